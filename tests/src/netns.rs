//! Linux network namespaces for the fault suite: Redis and every gateway node get an address of
//! their own, so a link set down is a real partition (the kernel drops the packets; both ends see
//! silence, not a reset).
//!
//! A [`Lab`] is one isolated topology, unique per test run:
//!
//! ```text
//!   root namespace (the test process: clients, checker, fault proxies)
//!     ef<idx> 10.A.B.254 ─┐                          ┌─ eb<idx> 10.A.B+1.254
//!                         │  switch namespace        │
//!                 bridge "brf" (front LAN)   bridge "brb" (back LAN)
//!                         │                          │
//!        node n0: f0 10.A.B.1 ────────────── b0 10.A.B+1.1
//!        node n1: f0 10.A.B.2 ────────────── b0 10.A.B+1.2
//!        redis:                              b0 10.A.B+1.100
//! ```
//!
//! Clients reach nodes over the front LAN; nodes reach Redis over the back LAN. Partitioning a
//! node from Redis sets the node's back port on the switch down (its clients still reach it);
//! partitioning a node's clients from it sets its front port down (it still reaches Redis).
//! The root namespace sits on both LANs so the test can talk to every process (and run a
//! [`crate::faultproxy::FaultProxy`] between a node and Redis) without IP forwarding.
//!
//! Names are unique per lab: an index `idx` is claimed with a lock file in
//! `/run/e2e-netns/` (atomic create), which also names the namespaces (`e2e<idx>sw`, ...) and
//! picks the two /24 subnets, so concurrent tests and concurrent runs never collide. A lab whose
//! owner died without cleaning up (SIGKILL) is swept when its index is claimed again. Dropping a
//! [`Lab`] kills the processes it started (by pid) and deletes its namespaces and links.
//!
//! Needs root and iproute2; [`Lab::create`] says so clearly when either is missing.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// Where lab indexes are claimed (one file per index, holding the owner's pid).
const LOCK_DIR: &str = "/run/e2e-netns";
/// Lab indexes: each takes two /24 subnets in 10.100.0.0–10.199.255.0.
const MAX_LABS: u32 = 12_800;
/// The last octet of Redis's back address.
pub const REDIS_OCTET: u8 = 100;

/// Runs `ip` with `args`; fails with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running ip (iproute2)")?;
    if !output.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Checks that this process can create network namespaces (root and iproute2), with a message
/// that says what is missing. The fault tests call it first.
pub fn require_netns() -> Result<()> {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .unwrap_or_default();
    if uid != "0" {
        bail!(
            "the network-namespace fault tests need root (uid 0, this is uid {uid}): run the \
             suite as root, as CI does"
        );
    }
    if Command::new("ip")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
    {
        bail!("the fault tests need iproute2 (`ip`): apt-get install -y iproute2");
    }
    // Unique per call: tests of one process probe concurrently.
    static PROBES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let probe = format!("e2eprobe{}x{n}", std::process::id());
    ip(&["netns", "add", &probe]).context(
        "cannot create a network namespace (`ip netns add`): the fault tests need root with \
         CAP_SYS_ADMIN and a kernel with network namespaces",
    )?;
    ip(&["netns", "del", &probe])?;
    Ok(())
}

/// Which LAN a host's port is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Clients ↔ nodes (and nginx, in the root namespace).
    Front,
    /// Nodes ↔ Redis.
    Back,
}

/// One namespace of the lab with its addresses.
#[derive(Clone, Debug)]
pub struct Host {
    pub name: String,
    pub ns: String,
    pub front_ip: Option<Ipv4Addr>,
    pub back_ip: Option<Ipv4Addr>,
    /// The host's ports on the switch (set down to partition).
    front_port: Option<String>,
    back_port: Option<String>,
}

/// An isolated two-LAN topology (see the module docs).
pub struct Lab {
    pub idx: u32,
    switch_ns: String,
    root_front_if: String,
    root_back_if: String,
    front_net: [u8; 3],
    back_net: [u8; 3],
    hosts: Vec<Host>,
    lock: PathBuf,
}

fn subnets(idx: u32) -> ([u8; 3], [u8; 3]) {
    let second = 100 + (idx / 128) as u8;
    let third = ((idx % 128) * 2) as u8;
    ([10, second, third], [10, second, third + 1])
}

fn addr(net: [u8; 3], last: u8) -> Ipv4Addr {
    Ipv4Addr::new(net[0], net[1], net[2], last)
}

fn pid_alive(pid: u32) -> bool {
    PathBuf::from(format!("/proc/{pid}")).exists()
}

/// Deletes every namespace and root link of lab `idx` (ignoring what is not there).
fn remove_lab(idx: u32) {
    let prefix = format!("e2e{idx}");
    if let Ok(output) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            // e2e<idx>sw, e2e<idx>h<n>: the index must end where a letter starts.
            if let Some(rest) = name.strip_prefix(&prefix) {
                if rest.starts_with(|c: char| c.is_ascii_alphabetic()) {
                    let _ = ip(&["netns", "del", name]);
                }
            }
        }
    }
    // The root ends are deleted with their peers when the switch namespace goes, but that
    // happens asynchronously: delete them now so the index (and its subnets) can be reused.
    let _ = ip(&["link", "del", &format!("ef{idx}")]);
    let _ = ip(&["link", "del", &format!("eb{idx}")]);
}

impl Lab {
    /// Claims a free lab index and builds the switch with its two bridges and the root
    /// namespace's ports.
    pub fn create() -> Result<Lab> {
        require_netns()?;
        std::fs::create_dir_all(LOCK_DIR).with_context(|| format!("creating {LOCK_DIR}"))?;
        let start = (std::process::id().wrapping_mul(7919)
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0))
            % MAX_LABS;
        for step in 0..MAX_LABS {
            let idx = (start + step) % MAX_LABS;
            let lock = PathBuf::from(LOCK_DIR).join(idx.to_string());
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&lock)
            {
                Ok(mut file) => {
                    use std::io::Write;
                    writeln!(file, "{}", std::process::id())?;
                    remove_lab(idx); // leftovers of a run that died without its lock file
                    let mut lab = Lab {
                        idx,
                        switch_ns: format!("e2e{idx}sw"),
                        root_front_if: format!("ef{idx}"),
                        root_back_if: format!("eb{idx}"),
                        front_net: subnets(idx).0,
                        back_net: subnets(idx).1,
                        hosts: Vec::new(),
                        lock,
                    };
                    lab.build_switch()?;
                    return Ok(lab);
                }
                Err(_) => {
                    // Taken: sweep it if its owner is gone, then try it again next time round.
                    let owner = std::fs::read_to_string(&lock)
                        .ok()
                        .and_then(|s| s.trim().parse::<u32>().ok());
                    if let Some(pid) = owner {
                        if !pid_alive(pid) {
                            remove_lab(idx);
                            let _ = std::fs::remove_file(&lock);
                        }
                    }
                }
            }
        }
        bail!("no free lab index in {LOCK_DIR}")
    }

    fn build_switch(&mut self) -> Result<()> {
        let sw = self.switch_ns.clone();
        ip(&["netns", "add", &sw])?;
        ip(&["-n", &sw, "link", "set", "lo", "up"])?;
        for (bridge, root_if, root_port, net) in [
            ("brf", self.root_front_if.clone(), "rf", self.front_net),
            ("brb", self.root_back_if.clone(), "rb", self.back_net),
        ] {
            ip(&["-n", &sw, "link", "add", bridge, "type", "bridge"])?;
            ip(&["-n", &sw, "link", "set", bridge, "up"])?;
            ip(&[
                "link", "add", &root_if, "type", "veth", "peer", "name", root_port, "netns", &sw,
            ])?;
            ip(&[
                "addr",
                "add",
                &format!("{}/24", addr(net, 254)),
                "dev",
                &root_if,
            ])?;
            ip(&["link", "set", &root_if, "up"])?;
            ip(&["-n", &sw, "link", "set", root_port, "master", bridge])?;
            ip(&["-n", &sw, "link", "set", root_port, "up"])?;
        }
        Ok(())
    }

    /// The root namespace's address on the front LAN (where nginx and clients connect from).
    pub fn root_front_ip(&self) -> Ipv4Addr {
        addr(self.front_net, 254)
    }

    /// The root namespace's address on the back LAN (where a Redis fault proxy listens).
    pub fn root_back_ip(&self) -> Ipv4Addr {
        addr(self.back_net, 254)
    }

    /// Adds a namespace `name` with a port on the front LAN, the back LAN or both, at the last
    /// octet `octet` of each subnet (1–253).
    pub fn add_host(&mut self, name: &str, octet: u8, front: bool, back: bool) -> Result<Host> {
        let n = self.hosts.len();
        let ns = format!("e2e{}h{n}", self.idx);
        ip(&["netns", "add", &ns])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        let mut host = Host {
            name: name.to_string(),
            ns: ns.clone(),
            front_ip: None,
            back_ip: None,
            front_port: None,
            back_port: None,
        };
        for (wanted, side_if, bridge, net, letter) in [
            (front, "f0", "brf", self.front_net, 'f'),
            (back, "b0", "brb", self.back_net, 'b'),
        ] {
            if !wanted {
                continue;
            }
            let port = format!("h{n}{letter}");
            let sw = self.switch_ns.as_str();
            ip(&[
                "link", "add", side_if, "netns", &ns, "type", "veth", "peer", "name", &port,
                "netns", sw,
            ])?;
            let address = addr(net, octet);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{address}/24"),
                "dev",
                side_if,
            ])?;
            ip(&["-n", &ns, "link", "set", side_if, "up"])?;
            ip(&["-n", sw, "link", "set", &port, "master", bridge])?;
            ip(&["-n", sw, "link", "set", &port, "up"])?;
            if letter == 'f' {
                host.front_ip = Some(address);
                host.front_port = Some(port);
            } else {
                host.back_ip = Some(address);
                host.back_port = Some(port);
            }
        }
        self.hosts.push(host.clone());
        Ok(host)
    }

    /// Sets `host`'s port on `side` down (a partition: packets are dropped both ways) or up
    /// (healed).
    pub fn set_link(&self, host: &Host, side: Side, up: bool) -> Result<()> {
        let port = match side {
            Side::Front => host.front_port.as_deref(),
            Side::Back => host.back_port.as_deref(),
        };
        let Some(port) = port else {
            bail!("{} has no {side:?} port", host.name);
        };
        ip(&[
            "-n",
            &self.switch_ns,
            "link",
            "set",
            port,
            if up { "up" } else { "down" },
        ])
    }
}

impl Host {
    /// A command that runs `program` inside this host's namespace (`ip netns exec`, which execs
    /// the program: the child's pid is the program's own).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns]).arg(program);
        cmd
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // The processes in the namespaces belong to their own handles (killed by pid when
        // those drop, which callers arrange to happen first); a namespace with a process
        // still inside lives on until that process exits, and is swept with the index.
        remove_lab(self.idx);
        let _ = std::fs::remove_file(&self.lock);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_of_neighbouring_labs_do_not_overlap() {
        let mut seen = std::collections::HashSet::new();
        for idx in 0..MAX_LABS {
            let (front, back) = subnets(idx);
            assert!(seen.insert(front), "{idx}");
            assert!(seen.insert(back), "{idx}");
            assert!((100..200).contains(&front[1]));
        }
    }
}
