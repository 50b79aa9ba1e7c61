//! A small TCP proxy of our own (tokio) that injects faults on one link: between a node and
//! Redis, or between a client and a node. The kernel here has no `tc netem`, so delay and loss
//! are made here, in user space.
//!
//! Faults, all switchable while traffic flows:
//! - **delay**: every chunk read is forwarded `delay` later (order kept, both directions);
//! - **stall**: nothing is forwarded (bytes are held, connections stay open) until unstalled —
//!   what a black-holed path looks like to both ends;
//! - **cut**: every open connection is closed at once (both sides see the close);
//! - **refuse**: new connections are closed as soon as they are accepted;
//! - **loss**: TCP itself never loses bytes: a lost segment is retransmitted, so to the
//!   application a loss is a delay of at least one retransmission timeout (200 ms and up on
//!   Linux), and heavy loss ends in a timeout or a reset. "Loss" here is exactly that: each
//!   chunk forwarded is, with probability `stall_chance`, held for a random time up to
//!   `max_stall` first, and with probability `cut_chance` its connection is cut instead.
//!
//! The proxy listens on an address of the caller's choosing (in the root namespace, so on a
//! lab's back LAN for nodes to reach, or on loopback for clients) and stops when dropped.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// A deterministic pseudo-random generator (splitmix64): faults and schedules replay from a
/// seed. Not for anything that needs real randomness.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        let unit = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        unit < p
    }

    /// A duration in `lo..=hi`.
    pub fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = hi.saturating_sub(lo).as_millis() as u64;
        lo + Duration::from_millis(self.below(span + 1))
    }
}

/// Loss-like behaviour (see the module docs).
#[derive(Clone, Copy, Debug)]
pub struct Loss {
    pub stall_chance: f64,
    pub max_stall: Duration,
    pub cut_chance: f64,
}

struct State {
    upstream: SocketAddr,
    delay_ms: AtomicU64,
    refuse: AtomicBool,
    stalled: watch::Sender<bool>,
    /// Bumped by `cut`: every connection started under an older generation closes.
    generation: watch::Sender<u64>,
    loss: Mutex<Option<Loss>>,
    rng: Mutex<Rng>,
    open: AtomicUsize,
    accepted: AtomicU64,
}

/// A fault-injecting TCP proxy (see the module docs).
pub struct FaultProxy {
    pub listen: SocketAddr,
    state: Arc<State>,
    accept_task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on `listen_ip` (a free port) and forwards every connection to `upstream`.
    /// `seed` drives the loss decisions.
    pub async fn start(listen_ip: IpAddr, upstream: SocketAddr, seed: u64) -> Result<FaultProxy> {
        let listener = TcpListener::bind((listen_ip, 0))
            .await
            .with_context(|| format!("fault proxy binding {listen_ip}"))?;
        let listen = listener.local_addr()?;
        let state = Arc::new(State {
            upstream,
            delay_ms: AtomicU64::new(0),
            refuse: AtomicBool::new(false),
            stalled: watch::channel(false).0,
            generation: watch::channel(0).0,
            loss: Mutex::new(None),
            rng: Mutex::new(Rng::new(seed)),
            open: AtomicUsize::new(0),
            accepted: AtomicU64::new(0),
        });
        let accept_task = tokio::spawn(accept_loop(listener, state.clone()));
        Ok(FaultProxy {
            listen,
            state,
            accept_task,
        })
    }

    /// Forwards every chunk `delay` after it was read (0: no delay).
    pub fn set_delay(&self, delay: Duration) {
        self.state
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    /// Stops (true) or resumes (false) forwarding on every connection.
    pub fn set_stalled(&self, stalled: bool) {
        self.state.stalled.send_replace(stalled);
    }

    /// New connections are closed at once while `refuse` is set.
    pub fn set_refuse(&self, refuse: bool) {
        self.state.refuse.store(refuse, Ordering::Relaxed);
    }

    /// Loss-like behaviour on every chunk, or none.
    pub fn set_loss(&self, loss: Option<Loss>) {
        *self.state.loss.lock().expect("loss lock") = loss;
    }

    /// Closes every open connection (new ones are accepted as usual).
    pub fn cut(&self) {
        self.state.generation.send_modify(|g| *g += 1);
    }

    /// Back to a transparent proxy (open connections stay).
    pub fn heal(&self) {
        self.set_delay(Duration::ZERO);
        self.set_stalled(false);
        self.set_refuse(false);
        self.set_loss(None);
    }

    /// Connections open through the proxy now.
    pub fn open_connections(&self) -> usize {
        self.state.open.load(Ordering::Relaxed)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept_task.abort();
        self.cut();
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        state.accepted.fetch_add(1, Ordering::Relaxed);
        if state.refuse.load(Ordering::Relaxed) {
            drop(client);
            continue;
        }
        tokio::spawn(serve(client, state.clone()));
    }
}

/// Decrements the open-connection count when a connection ends, however it ends.
struct OpenGuard(Arc<State>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve(client: TcpStream, state: Arc<State>) {
    let mut generation = state.generation.subscribe();
    let started_at = *generation.borrow_and_update();
    let upstream = match tokio::time::timeout(
        Duration::from_secs(3),
        TcpStream::connect(state.upstream),
    )
    .await
    {
        Ok(Ok(stream)) => stream,
        _ => return, // the client sees its connection closed, as with a refused upstream
    };
    state.open.fetch_add(1, Ordering::Relaxed);
    let _guard = OpenGuard(state.clone());
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (client_rd, client_wr) = client.into_split();
    let (up_rd, up_wr) = upstream.into_split();
    let cut = async {
        loop {
            if *generation.borrow_and_update() != started_at {
                return;
            }
            if generation.changed().await.is_err() {
                return;
            }
        }
    };
    // The first direction to end (EOF, error, a loss cut) or a cut ends the connection: both
    // sockets are dropped, so both peers see it closed.
    tokio::select! {
        _ = pump(client_rd, up_wr, state.clone()) => {}
        _ = pump(up_rd, client_wr, state.clone()) => {}
        _ = cut => {}
    }
}

/// Copies one direction: a reader queues chunks with the time they may leave; a writer sends
/// them then, unless stalled, after any loss-like hold. Returns when the reader hit EOF and
/// the queue is drained, on an error, or when a loss decision cuts the connection.
async fn pump(mut rd: OwnedReadHalf, mut wr: OwnedWriteHalf, state: Arc<State>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = {
        let state = state.clone();
        async move {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let delay = Duration::from_millis(state.delay_ms.load(Ordering::Relaxed));
                        if tx
                            .send((Instant::now() + delay, buf[..n].to_vec()))
                            .is_err()
                        {
                            break;
                        }
                    }
                }
            }
            // Closing the queue lets the writer drain what is left and end.
            drop(tx);
            std::future::pending::<()>().await
        }
    };
    let writer = async move {
        let mut stalled = state.stalled.subscribe();
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if stalled.wait_for(|s| !*s).await.is_err() {
                return;
            }
            let loss = *state.loss.lock().expect("loss lock");
            if let Some(loss) = loss {
                let (hold, cut) = {
                    let mut rng = state.rng.lock().expect("rng lock");
                    let hold = rng
                        .chance(loss.stall_chance)
                        .then(|| rng.between(Duration::ZERO, loss.max_stall));
                    (hold, rng.chance(loss.cut_chance))
                };
                if cut {
                    return;
                }
                if let Some(hold) = hold {
                    tokio::time::sleep(hold).await;
                }
            }
            if wr.write_all(&chunk).await.is_err() {
                return;
            }
        }
    };
    // The writer ends after the reader (the queue closes when the reader drops its sender)
    // or on its own (write error, loss cut); either way this direction is over.
    tokio::select! {
        _ = reader => {}
        _ = writer => {}
    }
}
