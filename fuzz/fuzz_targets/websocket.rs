//! `websocket::Reader` on arbitrary bytes, as a client could send them, cut into reads at
//! arbitrary points: it never panics, never holds more than a message's limit plus one read,
//! and what it parses does not depend on where the reads were cut (the same input in one read
//! gives the same messages, then the same error or the same wait).
#![no_main]

use gateway::websocket::{Incoming, ReadError, Reader};
use libfuzzer_sys::fuzz_target;

/// Small, so that the limit is reached often.
const MAX_MESSAGE: usize = 300;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, bytes)) = data.split_first() else {
        return;
    };
    let whole = read(bytes, bytes.len().max(1));
    let in_pieces = read(bytes, usize::from(cut % 17) + 1);
    assert_eq!(whole, in_pieces, "the reads' cuts changed what was parsed");
});

/// What `bytes` parse to when read `chunk` bytes at a time: the messages (as text), then how
/// the reading ended.
fn read(bytes: &[u8], chunk: usize) -> (Vec<String>, String) {
    let mut reader = Reader::new(&[], MAX_MESSAGE);
    let mut parsed = Vec::new();
    for piece in bytes.chunks(chunk) {
        reader.extend(piece);
        loop {
            match reader.parse() {
                Ok(Some(incoming)) => {
                    let closed = matches!(incoming, Incoming::Close(_));
                    parsed.push(describe(&incoming));
                    if closed {
                        return (parsed, "closed".into());
                    }
                }
                Ok(None) => break,
                Err(e) => return (parsed, error(&e)),
            }
        }
        // A declared length over the limit is refused before it is held; what is held is at
        // most one message and what one read brought beyond it.
        assert!(
            reader.held() <= 2 * (MAX_MESSAGE + 14 + chunk) + 64,
            "{} bytes held",
            reader.held()
        );
    }
    (parsed, "waiting".into())
}

fn describe(incoming: &Incoming) -> String {
    match incoming {
        Incoming::Text(text) => format!("text {text}"),
        Incoming::Binary(bytes) => format!("binary {bytes:?}"),
        Incoming::Ping(payload) => {
            assert!(payload.len() <= 125);
            format!("ping {payload:?}")
        }
        Incoming::Pong => "pong".into(),
        Incoming::Close(code) => format!("close {code:?}"),
    }
}

fn error(e: &ReadError) -> String {
    match e {
        ReadError::TooBig(limit) => {
            assert_eq!(*limit, MAX_MESSAGE);
            "too big".into()
        }
        ReadError::BadUtf8 => "bad utf-8".into(),
        ReadError::Protocol(what) => format!("protocol: {what}"),
        ReadError::Reset | ReadError::Io(_) => panic!("a reader knows no socket: {e}"),
    }
}
