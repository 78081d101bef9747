//! The service's counters, gauges and histograms, exposed at `GET /metrics`
//! in the Prometheus text format (version 0.0.4): requests by route and
//! status, request, queue and compute latency, forwards in flight, queue
//! depth, rows per forward, and the batch-size cache's counters.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use wick_engine::CacheStats;

/// Upper bounds (seconds) of the latency histograms' buckets.
const SECONDS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Upper bounds of the rows-per-forward histogram's buckets.
const ROWS: [f64; 8] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

/// A cumulative histogram with fixed buckets.
#[derive(Debug)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    /// Sum of observations, in millionths (atomics hold integers).
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    fn observe(&self, value: f64) {
        if let Some(i) = self.bounds.iter().position(|&b| value <= b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_micros.fetch_add((value * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            cumulative += count.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// Everything `/metrics` reports that the service measures itself.
#[derive(Debug)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    request_seconds: Histogram,
    queue_seconds: Histogram,
    compute_seconds: Histogram,
    batch_rows: Histogram,
    in_flight: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Mutex::new(BTreeMap::new()),
            request_seconds: Histogram::new(&SECONDS),
            queue_seconds: Histogram::new(&SECONDS),
            compute_seconds: Histogram::new(&SECONDS),
            batch_rows: Histogram::new(&ROWS),
            in_flight: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// One finished request on `route` (the matched route template).
    pub fn request(&self, route: &str, status: u16, elapsed: Duration) {
        if let Ok(mut requests) = self.requests.lock() {
            *requests.entry((route.to_string(), status)).or_insert(0) += 1;
        }
        self.request_seconds.observe(elapsed.as_secs_f64());
    }

    /// How long one request waited in the queue for its forward.
    pub fn queued(&self, waited: Duration) {
        self.queue_seconds.observe(waited.as_secs_f64());
    }

    /// A forward starts: counts it in flight until the guard drops, then
    /// records its duration and rows.
    pub fn forward(&self, rows: usize) -> ForwardGuard<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.batch_rows.observe(rows as f64);
        ForwardGuard {
            metrics: self,
            start: std::time::Instant::now(),
        }
    }

    /// The Prometheus text exposition, with the queue depth and the cache
    /// counters read at the time of the call.
    pub fn render(&self, queue_depth: usize, admitted: usize, cache: CacheStats) -> String {
        let mut out = String::new();
        out.push_str("# HELP wick_requests_total Requests answered, by route and status.\n");
        out.push_str("# TYPE wick_requests_total counter\n");
        if let Ok(requests) = self.requests.lock() {
            for ((route, status), count) in requests.iter() {
                let route = route.replace('\\', "\\\\").replace('"', "\\\"");
                let _ = writeln!(
                    out,
                    "wick_requests_total{{route=\"{route}\",status=\"{status}\"}} {count}"
                );
            }
        }
        self.request_seconds
            .render(&mut out, "wick_request_seconds", "Time from request to response.");
        self.queue_seconds
            .render(&mut out, "wick_queue_seconds", "Time a request waited for its forward.");
        self.compute_seconds
            .render(&mut out, "wick_compute_seconds", "Time of one forward.");
        self.batch_rows
            .render(&mut out, "wick_batch_rows", "Rows per forward (batches formed).");
        let gauges = [
            (
                "wick_forwards_in_flight",
                "Forwards running now.",
                self.in_flight.load(Ordering::Relaxed),
            ),
            (
                "wick_queue_depth",
                "Requests waiting for a forward now.",
                queue_depth as u64,
            ),
            (
                "wick_requests_admitted",
                "Requests held now (body being read, queued, running or answered).",
                admitted as u64,
            ),
            (
                "wick_batch_cache_entries",
                "Batch sizes compiled and held.",
                cache.entries as u64,
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
        }
        let counters = [
            (
                "wick_batch_cache_hits_total",
                "Forwards whose batch size was compiled.",
                cache.hits,
            ),
            (
                "wick_batch_cache_misses_total",
                "Forwards that found their batch size not compiled.",
                cache.misses,
            ),
            (
                "wick_batch_cache_compiles_total",
                "Batch sizes compiled.",
                cache.compiles,
            ),
            (
                "wick_batch_cache_evictions_total",
                "Compiled batch sizes dropped.",
                cache.evictions,
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
        }
        out
    }
}

/// A forward in flight (see [`Metrics::forward`]).
pub struct ForwardGuard<'a> {
    metrics: &'a Metrics,
    start: std::time::Instant,
}

impl Drop for ForwardGuard<'_> {
    fn drop(&mut self) {
        self.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.metrics.compute_seconds.observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exposition holds every family with cumulative buckets.
    #[test]
    fn renders_prometheus_text() {
        let metrics = Metrics::default();
        metrics.request("/v2/models/{name}/infer", 200, Duration::from_millis(30));
        metrics.request("/v2/models/{name}/infer", 503, Duration::from_micros(200));
        metrics.queued(Duration::from_millis(3));
        drop(metrics.forward(4));
        let cache = CacheStats {
            hits: 5,
            misses: 1,
            compiles: 1,
            evictions: 0,
            entries: 1,
        };
        let text = metrics.render(2, 3, cache);
        for line in [
            "wick_requests_total{route=\"/v2/models/{name}/infer\",status=\"200\"} 1",
            "wick_requests_total{route=\"/v2/models/{name}/infer\",status=\"503\"} 1",
            "wick_request_seconds_bucket{le=\"0.001\"} 1",
            "wick_request_seconds_bucket{le=\"0.05\"} 2",
            "wick_request_seconds_count 2",
            "wick_queue_seconds_bucket{le=\"0.005\"} 1",
            "wick_batch_rows_bucket{le=\"4\"} 1",
            "wick_compute_seconds_count 1",
            "wick_forwards_in_flight 0",
            "wick_queue_depth 2",
            "wick_requests_admitted 3",
            "wick_batch_cache_hits_total 5",
            "wick_batch_cache_compiles_total 1",
        ] {
            assert!(text.contains(line), "missing `{line}` in:\n{text}");
        }
    }
}
