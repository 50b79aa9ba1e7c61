//! Per-client bounds: token buckets for what one connection may ask for per second, the
//! per-address and per-user connection counts of this node, and which peers are trusted to
//! name the client's address (`X-Forwarded-For`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// A token bucket: `rate` tokens per second, holding at most `burst`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: f64, burst: f64) -> TokenBucket {
        TokenBucket {
            tokens: burst,
            rate,
            burst,
            last: Instant::now(),
        }
    }

    /// Spends `n` tokens, going into debt if need be; returns how long the caller should
    /// wait for the debt to be paid back (zero when there was enough).
    pub fn spend(&mut self, n: f64, now: Instant) -> std::time::Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst) - n;
        if self.tokens >= 0.0 {
            std::time::Duration::ZERO
        } else {
            std::time::Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }

    /// Tokens available now (refilled up to `now`, nothing taken).
    pub fn available(&mut self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.tokens
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What a limited request was (label `kind` of `gateway_rate_limited_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    /// Any incoming frame, WebSocket pings included.
    Frames,
    /// `sync` requests (each reads history from the broker).
    Sync,
    /// `login`/`logout` (each may broadcast to a room).
    Join,
    /// Direct messages sent.
    Dm,
}

impl Limited {
    pub const ALL: [Limited; 4] = [Limited::Frames, Limited::Sync, Limited::Join, Limited::Dm];

    pub fn as_str(self) -> &'static str {
        match self {
            Limited::Frames => "frames",
            Limited::Sync => "sync",
            Limited::Join => "join",
            Limited::Dm => "dm",
        }
    }
}

/// Counts of open connections by key (client address, user), with a cap per key. A slot is
/// released when its guard drops.
pub struct ConnectionCounts<K: std::hash::Hash + Eq + Clone + Send + 'static> {
    counts: Mutex<HashMap<K, u32>>,
    max: u32,
}

impl<K: std::hash::Hash + Eq + Clone + Send + 'static> ConnectionCounts<K> {
    pub fn new(max: u32) -> Arc<Self> {
        Arc::new(ConnectionCounts {
            counts: Mutex::new(HashMap::new()),
            max,
        })
    }

    /// A slot for `key`, or `None` when `key` already holds the maximum.
    pub fn acquire(self: &Arc<Self>, key: K) -> Option<CountGuard<K>> {
        let mut counts = self.counts.lock().expect("connection counts lock");
        let count = counts.entry(key.clone()).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(CountGuard {
            owner: self.clone(),
            key: Some(key),
        })
    }

    pub fn count(&self, key: &K) -> u32 {
        self.counts
            .lock()
            .expect("connection counts lock")
            .get(key)
            .copied()
            .unwrap_or(0)
    }
}

/// Holds one slot of a `ConnectionCounts` until dropped.
pub struct CountGuard<K: std::hash::Hash + Eq + Clone + Send + 'static> {
    owner: Arc<ConnectionCounts<K>>,
    key: Option<K>,
}

impl<K: std::hash::Hash + Eq + Clone + Send + 'static> Drop for CountGuard<K> {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else { return };
        let mut counts = self.owner.counts.lock().expect("connection counts lock");
        if let Some(count) = counts.get_mut(&key) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&key);
            }
        }
    }
}

/// Addresses a per-address bucket table holds at most.
const MAX_TRACKED_ADDRESSES: usize = 100_000;

/// A token bucket per client address, created full on the address's first use. Addresses
/// whose bucket is full again are forgotten when the table fills up; while it is full of
/// busy addresses (an attack from very many addresses), a new address goes untracked — and
/// so unlimited — rather than the memory growing.
pub struct AddressBuckets {
    buckets: Mutex<HashMap<IpAddr, TokenBucket>>,
    rate: f64,
    burst: f64,
}

impl AddressBuckets {
    pub fn new(rate: f64, burst: f64) -> AddressBuckets {
        AddressBuckets {
            buckets: Mutex::new(HashMap::new()),
            rate,
            burst,
        }
    }

    /// Takes one token of `ip`'s bucket; false when it had none (nothing taken).
    pub fn take(&self, ip: IpAddr) -> bool {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().expect("address buckets lock");
        if buckets.len() >= MAX_TRACKED_ADDRESSES && !buckets.contains_key(&ip) {
            let full = self.burst;
            buckets.retain(|_, b| b.available(now) < full);
            if buckets.len() >= MAX_TRACKED_ADDRESSES {
                return true;
            }
        }
        buckets
            .entry(ip)
            .or_insert_with(|| TokenBucket::new(self.rate, self.burst))
            .take(now)
    }

    /// Whether `ip` has a token now (nothing taken).
    pub fn has_token(&self, ip: IpAddr) -> bool {
        let mut buckets = self.buckets.lock().expect("address buckets lock");
        buckets
            .get_mut(&ip)
            .is_none_or(|b| b.available(Instant::now()) >= 1.0)
    }
}

/// Addresses whose connections were closed for abuse (rate limit, slow consumer): each such
/// close is a strike; an address out of strikes may not open WebSockets until one grows back.
/// Reconnecting at once would otherwise start every per-connection budget anew.
pub struct Strikes(AddressBuckets);

impl Strikes {
    pub fn new(strikes: u32, cooldown: std::time::Duration) -> Strikes {
        Strikes(AddressBuckets::new(
            1.0 / cooldown.as_secs_f64().max(0.001),
            strikes as f64,
        ))
    }

    /// Counts a close for abuse against `ip`.
    pub fn strike(&self, ip: IpAddr) {
        self.0.take(ip);
    }

    /// Whether `ip` may open a WebSocket now.
    pub fn allows(&self, ip: IpAddr) -> bool {
        self.0.has_token(ip)
    }
}

/// An IPv4 or IPv6 network (`10.0.0.0/8`, `::1/128`, or a bare address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl Network {
    pub fn parse(text: &str) -> Option<Network> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a.parse::<IpAddr>().ok()?, Some(p.parse::<u8>().ok()?)),
            None => (text.parse::<IpAddr>().ok()?, None),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        (prefix <= max).then_some(Network { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - self.prefix as u32).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - self.prefix as u32).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// IPv4-mapped IPv6 addresses count as their IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The peers allowed to tell the client's address in `X-Forwarded-For`.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<Network>);

impl TrustedProxies {
    pub fn parse(setting: Option<&str>) -> Result<TrustedProxies, String> {
        let mut networks = Vec::new();
        for item in setting
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            networks.push(Network::parse(item).ok_or_else(|| {
                format!("GATEWAY_TRUSTED_PROXIES entry {item:?} is not an address or network")
            })?);
        }
        Ok(TrustedProxies(networks))
    }

    /// Whether `ip` (a TCP peer) is a trusted proxy, whose connections carry other clients.
    pub fn is_proxy(&self, ip: IpAddr) -> bool {
        self.trusts(canonical(ip))
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|n| n.contains(ip))
    }

    /// The client's address: the peer's, unless the peer is a trusted proxy — then the
    /// right-most address of `X-Forwarded-For` that is not itself a trusted proxy (the
    /// left-most entries are whatever the client chose to send).
    pub fn client_ip(&self, peer: IpAddr, forwarded_for: Option<&str>) -> IpAddr {
        let peer = canonical(peer);
        if !self.trusts(peer) {
            return peer;
        }
        let Some(header) = forwarded_for else {
            return peer;
        };
        let mut client = peer;
        for hop in header.rsplit(',').map(str::trim) {
            match hop.parse::<IpAddr>() {
                Ok(ip) => {
                    client = canonical(ip);
                    if !self.trusts(client) {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        client
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10.0, 5.0);
        assert_eq!((0..8).filter(|_| bucket.take(start)).count(), 5);
        let later = start + Duration::from_millis(300);
        assert_eq!((0..8).filter(|_| bucket.take(later)).count(), 3);
        let much_later = later + Duration::from_secs(60);
        assert_eq!((0..8).filter(|_| bucket.take(much_later)).count(), 5);
    }

    #[test]
    fn spending_beyond_the_burst_says_how_long_to_wait() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(100.0, 100.0);
        assert_eq!(bucket.spend(50.0, start), Duration::ZERO);
        let wait = bucket.spend(100.0, start);
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        assert_eq!(
            bucket.spend(0.0, start + Duration::from_millis(500)),
            Duration::ZERO
        );
    }

    #[test]
    fn counts_cap_each_key_and_release_on_drop() {
        let counts = ConnectionCounts::new(2);
        let a1 = counts.acquire("a").unwrap();
        let _a2 = counts.acquire("a").unwrap();
        assert!(counts.acquire("a").is_none());
        assert!(counts.acquire("b").is_some());
        drop(a1);
        assert_eq!(counts.count(&"a"), 1);
        assert!(counts.acquire("a").is_some());
    }

    #[test]
    fn an_address_out_of_strikes_waits_for_one_to_grow_back() {
        let strikes = Strikes::new(2, Duration::from_millis(200));
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        assert!(strikes.allows(ip));
        strikes.strike(ip);
        assert!(strikes.allows(ip));
        strikes.strike(ip);
        assert!(!strikes.allows(ip));
        assert!(strikes.allows("10.1.2.4".parse().unwrap()));
        std::thread::sleep(Duration::from_millis(250));
        assert!(strikes.allows(ip));
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let none = TrustedProxies::parse(None).unwrap();
        assert_eq!(
            none.client_ip(ip("127.0.0.1"), Some("6.6.6.6")),
            ip("127.0.0.1")
        );
        let proxies = TrustedProxies::parse(Some("127.0.0.1, 10.0.0.0/8")).unwrap();
        assert_eq!(
            proxies.client_ip(ip("127.0.0.1"), Some("1.2.3.4")),
            ip("1.2.3.4")
        );
        // A client-sent entry on the left is not believed; the proxy chain is skipped.
        assert_eq!(
            proxies.client_ip(ip("127.0.0.1"), Some("6.6.6.6, 1.2.3.4, 10.1.2.3")),
            ip("1.2.3.4")
        );
        assert_eq!(
            proxies.client_ip(ip("192.0.2.1"), Some("1.2.3.4")),
            ip("192.0.2.1")
        );
        assert_eq!(
            proxies.client_ip(ip("::ffff:127.0.0.1"), Some("garbage")),
            ip("127.0.0.1")
        );
        assert!(TrustedProxies::parse(Some("not-an-ip")).is_err());
        assert!(Network::parse("10.0.0.0/33").is_none());
        assert!(Network::parse("::1/128").unwrap().contains(ip("::1")));
    }
}
