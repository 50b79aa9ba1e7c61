//! nginx re-resolving a changed name: the closest this machine allows to proving that
//! `docker compose up --scale gateway=N` reaches new replicas without restarting nginx.
//!
//! The compose stack relies on nginx >= 1.27.3 (`server gateway:8080 resolve` in a zoned
//! upstream, with `resolver 127.0.0.11 valid=5s`). This machine has Debian's nginx 1.22, whose
//! open-source upstreams cannot re-resolve, and no Docker. What it can run: the same `resolver
//! ... valid=` mechanism with the re-resolving form 1.22 has (a variable in `proxy_pass`),
//! against a DNS server of the test's own whose answer for the service name changes, as
//! Docker's does when replicas come and go. Proven here: nginx asks the resolver again after
//! `valid` and sends new requests to the new address, with no reload. Not proven here: the
//! `server ... resolve` form itself (checked by `nginx -t` only where nginx >= 1.27.3 is
//! installed, see deploy.rs).

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use e2e::nginx::{nginx_bin, require_bin};
use e2e::{free_port, http_get, wait_for, Gateway, GatewayOpts, Proc, WAIT};
use tokio::net::UdpSocket;

/// The service name nginx resolves (Docker's would be `gateway`).
const NAME: &str = "gateway.test";

/// A DNS server answering A queries for [`NAME`] with whatever address is current (TTL 1 s)
/// and NXDOMAIN for anything else. Counts the queries it answered for [`NAME`].
struct Dns {
    port: u16,
    answer: Arc<Mutex<Ipv4Addr>>,
    queries: Arc<AtomicU32>,
    task: tokio::task::JoinHandle<()>,
}

impl Dns {
    async fn start(first: Ipv4Addr) -> Result<Dns> {
        let socket = UdpSocket::bind("127.0.0.1:0").await?;
        let port = socket.local_addr()?.port();
        let answer = Arc::new(Mutex::new(first));
        let queries = Arc::new(AtomicU32::new(0));
        let (current, count) = (answer.clone(), queries.clone());
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                let Ok((len, peer)) = socket.recv_from(&mut buf).await else {
                    return;
                };
                let ip = *current.lock().expect("dns lock");
                if let Some((reply, asked_for_name)) = dns_reply(&buf[..len], ip) {
                    if asked_for_name {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = socket.send_to(&reply, peer).await;
                }
            }
        });
        Ok(Dns {
            port,
            answer,
            queries,
            task,
        })
    }

    fn point_at(&self, ip: Ipv4Addr) {
        *self.answer.lock().expect("dns lock") = ip;
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The reply to one DNS query: an A record for [`NAME`] (when asked for its A record), an empty
/// answer for its other types, NXDOMAIN for other names. Also says whether [`NAME`] was asked.
fn dns_reply(query: &[u8], ip: Ipv4Addr) -> Option<(Vec<u8>, bool)> {
    if query.len() < 12 || u16::from_be_bytes([query[4], query[5]]) != 1 {
        return None;
    }
    // The question: labels, then type and class.
    let mut labels = Vec::new();
    let mut i = 12;
    loop {
        let len = *query.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        labels.push(
            std::str::from_utf8(query.get(i..i + len)?)
                .ok()?
                .to_ascii_lowercase(),
        );
        i += len;
    }
    let question_end = i + 4;
    let qtype = u16::from_be_bytes([*query.get(i)?, *query.get(i + 1)?]);
    let ours = labels.join(".") == NAME;
    let answers = u16::from(ours && qtype == 1);
    let mut reply = Vec::with_capacity(question_end + 16);
    reply.extend_from_slice(&query[..2]); // id
    let rcode = if ours { 0 } else { 3 };
    reply.extend_from_slice(&[0x81, 0x80 | rcode]); // response, recursion desired+available
    reply.extend_from_slice(&[0, 1]); // one question
    reply.extend_from_slice(&answers.to_be_bytes());
    reply.extend_from_slice(&[0, 0, 0, 0]); // no authority, no additional records
    reply.extend_from_slice(query.get(12..question_end)?);
    if answers == 1 {
        reply.extend_from_slice(&[0xc0, 12]); // the name: a pointer to the question's
        reply.extend_from_slice(&[0, 1, 0, 1]); // type A, class IN
        reply.extend_from_slice(&1u32.to_be_bytes()); // TTL 1 s
        reply.extend_from_slice(&[0, 4]);
        reply.extend_from_slice(&ip.octets());
    }
    Some((reply, ours))
}

/// nginx, stopped with its workers on drop: SIGTERM first (the master stops its workers), then
/// SIGKILL for what is left (SIGKILL to the master alone would leave the workers listening).
struct NginxProc(Proc);

impl Drop for NginxProc {
    fn drop(&mut self) {
        if self.0.is_running() {
            self.0.signal(15);
            let deadline = Instant::now() + Duration::from_secs(3);
            while self.0.is_running() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.0.kill();
    }
}

/// Which node answered `GET /api/rooms` through nginx (each lists a default room of its own).
async fn served_by(addr: &str) -> Option<&'static str> {
    let (status, body) = http_get(addr, "/api/rooms").await.ok()?;
    match status {
        200 if body.contains("Alpha") => Some("alpha"),
        200 if body.contains("Beta") => Some("beta"),
        _ => None,
    }
}

#[tokio::test]
async fn nginx_follows_a_changed_dns_answer_without_a_reload() -> Result<()> {
    let bin = require_bin(&nginx_bin(), "nginx")?;
    // Two nodes on one port of two loopback addresses, as two replicas behind one name.
    let port = free_port();
    let (alpha_ip, beta_ip) = (Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3));
    let node = |ip: Ipv4Addr, room: &str| {
        GatewayOpts::default()
            .env("GATEWAY_LISTEN", format!("{ip}:{port}"))
            .env("GATEWAY_DEFAULT_ROOMS", format!("1:{room}"))
    };
    let _alpha = Gateway::start(node(alpha_ip, "Alpha")).await?;
    let _beta = Gateway::start(node(beta_ip, "Beta")).await?;

    let dns = Dns::start(alpha_ip).await?;
    let dir = tempfile::Builder::new().prefix("e2e-resolve-").tempdir()?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    }
    let listen = free_port();
    let prefix = dir.path().display();
    let conf = format!(
        "daemon off;\nworker_processes 1;\npid {prefix}/nginx.pid;\nerror_log stderr warn;\n\
         events {{ worker_connections 256; }}\n\
         http {{\n  access_log off;\n\
           client_body_temp_path {prefix}/cb;\n  proxy_temp_path {prefix}/p;\n\
           fastcgi_temp_path {prefix}/f;\n  uwsgi_temp_path {prefix}/u;\n  scgi_temp_path {prefix}/s;\n\
           # As in the compose stack: ask the resolver again once `valid` has passed.\n\
           resolver 127.0.0.1:{dns} valid=1s ipv6=off;\n  resolver_timeout 2s;\n\
           server {{\n    listen 127.0.0.1:{listen};\n    location / {{\n\
               set $gateway {NAME};\n      proxy_pass http://$gateway:{port};\n\
           }}\n  }}\n}}\n",
        dns = dns.port,
    );
    let conf_path = dir.path().join("nginx.conf");
    std::fs::write(&conf_path, conf)?;
    let mut cmd = Command::new(bin);
    cmd.arg("-p")
        .arg(dir.path())
        .arg("-c")
        .arg(&conf_path)
        .args(["-e", "stderr"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("error.log"))?);
    let mut nginx = NginxProc(Proc::spawn("nginx", &mut cmd)?);
    let addr = format!("127.0.0.1:{listen}");
    let log = || std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default();

    let first = wait_for("nginx to proxy to alpha", WAIT, || async {
        served_by(&addr).await.filter(|n| *n == "alpha")
    })
    .await
    .with_context(log)?;
    let nginx_pid = nginx.0.pid();

    // The name now points at the other replica: new requests follow within `valid`.
    dns.point_at(beta_ip);
    let switched = Instant::now();
    wait_for("nginx to re-resolve to beta", WAIT, || async {
        served_by(&addr).await.filter(|n| *n == "beta")
    })
    .await
    .with_context(log)?;
    let took = switched.elapsed();
    anyhow::ensure!(
        nginx.0.is_running() && nginx.0.pid() == nginx_pid,
        "nginx restarted"
    );
    // And back (a replica removed): followed again.
    dns.point_at(alpha_ip);
    wait_for("nginx to re-resolve to alpha again", WAIT, || async {
        served_by(&addr).await.filter(|n| *n == "alpha")
    })
    .await
    .with_context(log)?;
    let asked = dns.queries.load(Ordering::Relaxed);
    anyhow::ensure!(asked >= 3, "nginx asked the DNS server only {asked} times");
    println!(
        "first answer from {first}; switched to beta {took:?} after the DNS change \
         (resolver valid=1s); {asked} DNS queries"
    );
    anyhow::ensure!(
        took < Duration::from_secs(5),
        "took {took:?} to follow the DNS change"
    );
    drop(nginx);
    Ok(())
}

#[test]
fn dns_replies_are_well_formed() -> Result<()> {
    // A query for gateway.test A, id 0x1234, as a resolver sends it.
    let mut query = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in NAME.split('.') {
        query.push(label.len() as u8);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    let (reply, ours) =
        dns_reply(&query, Ipv4Addr::new(127, 0, 0, 9)).ok_or_else(|| anyhow!("no reply"))?;
    anyhow::ensure!(ours);
    anyhow::ensure!(reply[..2] == [0x12, 0x34] && reply[7] == 1, "{reply:?}");
    anyhow::ensure!(reply.ends_with(&[0, 4, 127, 0, 0, 9]), "{reply:?}");
    let mut other = query.clone();
    other[13] = b'x';
    let (reply, ours) = dns_reply(&other, Ipv4Addr::LOCALHOST).ok_or_else(|| anyhow!("none"))?;
    anyhow::ensure!(!ours && reply[3] & 0x0f == 3 && reply[7] == 0, "{reply:?}");
    Ok(())
}
