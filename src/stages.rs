//! Where a command's time went: wall seconds summed per named stage (read and tokenise, graph
//! runs, Parquet, optimiser …), reported in `prep` and `train` summaries.

use std::collections::BTreeMap;
use std::time::Instant;

/// Seconds per stage, summed over every call timed under that stage's name.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
#[serde(transparent)]
pub struct StageTimes(BTreeMap<&'static str, f64>);

impl StageTimes {
    /// Runs `f`, adding its wall time to `stage`.
    pub fn time<T>(&mut self, stage: &'static str, f: impl FnOnce() -> T) -> T {
        let started = Instant::now();
        let out = f();
        self.add(stage, started.elapsed().as_secs_f64());
        out
    }

    /// Adds `seconds` to `stage`.
    pub fn add(&mut self, stage: &'static str, seconds: f64) {
        *self.0.entry(stage).or_default() += seconds;
    }

    /// Moves `seconds` of `from` (time measured inside it) to `to`.
    pub fn split(&mut self, from: &'static str, to: &'static str, seconds: f64) {
        if seconds == 0.0 {
            return;
        }
        self.add(from, -seconds);
        self.add(to, seconds);
    }

    /// Adds every stage of `other`.
    pub fn merge(&mut self, other: &StageTimes) {
        for (stage, seconds) in &other.0 {
            self.add(stage, *seconds);
        }
    }

    /// Seconds of `stage` (0 if it never ran).
    pub fn get(&self, stage: &str) -> f64 {
        self.0.get(stage).copied().unwrap_or(0.0)
    }

    /// One line: "stage 1.2s (34%), …" in the order given by the stage names, shares of `wall`.
    pub fn line(&self, wall: f64) -> String {
        self.0
            .iter()
            .map(|(stage, s)| format!("{stage} {s:.1}s ({:.0}%)", 100.0 * s / wall.max(1e-9)))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_sum_and_split() {
        let mut t = StageTimes::default();
        t.add("graph", 1.5);
        t.add("graph", 0.5);
        t.add("parquet", 1.0);
        t.split("graph", "session", 0.5);
        assert_eq!(t.get("graph"), 1.5);
        assert_eq!(t.get("session"), 0.5);
        assert_eq!(t.get("absent"), 0.0);
        assert_eq!(
            t.line(4.0),
            "graph 1.5s (38%), parquet 1.0s (25%), session 0.5s (12%)"
        );
        assert_eq!(
            serde_json::to_string(&t).unwrap(),
            r#"{"graph":1.5,"parquet":1.0,"session":0.5}"#
        );
        let v = t.time("graph", || 7);
        assert_eq!(v, 7);
        assert!(t.get("graph") >= 1.5);
    }
}
