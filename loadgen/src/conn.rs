//! Targets (with the loopback safety check), connecting with a chosen source address (the
//! upgrade is `e2e::wire`'s), the message `content` codec and per-sender sequence tracking.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use e2e::wire;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;

pub type Ws = WebSocketStream<TcpStream>;

/// One `ws://host:port/path` target, resolved.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: String,
    pub addr: SocketAddr,
}

/// Parses and checks the targets: `ws://` only; the host must be a loopback address (or
/// `localhost`) unless it is named by `--allow-host`.
pub fn parse_targets(urls: &[String], allow: &[String]) -> Result<Vec<Target>> {
    let mut out = Vec::new();
    for url in urls.iter().flat_map(|u| u.split(',')).map(str::trim) {
        if url.is_empty() {
            continue;
        }
        let rest = url
            .strip_prefix("ws://")
            .ok_or_else(|| anyhow!("{url}: only ws:// URLs are supported"))?;
        let hostport = rest.split('/').next().unwrap_or(rest);
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h.trim_start_matches('[').trim_end_matches(']'),
                p.parse::<u16>()
                    .with_context(|| format!("{url}: bad port"))?,
            ),
            _ => (hostport, 80),
        };
        let allowed = allow.iter().any(|a| a == host);
        let addrs: Vec<SocketAddr> = (host, port)
            .to_socket_addrs()
            .with_context(|| format!("{url}: cannot resolve {host}"))?
            .collect();
        let addr = addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or(addrs.first())
            .copied()
            .ok_or_else(|| anyhow!("{url}: {host} has no address"))?;
        if !addr.ip().is_loopback() && !allowed {
            bail!(
                "{url}: {host} is not a loopback address; name it with --allow-host {host} \
                 if you really mean to load it"
            );
        }
        out.push(Target {
            url: url.to_string(),
            addr,
        });
    }
    if out.is_empty() {
        bail!("no --url given");
    }
    Ok(out)
}

/// Source addresses 127.0.0.(2 + first) .. for `count` addresses (IPv4 loopback targets only).
pub fn source_addrs(first: usize, count: usize) -> Vec<IpAddr> {
    (0..count)
        .map(|i| {
            let n = 2 + first + i;
            IpAddr::V4(Ipv4Addr::new(
                127,
                (n / 65536 % 256) as u8,
                (n / 256 % 256) as u8,
                (n % 256) as u8,
            ))
        })
        .collect()
}

/// Opens a TCP connection (from `source` when the target is IPv4 loopback) and does the
/// WebSocket handshake.
pub async fn connect(target: &Target, source: Option<IpAddr>, timeout: Duration) -> Result<Ws> {
    let fut = async {
        let socket = if target.addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let (Some(src), true) = (
            source,
            target.addr.ip().is_loopback() && target.addr.is_ipv4(),
        ) {
            // Pick the port at connect time (per 4-tuple), not at bind time: a port bound
            // with port 0 is taken from the machine's shared ephemeral range for every
            // destination, which nginx's own upstream connections would then run out of.
            nix::sys::socket::setsockopt(
                &socket,
                nix::sys::socket::sockopt::IpBindAddressNoPort,
                &true,
            )?;
            socket.bind(SocketAddr::new(src, 0))?;
        }
        let stream = socket.connect(target.addr).await?;
        stream.set_nodelay(true)?;
        wire::connect_over(&target.url, stream, &wire::Opts::default().small_buffers()).await
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| anyhow!("connect timeout"))?
}

/// A chat `content`: `t=<send µs>;s=<sender>;q=<seq>;` padded with `x` to `size` bytes.
pub fn encode_content(t_us: u64, sender: u64, seq: u64, size: usize) -> String {
    let mut s = format!("t={t_us};s={sender};q={seq};");
    while s.len() < size {
        s.push('x');
    }
    s
}

/// Parses what `encode_content` wrote: (send µs, sender, seq).
pub fn parse_content(content: &str) -> Option<(u64, u64, u64)> {
    let mut t = None;
    let mut s = None;
    let mut q = None;
    for part in content.split(';').take(3) {
        let (k, v) = part.split_once('=')?;
        let v: u64 = v.parse().ok()?;
        match k {
            "t" => t = Some(v),
            "s" => s = Some(v),
            "q" => q = Some(v),
            _ => return None,
        }
    }
    Some((t?, s?, q?))
}

/// What a received sequence number was.
#[derive(Debug, PartialEq, Eq)]
pub enum SeqKind {
    New,
    OutOfOrder,
    Duplicate,
}

/// Sequence numbers (from 1) received from one sender: the highest, plus the gaps below it.
#[derive(Default, Debug)]
pub struct SeqTrack {
    max: u64,
    /// Missing ranges below `max`, inclusive.
    gaps: Vec<(u64, u64)>,
}

impl SeqTrack {
    pub fn record(&mut self, q: u64) -> SeqKind {
        if q == self.max + 1 {
            self.max = q;
            return SeqKind::New;
        }
        if q > self.max {
            self.gaps.push((self.max + 1, q - 1));
            self.max = q;
            return SeqKind::New;
        }
        if let Some(i) = self.gaps.iter().position(|&(lo, hi)| lo <= q && q <= hi) {
            let (lo, hi) = self.gaps[i];
            self.gaps.remove(i);
            if lo < q {
                self.gaps.push((lo, q - 1));
            }
            if q < hi {
                self.gaps.push((q + 1, hi));
            }
            return SeqKind::OutOfOrder;
        }
        SeqKind::Duplicate
    }

    #[cfg(test)]
    pub fn max(&self) -> u64 {
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_roundtrip() {
        let c = encode_content(1_732_550_000_123_456, 7, 42, 100);
        assert_eq!(c.len(), 100);
        assert_eq!(parse_content(&c), Some((1_732_550_000_123_456, 7, 42)));
        assert_eq!(parse_content("hello"), None);
    }

    #[test]
    fn seq_tracking() {
        let mut t = SeqTrack::default();
        assert_eq!(t.record(1), SeqKind::New);
        assert_eq!(t.record(2), SeqKind::New);
        assert_eq!(t.record(5), SeqKind::New);
        assert_eq!(t.record(2), SeqKind::Duplicate);
        assert_eq!(t.record(4), SeqKind::OutOfOrder);
        assert_eq!(t.record(4), SeqKind::Duplicate);
        assert_eq!(t.record(3), SeqKind::OutOfOrder);
        assert_eq!(t.record(6), SeqKind::New);
        assert_eq!(t.max(), 6);
    }

    #[test]
    fn refuses_non_loopback() {
        assert!(parse_targets(&["ws://127.0.0.1:9000/ws".into()], &[]).is_ok());
        assert!(parse_targets(&["ws://localhost:9000/ws,ws://127.0.0.3:1/".into()], &[]).is_ok());
        assert!(parse_targets(&["http://127.0.0.1:9000/".into()], &[]).is_err());
        assert!(parse_targets(&["ws://10.1.2.3:9000/ws".into()], &[]).is_err());
        assert!(parse_targets(&["ws://10.1.2.3:9000/ws".into()], &["10.1.2.3".into()]).is_ok());
    }
}
