//! Which shards a prep process scores: worker I of N scores shards i ≡ I (mod N). I and N come
//! from `--worker I/N`, else from a Slurm job array's variables, else from a Kubernetes
//! Indexed Job's `JOB_COMPLETION_INDEX` with `--workers N` (`EDPO_WORKERS`); without any of
//! them one process scores every shard.

use std::fmt;

/// Worker `index` of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Worker {
    pub index: usize,
    pub count: usize,
}

impl Default for Worker {
    fn default() -> Self {
        Worker::ALONE
    }
}

impl fmt::Display for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Worker {
    /// One process, every shard.
    pub const ALONE: Worker = Worker { index: 0, count: 1 };

    /// Whether shard `shard` is this worker's.
    pub fn owns(&self, shard: usize) -> bool {
        shard % self.count == self.index
    }

    /// Whether other processes share the shards (the output folder is written concurrently).
    pub fn shared(&self) -> bool {
        self.count > 1
    }
}

/// A worker setting that does not make sense (exit code 2); each names the flag or variable.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("`--worker {given}`: {why}; write INDEX/COUNT with 0 ≤ INDEX < COUNT, e.g. `--worker 0/4` … `--worker 3/4`")]
    Flag { given: String, why: String },
    #[error("`--workers {0}`: the number of workers must be at least 1 (e.g. the Indexed Job's `completions`)")]
    Count(usize),
    #[error("`--workers {flag}` disagrees with {with}; leave `--workers` out or make them equal")]
    Mismatch { flag: usize, with: String },
    #[error("`{var}={value}`: {why}")]
    Env {
        var: &'static str,
        value: String,
        why: String,
    },
    #[error("`JOB_COMPLETION_INDEX={0}` (a Kubernetes Indexed Job) needs the number of workers: pass `--workers N` or set `EDPO_WORKERS` to the Job's `completions`")]
    NoCount(String),
    #[error("`--workers {0}` needs this worker's index: pass `--worker I/{0}` instead, or run as a Slurm job array or a Kubernetes Indexed Job")]
    NoIndex(usize),
}

/// The worker and where it came from (for the summary), from the flags and the environment
/// (`env` looks a variable up).
pub fn resolve(
    flag: Option<&str>,
    workers: Option<usize>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<(Worker, String), WorkerError> {
    if workers == Some(0) {
        return Err(WorkerError::Count(0));
    }
    let check_count = |w: Worker, with: String| match workers {
        Some(n) if n != w.count => Err(WorkerError::Mismatch { flag: n, with }),
        _ => Ok(w),
    };
    if let Some(given) = flag {
        let w = parse_flag(given)?;
        return Ok((
            check_count(w, format!("`--worker {given}`"))?,
            "--worker".into(),
        ));
    }
    if let Some(id) = env("SLURM_ARRAY_TASK_ID") {
        let (w, from) = slurm(&id, &env)?;
        return Ok((check_count(w, from.clone())?, from));
    }
    if let Some(index) = env("JOB_COMPLETION_INDEX") {
        let count = workers.ok_or_else(|| WorkerError::NoCount(index.clone()))?;
        let i = number("JOB_COMPLETION_INDEX", &index)?;
        if i >= count {
            return Err(WorkerError::Env {
                var: "JOB_COMPLETION_INDEX",
                value: index,
                why: format!("the index must be below the {count} workers of `--workers`/`EDPO_WORKERS`; set it to the Job's `completions`"),
            });
        }
        let w = Worker { index: i, count };
        return Ok((w, format!("JOB_COMPLETION_INDEX={index}")));
    }
    match workers {
        Some(n) if n > 1 => Err(WorkerError::NoIndex(n)),
        _ => Ok((Worker::ALONE, "one process".into())),
    }
}

fn parse_flag(given: &str) -> Result<Worker, WorkerError> {
    let bad = |why: &str| WorkerError::Flag {
        given: given.to_string(),
        why: why.to_string(),
    };
    let (i, n) = given
        .split_once('/')
        .ok_or_else(|| bad("not of the form INDEX/COUNT"))?;
    let parse = |s: &str| s.trim().parse::<usize>().ok();
    let (Some(index), Some(count)) = (parse(i), parse(n)) else {
        return Err(bad("INDEX and COUNT must be whole numbers"));
    };
    if count == 0 {
        return Err(bad("COUNT must be at least 1"));
    }
    if index >= count {
        return Err(bad(&format!(
            "INDEX {index} is not below COUNT {count} (indices start at 0)"
        )));
    }
    Ok(Worker { index, count })
}

fn number(var: &'static str, value: &str) -> Result<usize, WorkerError> {
    value.trim().parse().map_err(|_| WorkerError::Env {
        var,
        value: value.to_string(),
        why: "not a whole number".into(),
    })
}

/// A Slurm array task's worker: I = (SLURM_ARRAY_TASK_ID − SLURM_ARRAY_TASK_MIN) / STEP, so
/// `--array=1-4` or `--array=0-6:2` work as well as `--array=0-3`; N = SLURM_ARRAY_TASK_COUNT
/// (else (MAX − MIN) / STEP + 1). An array that is not an evenly spaced range (`--array=1,2,7`)
/// gives an index outside 0..N, which is refused.
fn slurm(id: &str, env: &impl Fn(&str) -> Option<String>) -> Result<(Worker, String), WorkerError> {
    let var = |name: &'static str| -> Result<Option<usize>, WorkerError> {
        env(name).map(|v| number(name, &v)).transpose()
    };
    let task = number("SLURM_ARRAY_TASK_ID", id)?;
    let min = var("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
    let step = var("SLURM_ARRAY_TASK_STEP")?.unwrap_or(1).max(1);
    let count = match (var("SLURM_ARRAY_TASK_COUNT")?, var("SLURM_ARRAY_TASK_MAX")?) {
        (Some(n), _) => n,
        (None, Some(max)) if max >= min => (max - min) / step + 1,
        _ => {
            return Err(WorkerError::Env {
                var: "SLURM_ARRAY_TASK_ID",
                value: id.to_string(),
                why: "neither SLURM_ARRAY_TASK_COUNT nor SLURM_ARRAY_TASK_MAX is set; pass `--worker I/N`".into(),
            })
        }
    };
    let offset = task.checked_sub(min).filter(|o| o % step == 0);
    let index = offset.map(|o| o / step).filter(|&i| i < count);
    let Some(index) = index else {
        return Err(WorkerError::Env {
            var: "SLURM_ARRAY_TASK_ID",
            value: id.to_string(),
            why: format!("with SLURM_ARRAY_TASK_MIN={min}, step {step} and {count} tasks this is not one of an evenly spaced range of task ids; submit with `--array=A-B` or `--array=A-B:STEP`, or pass `--worker I/N`"),
        });
    };
    let step_text = if step > 1 {
        format!(", over SLURM_ARRAY_TASK_STEP={step}")
    } else {
        String::new()
    };
    let from = format!(
        "SLURM_ARRAY_TASK_ID={task} minus SLURM_ARRAY_TASK_MIN={min}{step_text}; SLURM_ARRAY_TASK_COUNT={count}"
    );
    Ok((Worker { index, count }, from))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn with(
        vars: &[(&str, &str)],
        flag: Option<&str>,
        workers: Option<usize>,
    ) -> Result<Worker, String> {
        let env: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        resolve(flag, workers, |k| env.get(k).cloned())
            .map(|(w, _)| w)
            .map_err(|e| e.to_string())
    }

    fn w(index: usize, count: usize) -> Result<Worker, String> {
        Ok(Worker { index, count })
    }

    #[test]
    fn the_flag_wins_and_is_checked() {
        let slurm = [
            ("SLURM_ARRAY_TASK_ID", "5"),
            ("SLURM_ARRAY_TASK_COUNT", "9"),
        ];
        assert_eq!(with(&slurm, Some("2/3"), None), w(2, 3));
        assert_eq!(with(&[], None, None), w(0, 1));
        for (bad, needle) in [
            ("3/2", "not below COUNT"),
            ("1-2", "INDEX/COUNT"),
            ("a/2", "whole numbers"),
            ("0/0", "at least 1"),
        ] {
            let err = with(&[], Some(bad), None).unwrap_err();
            assert!(
                err.contains(&format!("`--worker {bad}`")) && err.contains(needle),
                "{err}"
            );
        }
        let err = with(&[], Some("1/3"), Some(4)).unwrap_err();
        assert!(
            err.contains("--workers 4") && err.contains("--worker 1/3"),
            "{err}"
        );
    }

    #[test]
    fn slurm_task_ids_are_offset_by_the_array_minimum_and_step() {
        let array = |id: &str, min: &str, max: &str, step: Option<&str>, count: Option<&str>| {
            let mut v = vec![
                ("SLURM_ARRAY_TASK_ID", id),
                ("SLURM_ARRAY_TASK_MIN", min),
                ("SLURM_ARRAY_TASK_MAX", max),
            ];
            v.extend(step.map(|s| ("SLURM_ARRAY_TASK_STEP", s)));
            v.extend(count.map(|c| ("SLURM_ARRAY_TASK_COUNT", c)));
            with(&v, None, None)
        };
        assert_eq!(array("0", "0", "2", None, Some("3")), w(0, 3));
        assert_eq!(
            array("4", "1", "4", Some("1"), Some("4")),
            w(3, 4),
            "--array=1-4"
        );
        assert_eq!(
            array("6", "0", "6", Some("2"), Some("4")),
            w(3, 4),
            "--array=0-6:2"
        );
        assert_eq!(array("3", "1", "3", None, None), w(2, 3), "count from MAX");
        let err = array("7", "1", "7", None, Some("3")).unwrap_err();
        assert!(
            err.contains("SLURM_ARRAY_TASK_ID=7") && err.contains("--array=A-B"),
            "{err}"
        );
        let err = array("3", "0", "6", Some("2"), Some("4")).unwrap_err();
        assert!(err.contains("evenly spaced"), "{err}");
    }

    #[test]
    fn kubernetes_indexed_jobs_need_the_worker_count() {
        assert_eq!(
            with(&[("JOB_COMPLETION_INDEX", "2")], None, Some(3)),
            w(2, 3)
        );
        let err = with(&[("JOB_COMPLETION_INDEX", "2")], None, None).unwrap_err();
        assert!(
            err.contains("--workers N") && err.contains("EDPO_WORKERS"),
            "{err}"
        );
        let err = with(&[("JOB_COMPLETION_INDEX", "3")], None, Some(3)).unwrap_err();
        assert!(err.contains("JOB_COMPLETION_INDEX=3"), "{err}");
        let err = with(&[], None, Some(3)).unwrap_err();
        assert!(err.contains("--worker I/3"), "{err}");
        assert_eq!(with(&[], None, Some(1)), w(0, 1));
        assert!(with(&[], None, Some(0))
            .unwrap_err()
            .contains("--workers 0"));
    }
}
