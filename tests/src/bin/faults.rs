//! The longer fault-injection run of issue 16: a random schedule of every fault the suite
//! knows (`e2e::chaos::Fault`), replayable from its seed, against a lab of gateway nodes in
//! network namespaces; prints each fault with its recovery times, then the messages checked
//! and the violations found by the history checker. Exits 1 when there are violations.
//!
//! ```sh
//! cargo build -p gateway && cargo run -p e2e --bin faults -- --seed 7 --secs 600
//! ```
//!
//! `--soak` runs steady traffic with client churn (a user leaves and a new one arrives every
//! 10 s) and no faults, sampling every node's RSS and Redis's `used_memory` every 30 s, then
//! checks the history the same way. Needs root (network namespaces).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use e2e::chaos::{ChaosLab, Fault, LabConfig, Recovery};
use e2e::faultproxy::Rng;

#[derive(Parser)]
#[command(about = "Randomized fault injection (or a soak) with a history checker")]
struct Args {
    /// Seed of the schedule (and of every random choice of the run).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// How long to inject faults (or to soak), in seconds.
    #[arg(long, default_value_t = 120)]
    secs: u64,
    /// No faults: steady traffic with churn, memory sampled every 30 s.
    #[arg(long)]
    soak: bool,
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    #[arg(long, default_value_t = 3)]
    rooms: usize,
    #[arg(long, default_value_t = 4)]
    clients_per_room: usize,
    /// Only faults of this kind (as the summary table names them, e.g. "partition
    /// node/Redis"): the random schedule skips the others.
    #[arg(long)]
    only: Option<String>,
    /// Each client sends a message this often (milliseconds).
    #[arg(long, default_value_t = 200)]
    send_every_ms: u64,
}

fn config(args: &Args) -> LabConfig {
    LabConfig {
        nodes: args.nodes,
        rooms: args.rooms,
        clients_per_room: args.clients_per_room,
        send_every: Duration::from_millis(args.send_every_ms),
        seed: args.seed,
        ..LabConfig::small(if args.soak { "soak" } else { "rand" })
    }
}

fn summary(recoveries: &[Recovery]) -> String {
    let mut by_kind: BTreeMap<&str, Vec<&Recovery>> = BTreeMap::new();
    for r in recoveries {
        by_kind.entry(r.fault.kind()).or_default().push(r);
    }
    let mut out = String::from(
        "| fault | n | heal → send confirmed (all clients), max s | heal → delivered (all \
         clients), max s | heal → presence right, max s | presence wrong again after right | logout frames for connected users |\n\
         |---|---|---|---|---|---|---|\n",
    );
    let max = |rs: &[&Recovery], f: &dyn Fn(&Recovery) -> Option<Duration>| {
        let values: Vec<Option<Duration>> = rs.iter().map(|r| f(r)).collect();
        if values.iter().any(Option::is_none) {
            "not reached".to_string()
        } else {
            let m = values.into_iter().flatten().max().unwrap_or_default();
            format!("{:.2}", m.as_secs_f64())
        }
    };
    for (kind, rs) in by_kind {
        out.push_str(&format!(
            "| {kind} | {} | {} ({}) | {} ({}) | {} | {} | {} |\n",
            rs.len(),
            max(&rs, &|r| r.first_confirm),
            max(&rs, &|r| r.all_confirm),
            max(&rs, &|r| r.first_delivery),
            max(&rs, &|r| r.all_delivery),
            max(&rs, &|r| r.presence),
            rs.iter().map(|r| r.presence_flaps).sum::<u32>(),
            rs.iter().map(|r| r.logouts_of_connected).sum::<usize>(),
        ));
    }
    out
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    // Ctrl-C or SIGTERM ends the run early: the lab is still checked and cleaned up.
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let interrupted = interrupted.clone();
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            eprintln!("interrupted: finishing the run");
            interrupted.store(true, Ordering::Relaxed);
        });
    }
    let go_on = |t0: Instant| {
        t0.elapsed() < Duration::from_secs(args.secs) && !interrupted.load(Ordering::Relaxed)
    };
    let mut lab = ChaosLab::start(config(&args)).await?;
    lab.start_clients().await?;
    lab.traffic(true);
    let mut rng = Rng::new(args.seed ^ 0x5EED);
    let t0 = Instant::now();
    if args.soak {
        println!(
            "soak: {} s, {} nodes, {} rooms x {} clients, a message per client every {} ms",
            args.secs, args.nodes, args.rooms, args.clients_per_room, args.send_every_ms
        );
        println!("t_s\tgateway_rss_kib (per node)\tredis_used_memory_bytes\tmessages_confirmed");
        let mut next_sample = t0;
        let mut next_churn = t0 + Duration::from_secs(10);
        while go_on(t0) {
            if Instant::now() >= next_sample {
                print_sample(&lab, t0).await?;
                next_sample += Duration::from_secs(30);
            }
            if Instant::now() >= next_churn {
                lab.churn(rng.below(1 << 16) as usize).await?;
                next_churn += Duration::from_secs(10);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        print_sample(&lab, t0).await?;
    } else {
        println!(
            "randomized faults: seed {}, {} s, {} nodes, {} rooms x {} clients",
            args.seed, args.secs, args.nodes, args.rooms, args.clients_per_room
        );
        let mut n = 0;
        while go_on(t0) {
            let fault = loop {
                let fault = Fault::random(&mut rng, args.nodes);
                if args.only.as_deref().is_none_or(|k| k == fault.kind()) {
                    break fault;
                }
            };
            n += 1;
            println!("[{:>5.1} s] fault {n}: {fault}", t0.elapsed().as_secs_f64());
            let recovery = lab.inject(&fault).await?;
            println!("          {recovery}");
            // A calm moment between faults.
            let calm = rng.between(Duration::from_millis(500), Duration::from_millis(2500));
            tokio::time::sleep(calm).await;
        }
    }
    let recoveries = lab.recoveries.clone();
    let report = lab.finish().await?;
    println!("\n{report}");
    if !args.soak {
        let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
        for r in &recoveries {
            *kinds.entry(r.fault.kind()).or_default() += 1;
        }
        println!("faults injected: {} {kinds:?}", recoveries.len());
        println!("{}", summary(&recoveries));
    }
    println!(
        "seed {} ran {:.0} s: {} messages, {} (message, member) deliveries checked, {} violations",
        args.seed,
        started.elapsed().as_secs_f64(),
        report.stats.messages,
        report.stats.expected_deliveries,
        report.violations.len()
    );
    if !report.violations.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}

/// One soak sample line: seconds, gateway RSS per node, Redis used_memory, messages confirmed.
async fn print_sample(lab: &ChaosLab, t0: Instant) -> anyhow::Result<()> {
    let (rss, used) = lab.memory().await?;
    println!(
        "{}\t{:?}\t{used}\t{}",
        t0.elapsed().as_secs(),
        rss,
        lab.history.stats().confirmed
    );
    Ok(())
}
