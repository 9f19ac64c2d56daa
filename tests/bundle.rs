//! The sample bundle: goldens reproduced from Rust, and wrong or corrupted bundles refused.

mod common;

use common::*;
use edpo::bundle::{Bundle, BundleError};
use edpo::graphs::ReferenceGraph;
use edpo::runtime::SessionConfig;

fn config() -> SessionConfig {
    SessionConfig {
        threads: 1,
        ..SessionConfig::default()
    }
}

#[test]
fn sample_bundle_reproduces_pytorch_goldens() {
    let bundle = Bundle::open(&sample_bundle()).expect("sample bundle opens");
    let report = edpo::goldens::verify_bundle(&bundle, &config()).expect("goldens run");
    for c in &report.checks {
        eprintln!(
            "{} {} {}",
            if c.ok { "ok" } else { "FAIL" },
            c.label,
            c.detail
        );
    }
    assert!(report.checks.len() >= 9, "every golden was compared");
    assert!(
        report.passed(),
        "goldens not reproduced: {:?}",
        report.checks
    );
}

/// Multiplies one float32 tensor of `params.safetensors` by `factor` in place (same offsets:
/// the reference graph's external weights still point at the right bytes) and rehashes it.
fn scale_param_in_place(bundle: &std::path::Path, name: &str, factor: f32) {
    let path = bundle.join("params.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let offsets = &header[name]["data_offsets"];
    let begin = 8 + header_len + offsets[0].as_u64().unwrap() as usize;
    let end = 8 + header_len + offsets[1].as_u64().unwrap() as usize;
    for chunk in bytes[begin..end].chunks_exact_mut(4) {
        let value = f32::from_le_bytes(chunk.try_into().unwrap()) * factor;
        chunk.copy_from_slice(&value.to_le_bytes());
    }
    std::fs::write(&path, bytes).unwrap();
    rehash(bundle, "params.safetensors");
}

#[test]
fn scaled_final_norm_gain_is_caught_far_outside_the_band() {
    // `model.norm.weight` multiplies the normalised final hidden state: nothing re-normalises
    // it, so every logit scales by 1.001. The hash is updated; only the numbers can tell.
    let (_tmp, bundle) = bundle_copy();
    scale_param_in_place(&bundle, "model.norm.weight", 1.0 + 1e-3);
    let opened = Bundle::open(&bundle).expect("hashes match");
    let report = edpo::goldens::verify_bundle(&opened, &config()).expect("goldens run");
    assert!(!report.passed());
    for label in [
        "reference token_logps (max abs)",
        "train logps (max abs)",
        "gradients, 21 tensors (rel)",
    ] {
        let c = report
            .check(label)
            .unwrap_or_else(|| panic!("no check `{label}`"));
        let (err, band) = (c.error.unwrap(), c.band.unwrap());
        assert!(
            !c.ok && err > 3.0 * band,
            "{label}: error {err:.2e} vs band {band:.2e}"
        );
    }
}

#[test]
fn goldens_of_format_1_ask_for_a_reexport() {
    let (_tmp, bundle) = bundle_copy();
    let path = bundle.join("edpo-model.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    manifest["goldens"] = serde_json::json!({
        "file": "goldens.safetensors",
        "tolerances": {"loss_abs": 1e-5, "grad_rel": 1e-4, "logps_abs": 1e-4},
    });
    std::fs::write(&path, serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
    let opened = Bundle::open(&bundle).expect("an old manifest still opens");
    let err = match edpo::goldens::verify_bundle(&opened, &config()) {
        Ok(_) => panic!("format-1 goldens must be refused"),
        Err(e) => e,
    };
    assert_eq!(err.exit_code(), 2);
    let msg = err.to_string();
    assert!(
        msg.contains("goldens.safetensors")
            && msg.contains("format 1")
            && msg.contains("python -m edpo_export"),
        "{msg}"
    );
}

#[test]
fn missing_file_is_named() {
    let (_tmp, bundle) = bundle_copy();
    std::fs::remove_file(bundle.join("policy.train.onnx")).unwrap();
    let err = Bundle::open(&bundle).unwrap_err();
    assert!(matches!(err, BundleError::MissingFile { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("policy.train.onnx") && msg.contains("python -m edpo_export"),
        "{msg}"
    );
}

#[test]
fn missing_manifest_says_how_to_make_a_bundle() {
    let (_tmp, bundle) = bundle_copy();
    std::fs::remove_file(bundle.join("edpo-model.json")).unwrap();
    let msg = Bundle::open(&bundle).unwrap_err().to_string();
    assert!(
        msg.contains("edpo-model.json") && msg.contains("python -m edpo_export"),
        "{msg}"
    );
}

#[test]
fn changed_file_fails_the_hash_check() {
    let (_tmp, bundle) = bundle_copy();
    let path = bundle.join("params.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(&path, bytes).unwrap();
    let err = Bundle::open(&bundle).unwrap_err();
    match &err {
        BundleError::HashMismatch { path, got, want } => {
            assert!(path.ends_with("params.safetensors"));
            assert_ne!(got, want);
        }
        other => panic!("expected a hash mismatch, got {other:?}"),
    }
    assert!(err.to_string().contains("sha256"), "{err}");
}

#[test]
fn renamed_graph_input_is_refused_with_both_names() {
    let (_tmp, bundle) = bundle_copy();
    // Rename the input everywhere in the graph (declaration and uses): a consistent graph
    // whose contract no longer matches the manifest. The hash is updated so only the
    // contract check can catch it.
    let n = replace_bytes(
        &bundle.join("reference.onnx"),
        b"attention_mask",
        b"attention_mAsk",
    );
    assert!(n >= 2, "the name occurs in the graph");
    rehash(&bundle, "reference.onnx");
    let opened = Bundle::open(&bundle).expect("hashes match");
    let err = match ReferenceGraph::new(&opened, None, &config()) {
        Ok(_) => panic!("a renamed input must be refused"),
        Err(e) => e,
    };
    let msg = err.to_string();
    assert!(
        matches!(err, edpo::Error::Bundle(BundleError::Contract { .. })),
        "{err:?}"
    );
    assert!(msg.contains("missing input `attention_mask`"), "{msg}");
    assert!(msg.contains("unexpected input `attention_mAsk`"), "{msg}");
}

#[test]
fn corrupted_manifest_is_a_clear_error() {
    let (_tmp, bundle) = bundle_copy();
    std::fs::write(bundle.join("edpo-model.json"), b"{\"format_version\": 1").unwrap();
    let msg = Bundle::open(&bundle).unwrap_err().to_string();
    assert!(msg.contains("not a valid bundle manifest"), "{msg}");
}

#[test]
fn scoring_graph_takes_weights_from_any_checkpoint() {
    let bundle = Bundle::open(&sample_bundle()).unwrap();
    let params = bundle.load_params().unwrap();
    let ids = ndarray::Array2::from_shape_fn((2, 6), |(i, t)| ((i * 7 + t * 3) % 500) as i64);
    let mask = ndarray::Array2::<i64>::ones((2, 6));
    let base = ReferenceGraph::new(&bundle, None, &config())
        .unwrap()
        .score(ids.view(), mask.view(), None, 4)
        .unwrap();
    let same = ReferenceGraph::new(&bundle, Some(&params), &config())
        .unwrap()
        .score(ids.view(), mask.view(), None, 4)
        .unwrap();
    let max_diff = |a: &ndarray::Array2<f32>, b: &ndarray::Array2<f32>| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max)
    };
    assert!(max_diff(&base.token_logps, &same.token_logps) < 1e-6);
    assert_eq!(base.topk_ids.dim(), (2, 6, 4));

    let mut changed = params.clone();
    for p in &mut changed.params {
        for v in &mut p.data {
            *v *= 1.5;
        }
    }
    let moved = ReferenceGraph::new(&bundle, Some(&changed), &config())
        .unwrap()
        .score(ids.view(), mask.view(), None, 4)
        .unwrap();
    assert!(
        max_diff(&base.token_logps, &moved.token_logps) > 1e-3,
        "overriding the weights changes the scores"
    );
    // Scores are log-probabilities: position 0 is 0, the rest negative, top-K descending.
    assert!(moved.token_logps.column(0).iter().all(|v| *v == 0.0));
    assert!(moved.token_logps.iter().all(|v| *v <= 0.0));
    for row in moved.topk_logps.lanes(ndarray::Axis(2)) {
        assert!(row.windows(2).into_iter().all(|w| w[0] >= w[1]));
    }
}

#[test]
fn scoring_a_row_padded_on_the_left_is_a_clear_error() {
    let bundle = Bundle::open(&sample_bundle()).unwrap();
    let mut graph = ReferenceGraph::new(&bundle, None, &config()).unwrap();
    let ids = ndarray::Array2::from_shape_fn((2, 5), |(i, t)| (i * 5 + t) as i64);
    let mut mask = ndarray::Array2::<i64>::ones((2, 5));
    mask[[1, 0]] = 0;
    let msg = graph
        .score(ids.view(), mask.view(), None, 3)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("row 1 of attention_mask") && msg.contains("padded on the right"),
        "{msg}"
    );
}

#[test]
fn label_mask_scores_only_its_positions_with_the_same_values() {
    let bundle = Bundle::open(&sample_bundle()).unwrap();
    let mut graph = ReferenceGraph::new(&bundle, None, &config()).unwrap();
    let ids = ndarray::Array2::from_shape_fn((3, 9), |(i, t)| ((i * 11 + t * 5) % 400) as i64);
    let mut mask = ndarray::Array2::<i64>::ones((3, 9));
    mask.slice_mut(ndarray::s![2, 6..]).fill(0);
    // Response tokens from position 4 (row 1: from 7; row 2 ends at 6, as prep pads it).
    let labels = ndarray::Array2::from_shape_fn((3, 9), |(i, t)| {
        i64::from(t >= if i == 1 { 7 } else { 4 } && mask[[i, t]] == 1)
    });
    let every = graph.score(ids.view(), mask.view(), None, 5).unwrap();
    let some = graph
        .score(ids.view(), mask.view(), Some(labels.view()), 5)
        .unwrap();
    for ((i, t), &label) in labels.indexed_iter() {
        let (want_tok, want_vals, want_ids) = if label == 1 {
            let vals = every.topk_logps.slice(ndarray::s![i, t, ..]).to_vec();
            let ids = every.topk_ids.slice(ndarray::s![i, t, ..]).to_vec();
            (every.token_logps[[i, t]], vals, ids)
        } else {
            (0.0, vec![0.0; 5], vec![0; 5])
        };
        // Same values up to float rounding (a slice of fewer positions may take another GEMM
        // kernel; on this repo's machine they are bit for bit equal).
        assert!(
            (some.token_logps[[i, t]] - want_tok).abs() <= 1e-6,
            "({i}, {t})"
        );
        let vals = some.topk_logps.slice(ndarray::s![i, t, ..]).to_vec();
        assert!(vals
            .iter()
            .zip(&want_vals)
            .all(|(a, b)| (a - b).abs() <= 1e-6));
        assert_eq!(
            some.topk_ids.slice(ndarray::s![i, t, ..]).to_vec(),
            want_ids
        );
    }
    assert!(
        every.token_logps[[0, 1]] < 0.0,
        "no mask scores the prompt too"
    );
    let none = ndarray::Array2::<i64>::zeros((3, 9));
    let empty = graph
        .score(ids.view(), mask.view(), Some(none.view()), 5)
        .unwrap();
    assert!(empty.token_logps.iter().all(|v| *v == 0.0));
    assert_eq!(empty.topk_ids.dim(), (3, 9, 5));
}

#[test]
fn params_with_wrong_shape_are_refused() {
    let (_tmp, bundle) = bundle_copy();
    let opened = Bundle::open(&bundle).unwrap();
    let mut params = opened.load_params().unwrap();
    params.params[0].shape = vec![params.params[0].data.len()];
    let path = bundle.join("bad.safetensors");
    params.save(&path, None).unwrap();
    let msg = opened.load_params_from(&path).unwrap_err().to_string();
    assert!(
        msg.contains(&opened.manifest.params[0].name) && msg.contains("shape"),
        "{msg}"
    );
}

/// One pair (two rows of 10 tokens, the response from token 5) with a made-up cached reference.
fn train_batch() -> edpo::graphs::TrainBatch {
    let (n, t, k) = (2, 10, 16);
    let ids = ndarray::Array2::from_shape_fn((n, t), |(i, j)| ((i * 37 + j * 11) % 500) as i64);
    let loss_mask = ndarray::Array2::from_shape_fn((n, t), |(_, j)| i64::from(j >= 5));
    edpo::graphs::TrainBatch {
        input_ids: ids,
        attention_mask: ndarray::Array2::ones((n, t)),
        loss_mask,
        ref_logps: ndarray::Array1::from(vec![-30.0, -32.0]),
        ref_token_logps: ndarray::Array2::from_elem((n, t), -6.0),
        ref_topk_ids: ndarray::Array3::from_shape_fn((n, t, k), |(i, j, r)| {
            ((i * 7 + j * 3 + r * 29) % 500) as i64
        }),
        ref_topk_logps: ndarray::Array3::from_shape_fn((n, t, k), |(_, _, r)| -2.0 - r as f32),
    }
}

/// The paper's loss settings for the joint-graph tests (β 0.1, ε 0.01).
fn loss_settings() -> edpo::graphs::LossSettings {
    edpo::graphs::LossSettings {
        beta: 0.1,
        epsilon: 0.01,
        label_smoothing: 0.0,
        step_tolerance: 1e-6,
    }
}

#[test]
fn training_on_a_row_padded_on_the_left_is_a_clear_error() {
    let bundle = Bundle::open(&sample_bundle()).unwrap();
    assert!(bundle.manifest.export.training_needs_right_padding());
    let params = bundle.load_params().unwrap();
    let mut graph = edpo::graphs::TrainGraph::new(&bundle, &config()).unwrap();
    let settings = loss_settings();
    let mut batch = train_batch();
    batch.attention_mask[[1, 0]] = 0;
    let mut grads = params.zeros_like();
    let msg = graph
        .run(&params, &batch, &settings, &mut grads, 1.0)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("row 1 of attention_mask") && msg.contains("--train-attention-blocks 1"),
        "{msg}"
    );
}

#[test]
fn the_joint_graph_adds_the_weighted_gradient_to_the_buffers_in_place() {
    let bundle = Bundle::open(&sample_bundle()).unwrap();
    assert!(
        bundle.manifest.graphs.train.grad_accumulation.is_some(),
        "the sample bundle sums in the graph"
    );
    let params = bundle.load_params().unwrap();
    let mut graph = edpo::graphs::TrainGraph::new(&bundle, &config()).unwrap();
    let settings = loss_settings();
    let batch = train_batch();
    let mut plain = params.zeros_like();
    graph
        .run(&params, &batch, &settings, &mut plain, 1.0)
        .unwrap();
    assert!(plain.iter().all(|g| g.iter().any(|v| *v != 0.0)));
    let start: Vec<Vec<f32>> = plain
        .iter()
        .map(|g| (0..g.len()).map(|i| (i % 13) as f32 * 0.25 - 1.0).collect())
        .collect();
    let mut summed = start.clone();
    graph
        .run(&params, &batch, &settings, &mut summed, 0.375)
        .unwrap();
    graph
        .run(&params, &batch, &settings, &mut summed, 0.625)
        .unwrap();
    for ((s, a), g) in summed.iter().zip(&start).zip(&plain) {
        for ((s, a), g) in s.iter().zip(a).zip(g) {
            let want = (a + 0.375 * g) + 0.625 * g;
            assert!(
                (s - want).abs() <= 1e-6 * want.abs().max(1.0),
                "{s} vs {want}"
            );
        }
    }
}

/// One run of the bundle's joint graph on `train_batch`: what it did with the cache, its
/// outputs and its gradients.
fn joint_run(
    bundle: &Bundle,
    config: &SessionConfig,
) -> (
    edpo::graph_cache::CacheUse,
    edpo::graphs::TrainOutputs,
    Vec<Vec<f32>>,
) {
    let params = bundle.load_params().unwrap();
    let mut graph = edpo::graphs::TrainGraph::new(bundle, config).unwrap();
    let mut grads = params.zeros_like();
    let out = graph
        .run(&params, &train_batch(), &loss_settings(), &mut grads, 1.0)
        .unwrap();
    (graph.cache_use().clone(), out, grads)
}

/// Whether two runs' outputs and gradients are the same bit for bit.
fn same_bits(
    a: &(edpo::graphs::TrainOutputs, Vec<Vec<f32>>),
    b: &(edpo::graphs::TrainOutputs, Vec<Vec<f32>>),
) -> bool {
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let outputs = |o: &edpo::graphs::TrainOutputs| {
        [&o.logps, &o.logps_plus, &o.logps_minus]
            .iter()
            .flat_map(|a| bits(a.as_slice().unwrap()))
            .chain([o.loss.to_bits()])
            .collect::<Vec<_>>()
    };
    outputs(&a.0) == outputs(&b.0)
        && a.0.pair_steps == b.0.pair_steps
        && a.1.len() == b.1.len()
        && a.1.iter().zip(&b.1).all(|(x, y)| bits(x) == bits(y))
}

#[test]
fn the_optimised_joint_graph_is_cached_and_gives_the_same_outputs_bit_for_bit() {
    use edpo::graph_cache::CacheUse;
    let bundle = Bundle::open(&sample_bundle()).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let cached = SessionConfig {
        graph_cache: Some(scratch.path().join("graphs")),
        ..config()
    };
    let (used, out, grads) = joint_run(&bundle, &config());
    assert_eq!(used, CacheUse::Off);
    let plain = (out, grads);

    let (used, out, grads) = joint_run(&bundle, &cached);
    let CacheUse::Written(file) = used else {
        panic!("the first session writes the cache: {used:?}")
    };
    assert!(same_bits(&plain, &(out, grads)));
    let (used, out, grads) = joint_run(&bundle, &cached);
    assert_eq!(used, CacheUse::Loaded(file.clone()));
    assert!(
        same_bits(&plain, &(out, grads)),
        "the cached graph's outputs"
    );
    let names: Vec<String> = std::fs::read_dir(file.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let stem = file.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        names
            .iter()
            .all(|n| *n == stem || (n.starts_with(&stem) && n.ends_with(".data"))),
        "the graph and its data file only, no temporary file: {names:?}"
    );

    // A damaged file is replaced by a good one.
    std::fs::write(&file, b"not a graph").unwrap();
    let (used, out, grads) = joint_run(&bundle, &cached);
    assert_eq!(used, CacheUse::Written(file.clone()));
    assert!(same_bits(&plain, &(out, grads)));
    assert_eq!(joint_run(&bundle, &cached).0, CacheUse::Loaded(file));

    // A folder that cannot be made costs the optimisation, not the run.
    let blocked = scratch.path().join("a-file");
    std::fs::write(&blocked, b"").unwrap();
    let unwritable = SessionConfig {
        graph_cache: Some(blocked.join("graphs")),
        ..config()
    };
    let (used, out, grads) = joint_run(&bundle, &unwritable);
    assert!(
        matches!(&used, CacheUse::NotWritten(reason) if reason.contains("cannot write in") && reason.contains("--graph-cache")),
        "{used:?}"
    );
    assert!(same_bits(&plain, &(out, grads)));
}

#[test]
fn a_lora_joint_graph_is_not_cached() {
    let bundle = Bundle::open(&repo_root().join("data-samples/bundle-lora")).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let cached = SessionConfig {
        graph_cache: Some(scratch.path().join("graphs")),
        ..config()
    };
    let graph = edpo::graphs::TrainGraph::new(&bundle, &cached).unwrap();
    assert_eq!(graph.cache_use(), &edpo::graph_cache::CacheUse::Off);
    assert!(!scratch.path().join("graphs").exists());
}
