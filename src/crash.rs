//! Named crash points for the crash-consistency tests: with `EDPO_CRASH_AT=NAME:N` in the
//! environment, the process kills itself (SIGKILL, as a power cut or the OOM killer would) the
//! N-th time it reaches the point `NAME`. Without the variable a point costs one lookup.
//!
//! Points: `table.tmp-written` (a Parquet file is written but not yet renamed into place),
//! `train.tables-saved` (run tables saved, checkpoint not yet), `checkpoint.tmp-written`,
//! `checkpoint.renamed` (before older checkpoints are pruned), `prep.shard-written` (a shard
//! is in place, the manifest not yet updated).

use std::sync::atomic::{AtomicU64, Ordering};

static REACHED: AtomicU64 = AtomicU64::new(0);

/// Kills the process here if `EDPO_CRASH_AT` names this point and this is its N-th visit.
pub fn point(name: &str) {
    let Ok(spec) = std::env::var("EDPO_CRASH_AT") else {
        return;
    };
    let Some((target, nth)) = spec.split_once(':') else {
        return;
    };
    if target != name {
        return;
    }
    let visit = REACHED.fetch_add(1, Ordering::SeqCst) + 1;
    if nth.parse::<u64>().is_ok_and(|n| n == visit) {
        // SAFETY: kill(2) on our own pid with a valid signal has no memory-safety preconditions.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}
