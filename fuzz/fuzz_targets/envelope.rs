//! `Envelope::parse` on arbitrary bytes (what another node, or anyone able to publish on the
//! broker, could put on a channel): it never panics, and an accepted envelope is what its
//! header says. Re-encoding its header with `EnvelopeHeader::split_at_id` (as the publishing
//! node does) and the id gives a payload that parses back to the same envelope, and that
//! payload is canonical: encoding it again gives the same bytes.
#![no_main]

use bytes::Bytes;
use gateway::broker::{Envelope, EnvelopeHeader, Kind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let payload = Bytes::copy_from_slice(data);
    let Some(env) = Envelope::parse(&payload) else {
        return;
    };
    // The frame is everything after the first newline, byte for byte.
    let newline = data
        .iter()
        .position(|&b| b == b'\n')
        .expect("a header line");
    assert_eq!(&env.frame[..], &data[newline + 1..]);
    // Fields the header's separators delimit cannot contain them.
    assert!(!env.origin.contains(['|', '\n']), "origin {:?}", env.origin);
    assert!(
        !env.traceparent.contains('\n'),
        "traceparent {:?}",
        env.traceparent
    );

    let encoded = encode(&env);
    let again = Envelope::parse(&encoded)
        .unwrap_or_else(|| panic!("re-encoded envelope {encoded:?} refused"));
    assert_eq!(again, env, "re-encoded as {encoded:?}");
    assert_eq!(encode(&again), encoded, "encoding is not canonical");
});

/// The payload a node publishing this envelope writes.
fn encode(env: &Envelope) -> Bytes {
    let header = EnvelopeHeader {
        kind: env.kind,
        published_us: env.published_us,
        origin: env.origin.clone(),
        sender_conn: env.sender_conn,
        traceparent: env.traceparent.clone(),
    };
    let (before, after) = header.split_at_id();
    if env.id.is_none() && env.kind == Kind::Presence {
        assert_eq!(header.without_id(), format!("{before}{after}"));
    }
    let id = env.id.map(|id| id.to_string()).unwrap_or_default();
    let mut out = format!("{before}{id}{after}").into_bytes();
    out.extend_from_slice(&env.frame);
    Bytes::from(out)
}
