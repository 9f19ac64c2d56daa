//! Checkpoints: parameters (safetensors, Hugging Face names), AdamW moments, β, step, data
//! position and the resolved config, written to a temporary folder and renamed into place.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::optim::AdamW;
use crate::params::{ParamStore, ParamsError};

pub const CHECKPOINTS: &str = "checkpoints";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot write checkpoint `{path}`: {message}")]
    Write { path: PathBuf, message: String },
    #[error("checkpoint `{path}` is unreadable: {message}")]
    Read { path: PathBuf, message: String },
    #[error(transparent)]
    Params(#[from] ParamsError),
}

/// Everything besides tensors that a resumed run needs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    /// Optimiser steps done.
    pub step: u64,
    /// AdamW updates done (fewer than `step` when non-finite steps were skipped).
    pub adam_step: u64,
    /// Epoch of the next step and its index within that epoch's plan (the data position).
    pub epoch: u64,
    pub step_in_epoch: u64,
    /// β after the last update (objective.md §5).
    pub beta: f64,
    pub seed: u64,
    pub nonfinite_in_a_row: u32,
    pub nonfinite_total: u64,
    pub pairs_seen: u64,
    pub elapsed_s: f64,
    /// The resolved training configuration.
    pub config: serde_json::Value,
}

impl TrainState {
    /// The state of a run before its first step.
    pub fn start(beta: f64, seed: u64, config: serde_json::Value) -> TrainState {
        TrainState {
            step: 0,
            adam_step: 0,
            epoch: 0,
            step_in_epoch: 0,
            beta,
            seed,
            nonfinite_in_a_row: 0,
            nonfinite_total: 0,
            pairs_seen: 0,
            elapsed_s: 0.0,
            config,
        }
    }
}

pub fn step_dir(run: &Path, step: u64) -> PathBuf {
    run.join(CHECKPOINTS).join(format!("step-{step:08}"))
}

/// Flushes every file of `dir`, and `dir` itself, to the disk.
fn sync_folder(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        std::fs::File::open(entry?.path())?.sync_all()?;
    }
    std::fs::File::open(dir)?.sync_all()
}

/// Writes a checkpoint atomically (a temporary folder, flushed, then renamed into place);
/// removes older ones beyond `keep`.
pub fn save(
    run: &Path,
    state: &TrainState,
    params: &ParamStore,
    optimizer: &AdamW,
    keep: usize,
) -> Result<PathBuf, CheckpointError> {
    let final_dir = step_dir(run, state.step);
    let tmp = run
        .join(CHECKPOINTS)
        .join(format!(".tmp-step-{:08}", state.step));
    let err = |e: String| CheckpointError::Write {
        path: final_dir.clone(),
        message: e,
    };
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| err(e.to_string()))?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    params.save(&tmp.join("model.safetensors"), Some(meta))?;
    let mut moments: Vec<(String, &[usize], &[f32])> = Vec::with_capacity(params.len() * 2);
    for (i, p) in params.params.iter().enumerate() {
        let shape = p.shape.as_slice();
        moments.push((format!("exp_avg.{}", p.name), shape, &optimizer.exp_avg[i]));
        moments.push((
            format!("exp_avg_sq.{}", p.name),
            shape,
            &optimizer.exp_avg_sq[i],
        ));
    }
    let mut meta = HashMap::new();
    meta.insert("adam_step".to_string(), optimizer.step.to_string());
    crate::params::save_tensors(&tmp.join("optimizer.safetensors"), &moments, Some(meta))?;
    let json = serde_json::to_vec_pretty(state).expect("state serialises");
    std::fs::write(tmp.join("state.json"), json).map_err(|e| err(e.to_string()))?;
    sync_folder(&tmp).map_err(|e| err(e.to_string()))?;
    crate::crash::point("checkpoint.tmp-written");
    let _ = std::fs::remove_dir_all(&final_dir);
    std::fs::rename(&tmp, &final_dir).map_err(|e| err(e.to_string()))?;
    std::fs::File::open(run.join(CHECKPOINTS))
        .and_then(|d| d.sync_all())
        .map_err(|e| err(e.to_string()))?;
    crate::crash::point("checkpoint.renamed");
    if let Ok(mut all) = list(run) {
        all.sort();
        while all.len() > keep.max(1) {
            let (_, old) = all.remove(0);
            let _ = std::fs::remove_dir_all(old);
        }
    }
    Ok(final_dir)
}

/// Removes the temporary folders of checkpoints whose writing was interrupted.
pub fn remove_partial(run: &Path) {
    let Ok(entries) = std::fs::read_dir(run.join(CHECKPOINTS)) else {
        return;
    };
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(".tmp-step-")
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Complete checkpoints of a run as (step, folder), unsorted.
pub fn list(run: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let dir = run.join(CHECKPOINTS);
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let path = e?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some(step) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<u64>().ok())
        {
            if path.join("state.json").is_file() {
                out.push((step, path));
            }
        }
    }
    Ok(out)
}

pub fn latest(run: &Path) -> Option<PathBuf> {
    list(run).ok()?.into_iter().max().map(|(_, p)| p)
}

/// Loads a checkpoint: state, parameters (laid out as `layout`) and AdamW moments.
pub fn load(
    dir: &Path,
    layout: &[(String, Vec<usize>)],
    optimizer: &mut AdamW,
) -> Result<(TrainState, ParamStore), CheckpointError> {
    let read = |e: String| CheckpointError::Read {
        path: dir.to_path_buf(),
        message: e,
    };
    let state: TrainState = serde_json::from_slice(
        &std::fs::read(dir.join("state.json")).map_err(|e| read(e.to_string()))?,
    )
    .map_err(|e| read(e.to_string()))?;
    let params = ParamStore::load(&dir.join("model.safetensors"), layout)?;
    let moment_layout: Vec<(String, Vec<usize>)> = layout
        .iter()
        .flat_map(|(n, s)| {
            [
                (format!("exp_avg.{n}"), s.clone()),
                (format!("exp_avg_sq.{n}"), s.clone()),
            ]
        })
        .collect();
    let moments = ParamStore::load(&dir.join("optimizer.safetensors"), &moment_layout)?;
    for (i, (name, _)) in layout.iter().enumerate() {
        optimizer.exp_avg[i] = moments
            .get(&format!("exp_avg.{name}"))
            .map(|p| p.data.clone())
            .unwrap_or_default();
        optimizer.exp_avg_sq[i] = moments
            .get(&format!("exp_avg_sq.{name}"))
            .map(|p| p.data.clone())
            .unwrap_or_default();
    }
    optimizer.step = state.adam_step;
    Ok((state, params))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::Param;
    use crate::train::optim::AdamWConfig;

    fn params(scale: f32) -> ParamStore {
        ParamStore::new(vec![
            Param {
                name: "w".into(),
                shape: vec![2, 3],
                data: (0..6).map(|i| scale * i as f32).collect(),
            },
            Param {
                name: "norm.weight".into(),
                shape: vec![3],
                data: vec![scale, -scale, 0.5],
            },
        ])
    }

    #[test]
    fn a_checkpoint_restores_state_parameters_and_moments_exactly() {
        let run = tempfile::tempdir().unwrap();
        let config = AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        };
        let mut p = params(0.1);
        let mut optimizer = AdamW::new(config, &p);
        let grads = params(0.3)
            .params
            .into_iter()
            .map(|x| x.data)
            .collect::<Vec<_>>();
        optimizer.update(&mut p, &grads, 1e-3);
        optimizer.update(&mut p, &grads, 1e-3);
        let mut state = TrainState::start(0.1, 7, serde_json::json!({"beta": 0.1}));
        state.step = 2;
        state.adam_step = optimizer.step;
        // β values whose shortest decimal form needs all 17 digits must come back bit-exact.
        state.beta = 0.095_238_095_238_095_25;
        state.elapsed_s = 1.0 / 3.0;
        save(run.path(), &state, &p, &optimizer, 2).unwrap();

        let layout: Vec<(String, Vec<usize>)> = p
            .params
            .iter()
            .map(|x| (x.name.clone(), x.shape.clone()))
            .collect();
        let mut restored = AdamW::new(config, &params(0.0));
        let dir = latest(run.path()).unwrap();
        let (loaded_state, loaded) = load(&dir, &layout, &mut restored).unwrap();
        assert_eq!(loaded_state, state);
        assert_eq!(loaded_state.beta.to_bits(), state.beta.to_bits());
        assert_eq!(loaded, p);
        assert_eq!(restored, optimizer);
    }

    #[test]
    fn run_state_floats_round_trip_bit_exactly() {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(12);
        let mut state = TrainState::start(0.1, 1, serde_json::json!({"lr": 3e-7}));
        for _ in 0..20_000 {
            state.beta = rng.random::<f64>() * 0.2;
            state.elapsed_s = rng.random::<f64>() * 1e4;
            let text = serde_json::to_vec_pretty(&state).unwrap();
            let back: TrainState = serde_json::from_slice(&text).unwrap();
            assert_eq!(back.beta.to_bits(), state.beta.to_bits(), "{}", state.beta);
            assert_eq!(back.elapsed_s.to_bits(), state.elapsed_s.to_bits());
        }
    }

    #[test]
    fn only_the_newest_checkpoints_are_kept() {
        let run = tempfile::tempdir().unwrap();
        let p = params(1.0);
        let optimizer = AdamW::new(
            AdamWConfig {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.0,
            },
            &p,
        );
        for step in 1..=4 {
            let mut state = TrainState::start(0.1, 1, serde_json::Value::Null);
            state.step = step;
            save(run.path(), &state, &p, &optimizer, 2).unwrap();
        }
        let mut steps: Vec<u64> = list(run.path())
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        steps.sort();
        assert_eq!(steps, vec![3, 4]);
        assert_eq!(latest(run.path()), Some(step_dir(run.path(), 4)));
    }
}
