//! One process or several: reads the open-file limit, and when one process cannot hold the
//! connections, re-runs itself as worker processes (each with its own source addresses) and
//! merges their reports.

use std::io::Write;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::conn::Target;
use crate::run::{self, Control, Kind, Slice, Spec};
use crate::stats::{Progress, Report, Stats};
use crate::Common;

/// Raises the soft open-file limit to the hard one; returns the limit in force.
pub fn nofile_limit() -> u64 {
    rlimit::increase_nofile_limit(u64::MAX)
        .or_else(|_| rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(soft, _)| soft))
        .unwrap_or(1024)
}

/// Connections one process may hold (a reserve for the runtime, logs and pipes).
pub fn per_process_capacity(limit: u64) -> usize {
    (limit.saturating_sub(256) as usize).max(64)
}

struct LocalControl {
    quiet: bool,
    ready_file: Option<std::path::PathBuf>,
    drained_file: Option<std::path::PathBuf>,
    last: Mutex<(Progress, Instant)>,
}

impl Control for LocalControl {
    fn progress(&self, stats: &Stats, elapsed: f64) {
        if self.quiet {
            return;
        }
        let p = stats.progress();
        let mut last = self.last.lock().expect("progress lock");
        let dt = last.1.elapsed().as_secs_f64();
        eprintln!("{}", p.line(&last.0, elapsed, dt));
        *last = (p, Instant::now());
    }

    async fn ready(&self) {
        if let Some(f) = &self.ready_file {
            let _ = std::fs::write(f, b"ready\n");
        }
    }

    fn drained(&self) {
        if let Some(f) = &self.drained_file {
            let _ = std::fs::write(f, b"drained\n");
        }
    }
}

struct WorkerControl;

impl Control for WorkerControl {
    fn progress(&self, stats: &Stats, _elapsed: f64) {
        let p = stats.progress();
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "P {}", serde_json::to_string(&p).unwrap_or_default());
        let _ = out.flush();
    }

    async fn ready(&self) {
        {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "READY");
            let _ = out.flush();
        }
        // Wait for the parent's GO (or for stdin to close).
        let _ = tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
        })
        .await;
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Completes what only the merged report can know, and derives the rates.
fn finish(report: &mut Report) {
    if report.scenario == Kind::Bigroom.name() {
        report.expected = report.joined * report.sent.saturating_sub(report.rejected);
    }
    report.finish();
}

pub fn main(common: Common, spec: Spec, targets: Vec<Target>) -> Result<()> {
    let limit = nofile_limit();
    let rt = runtime()?;
    if let (Some(index), Some(count)) = (common.worker_index, common.worker_count) {
        let report = rt.block_on(run::run(
            spec,
            targets,
            Slice { index, count },
            &WorkerControl,
        ))?;
        let path = common.worker_json.context("--worker-json is required")?;
        std::fs::write(&path, serde_json::to_vec(&report)?)?;
        return Ok(());
    }
    let cap = per_process_capacity(limit);
    let need = spec.connections.div_ceil(cap).max(1);
    let n = common.workers.unwrap_or(need).max(need);
    if n > 64 {
        bail!("{n} worker processes needed; that is too many");
    }
    if !common.quiet {
        eprintln!(
            "loadgen {}: {} connections to {} target(s), {} process(es) (open-file limit {limit}), {} s",
            spec.kind.name(),
            spec.connections,
            targets.len(),
            n,
            spec.duration_s
        );
    }
    let mut report = if n == 1 {
        let control = LocalControl {
            quiet: common.quiet,
            ready_file: common.ready_file.clone(),
            drained_file: common.drained_file.clone(),
            last: Mutex::new((Progress::default(), Instant::now())),
        };
        rt.block_on(run::run(
            spec.clone(),
            targets,
            Slice { index: 0, count: 1 },
            &control,
        ))?
    } else {
        let mut r = rt.block_on(parent(&common, &spec, n))?;
        let own = e2e::procfs::cpu_seconds("self");
        r.cpu_s += own;
        r.cpu_total_s += own;
        r
    };
    finish(&mut report);
    print!("{}", report.table());
    if let Some(path) = &common.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Runs the scenario as `n` worker processes (this binary again, with the same arguments and
/// its slice): starts them, prints their summed progress, starts them together once all are
/// connected, waits for them and merges their reports.
async fn parent(common: &Common, spec: &Spec, n: usize) -> Result<Report> {
    let progress = Arc::new(Mutex::new(vec![Progress::default(); n]));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<usize>();
    let mut workers = spawn_workers(common, spec, n, &progress, ready_tx)?;
    let t0 = Instant::now();
    let limit = Duration::from_secs_f64(
        60.0 + spec.connections as f64 / spec.connect_rate.max(1.0)
            + spec.duration_s
            + spec.drain_s
            + 30.0,
    );
    let mut printer = ProgressPrinter {
        quiet: common.quiet,
        t0,
        last: Progress::default(),
        last_t: Instant::now(),
    };
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    ticker.tick().await;
    // Wait for every worker's READY, then start them together.
    let mut ready = 0;
    while ready < n {
        tokio::select! {
            r = ready_rx.recv() => match r {
                Some(_) => ready += 1,
                None => break,
            },
            _ = ticker.tick() => printer.print(&progress),
        }
        if t0.elapsed() > limit {
            bail!("workers did not get ready in time");
        }
    }
    if let Some(f) = &common.ready_file {
        let _ = std::fs::write(f, b"ready\n");
    }
    for s in workers.stdins.iter_mut() {
        let _ = s.write_all(b"GO\n").await;
        let _ = s.flush().await;
    }
    wait_workers(&mut workers.children, t0, limit, &mut ticker, || {
        printer.print(&progress)
    })
    .await?;
    drop(workers.stdins);
    if let Some(f) = &common.drained_file {
        let _ = std::fs::write(f, b"drained\n");
    }
    let mut parts = Vec::new();
    for f in &workers.files {
        let data = std::fs::read(f).with_context(|| format!("worker report {}", f.display()))?;
        parts.push(serde_json::from_slice::<Report>(&data)?);
        let _ = std::fs::remove_file(f);
    }
    Ok(Report::merge(&parts))
}

/// The worker processes: their handles, their stdins (for GO) and their report files.
struct Workers {
    children: Vec<tokio::process::Child>,
    stdins: Vec<tokio::process::ChildStdin>,
    files: Vec<std::path::PathBuf>,
}

/// Starts `n` workers, each writing its report to a file of its own, and forwards their
/// output: `READY` to `ready_tx` (with the worker's index), progress lines into `progress`.
fn spawn_workers(
    common: &Common,
    spec: &Spec,
    n: usize,
    progress: &Arc<Mutex<Vec<Progress>>>,
    ready_tx: tokio::sync::mpsc::UnboundedSender<usize>,
) -> Result<Workers> {
    let exe = std::env::current_exe()?;
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let dir = std::env::temp_dir();
    let pid = std::process::id();
    let mut workers = Workers {
        children: Vec::new(),
        stdins: Vec::new(),
        files: Vec::new(),
    };
    for i in 0..n {
        let file = dir.join(format!("loadgen-{pid}-{i}.json"));
        let _ = std::fs::remove_file(&file);
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.args(&args);
        if common.tag.is_none() {
            cmd.arg("--tag").arg(&spec.tag);
        }
        let mut child = cmd
            .arg("--worker-index")
            .arg(i.to_string())
            .arg("--worker-count")
            .arg(n.to_string())
            .arg("--worker-json")
            .arg(&file)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting a worker process")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        workers
            .stdins
            .push(child.stdin.take().context("worker stdin")?);
        let progress = progress.clone();
        let ready_tx = ready_tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if line == "READY" {
                    let _ = ready_tx.send(i);
                } else if let Some(p) = line.strip_prefix("P ") {
                    if let Ok(p) = serde_json::from_str::<Progress>(p) {
                        progress.lock().expect("progress lock")[i] = p;
                    }
                }
            }
        });
        workers.children.push(child);
        workers.files.push(file);
    }
    Ok(workers)
}

/// Prints the workers' summed progress once a second (unless quiet).
struct ProgressPrinter {
    quiet: bool,
    t0: Instant,
    last: Progress,
    last_t: Instant,
}

impl ProgressPrinter {
    fn print(&mut self, progress: &Arc<Mutex<Vec<Progress>>>) {
        if self.quiet {
            return;
        }
        let p = Progress::sum(progress.lock().expect("progress lock").iter().copied());
        eprintln!(
            "{}",
            p.line(
                &self.last,
                self.t0.elapsed().as_secs_f64(),
                self.last_t.elapsed().as_secs_f64()
            )
        );
        self.last = p;
        self.last_t = Instant::now();
    }
}

/// Waits until every worker has exited, printing progress on each tick; past `limit` (from
/// `t0`) kills them all and fails.
async fn wait_workers(
    children: &mut [tokio::process::Child],
    t0: Instant,
    limit: Duration,
    ticker: &mut tokio::time::Interval,
    mut print: impl FnMut(),
) -> Result<()> {
    let n = children.len();
    let mut done = vec![false; n];
    while done.iter().any(|d| !d) {
        for (i, c) in children.iter_mut().enumerate() {
            if !done[i] && c.try_wait()?.is_some() {
                done[i] = true;
            }
        }
        if t0.elapsed() > limit {
            for c in children.iter_mut() {
                let _ = c.start_kill();
            }
            bail!("workers did not finish in time; killed them");
        }
        tokio::select! {
            _ = ticker.tick() => print(),
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    Ok(())
}
