//! Smoke run of the load generator (seconds, a few hundred connections): proves that it works,
//! measures nothing. Benchmark figures live in docs/benchmarks.md, never in assertions.
//!
//! Uses `$GATEWAY_BIN`, else builds and uses the workspace's debug `gateway` (embedded broker:
//! no Redis needed).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const LOADGEN: &str = env!("CARGO_BIN_EXE_loadgen");

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn gateway_bin() -> PathBuf {
    if let Ok(p) = std::env::var("GATEWAY_BIN") {
        return PathBuf::from(p);
    }
    // Same target directory and profile as this test's loadgen binary.
    let dir = PathBuf::from(LOADGEN)
        .parent()
        .expect("binary directory")
        .to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-p", "gateway", "--bin", "gateway"]);
    if dir.ends_with("release") {
        cmd.arg("--release");
    }
    if let Some(target) = dir.parent() {
        cmd.env("CARGO_TARGET_DIR", target);
    }
    let status = cmd.status().expect("running cargo build -p gateway");
    assert!(status.success(), "cargo build -p gateway failed");
    dir.join("gateway")
}

fn healthy(admin: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", admin)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = write!(s, "GET /healthz HTTP/1.0\r\n\r\n");
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.starts_with("HTTP/1.1 200") || buf.starts_with("HTTP/1.0 200")
}

fn start_gateway() -> (Killed, u16) {
    start_gateway_with(&[])
}

fn start_gateway_with(env: &[(&str, &str)]) -> (Killed, u16) {
    let port = free_port();
    let admin = free_port();
    let child = Command::new(gateway_bin())
        .env_remove("GATEWAY_REDIS_URL")
        .envs(env.iter().copied())
        .env("GATEWAY_LISTEN", format!("127.0.0.1:{port}"))
        .env("GATEWAY_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        .env("GATEWAY_NODE_ID", "smoke")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .expect("starting the gateway");
    let child = Killed(child);
    let end = Instant::now() + Duration::from_secs(30);
    while !healthy(admin) {
        assert!(Instant::now() < end, "gateway not healthy within 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    (child, port)
}

fn loadgen(args: &[&str]) -> Value {
    let dir = std::env::temp_dir().join(format!("loadgen-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let json = dir.join(format!("{}.json", args[0]));
    let out = Command::new(LOADGEN)
        .args(args)
        .arg("--quiet")
        .arg("--json")
        .arg(&json)
        .output()
        .expect("running loadgen");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "loadgen {args:?} failed:\n{stdout}\n{stderr}"
    );
    println!("loadgen {args:?}:\n{stdout}");
    serde_json::from_slice(&std::fs::read(&json).expect("json report")).expect("valid json")
}

fn n(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} missing in {v}"))
}

#[test]
fn ceiling_pair_delivers() {
    let port = free_port();
    let mut server = Killed(
        Command::new(LOADGEN)
            .args(["ceiling-server", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--members", "100", "--duration", "1", "--rate", "200"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("ceiling server"),
    );
    let mut line = String::new();
    let stdout = server.0.stdout.take().expect("stdout");
    // Keep the pipe open until the end: the server prints its totals when it stops.
    let mut server_out = BufReader::new(stdout);
    server_out.read_line(&mut line).expect("listening line");
    assert!(line.starts_with("listening"), "{line}");
    let url = format!("ws://127.0.0.1:{port}/ws");
    let r = loadgen(&[
        "ceiling", "--url", &url, "-c", "100", "-d", "5", "--drain", "1",
    ]);
    assert_eq!(n(&r, "connects"), 100);
    assert!(n(&r, "delivered") > 100 * 50, "{r}");
    assert_eq!(n(&r, "duplicates"), 0);
    assert_eq!(n(&r, "out_of_order"), 0);
}

#[test]
fn refuses_non_loopback_targets() {
    let out = Command::new(LOADGEN)
        .args([
            "idle",
            "--url",
            "ws://192.0.2.1:80/ws",
            "-c",
            "1",
            "-d",
            "1",
        ])
        .output()
        .expect("running loadgen");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a loopback address"));
}

#[test]
fn bigroom_and_churn_against_one_gateway() {
    let (_gw, port) = start_gateway();
    let url = format!("ws://127.0.0.1:{port}/ws");

    let r = loadgen(&[
        "bigroom",
        "--url",
        &url,
        "-c",
        "300",
        "-d",
        "3",
        "--rate",
        "40",
        "--senders",
        "3",
    ]);
    assert_eq!(n(&r, "joined"), 300, "{r}");
    assert!(n(&r, "sent") > 0);
    assert_eq!(n(&r, "expected"), 300 * n(&r, "sent"));
    assert_eq!(n(&r, "lost"), 0, "{r}");
    assert_eq!(n(&r, "duplicates"), 0);
    assert_eq!(n(&r, "out_of_order"), 0);
    assert_eq!(n(&r, "unexpected_closes"), 0);
    assert!(r["errors"].as_object().expect("errors").is_empty(), "{r}");

    let r = loadgen(&[
        "churn",
        "--url",
        &url,
        "-c",
        "50",
        "-d",
        "3",
        "--rooms",
        "5",
        "--messages",
        "2",
    ]);
    assert!(n(&r, "cycles") > 0, "{r}");
    assert_eq!(n(&r, "lost"), 0, "{r}");
    assert!(r["errors"].as_object().expect("errors").is_empty(), "{r}");

    let r = loadgen(&[
        "rooms", "--url", &url, "-c", "200", "-d", "3", "--rate", "100",
    ]);
    assert!(n(&r, "expected") > 0);
    assert_eq!(n(&r, "lost"), 0, "{r}");
}

#[test]
fn logs_in_with_tokens_when_the_gateway_requires_them() {
    const SECRET: &str = "loadgen-smoke-secret-loadgen-smoke-secret";
    let (_gw, port) = start_gateway_with(&[("GATEWAY_JWT_SECRET", SECRET)]);
    let url = format!("ws://127.0.0.1:{port}/ws");
    let r = loadgen(&[
        "bigroom",
        "--url",
        &url,
        "-c",
        "50",
        "-d",
        "2",
        "--rate",
        "20",
        "--senders",
        "2",
        "--jwt-secret",
        SECRET,
    ]);
    assert_eq!(n(&r, "joined"), 50, "{r}");
    assert!(n(&r, "sent") > 0, "{r}");
    assert_eq!(n(&r, "lost"), 0, "{r}");
    assert!(r["errors"].as_object().expect("errors").is_empty(), "{r}");
    assert!(
        !r.to_string().contains(SECRET),
        "the secret stays out of the report"
    );
}
