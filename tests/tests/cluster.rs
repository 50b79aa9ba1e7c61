//! Several gateway processes on one real Redis: the tutorial flow across nodes, room isolation,
//! subscriptions that follow local membership, Redis lost and back, and graceful shutdown.

use std::time::Duration;

use e2e::{is, start_nodes, wait_for, Client, RedisServer, WAIT};
use serde_json::json;

#[tokio::test]
async fn chat_crosses_three_nodes_with_room_isolation() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let gws = start_nodes(&redis, "n", 3, &[]).await?;
    let mut members = Vec::new();
    for (i, gw) in gws.iter().enumerate() {
        let mut c = Client::connect(&gw.ws_url()).await?;
        let login = c.login(&format!("u{i}"), json!(1)).await?;
        assert_eq!(
            login["num"],
            i as u64 + 1,
            "count includes members on other nodes"
        );
        members.push(c);
    }
    // Everyone already in the room saw each later login with the right count.
    for (i, c) in members.iter_mut().enumerate() {
        for later in i + 1..3 {
            let user = format!("u{later}");
            let f = c
                .recv_until(|f| f["event"] == "login" && f["userId"] == user.as_str())
                .await?;
            assert_eq!(f["num"], later as u64 + 1);
        }
    }
    // Another room on the same nodes.
    let mut outsider = Client::connect(&gws[0].ws_url()).await?;
    outsider.login("other", json!(2)).await?;

    members[2]
        .send(json!({"roomId":1,"content":"from n2"}))
        .await?;
    for c in members.iter_mut() {
        let msg = c.recv_until(is("message")).await?;
        assert_eq!(msg["content"], "from n2");
        assert_eq!(msg["userId"], "u2");
        assert_eq!(msg["num"], 3);
    }
    outsider
        .expect_none(Duration::from_millis(300), is("message"))
        .await?;

    // Logout announced across nodes with the new count.
    let leaver = members.remove(1);
    leaver.close().await?;
    for c in members.iter_mut() {
        let f = c.recv_until(is("logout")).await?;
        assert_eq!(
            (f["userId"].as_str(), f["num"].as_u64()),
            (Some("u1"), Some(2))
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_node_subscribes_only_while_it_has_members() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let gws = start_nodes(&redis, "n", 2, &[]).await?;
    let channel = "gw:{r:lonely}:ch";
    let mut a = Client::connect(&gws[0].ws_url()).await?;
    a.login("a", json!("lonely")).await?;
    let channels = redis.pubsub_channels().await?;
    assert!(channels.iter().any(|c| c == channel), "{channels:?}");
    assert!(
        !channels.iter().any(|c| c.contains('*')),
        "no pattern subscriptions"
    );
    let mut b = Client::connect(&gws[1].ws_url()).await?;
    b.login("b", json!("lonely")).await?;
    assert_eq!(gws[0].metric("gateway_rooms_local").await?, 2.0); // room + inbox
    a.send(json!({"event":"logout","roomId":"lonely"})).await?;
    a.recv_until(is("logout")).await?;
    b.recv_until(is("logout")).await?;
    b.close().await?;
    wait_for("the room's channel to be unsubscribed", WAIT, || async {
        let channels = redis.pubsub_channels().await.ok()?;
        (!channels.iter().any(|c| c == channel)).then_some(())
    })
    .await?;
    wait_for("node 1 to drop its last local room", WAIT, || async {
        (gws[1].metric("gateway_rooms_local").await.ok()? == 0.0).then_some(())
    })
    .await?;
    // Node 0 still holds a's inbox only.
    assert_eq!(gws[0].metric("gateway_rooms_local").await?, 1.0);
    Ok(())
}

#[tokio::test]
async fn redis_outage_gives_error_frames_then_traffic_recovers() -> anyhow::Result<()> {
    let mut redis = RedisServer::start().await?;
    let gws = start_nodes(&redis, "n", 2, &[]).await?;
    let mut a = Client::connect(&gws[0].ws_url()).await?;
    a.login("a", json!(9)).await?;
    let mut b = Client::connect(&gws[1].ws_url()).await?;
    b.login("b", json!(9)).await?;
    a.recv_until(is("login")).await?;

    redis.kill();
    gws[0].wait_ready(503).await?;
    a.send(json!({"roomId":9,"content":"during outage","clientMsgId":"o1"}))
        .await?;
    let err = a.recv_until(is("error")).await?;
    // `unavailable` when the gateway knew Redis was gone before sending, `outcome_unknown`
    // when the request went out on a connection that then broke (it cannot tell whether
    // Redis got it).
    assert!(
        err["code"] == "unavailable" || err["code"] == "outcome_unknown",
        "{err}"
    );
    assert_eq!(err["clientMsgId"], "o1");
    assert_eq!(err["roomId"], 9);

    redis.restart().await?;
    for gw in &gws {
        gw.wait_ready(200).await?;
    }
    // Same sockets, no gateway restarted: the nodes re-subscribed and re-asserted presence.
    let deadline = tokio::time::Instant::now() + WAIT * 2;
    let own = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no message crossed nodes after the restart"
        );
        a.send(json!({"roomId":9,"content":"after"})).await?;
        let echoed = a
            .recv_until_timeout(Duration::from_millis(500), |f| {
                f["event"] == "message" && f["content"] == "after"
            })
            .await;
        if let Ok(own) = echoed {
            break own;
        }
    };
    assert_eq!(
        own["num"], 2,
        "presence re-asserted after Redis came back empty"
    );
    let got = b
        .recv_until(|f| f["event"] == "message" && f["content"] == "after")
        .await?;
    assert_eq!(got["userId"], "a");
    assert!(gws[1].metric("gateway_pubsub_reconnects_total").await? >= 1.0);
    Ok(())
}

#[tokio::test]
async fn sigterm_closes_with_1012_and_others_see_the_logouts() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let mut gws = start_nodes(&redis, "n", 2, &[]).await?;
    let mut leaving = Client::connect(&gws[0].ws_url()).await?;
    leaving.login("going", json!("t")).await?;
    let mut staying = Client::connect(&gws[1].ws_url()).await?;
    staying.login("staying", json!("t")).await?;

    gws[0].proc.signal(15);
    assert_eq!(leaving.expect_close(WAIT).await?, 1012);
    let logout = staying.recv_until(is("logout")).await?;
    assert_eq!(
        (logout["userId"].as_str(), logout["num"].as_u64()),
        (Some("going"), Some(1))
    );
    assert_eq!(gws[0].proc.wait_exit(WAIT).await?, Some(0));
    // Its presence is gone at once, not after the TTL.
    let mut con = redis.connection().await?;
    let num: u64 = redis::cmd("HLEN")
        .arg("gw:{r:t}:pu")
        .query_async(&mut con)
        .await?;
    assert_eq!(num, 1);
    gws.remove(0);
    Ok(())
}

/// `gateway_connections_open` of the node whose admin listener is `admin`.
async fn open_connections(admin: &str) -> Option<f64> {
    let (status, text) = e2e::http_get(admin, "/metrics").await.ok()?;
    (status == 200).then_some(())?;
    text.lines()
        .find(|l| l.starts_with("gateway_connections_open"))?
        .rsplit(' ')
        .next()?
        .parse()
        .ok()
}

/// Kills (SIGKILL, by pid) whatever of the runner's gateway nodes is left, if a check failed.
struct KillOnDrop(Vec<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for pid in &self.0 {
            if std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::process::Command::new("kill")
                    .args(["-9", &pid.to_string()])
                    .status();
            }
        }
    }
}

/// Starts the runner (`cluster --port 0 --ready-json` plus `args`) and waits for its READY
/// line; its stdout is read to the end on a thread of its own (it prints after READY too).
async fn start_runner(args: &[&str]) -> anyhow::Result<(e2e::Proc, serde_json::Value)> {
    use anyhow::Context;
    use std::io::BufRead;

    let mut runner = e2e::Proc::spawn(
        "cluster runner",
        std::process::Command::new(env!("CARGO_BIN_EXE_cluster"))
            .args(args)
            .args(["--port", "0"])
            .args(["--ready-json", "--log", "warn"])
            .stdout(std::process::Stdio::piped()),
    )?
    .graceful();
    let stdout = runner.take_stdout().context("the runner's stdout")?;
    // The runner prints after READY too: keep reading its stdout to the end.
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut ready_tx = Some(ready_tx);
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(json) = line.strip_prefix("READY ") {
                if let Some(tx) = ready_tx.take() {
                    let _ = tx.send(json.to_owned());
                }
            }
        }
    });
    let ready = tokio::time::timeout(Duration::from_secs(25), ready_rx)
        .await
        .context("the runner printed no READY line within 25 s")?
        .context("the runner exited before READY")?;
    Ok((runner, serde_json::from_str(&ready)?))
}

/// The local runner on a Redis Cluster (`cluster --redis-cluster`): two gateway nodes on a
/// 3 + 3 cluster of its own, chat across them through its nginx, and SIGINT (Ctrl-C) stops the
/// nodes and the cluster.
#[tokio::test]
async fn the_runner_on_a_redis_cluster_chats_across_nodes_and_stops_on_sigint() -> anyhow::Result<()>
{
    use anyhow::Context;

    let started = std::time::Instant::now();
    let (mut runner, ready) = start_runner(&["--redis-cluster", "--nodes", "2"]).await?;
    assert_eq!(ready["redisCluster"], true, "{ready}");
    let pids: Vec<u32> = ready["nodes"]
        .as_array()
        .context("no nodes")?
        .iter()
        .filter_map(|n| n["pid"].as_u64().and_then(|p| u32::try_from(p).ok()))
        .collect();
    let _guard = KillOnDrop(pids.clone());
    assert_eq!(pids.len(), 2, "{ready}");
    let redis_urls: Vec<String> = ready["redisUrl"]
        .as_str()
        .context("no redisUrl")?
        .split(',')
        .map(str::to_owned)
        .collect();
    assert_eq!(
        redis_urls.len(),
        6,
        "3 masters + 3 replicas: {redis_urls:?}"
    );
    let admins: Vec<String> = ready["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|n| format!("127.0.0.1:{}", n["adminPort"]))
        .collect();
    let ws = format!(
        "{}/ws",
        ready["url"]
            .as_str()
            .context("no url")?
            .trim_end_matches('/')
            .replacen("http://", "ws://", 1)
    );

    // Two users through nginx; least_conn puts the second on the other node.
    let mut a = Client::connect(&ws).await?;
    a.login("a", json!(1)).await?;
    wait_for("a's connection on one node", WAIT, || async {
        let mut open = 0.0;
        for admin in &admins {
            open += open_connections(admin).await?;
        }
        (open == 1.0).then_some(())
    })
    .await?;
    let mut b = Client::connect(&ws).await?;
    b.login("b", json!(1)).await?;
    wait_for("one connection on each node", WAIT, || async {
        for admin in &admins {
            let open = open_connections(admin).await?;
            (open == 1.0).then_some(())?;
        }
        Some(())
    })
    .await?;
    a.send(json!({"roomId":1,"content":"over the cluster"}))
        .await?;
    let own = a
        .recv_until(|f| f["event"] == "message" || f["event"] == "error")
        .await
        .context("the sender's own copy")?;
    assert_eq!(own["content"], "over the cluster", "{own}");
    let got = b
        .recv_until(|f| f["event"] == "message" && f["content"] == "over the cluster")
        .await?;
    assert_eq!(
        (got["userId"].as_str(), got["num"].as_u64()),
        (Some("a"), Some(2))
    );
    b.send(json!({"roomId":1,"content":"and back"})).await?;
    a.recv_until(|f| f["event"] == "message" && f["content"] == "and back")
        .await?;
    a.close().await?;
    b.close().await?;

    // Ctrl-C: the runner exits 0 and leaves no gateway node or Redis node behind.
    runner.signal(2);
    assert_eq!(runner.wait_exit(Duration::from_secs(20)).await?, Some(0));
    for pid in &pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "gateway pid {pid} survived the runner"
        );
    }
    for url in &redis_urls {
        let addr = url.trim_start_matches("redis://").trim_end_matches('/');
        assert!(
            std::net::TcpStream::connect(addr).is_err(),
            "redis node {addr} survived the runner"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    Ok(())
}
