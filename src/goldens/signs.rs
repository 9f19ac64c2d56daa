//! Seeded ±1 sign vectors for the goldens' gradient projections, bit for bit the exporter's
//! (`python/edpo_export/goldens.py`): FNV-1a 64 of the tensor name seeds splitmix64.
//!
//! The sign of element i (row-major) in projection j (j < 64) is bit j of splitmix64 output
//! number i + 1; bit 0 is +1, bit 1 is −1.

/// FNV-1a, 64 bits, of the UTF-8 bytes of `text`.
pub fn fnv1a64(text: &str) -> u64 {
    text.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

/// splitmix64: advances `state` and returns the next output.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The signs (±1) of the first `numel` elements of the tensor `name` in projection `projection`.
pub fn signs(name: &str, projection: usize, numel: usize) -> Vec<f64> {
    let mut state = fnv1a64(name);
    (0..numel)
        .map(|_| {
            if (splitmix64(&mut state) >> projection) & 1 == 1 {
                -1.0
            } else {
                1.0
            }
        })
        .collect()
}

/// `[g · r_j for j < projections]` in float64 for the flat tensor `name` (projections ≤ 64).
pub fn project(name: &str, data: &[f32], projections: usize) -> Vec<f64> {
    let mut state = fnv1a64(name);
    let mut acc = vec![0.0f64; projections.min(64)];
    for &g in data {
        let bits = splitmix64(&mut state);
        let g = f64::from(g);
        for (j, sum) in acc.iter_mut().enumerate() {
            // Flip the sign bit of g where bit j is set.
            *sum += f64::from_bits(g.to_bits() ^ (((bits >> j) & 1) << 63));
        }
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generators_match_their_published_values() {
        let mut state = 0u64;
        assert_eq!(splitmix64(&mut state), 0xE220_A839_7B1D_CDAF);
        assert_eq!(splitmix64(&mut state), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(fnv1a64(""), 0xCBF2_9CE4_8422_2325);
        assert_eq!(fnv1a64("a"), 0xAF63_DC4C_8601_EC8C);
    }

    /// The same lists are asserted by tests/python/test_goldens.py against the exporter.
    #[test]
    fn first_signs_match_the_exporter() {
        let ints = |v: &[f64]| v.iter().map(|s| *s as i32).collect::<Vec<_>>();
        assert_eq!(
            ints(&signs("model.norm.weight", 0, 16)),
            [1, -1, -1, -1, 1, -1, 1, 1, -1, -1, 1, -1, -1, -1, 1, 1]
        );
        assert_eq!(
            ints(&signs("model.norm.weight", 2, 16)),
            [-1, 1, -1, -1, -1, -1, 1, -1, 1, 1, -1, -1, 1, -1, 1, -1]
        );
        assert_eq!(
            ints(&signs("model.norm.weight", 1, 80)[64..]),
            [1, -1, -1, -1, 1, 1, 1, 1, 1, 1, -1, -1, 1, 1, -1, -1]
        );
    }

    #[test]
    fn projection_is_the_dot_product_with_the_signs() {
        let data: Vec<f32> = (0..150).map(|i| (i as f32 * 0.37).sin()).collect();
        let got = project("w", &data, 3);
        for (j, value) in got.iter().enumerate() {
            let want: f64 = signs("w", j, data.len())
                .iter()
                .zip(&data)
                .map(|(s, g)| s * f64::from(*g))
                .sum();
            assert!(
                (value - want).abs() < 1e-12,
                "projection {j}: {value} vs {want}"
            );
        }
    }
}
