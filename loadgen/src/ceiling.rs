//! The machine's ceiling: a minimal fan-out server with no WebSocket library, no JSON and no
//! Redis. It answers the WebSocket upgrade by hand (so that nginx proxies it exactly like a
//! gateway), waits for `members` connections, then writes pre-built text frames of the same
//! size as the gateway's message frames to every connection, from plain threads with blocking
//! sockets: one `write` per delivery (`--batch 1`), or `--batch N` messages per write (what a
//! server that drains its per-connection queue in one write does when it is behind). The clients are the generator's own (the `ceiling`
//! scenario), so the client side costs the same as in the gateway runs.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::conn::encode_content;
use crate::stats::now_us;

#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    /// Address to listen on (loopback).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
    /// Start broadcasting once this many connections are in.
    #[arg(long, default_value_t = 1000)]
    pub members: usize,
    /// Payload bytes of each frame (use the gateway's measured message frame size).
    #[arg(long, default_value_t = 260)]
    pub frame_bytes: usize,
    /// Messages per second, each to every member; 0 = as fast as the sockets take them.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Seconds of broadcasting (at most 600).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Writer threads (each owns a share of the sockets).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Give up waiting for members after this many seconds and start with those connected.
    #[arg(long, default_value_t = 120.0)]
    pub max_wait: f64,
    /// Messages per write: with `--rate 0` each round makes this many messages and writes them
    /// to every socket in one `write` (1 = one write per delivery). With a rate, the messages
    /// that fell due since the last round go out together (at most this many).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
}

/// Reads the HTTP upgrade request and answers 101 with the accept key.
fn handshake(stream: &mut TcpStream) -> Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            bail!("closed during handshake");
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > 16 * 1024 {
            bail!("request head too large");
        }
    }
    let head = String::from_utf8_lossy(&buf);
    let key = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("sec-websocket-key")
                .then(|| v.trim().to_string())
        })
        .context("no Sec-WebSocket-Key")?;
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        derive_accept_key(key.as_bytes())
    );
    stream.write_all(resp.as_bytes())?;
    stream.set_read_timeout(None)?;
    Ok(())
}

/// One server→client text frame whose JSON payload is `frame_bytes` long (the gateway's shape).
fn frame(thread: u64, seq: u64, frame_bytes: usize, members: usize, out: &mut Vec<u8>) {
    let t = now_us();
    let ms = t / 1000;
    let head = format!(
        r#"{{"event":"message","id":"{ms}-{seq}","roomId":"big","roomName":"big","userId":"u{thread}","userName":"user {thread}","content":""#
    );
    let tail = format!(r#"","ts":{ms},"num":{members},"clientMsgId":"c-{thread}-{seq}"}}"#);
    let csize = frame_bytes.saturating_sub(head.len() + tail.len()).max(24);
    let content = encode_content(t, thread, seq, csize);
    let len = head.len() + content.len() + tail.len();
    out.clear();
    out.push(0x81);
    if len < 126 {
        out.push(len as u8);
    } else {
        out.push(126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    }
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(content.as_bytes());
    out.extend_from_slice(tail.as_bytes());
}

pub fn serve(args: ServerArgs) -> Result<()> {
    let duration = args.duration.clamp(0.1, 600.0);
    let threads = args.threads.max(1);
    let listener = TcpListener::bind(&args.listen).context("bind")?;
    let addr = listener.local_addr()?;
    if !addr.ip().is_loopback() {
        bail!("the ceiling server listens on loopback only");
    }
    println!("listening {addr}");
    let _ = std::io::stdout().flush();
    listener.set_nonblocking(true)?;
    let mut shards: Vec<Vec<TcpStream>> = (0..threads).map(|_| Vec::new()).collect();
    let mut count = 0usize;
    let wait_end = Instant::now() + Duration::from_secs_f64(args.max_wait);
    while count < args.members && Instant::now() < wait_end {
        match listener.accept() {
            Ok((mut s, _)) => {
                s.set_nonblocking(false)?;
                s.set_nodelay(true)?;
                if handshake(&mut s).is_ok() {
                    shards[count % threads].push(s);
                    count += 1;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e.into()),
        }
    }
    drop(listener);
    eprintln!("ceiling-server: {count} members; broadcasting for {duration} s");
    let barrier = Arc::new(Barrier::new(threads));
    // Each thread writes every message to its share of the sockets: with a rate, every
    // member receives `rate` messages per second, as in the gateway runs.
    let per_thread_rate = args.rate;
    let handles: Vec<_> = shards
        .into_iter()
        .enumerate()
        .map(|(t, socks)| {
            let barrier = barrier.clone();
            let frame_bytes = args.frame_bytes;
            let batch = args.batch.clamp(1, 1024);
            std::thread::spawn(move || {
                barrier.wait();
                let start = Instant::now();
                let end = start + Duration::from_secs_f64(duration);
                let mut socks: Vec<Option<TcpStream>> = socks.into_iter().map(Some).collect();
                let mut one = Vec::with_capacity(frame_bytes + 16);
                let mut buf = Vec::with_capacity((frame_bytes + 16) * batch);
                let mut seq = 0u64;
                let mut deliveries = 0u64;
                while Instant::now() < end {
                    let mut k = batch;
                    if per_thread_rate > 0.0 {
                        let next = start + Duration::from_secs_f64(seq as f64 / per_thread_rate);
                        let now = Instant::now();
                        if next > now {
                            std::thread::sleep(next - now);
                        }
                        let due = (start.elapsed().as_secs_f64() * per_thread_rate) as u64 + 1;
                        k = (due.saturating_sub(seq) as usize).clamp(1, batch);
                    }
                    buf.clear();
                    for _ in 0..k {
                        seq += 1;
                        frame(t as u64, seq, frame_bytes, count, &mut one);
                        buf.extend_from_slice(&one);
                    }
                    for slot in socks.iter_mut() {
                        if let Some(s) = slot {
                            if s.write_all(&buf).is_err() {
                                *slot = None;
                            } else {
                                deliveries += k as u64;
                            }
                        }
                    }
                }
                for s in socks.into_iter().flatten() {
                    let _ = s.shutdown(Shutdown::Both);
                }
                (seq, deliveries)
            })
        })
        .collect();
    let mut msgs = 0;
    let mut deliveries = 0;
    for h in handles {
        let (m, d) = h.join().unwrap_or((0, 0));
        msgs += m;
        deliveries += d;
    }
    println!(
        "{}",
        serde_json::json!({"members": count, "messages": msgs, "deliveries": deliveries,
            "deliveries_per_s": deliveries as f64 / duration})
    );
    Ok(())
}
