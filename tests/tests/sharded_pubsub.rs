//! The gateway's own sharded pub/sub subscriber (`gateway::broker::sharded`) against a real local
//! Redis Cluster (3 masters + 3 replicas, node timeout 2000 ms): channels on every shard receive
//! each message once; a SIGKILLed master's channels come back after its replica's promotion
//! (reported as `Resubscribed`) while the other shards keep receiving; a manual `CLUSTER
//! FAILOVER` moves a shard's channels to the new master; a channel unsubscribed during a rebuild
//! does not come back, and unsubscribing stops delivery. Recovery times are printed.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use e2e::redis_cluster::{command, ClusterOpts, RedisCluster};
use e2e::wait_for;
use gateway::broker::sharded::{self, Resubscribed, ShardedSubscriber};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Channels per shard.
const PER_SHARD: usize = 4;
const PUBLISH_EVERY: Duration = Duration::from_millis(20);
/// A shard not failing over may pause no longer than this (its failover takes seconds).
const UNDISTURBED_GAP: Duration = Duration::from_secs(2);
const WAIT: Duration = Duration::from_secs(20);

/// What the subscriber delivered: per channel, each payload and when it arrived.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Arrivals>>);

/// Per channel: each payload and when it arrived.
type Arrivals = HashMap<String, Vec<(String, Instant)>>;

impl Received {
    fn collect<B: AsRef<[u8]> + Send + 'static>(
        mut inbound: mpsc::UnboundedReceiver<(String, B)>,
    ) -> Received {
        let received = Received::default();
        let sink = received.clone();
        tokio::spawn(async move {
            while let Some((channel, payload)) = inbound.recv().await {
                let payload = String::from_utf8_lossy(payload.as_ref()).into_owned();
                let mut map = sink.0.lock().unwrap();
                map.entry(channel)
                    .or_default()
                    .push((payload, Instant::now()));
            }
        });
        received
    }

    fn of(&self, channel: &str) -> Vec<(String, Instant)> {
        self.0
            .lock()
            .unwrap()
            .get(channel)
            .cloned()
            .unwrap_or_default()
    }

    fn count_of(&self, channel: &str, payload: &str) -> usize {
        self.of(channel)
            .iter()
            .filter(|(p, _)| p == payload)
            .count()
    }

    fn since(&self, channel: &str, from: Instant) -> usize {
        self.of(channel)
            .iter()
            .filter(|(_, at)| *at >= from)
            .count()
    }

    /// The longest stretch without a message on `channel` between `from` and `to`, and when
    /// it ended.
    fn longest_gap(&self, channel: &str, from: Instant, to: Instant) -> (Duration, Instant) {
        let mut last = from;
        let mut longest = (Duration::ZERO, from);
        for (_, at) in self.of(channel) {
            if at <= from || at > to {
                continue;
            }
            if at - last > longest.0 {
                longest = (at - last, at);
            }
            last = at;
        }
        if to - last > longest.0 {
            longest = (to - last, to);
        }
        longest
    }

    /// Payloads of `channel` delivered more than once.
    fn duplicates(&self, channel: &str) -> usize {
        let mut seen = std::collections::HashSet::new();
        self.of(channel)
            .into_iter()
            .filter(|(p, _)| !seen.insert(p.clone()))
            .count()
    }
}

/// `SPUBLISH` as a cluster client does it: to the node that served the channel last, following
/// MOVED, trying the other nodes when that one is gone.
struct Publisher {
    ports: Vec<u16>,
    current: u16,
    conns: HashMap<u16, redis::aio::MultiplexedConnection>,
}

impl Publisher {
    fn new(ports: Vec<u16>) -> Publisher {
        Publisher {
            current: ports[0],
            ports,
            conns: HashMap::new(),
        }
    }

    async fn try_on(&mut self, port: u16, channel: &str, payload: &str) -> Result<(), Retry> {
        let short = Duration::from_millis(300);
        let con = match self.conns.entry(port) {
            Entry::Occupied(con) => con.into_mut(),
            Entry::Vacant(vacant) => {
                let url = format!("redis://127.0.0.1:{port}/");
                let client = redis::Client::open(url).map_err(|_| Retry::Elsewhere)?;
                let connect = client.get_multiplexed_async_connection();
                let con = tokio::time::timeout(short, connect)
                    .await
                    .map_err(|_| Retry::Elsewhere)?
                    .map_err(|_| Retry::Elsewhere)?;
                vacant.insert(con)
            }
        };
        let mut cmd = redis::cmd("SPUBLISH");
        cmd.arg(channel).arg(payload);
        let result = tokio::time::timeout(short, cmd.query_async::<i64>(con)).await;
        if let Ok(Err(e)) = &result {
            if let Some(port) = e
                .redirect_node()
                .and_then(|(addr, _)| addr.rsplit(':').next()?.parse().ok())
            {
                return Err(Retry::Moved(port));
            }
        }
        if matches!(result, Ok(Ok(_))) {
            return Ok(());
        }
        // Sent, but no answer: it may have been published. Not retried (the test counts
        // duplicates, so the publisher must not make any).
        self.conns.remove(&port);
        Err(Retry::Unknown)
    }

    /// Publishes once at most; false if it failed or may have failed.
    async fn publish(&mut self, channel: &str, payload: &str) -> bool {
        let mut port = self.current;
        for attempt in 0..self.ports.len() + 2 {
            match self.try_on(port, channel, payload).await {
                Ok(()) => {
                    self.current = port;
                    return true;
                }
                Err(Retry::Moved(moved)) => port = moved,
                Err(Retry::Elsewhere) => port = self.ports[attempt % self.ports.len()],
                Err(Retry::Unknown) => {
                    self.current = self.ports[attempt % self.ports.len()];
                    return false;
                }
            }
        }
        false
    }
}

/// Whether, and where, a failed `SPUBLISH` may be tried again.
enum Retry {
    /// Refused with MOVED: not published.
    Moved(u16),
    /// Never sent (no connection): try another node.
    Elsewhere,
    /// The outcome is unknown.
    Unknown,
}

/// Publishes `channel:<n>` to `channel` every `PUBLISH_EVERY` until `stop`.
fn publish_forever(channel: String, ports: Vec<u16>, stop: CancellationToken) {
    tokio::spawn(async move {
        let mut publisher = Publisher::new(ports);
        let mut tick = tokio::time::interval(PUBLISH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for n in 0u64.. {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            publisher.publish(&channel, &format!("{channel}:{n}")).await;
        }
    });
}

/// `Resubscribed` reports, as they come.
#[derive(Clone, Default)]
struct Events(Arc<Mutex<Vec<(Resubscribed, Instant)>>>);

impl Events {
    fn collect(mut events: mpsc::UnboundedReceiver<Resubscribed>) -> Events {
        let collected = Events::default();
        let sink = collected.clone();
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                sink.0.lock().unwrap().push((event, Instant::now()));
            }
        });
        collected
    }

    /// Waits for the report that lists a channel of `channels`; checks it lists exactly them.
    async fn wait_for_shard(&self, channels: &[String]) -> Result<(Resubscribed, Instant)> {
        let found = wait_for("a Resubscribed report of the shard", WAIT, || async {
            let events = self.0.lock().unwrap();
            events
                .iter()
                .find(|(e, _)| e.channels.iter().any(|c| channels.contains(c)))
                .cloned()
        })
        .await?;
        let mut listed = found.0.channels.clone();
        listed.sort();
        let mut expected = channels.to_vec();
        expected.sort();
        ensure!(
            listed == expected,
            "resubscribed {listed:?}, expected {expected:?}"
        );
        Ok(found)
    }
}

/// Channels whose hash tags land on each master: `PER_SHARD` per master, by master port.
async fn channels_by_master(cluster: &mut RedisCluster) -> Result<Vec<(u16, Vec<String>)>> {
    let mut shards: Vec<(u16, Vec<String>)> = Vec::new();
    for i in 0.. {
        if shards.len() == 3 && shards.iter().all(|(_, c)| c.len() == PER_SHARD) {
            break;
        }
        ensure!(i < 1000, "no channels found for every master");
        let channel = format!("gw:{{r:t{i}}}:pub");
        let master = cluster.master_of(&channel).await?;
        let slot = command(master, &["CLUSTER", "KEYSLOT", &channel]).await?;
        ensure!(
            slot == sharded::slot_of(&channel).to_string(),
            "slot of {channel}"
        );
        match shards.iter_mut().find(|(port, _)| *port == master) {
            Some((_, channels)) if channels.len() < PER_SHARD => channels.push(channel),
            Some(_) => {}
            None => shards.push((master, vec![channel])),
        }
    }
    Ok(shards)
}

/// The port of the replica of the master on `master` (from `CLUSTER NODES`).
async fn replica_of(master: u16) -> Result<u16> {
    let nodes = command(master, &["CLUSTER", "NODES"]).await?;
    let port_of =
        |addr: &str| -> Option<u16> { addr.split('@').next()?.rsplit(':').next()?.parse().ok() };
    let id = nodes
        .lines()
        .find(|l| l.split_whitespace().nth(1).and_then(port_of) == Some(master))
        .and_then(|l| l.split_whitespace().next())
        .context("the master is not in CLUSTER NODES")?;
    nodes
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 3 && f[2].contains("slave") && f[3] == id)
        .and_then(|f| port_of(f[1]))
        .context("the master has no replica")
}

/// Waits until each of `channels` received `n` messages since `from`.
async fn wait_flowing(
    received: &Received,
    channels: &[String],
    from: Instant,
    n: usize,
) -> Result<()> {
    for channel in channels {
        wait_for(&format!("{n} messages on {channel}"), WAIT, || async {
            (received.since(channel, from) >= n).then_some(())
        })
        .await?;
    }
    Ok(())
}

/// The longest pause of any of `channels` between `from` and `to`.
fn longest_pause(received: &Received, channels: &[String], from: Instant, to: Instant) -> Duration {
    channels
        .iter()
        .map(|c| received.longest_gap(c, from, to).0)
        .max()
        .unwrap_or_default()
}

struct Setup {
    cluster: RedisCluster,
    shards: Vec<(u16, Vec<String>)>,
    subscriber: Arc<ShardedSubscriber>,
    received: Received,
    events: Events,
    ports: Vec<u16>,
    stop: CancellationToken,
}

async fn setup() -> Result<Setup> {
    // The subscriber's own account of its rebuilds (warn/info lines), beside the test's.
    std::mem::forget(gateway::telemetry::init(false, "sharded-pubsub-test"));
    let started = Instant::now();
    let mut cluster = RedisCluster::start(ClusterOpts::default()).await?;
    let shards = channels_by_master(&mut cluster).await?;
    println!(
        "cluster up in {:?}; channels by master: {shards:?}",
        started.elapsed()
    );
    let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.port).collect();
    let (inbound, inbound_rx) = mpsc::unbounded_channel();
    let (events, events_rx) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let seeds = cluster.urls().split(',').map(str::to_owned).collect();
    let subscriber = ShardedSubscriber::start(seeds, inbound, events, stop.clone());
    let subscribing = Instant::now();
    let all: Vec<String> = shards.iter().flat_map(|(_, c)| c.clone()).collect();
    let results = futures_util::future::join_all(all.iter().map(|c| subscriber.subscribe(c))).await;
    for (channel, result) in all.iter().zip(results) {
        result.with_context(|| format!("subscribing {channel}"))?;
    }
    println!(
        "{} channels subscribed in {:?}",
        all.len(),
        subscribing.elapsed()
    );
    Ok(Setup {
        cluster,
        shards,
        subscriber,
        received: Received::collect(inbound_rx),
        events: Events::collect(events_rx),
        ports,
        stop,
    })
}

#[tokio::test]
async fn sharded_subscriptions_survive_failovers_and_follow_unsubscribes() -> Result<()> {
    let mut s = setup().await?;
    let all: Vec<String> = s.shards.iter().flat_map(|(_, c)| c.clone()).collect();

    // Every channel, on every shard, receives a message once.
    let mut publisher = Publisher::new(s.ports.clone());
    for marker in ["hello", "again"] {
        for channel in &all {
            ensure!(
                publisher.publish(channel, marker).await,
                "SPUBLISH {channel}"
            );
        }
        for channel in &all {
            wait_for(&format!("{marker} on {channel}"), WAIT, || async {
                (s.received.count_of(channel, marker) > 0).then_some(())
            })
            .await?;
        }
    }
    for channel in &all {
        ensure!(
            s.received.count_of(channel, "hello") == 1,
            "{channel}: hello not once"
        );
    }

    for channel in &all {
        publish_forever(channel.clone(), s.ports.clone(), s.stop.clone());
    }
    wait_flowing(&s.received, &all, Instant::now(), 3).await?;

    sigkill_a_master(&mut s).await?;
    manual_failover(&mut s).await?;
    unsubscribing_stops_delivery(&s).await?;
    sigstop_a_master(&s).await?;

    for channel in &all {
        ensure!(
            s.received.duplicates(channel) == 0,
            "{channel}: a message delivered twice"
        );
    }
    s.stop.cancel();
    Ok(())
}

/// SIGKILL the first shard's master while every channel is published to: after the promotion
/// its channels receive again and are reported resubscribed; one of them, unsubscribed while
/// the shard was down, stays gone; the other shards never pause.
async fn sigkill_a_master(s: &mut Setup) -> Result<()> {
    let (master, channels) = s.shards[0].clone();
    let others: Vec<String> = s.shards[1..].iter().flat_map(|(_, c)| c.clone()).collect();
    let (dropped, kept) = (channels[0].clone(), channels[1..].to_vec());
    // A channel of the shard subscribed while it is down: the call waits a bounded time.
    let late = format!("{}:late", kept[0]);
    publish_forever(late.clone(), s.ports.clone(), s.stop.clone());
    let subscriber = Arc::clone(&s.subscriber);
    let killed = Instant::now();
    let (took, during) = tokio::join!(
        s.cluster.kill_master_of(&kept[0], Duration::from_secs(30)),
        async {
            wait_for("the killed master to refuse connections", WAIT, || async {
                tokio::net::TcpStream::connect(("127.0.0.1", master))
                    .await
                    .err()
                    .map(|_| ())
            })
            .await?;
            subscriber.unsubscribe(&dropped).await;
            let unsubscribed = Instant::now();
            let late_result = subscriber.subscribe(&late).await;
            Ok::<_, anyhow::Error>((unsubscribed, late_result, unsubscribed.elapsed()))
        }
    );
    let (took, (unsubscribed, late_result, late_took)) = (took?, during?);
    let (event, reported) = s.events.wait_for_shard(&kept).await?;
    wait_flowing(&s.received, &kept, reported, 3).await?;
    let now = Instant::now();
    let mut back = Duration::ZERO;
    for channel in &kept {
        let (_, ended) = s.received.longest_gap(channel, killed, now);
        back = back.max(ended - killed);
    }
    let others_pause = longest_pause(&s.received, &others, killed, now);
    println!(
        "SIGKILL of master :{master}: promoted after {took:?}; resubscribed report after {:?} \
         (lost_for {:?}, cause {:?}); every channel receiving again {back:?} after the kill; \
         other shards' longest pause {others_pause:?}",
        reported - killed,
        event.lost_for,
        event.cause
    );
    ensure!(
        others_pause < UNDISTURBED_GAP,
        "other shards paused {others_pause:?}"
    );
    // The unsubscribed channel's messages were published all along.
    let after = s.received.since(&dropped, unsubscribed);
    ensure!(
        after == 0,
        "{dropped} received {after} messages after its unsubscribe"
    );
    println!("subscribe during the rebuild: {late_result:?} after {late_took:?}");
    ensure!(late_took < sharded::SUBSCRIBE_WAIT + Duration::from_secs(1));
    match late_result {
        Ok(()) => wait_flowing(&s.received, &[late], Instant::now(), 3).await?,
        Err(sharded::Error::Timeout { .. }) => {}
        Err(e) => bail!("subscribe during the rebuild: {e}"),
    }
    s.shards[0].1 = kept;
    s.shards[0].0 = s.cluster.master_of(&s.shards[0].1[0]).await?;
    Ok(())
}

/// A manual `CLUSTER FAILOVER` on the second shard's replica: the old master drops its shard
/// subscribers (`sunsubscribe`) and the channels follow the slot to the new master.
async fn manual_failover(s: &mut Setup) -> Result<()> {
    s.cluster.wait_whole(WAIT).await?;
    let (master, channels) = s.shards[1].clone();
    let others: Vec<String> = [&s.shards[0], &s.shards[2]]
        .iter()
        .flat_map(|(_, c)| c.clone())
        .collect();
    let replica = replica_of(master).await?;
    let before = Instant::now();
    let reply = command(replica, &["CLUSTER", "FAILOVER"]).await?;
    ensure!(reply == "OK", "CLUSTER FAILOVER answered {reply}");
    let (event, reported) = s.events.wait_for_shard(&channels).await?;
    wait_flowing(&s.received, &channels, reported, 3).await?;
    let now = Instant::now();
    let gap = longest_pause(&s.received, &channels, before, now);
    let others_pause = longest_pause(&s.received, &others, before, now);
    let promoted = s.cluster.master_of(&channels[0]).await?;
    println!(
        "manual CLUSTER FAILOVER :{master} -> :{replica} (now serving: :{promoted}): resubscribed \
         report after {:?} (lost_for {:?}, cause {:?}); the shard's longest delivery gap {gap:?}; \
         other shards' longest pause {others_pause:?}",
        reported - before,
        event.lost_for,
        event.cause
    );
    ensure!(promoted == replica, "the replica did not take over");
    ensure!(
        others_pause < UNDISTURBED_GAP,
        "other shards paused {others_pause:?}"
    );
    s.shards[1].0 = promoted;
    Ok(())
}

/// Unsubscribing a channel of each of two shards stops their delivery while their neighbours,
/// on the same connections, keep receiving.
async fn unsubscribing_stops_delivery(s: &Setup) -> Result<()> {
    let gone = [s.shards[1].1[0].clone(), s.shards[2].1[0].clone()];
    let neighbours = [s.shards[1].1[1].clone(), s.shards[2].1[1].clone()];
    for channel in &gone {
        s.subscriber.unsubscribe(channel).await;
    }
    let unsubscribed = Instant::now();
    wait_flowing(&s.received, &neighbours, unsubscribed, 10).await?;
    for channel in &gone {
        let after = s.received.since(channel, unsubscribed);
        if after > 0 {
            bail!("{channel} received {after} messages after its unsubscribe");
        }
    }
    Ok(())
}

/// SIGSTOP the third shard's master: its subscribers see neither EOF nor `sunsubscribe` while its
/// replica takes over; the subscriber's periodic topology check moves the channels.
async fn sigstop_a_master(s: &Setup) -> Result<()> {
    let (master, channels) = s.shards[2].clone();
    let kept = channels[1..].to_vec(); // [0] was unsubscribed
    let replica = replica_of(master).await?;
    let info = command(master, &["INFO", "server"]).await?;
    let pid = info
        .lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .context("no process_id in INFO")?
        .trim()
        .to_string();
    // The cluster is dropped with a SIGKILL by pid, which ends a stopped process too.
    let status = std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()?;
    ensure!(status.success(), "kill -STOP {pid}");
    let stopped = Instant::now();
    wait_for("the replica to be promoted", WAIT, || async {
        let info = command(replica, &["INFO", "replication"]).await.ok()?;
        info.contains("role:master").then_some(())
    })
    .await?;
    let promoted = stopped.elapsed();
    let (event, reported) = s.events.wait_for_shard(&kept).await?;
    wait_flowing(&s.received, &kept, reported, 3).await?;
    println!(
        "SIGSTOP of master :{master}: promoted after {promoted:?}; resubscribed report after \
         {:?} (cause {:?})",
        reported - stopped,
        event.cause
    );
    Ok(())
}
