//! CPU time and memory of processes, and the machine's CPU, read from /proc (Linux): for the
//! benchmark binaries and `loadgen`. A process is named by its pid or `"self"`.

use std::fmt::Display;
use std::sync::OnceLock;

/// Clock ticks per second (`getconf CLK_TCK`, read once; 100 if it cannot be read).
pub fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// User + system CPU seconds of a process (utime + stime of /proc/<pid>/stat); 0 if they
/// cannot be read.
pub fn cpu_seconds(pid: impl Display) -> f64 {
    read_cpu_seconds(pid).unwrap_or(0.0)
}

fn read_cpu_seconds(pid: impl Display) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3 (state).
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

/// A `VmRSS:`/`VmHWM:`-style field of /proc/<pid>/status, KiB.
pub fn status_kib(pid: impl Display, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Busy and total jiffies of the whole machine (the first line of /proc/stat); (0, 0) if it
/// cannot be read.
pub fn machine_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().next() else {
        return (0, 0);
    };
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = values.iter().take(8).sum();
    let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// Resident set size of a process in MiB (`VmRSS`); 0 if it cannot be read.
pub fn rss_mib(pid: impl Display) -> f64 {
    status_kib(pid, "VmRSS:").map_or(0.0, |kib| kib as f64 / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        assert!(read_cpu_seconds("self").is_some());
        assert!(read_cpu_seconds(std::process::id()).is_some());
        assert!(status_kib("self", "VmHWM:").unwrap() > 0);
        assert!(rss_mib(std::process::id()) > 0.0);
        assert_eq!(cpu_seconds(u32::MAX), 0.0);
        let (busy, total) = machine_jiffies();
        assert!(total > 0 && busy <= total);
    }
}
