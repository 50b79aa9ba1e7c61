//! Helpers shared by the benchmark binaries (`src/bin/bench_presence.rs`,
//! `src/bin/bench_delivery.rs`), included by each with `#[path]`: report tables (text and
//! Markdown), Redis `INFO` samples and their differences, the open-file limit, latency
//! percentiles. CPU time and RSS from /proc are `e2e::procfs`'s.
//!
//! Not part of the harness library: each binary uses what it needs.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

// Report tables (text and Markdown): shared with the benchmark suite (`loadgen suite`).
pub use e2e::report::{Section, Table};

// Measurements: Redis INFO, /proc

/// One command's `INFO commandstats` counters.
#[derive(Clone, Copy, Default, Debug)]
pub struct CmdStat {
    pub calls: u64,
    pub usec: u64,
    /// Calls that returned an error (e.g. EVALSHA of a script Redis does not know: NOSCRIPT).
    pub failed: u64,
}

/// Commands the benchmarks send themselves (excluded from the gateway's figures).
pub const OWN_COMMANDS: [&str; 2] = ["info", "ping"];

/// One `INFO commandstats stats cpu memory server` sample.
#[derive(Clone, Default)]
pub struct Info {
    /// Command → counters. Calls made inside Lua scripts count here too.
    pub cmds: BTreeMap<String, CmdStat>,
    pub fields: BTreeMap<String, String>,
}

impl Info {
    pub async fn take(con: &mut redis::aio::MultiplexedConnection) -> Result<Info> {
        let text: String = redis::cmd("INFO")
            .arg("commandstats")
            .arg("stats")
            .arg("cpu")
            .arg("memory")
            .arg("server")
            .query_async(con)
            .await?;
        let mut info = Info::default();
        for line in text.lines() {
            let Some((key, value)) = line.trim().split_once(':') else {
                continue;
            };
            if let Some(cmd) = key.strip_prefix("cmdstat_") {
                let mut stat = CmdStat::default();
                for part in value.split(',') {
                    let Some((name, v)) = part.split_once('=') else {
                        continue;
                    };
                    let v = v.parse().unwrap_or(0);
                    match name {
                        "calls" => stat.calls = v,
                        "usec" => stat.usec = v,
                        "failed_calls" => stat.failed = v,
                        _ => {}
                    }
                }
                info.cmds.insert(cmd.to_string(), stat);
            } else {
                info.fields.insert(key.to_string(), value.to_string());
            }
        }
        Ok(info)
    }

    pub fn num(&self, key: &str) -> f64 {
        self.fields
            .get(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    pub fn stat(&self, cmd: &str) -> CmdStat {
        self.cmds.get(cmd).copied().unwrap_or_default()
    }

    pub fn calls(&self, cmd: &str) -> u64 {
        self.stat(cmd).calls
    }

    pub fn usec(&self, cmd: &str) -> u64 {
        self.stat(cmd).usec
    }

    /// used_cpu_user + used_cpu_sys, seconds.
    pub fn cpu(&self) -> f64 {
        self.num("used_cpu_user") + self.num("used_cpu_sys")
    }
}

/// Differences between two INFO samples.
pub struct InfoDelta<'a> {
    pub a: &'a Info,
    pub b: &'a Info,
}

impl InfoDelta<'_> {
    pub fn calls(&self, cmd: &str) -> u64 {
        self.b.calls(cmd).saturating_sub(self.a.calls(cmd))
    }

    pub fn usec(&self, cmd: &str) -> u64 {
        self.b.usec(cmd).saturating_sub(self.a.usec(cmd))
    }

    pub fn failed(&self, cmd: &str) -> u64 {
        self.b
            .stat(cmd)
            .failed
            .saturating_sub(self.a.stat(cmd).failed)
    }

    pub fn cpu(&self) -> f64 {
        self.b.cpu() - self.a.cpu()
    }

    /// Every command whose call count changed (name, delta), except the benchmark's own.
    pub fn changed(&self) -> Vec<(String, CmdStat)> {
        self.b
            .cmds
            .keys()
            .filter(|c| !OWN_COMMANDS.contains(&c.as_str()))
            .map(|c| {
                let stat = CmdStat {
                    calls: self.calls(c),
                    usec: self.usec(c),
                    failed: self.failed(c),
                };
                (c.clone(), stat)
            })
            .filter(|(_, stat)| stat.calls > 0)
            .collect()
    }

    /// total_commands_processed, less the benchmark's own commands (inner script calls are
    /// included: Redis counts them as commands).
    pub fn total_commands(&self) -> u64 {
        let total = (self.b.num("total_commands_processed")
            - self.a.num("total_commands_processed"))
        .max(0.0) as u64;
        OWN_COMMANDS
            .iter()
            .fold(total, |t, c| t.saturating_sub(self.calls(c)))
    }
}

/// Soft and hard open-file limits of this process.
pub fn nofile_limits() -> Option<(u64, u64)> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut parts = line["Max open files".len()..].split_whitespace();
    let parse = |v: Option<&str>| match v {
        Some("unlimited") => Some(u64::MAX),
        Some(v) => v.parse().ok(),
        None => None,
    };
    Some((parse(parts.next())?, parse(parts.next())?))
}

/// Makes sure `needed` files can be open: raises the soft limit to the hard one with
/// prlimit(1) (no unsafe code, no extra crate) when the soft one is too low.
pub fn ensure_open_files(needed: u64) -> Result<()> {
    let Some((soft, hard)) = nofile_limits() else {
        eprintln!("warning: could not read the open-file limit; continuing");
        return Ok(());
    };
    if soft >= needed {
        return Ok(());
    }
    if hard < needed {
        bail!(
            "{needed} open files needed, but the hard limit is {hard}: use fewer --users \
             (one process here cannot hold more)"
        );
    }
    let status = Command::new("prlimit")
        .arg("--pid")
        .arg(std::process::id().to_string())
        .arg(format!("--nofile={hard}:{hard}"))
        .status()
        .context("running prlimit to raise the open-file limit")?;
    let now = nofile_limits().map(|l| l.0).unwrap_or(0);
    if !status.success() || now < needed {
        bail!("could not raise the open-file soft limit from {soft} to {hard} (now {now})");
    }
    eprintln!("raised the open-file soft limit from {soft} to {now}");
    Ok(())
}

pub fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

pub fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

/// count, p50, p90, p99, max (ms) of a sample.
pub fn latency_cells(sample: &[Duration]) -> Vec<String> {
    let mut sorted = sample.to_vec();
    sorted.sort();
    vec![
        sorted.len().to_string(),
        ms(percentile(&sorted, 0.50)),
        ms(percentile(&sorted, 0.90)),
        ms(percentile(&sorted, 0.99)),
        ms(sorted.last().copied().unwrap_or_default()),
    ]
}
