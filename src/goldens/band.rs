//! The noise band of each golden output and the rules that judge ONNX Runtime's outputs
//! against PyTorch float64 (the same rules as `python/edpo_export/verify.py`).
//!
//! An output's band is `factor` × PyTorch fp32's own error against float64 on the golden batch
//! + `floor` × max(1, largest |float64 value|) (relative gradient errors: + `floor`).

use ndarray::{ArrayView3, Axis};

use crate::bundle::{GoldensSpec, MANIFEST_FILE};

use super::GoldensError;

/// The allowed error of one output, and the PyTorch fp32 error it was derived from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Band {
    pub allowed: f64,
    pub torch_fp32: f64,
}

/// The bands of a bundle, from its manifest's `goldens` section.
pub struct Bands<'a> {
    spec: &'a GoldensSpec,
}

impl<'a> Bands<'a> {
    pub fn new(spec: &'a GoldensSpec) -> Self {
        Bands { spec }
    }

    pub fn factor(&self) -> f64 {
        self.spec.factor
    }

    pub fn floor(&self) -> f64 {
        self.spec.floor
    }

    /// The band of an absolute-error output (`reference.token_logps`, `train.loss`, …) whose
    /// float64 golden values are `golden`.
    pub fn absolute(
        &self,
        output: &str,
        golden: impl IntoIterator<Item = f64>,
    ) -> Result<Band, GoldensError> {
        let torch_fp32 = lookup(&self.spec.torch_fp32_error, "torch_fp32_error", output)?;
        let scale = golden.into_iter().map(f64::abs).fold(1.0, f64::max);
        Ok(Band {
            allowed: self.spec.factor * torch_fp32 + self.spec.floor * scale,
            torch_fp32,
        })
    }

    /// The band of a gradient tensor's relative error.
    pub fn gradient(&self, name: &str) -> Result<Band, GoldensError> {
        let torch_fp32 = lookup(
            &self.spec.torch_fp32_grad_error,
            "torch_fp32_grad_error",
            name,
        )?;
        Ok(Band {
            allowed: self.spec.factor * torch_fp32 + self.spec.floor,
            torch_fp32,
        })
    }
}

fn lookup(
    map: &std::collections::BTreeMap<String, f64>,
    field: &str,
    key: &str,
) -> Result<f64, GoldensError> {
    map.get(key).copied().ok_or_else(|| GoldensError::Format {
        file: MANIFEST_FILE.to_string(),
        message: format!("`goldens.{field}` has no entry `{key}`; re-export the bundle"),
    })
}

/// Top-K ids against float64's: (how many differ, how many of those are not near-ties).
/// An id at rank j is a near-tie when its float64 log-prob, looked up among the K + E stored
/// ranks, is within `band` of float64's value at rank j; an id beyond those ranks is not.
pub fn topk_ids_outside_band(
    got: ArrayView3<i64>,
    ids64: ArrayView3<i64>,
    vals64: ArrayView3<f64>,
    band: f64,
) -> (usize, usize) {
    let (mut differ, mut outside) = (0, 0);
    let lanes = got
        .lanes(Axis(2))
        .into_iter()
        .zip(ids64.lanes(Axis(2)))
        .zip(vals64.lanes(Axis(2)));
    for ((got, ids), vals) in lanes {
        for (j, id) in got.iter().enumerate() {
            if *id == ids[j] {
                continue;
            }
            differ += 1;
            let near = ids
                .iter()
                .position(|x| x == id)
                .is_some_and(|m| (vals[m] - vals[j]).abs() <= band);
            if !near {
                outside += 1;
            }
        }
    }
    (differ, outside)
}

/// The band of the step decision: g₊ − g and g − g₋ each combine two policy log-probs and two
/// perturbed ones, so their error is at most twice the sum of those outputs' bands.
pub fn step_band(logps: f64, logps_plus: f64, logps_minus: f64) -> f64 {
    2.0 * (logps + logps_plus.max(logps_minus))
}

/// Whether the steps equal float64's on every pair whose decision margin exceeds `band`, and
/// how many pairs that is.
pub fn decided_steps_agree(got: &[i64], want: &[i64], margin: &[f64], band: f64) -> (bool, usize) {
    let decided: Vec<usize> = (0..want.len()).filter(|&i| margin[i] > band).collect();
    let agree = got.len() == want.len() && decided.iter().all(|&i| got[i] == want[i]);
    (agree, decided.len())
}

/// ‖got − want‖ / ‖want‖ for a gradient stored in full (`norm` = ‖want‖).
pub fn rel_error_full(got: &[f32], want: &[f64], norm: f64) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    let sq: f64 = got
        .iter()
        .zip(want)
        .map(|(g, w)| (f64::from(*g) - w).powi(2))
        .sum();
    sq.sqrt() / norm.max(f64::MIN_POSITIVE)
}

/// The relative error estimated from projections: E[(e·r)²] = ‖e‖² for ±1 signs r, so
/// sqrt(mean_j (got_j − want_j)²) estimates ‖e‖.
pub fn rel_error_projected(got: &[f64], want: &[f64], norm: f64) -> f64 {
    if got.len() != want.len() || want.is_empty() {
        return f64::INFINITY;
    }
    let mean_sq = got
        .iter()
        .zip(want)
        .map(|(g, w)| (g - w).powi(2))
        .sum::<f64>()
        / want.len() as f64;
    mean_sq.sqrt() / norm.max(f64::MIN_POSITIVE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array3;

    #[test]
    fn near_ties_may_swap_other_ids_may_not() {
        // One position, K = 3 run by ORT, K + E = 5 stored float64 ranks.
        let ids64 = Array3::from_shape_vec((1, 1, 5), vec![10, 11, 12, 13, 14]).unwrap();
        let vals64 =
            Array3::from_shape_vec((1, 1, 5), vec![-1.0, -2.0, -2.00001, -2.00002, -5.0]).unwrap();
        let judge = |got: Vec<i64>| {
            let got = Array3::from_shape_vec((1, 1, 3), got).unwrap();
            topk_ids_outside_band(got.view(), ids64.view(), vals64.view(), 1e-4)
        };
        assert_eq!(judge(vec![10, 11, 12]), (0, 0));
        // Ranks 1 and 2 swapped, and rank 2 taken by rank 3 (beyond K): near-ties.
        assert_eq!(judge(vec![10, 12, 11]), (2, 0));
        assert_eq!(judge(vec![10, 11, 13]), (1, 0));
        // Rank 0 and 1 are 1 nat apart; 14 is far; 99 is beyond the stored ranks.
        assert_eq!(judge(vec![11, 10, 12]), (2, 2));
        assert_eq!(judge(vec![10, 11, 14]), (1, 1));
        assert_eq!(judge(vec![10, 11, 99]), (1, 1));
    }

    #[test]
    fn only_decided_steps_must_agree() {
        let want = [1, -1, 0];
        assert_eq!(
            decided_steps_agree(&[1, -1, 0], &want, &[1.0, 1.0, 1.0], 0.1),
            (true, 3)
        );
        // Pair 2's margin is inside the band: its step may differ.
        assert_eq!(
            decided_steps_agree(&[1, -1, 1], &want, &[1.0, 1.0, 0.05], 0.1),
            (true, 2)
        );
        assert_eq!(
            decided_steps_agree(&[1, 0, 0], &want, &[1.0, 1.0, 0.05], 0.1),
            (false, 2)
        );
        assert!((step_band(1.0, 2.0, 3.0) - 8.0).abs() < 1e-15);
    }

    #[test]
    fn band_is_factor_times_torch_error_plus_scaled_floor() {
        let spec: GoldensSpec = serde_json::from_value(serde_json::json!({
            "file": "goldens.safetensors", "format": 2, "factor": 4.0, "floor": 1e-6,
            "torch_fp32_error": {"train.logps": 2e-6, "train.loss": 0.0},
            "torch_fp32_grad_error": {"w": 3e-6},
        }))
        .unwrap();
        let bands = Bands::new(&spec);
        let b = bands.absolute("train.logps", [-30.0, 5.0]).unwrap();
        assert!((b.allowed - (8e-6 + 30e-6)).abs() < 1e-18, "{b:?}");
        // An output PyTorch fp32 got exactly right still has the floor (scale at least 1).
        let b = bands.absolute("train.loss", [0.5]).unwrap();
        assert!((b.allowed - 1e-6).abs() < 1e-18, "{b:?}");
        assert!((bands.gradient("w").unwrap().allowed - 13e-6).abs() < 1e-18);
        let err = bands
            .absolute("train.steps", [0.0])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("train.steps") && err.contains("re-export"),
            "{err}"
        );
    }

    #[test]
    fn relative_errors() {
        assert!((rel_error_full(&[3.0, 4.0], &[0.0, 0.0], 5.0) - 1.0).abs() < 1e-15);
        assert!((rel_error_projected(&[1.0, 3.0], &[0.0, 0.0], 1.0) - 5f64.sqrt()).abs() < 1e-15);
        assert_eq!(rel_error_projected(&[1.0], &[1.0, 2.0], 1.0), f64::INFINITY);
    }
}
