//! Counters, latency histograms and the result report (mergeable across worker processes).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Microseconds since the Unix epoch (all processes share the machine's clock).
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Latency histogram in microseconds, 1 µs .. 10 min, 3 significant digits.
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

const SHARDS: usize = 16;

/// Live counters of one process, updated by every connection task.
pub struct Stats {
    pub connects: AtomicU64,
    pub connect_errors: AtomicU64,
    pub open: AtomicU64,
    pub max_open: AtomicU64,
    pub sent: AtomicU64,
    pub send_errors: AtomicU64,
    pub delivered: AtomicU64,
    pub distinct: AtomicU64,
    pub duplicates: AtomicU64,
    pub out_of_order: AtomicU64,
    pub delivered_bytes: AtomicU64,
    pub own_echoes: AtomicU64,
    pub rejected: AtomicU64,
    pub presence_frames: AtomicU64,
    pub unexpected_closes: AtomicU64,
    pub reconnects: AtomicU64,
    pub cycles: AtomicU64,
    pub acks_sent: AtomicU64,
    pub replayed: AtomicU64,
    pub truncated: AtomicU64,
    pub first_delivery_us: AtomicU64,
    pub last_delivery_us: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
    closes: Mutex<BTreeMap<String, u64>>,
    latency: Vec<Mutex<Histogram<u64>>>,
    connect_latency: Mutex<Histogram<u64>>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            connects: AtomicU64::new(0),
            connect_errors: AtomicU64::new(0),
            open: AtomicU64::new(0),
            max_open: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            send_errors: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            distinct: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            out_of_order: AtomicU64::new(0),
            delivered_bytes: AtomicU64::new(0),
            own_echoes: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            presence_frames: AtomicU64::new(0),
            unexpected_closes: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            cycles: AtomicU64::new(0),
            acks_sent: AtomicU64::new(0),
            replayed: AtomicU64::new(0),
            truncated: AtomicU64::new(0),
            first_delivery_us: AtomicU64::new(u64::MAX),
            last_delivery_us: AtomicU64::new(0),
            errors: Mutex::new(BTreeMap::new()),
            closes: Mutex::new(BTreeMap::new()),
            latency: (0..SHARDS).map(|_| Mutex::new(new_hist())).collect(),
            connect_latency: Mutex::new(new_hist()),
        }
    }
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub fn opened(&self, connect_us: u64) {
        self.connects.fetch_add(1, Relaxed);
        let open = self.open.fetch_add(1, Relaxed) + 1;
        self.max_open.fetch_max(open, Relaxed);
        let _ = self
            .connect_latency
            .lock()
            .expect("histogram lock")
            .record(connect_us.max(1));
    }

    pub fn closed(&self) {
        self.open.fetch_sub(1, Relaxed);
    }

    pub fn error(&self, code: &str) {
        *self
            .errors
            .lock()
            .expect("errors lock")
            .entry(code.to_string())
            .or_default() += 1;
    }

    pub fn close_code(&self, code: &str) {
        *self
            .closes
            .lock()
            .expect("closes lock")
            .entry(code.to_string())
            .or_default() += 1;
    }

    /// One delivery of a message that carried our send timestamp.
    pub fn delivery(&self, shard: usize, sent_us: u64, now: u64, bytes: usize) {
        self.delivered.fetch_add(1, Relaxed);
        self.delivered_bytes.fetch_add(bytes as u64, Relaxed);
        self.first_delivery_us.fetch_min(now, Relaxed);
        self.last_delivery_us.fetch_max(now, Relaxed);
        let lat = now.saturating_sub(sent_us).max(1);
        let _ = self.latency[shard % SHARDS]
            .lock()
            .expect("histogram lock")
            .record(lat);
    }

    pub fn latency_snapshot(&self) -> Histogram<u64> {
        let mut h = new_hist();
        for shard in &self.latency {
            let _ = h.add(&*shard.lock().expect("histogram lock"));
        }
        h
    }

    pub fn progress(&self) -> Progress {
        Progress {
            open: self.open.load(Relaxed),
            connects: self.connects.load(Relaxed),
            connect_errors: self.connect_errors.load(Relaxed),
            sent: self.sent.load(Relaxed),
            delivered: self.delivered.load(Relaxed),
            errors: self
                .errors
                .lock()
                .expect("errors lock")
                .values()
                .sum::<u64>()
                + self.unexpected_closes.load(Relaxed)
                + self.connect_errors.load(Relaxed),
            cycles: self.cycles.load(Relaxed),
        }
    }

    /// The process's report; `expected` is filled by the scenario.
    pub fn report(&self, scenario: &str) -> Report {
        let lat = self.latency_snapshot();
        let con = self.connect_latency.lock().expect("histogram lock").clone();
        let first = self.first_delivery_us.load(Relaxed);
        Report {
            scenario: scenario.to_string(),
            connects: self.connects.load(Relaxed),
            connect_errors: self.connect_errors.load(Relaxed),
            max_open: self.max_open.load(Relaxed),
            sent: self.sent.load(Relaxed),
            send_errors: self.send_errors.load(Relaxed),
            rejected: self.rejected.load(Relaxed),
            delivered: self.delivered.load(Relaxed),
            distinct: self.distinct.load(Relaxed),
            duplicates: self.duplicates.load(Relaxed),
            out_of_order: self.out_of_order.load(Relaxed),
            delivered_bytes: self.delivered_bytes.load(Relaxed),
            own_echoes: self.own_echoes.load(Relaxed),
            presence_frames: self.presence_frames.load(Relaxed),
            unexpected_closes: self.unexpected_closes.load(Relaxed),
            reconnects: self.reconnects.load(Relaxed),
            cycles: self.cycles.load(Relaxed),
            acks_sent: self.acks_sent.load(Relaxed),
            replayed: self.replayed.load(Relaxed),
            truncated: self.truncated.load(Relaxed),
            first_delivery_us: if first == u64::MAX { 0 } else { first },
            last_delivery_us: self.last_delivery_us.load(Relaxed),
            errors: self.errors.lock().expect("errors lock").clone(),
            closes: self.closes.lock().expect("closes lock").clone(),
            latency_hist: hist_to_pairs(&lat),
            connect_hist: hist_to_pairs(&con),
            ..Default::default()
        }
    }
}

/// Counters printed by the progress line (and sent by workers to their parent).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Progress {
    pub open: u64,
    pub connects: u64,
    pub connect_errors: u64,
    pub sent: u64,
    pub delivered: u64,
    pub errors: u64,
    pub cycles: u64,
}

impl Progress {
    pub fn sum(items: impl IntoIterator<Item = Progress>) -> Progress {
        let mut p = Progress::default();
        for i in items {
            p.open += i.open;
            p.connects += i.connects;
            p.connect_errors += i.connect_errors;
            p.sent += i.sent;
            p.delivered += i.delivered;
            p.errors += i.errors;
            p.cycles += i.cycles;
        }
        p
    }

    pub fn line(&self, prev: &Progress, elapsed_s: f64, dt: f64) -> String {
        let rate = |a: u64, b: u64| (a.saturating_sub(b)) as f64 / dt.max(1e-3);
        format!(
            "[{elapsed_s:6.1}s] open {:>7}  connects/s {:>8.0}  sent/s {:>8.0}  delivered/s {:>10.0}  cycles/s {:>6.0}  errors {}",
            self.open,
            rate(self.connects, prev.connects),
            rate(self.sent, prev.sent),
            rate(self.delivered, prev.delivered),
            rate(self.cycles, prev.cycles),
            self.errors
        )
    }
}

fn hist_to_pairs(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

fn pairs_to_hist(pairs: &[(u64, u64)]) -> Histogram<u64> {
    let mut h = new_hist();
    for &(v, c) in pairs {
        let _ = h.record_n(v.max(1), c);
    }
    h
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

fn percentiles(pairs: &[(u64, u64)]) -> Percentiles {
    let h = pairs_to_hist(pairs);
    if h.is_empty() {
        return Percentiles::default();
    }
    let ms = |us: u64| us as f64 / 1000.0;
    Percentiles {
        count: h.len(),
        p50_ms: ms(h.value_at_quantile(0.50)),
        p90_ms: ms(h.value_at_quantile(0.90)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        p999_ms: ms(h.value_at_quantile(0.999)),
        max_ms: ms(h.max()),
        mean_ms: h.mean() / 1000.0,
    }
}

/// The result of one run (one process, or merged over worker processes).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    pub scenario: String,
    pub settings: serde_json::Value,
    pub workers: u64,
    pub started_us: u64,
    pub finished_us: u64,
    /// Length of the measured phase (sending, or holding for `idle`), seconds.
    pub phase_s: f64,
    /// Time to open all connections, seconds.
    pub connect_phase_s: f64,
    pub connect_rate_per_s: f64,
    pub connects: u64,
    pub connect_errors: u64,
    /// Connections that completed their first login (or handshake, without login).
    pub joined: u64,
    pub max_open: u64,
    pub sent: u64,
    pub send_errors: u64,
    /// Chats refused with an error frame (not counted as lost).
    pub rejected: u64,
    pub delivered: u64,
    pub distinct: u64,
    pub expected: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub delivered_bytes: u64,
    pub own_echoes: u64,
    pub presence_frames: u64,
    pub unexpected_closes: u64,
    pub reconnects: u64,
    pub cycles: u64,
    pub acks_sent: u64,
    pub replayed: u64,
    pub truncated: u64,
    pub first_delivery_us: u64,
    pub last_delivery_us: u64,
    pub delivered_per_s: f64,
    pub sent_per_s: f64,
    pub bytes_per_delivery: f64,
    pub latency: Percentiles,
    pub connect_latency: Percentiles,
    pub errors: BTreeMap<String, u64>,
    pub closes: BTreeMap<String, u64>,
    /// CPU seconds (user + system) of the generator, workers included, from the end of the
    /// connect phase to the end (measured phase, drain, close).
    pub cpu_s: f64,
    /// The same over the whole run, connect phase included.
    pub cpu_total_s: f64,
    /// Peak RSS of the generator processes, summed, KiB.
    pub rss_kib: u64,
    pub latency_hist: Vec<(u64, u64)>,
    pub connect_hist: Vec<(u64, u64)>,
}

impl Report {
    /// Sums the reports of worker processes.
    pub fn merge(parts: &[Report]) -> Report {
        let mut r = Report {
            scenario: parts
                .first()
                .map(|p| p.scenario.clone())
                .unwrap_or_default(),
            settings: parts
                .first()
                .map(|p| p.settings.clone())
                .unwrap_or_default(),
            ..Default::default()
        };
        let mut lat = new_hist();
        let mut con = new_hist();
        r.started_us = u64::MAX;
        r.first_delivery_us = u64::MAX;
        for p in parts {
            r.workers += p.workers.max(1);
            r.started_us = r.started_us.min(p.started_us);
            r.finished_us = r.finished_us.max(p.finished_us);
            r.phase_s = r.phase_s.max(p.phase_s);
            r.connect_phase_s = r.connect_phase_s.max(p.connect_phase_s);
            r.connects += p.connects;
            r.connect_errors += p.connect_errors;
            r.joined += p.joined;
            r.max_open += p.max_open;
            r.sent += p.sent;
            r.send_errors += p.send_errors;
            r.rejected += p.rejected;
            r.delivered += p.delivered;
            r.distinct += p.distinct;
            r.expected += p.expected;
            r.duplicates += p.duplicates;
            r.out_of_order += p.out_of_order;
            r.delivered_bytes += p.delivered_bytes;
            r.own_echoes += p.own_echoes;
            r.presence_frames += p.presence_frames;
            r.unexpected_closes += p.unexpected_closes;
            r.reconnects += p.reconnects;
            r.cycles += p.cycles;
            r.acks_sent += p.acks_sent;
            r.replayed += p.replayed;
            r.truncated += p.truncated;
            if p.first_delivery_us > 0 {
                r.first_delivery_us = r.first_delivery_us.min(p.first_delivery_us);
            }
            r.last_delivery_us = r.last_delivery_us.max(p.last_delivery_us);
            r.cpu_s += p.cpu_s;
            r.cpu_total_s += p.cpu_total_s;
            r.rss_kib += p.rss_kib;
            for (k, v) in &p.errors {
                *r.errors.entry(k.clone()).or_default() += v;
            }
            for (k, v) in &p.closes {
                *r.closes.entry(k.clone()).or_default() += v;
            }
            let _ = lat.add(pairs_to_hist(&p.latency_hist));
            let _ = con.add(pairs_to_hist(&p.connect_hist));
        }
        if r.first_delivery_us == u64::MAX {
            r.first_delivery_us = 0;
        }
        r.latency_hist = hist_to_pairs(&lat);
        r.connect_hist = hist_to_pairs(&con);
        r
    }

    /// Derived figures (rates, percentiles, loss) from the raw counters.
    pub fn finish(&mut self) {
        self.latency = percentiles(&self.latency_hist);
        self.connect_latency = percentiles(&self.connect_hist);
        let span = self.last_delivery_us.saturating_sub(self.first_delivery_us) as f64 / 1e6;
        self.delivered_per_s = if span > 0.0 {
            self.delivered as f64 / span
        } else {
            0.0
        };
        self.sent_per_s = if self.phase_s > 0.0 {
            self.sent as f64 / self.phase_s
        } else {
            0.0
        };
        self.connect_rate_per_s = if self.connect_phase_s > 0.0 {
            self.connects as f64 / self.connect_phase_s
        } else {
            0.0
        };
        self.bytes_per_delivery = if self.delivered > 0 {
            self.delivered_bytes as f64 / self.delivered as f64
        } else {
            0.0
        };
        self.lost = self.expected.saturating_sub(self.distinct);
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut rows: Vec<(String, String)> = vec![
            ("scenario".into(), self.scenario.clone()),
            ("worker processes".into(), self.workers.to_string()),
            (
                "connections opened / failed".into(),
                format!("{} / {}", self.connects, self.connect_errors),
            ),
            ("connections held (max)".into(), self.max_open.to_string()),
            (
                "connect phase".into(),
                format!(
                    "{:.2} s ({:.0} connections/s)",
                    self.connect_phase_s, self.connect_rate_per_s
                ),
            ),
            (
                "connect latency p50 / p99 / max".into(),
                format!(
                    "{:.2} / {:.2} / {:.2} ms",
                    self.connect_latency.p50_ms,
                    self.connect_latency.p99_ms,
                    self.connect_latency.max_ms
                ),
            ),
            ("measured phase".into(), format!("{:.2} s", self.phase_s)),
            (
                "messages sent".into(),
                format!("{} ({:.0}/s)", self.sent, self.sent_per_s),
            ),
            (
                "deliveries".into(),
                format!(
                    "{} ({:.0}/s, {:.0} B each)",
                    self.delivered, self.delivered_per_s, self.bytes_per_delivery
                ),
            ),
            (
                "latency p50 / p90 / p99 / max".into(),
                format!(
                    "{:.3} / {:.3} / {:.3} / {:.3} ms",
                    self.latency.p50_ms,
                    self.latency.p90_ms,
                    self.latency.p99_ms,
                    self.latency.max_ms
                ),
            ),
            (
                "expected / distinct / lost".into(),
                format!("{} / {} / {}", self.expected, self.distinct, self.lost),
            ),
            (
                "duplicates / out of order".into(),
                format!("{} / {}", self.duplicates, self.out_of_order),
            ),
        ];
        if self.cycles > 0 {
            rows.push(("churn cycles".into(), self.cycles.to_string()));
        }
        if self.reconnects > 0 || self.acks_sent > 0 {
            rows.push((
                "reconnects / acks / replayed".into(),
                format!(
                    "{} / {} / {}",
                    self.reconnects, self.acks_sent, self.replayed
                ),
            ));
        }
        rows.push((
            "rejected / send errors / unexpected closes".into(),
            format!(
                "{} / {} / {}",
                self.rejected, self.send_errors, self.unexpected_closes
            ),
        ));
        rows.push(("error frames by code".into(), fmt_map(&self.errors)));
        rows.push(("closes by code".into(), fmt_map(&self.closes)));
        rows.push((
            "generator CPU after connecting".into(),
            format!(
                "{:.2} s ({:.2} µs per delivery)",
                self.cpu_s,
                if self.delivered > 0 {
                    self.cpu_s * 1e6 / self.delivered as f64
                } else {
                    0.0
                }
            ),
        ));
        let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut out = String::new();
        for (k, v) in rows {
            out.push_str(&format!("{k:<w$}  {v}\n"));
        }
        out
    }
}

fn fmt_map(m: &BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "none".into();
    }
    m.iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}
