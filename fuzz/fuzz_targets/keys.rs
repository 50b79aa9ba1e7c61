//! The broker's key encoding and presence records on arbitrary input.
//!
//! The input is split at its first 0xFF byte (never part of UTF-8) into two strings `a` and `b`
//! (`b` empty without one), so seeds stay readable text:
//! - `decode_part(encode_part(s)) == s` for `a`, `b` and the whole input as text, and the
//!   encoded form never contains `{`, `}`, `:`, `%` outside its own escapes, or a newline (it
//!   keeps Redis Cluster hash tags and key separators intact);
//! - `decode_part` of arbitrary text never panics, and what it decodes encodes and decodes
//!   back to itself;
//! - `parse_presence_record(presence_record(a, b)) == Some((a, b))`, and
//!   `parse_presence_record` of arbitrary text never panics and, when it splits, splits a record
//!   that `presence_record` rebuilds into the same parts.
#![no_main]

use gateway::broker::keys::{decode_part, encode_part, parse_presence_record, presence_record};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (a, b) = match data.iter().position(|&b| b == 0xFF) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let (Ok(a), Ok(b)) = (std::str::from_utf8(a), std::str::from_utf8(b)) else {
        // Still exercise the decoders on whatever text there is.
        let lossy = String::from_utf8_lossy(data);
        decode_any(&lossy);
        presence_any(&lossy);
        return;
    };
    for s in [a, b] {
        round_trip(s);
        decode_any(s);
        presence_any(s);
    }

    let record = presence_record(a, b);
    assert!(record.starts_with(&format!("{}:", a.len())));
    assert_eq!(
        parse_presence_record(&record),
        Some((a, b)),
        "record {record:?}"
    );
});

fn round_trip(s: &str) {
    let encoded = encode_part(s);
    assert!(
        !encoded.contains(['{', '}', ':', '\n']),
        "{s:?} encoded as {encoded:?}"
    );
    assert!(
        encoded
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b'%')),
        "{s:?} encoded as {encoded:?}"
    );
    // Every '%' starts an escape of two upper-case hex digits.
    let bytes = encoded.as_bytes();
    for (i, _) in encoded.match_indices('%') {
        let hex = bytes.get(i + 1..i + 3).expect("an escape has two digits");
        assert!(
            hex.iter().all(|h| matches!(h, b'0'..=b'9' | b'A'..=b'F')),
            "{encoded:?}"
        );
    }
    assert_eq!(decode_part(&encoded).as_deref(), Some(s), "{encoded:?}");
}

fn decode_any(s: &str) {
    if let Some(decoded) = decode_part(s) {
        // Not necessarily `s` itself (decoding is lenient: "%41" and "A" both give "A"), but a
        // fixed point from then on.
        let encoded = encode_part(&decoded);
        assert_eq!(decode_part(&encoded).as_deref(), Some(decoded.as_str()));
    }
}

fn presence_any(s: &str) {
    if let Some((user, fragment)) = parse_presence_record(s) {
        assert_eq!(
            user.len() + fragment.len(),
            s.len() - s.find(':').unwrap() - 1
        );
        let rebuilt = presence_record(user, fragment);
        assert_eq!(parse_presence_record(&rebuilt), Some((user, fragment)));
    }
}
