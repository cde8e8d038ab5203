//! Results: rows of (scenario, metric, value), some checked against a target, shown
//! as a Markdown table or as JSON.

use std::path::Path;

use serde_json::{json, Value};

#[derive(Debug, Clone, Copy)]
pub enum Goal {
    AtLeast(f64),
    AtMost(f64),
}

#[derive(Debug, Clone)]
pub struct Target {
    /// As the brief states it, e.g. ">= 85 % of limit write+fsync".
    pub text: String,
    pub goal: Goal,
    /// The figure compared with the goal (a ratio, a rate, bytes...).
    pub actual: f64,
}

impl Target {
    pub fn met(&self) -> bool {
        match self.goal {
            Goal::AtLeast(x) => self.actual >= x,
            Goal::AtMost(x) => self.actual <= x,
        }
    }

    /// How far past (+) or short of (-) the goal, relative to the goal.
    pub fn margin(&self) -> f64 {
        match self.goal {
            Goal::AtLeast(x) => (self.actual - x) / x,
            Goal::AtMost(x) => (x - self.actual) / x,
        }
    }

    pub fn verdict(&self) -> String {
        let pct = 100.0 * self.margin();
        if self.met() {
            format!("met ({pct:+.0} %)")
        } else {
            format!("NOT met ({pct:+.0} %)")
        }
    }
}

#[derive(Debug, Clone)]
pub struct Row {
    pub scenario: &'static str,
    pub metric: String,
    pub value: f64,
    pub unit: &'static str,
    pub target: Option<Target>,
}

impl Row {
    pub fn new(
        scenario: &'static str,
        metric: impl Into<String>,
        value: f64,
        unit: &'static str,
    ) -> Row {
        Row {
            scenario,
            metric: metric.into(),
            value,
            unit,
            target: None,
        }
    }

    pub fn with_target(mut self, text: impl Into<String>, goal: Goal, actual: f64) -> Row {
        self.target = Some(Target {
            text: text.into(),
            goal,
            actual,
        });
        self
    }

    fn shown(&self) -> String {
        let v = self.value;
        if !v.is_finite() {
            return "n/a".into();
        }
        let digits = if v.abs() >= 100.0 || v.fract() == 0.0 {
            0
        } else if v.abs() >= 10.0 {
            1
        } else {
            2
        };
        match self.unit {
            "" => format!("{v:.digits$}"),
            "%" => format!("{v:.0} %"),
            unit => format!("{v:.digits$} {unit}"),
        }
    }
}

pub fn table(rows: &[Row]) -> String {
    let mut out =
        String::from("| scenario | metric | value | target | result |\n|---|---|---|---|---|\n");
    for row in rows {
        let (text, verdict) = match &row.target {
            Some(t) => (t.text.clone(), t.verdict()),
            None => (String::new(), String::new()),
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            row.scenario,
            row.metric,
            row.shown(),
            text,
            verdict
        ));
    }
    out
}

pub fn json(rows: &[Row], machine: &Value, settings: Value) -> Value {
    let rows: Vec<Value> = rows
        .iter()
        .map(|r| {
            let mut v = json!({
                "scenario": r.scenario,
                "metric": r.metric,
                "value": r.value,
                "unit": r.unit,
            });
            if let Some(t) = &r.target {
                v["target"] = json!({
                    "text": t.text,
                    "actual": t.actual,
                    "met": t.met(),
                    "margin": t.margin(),
                });
            }
            v
        })
        .collect();
    json!({ "machine": machine, "settings": settings, "rows": rows })
}

/// Cores, memory, kernel and the filesystem holding `dir`.
pub fn machine(dir: &Path) -> Value {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let (device, mount, fstype) = filesystem_of(dir).unwrap_or_default();
    json!({
        "cores": cores,
        "memory_gib": (mem_kib as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        "kernel": kernel,
        "work_dir": dir.display().to_string(),
        "filesystem": { "device": device, "mount": mount, "type": fstype },
    })
}

/// The mount (longest matching mount point in /proc/mounts) holding `dir`.
fn filesystem_of(dir: &Path) -> Option<(String, String, String)> {
    let dir = std::fs::canonicalize(dir).ok()?;
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((
                f.next()?.to_owned(),
                f.next()?.to_owned(),
                f.next()?.to_owned(),
            ))
        })
        .filter(|(_, mount, _)| dir.starts_with(mount))
        .max_by_key(|(_, mount, _)| mount.len())
}

/// The 1-minute load average (other work on the machine skews every figure).
pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// p50 and p99 rows of latencies in ms, and a row for failures if there were any.
pub fn latency_rows(
    scenario: &'static str,
    what: &str,
    latencies: Vec<f64>,
    failed: u64,
) -> Vec<Row> {
    let mut rows = percentile_rows(scenario, what, latencies, None);
    if failed > 0 {
        rows.push(Row::new(scenario, "failed uploads", failed as f64, ""));
    }
    rows
}

/// p50 and p99 rows of latencies in ms; with `p99_below_ms`, the p99 row carries
/// the target "p99 < N ms".
pub fn percentile_rows(
    scenario: &'static str,
    what: &str,
    mut latencies: Vec<f64>,
    p99_below_ms: Option<f64>,
) -> Vec<Row> {
    latencies.sort_by(f64::total_cmp);
    let p99 = percentile(&latencies, 99.0);
    let mut p99_row = Row::new(scenario, format!("{what} p99"), p99, "ms");
    if let Some(limit) = p99_below_ms {
        p99_row = p99_row.with_target(format!("p99 < {limit:.0} ms"), Goal::AtMost(limit), p99);
    }
    vec![
        Row::new(
            scenario,
            format!("{what} p50"),
            percentile(&latencies, 50.0),
            "ms",
        ),
        p99_row,
    ]
}

/// The `p`-th percentile (0..=100) of sorted samples, nearest rank.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
    }

    #[test]
    fn margins_point_the_right_way() {
        let t = |goal, actual| Target {
            text: String::new(),
            goal,
            actual,
        };
        assert!(t(Goal::AtLeast(0.85), 0.9).met());
        assert!(t(Goal::AtLeast(0.85), 0.9).margin() > 0.0);
        assert!(!t(Goal::AtMost(64.0), 80.0).met());
        assert!((t(Goal::AtMost(64.0), 80.0).margin() + 0.25).abs() < 1e-9);
    }
}
