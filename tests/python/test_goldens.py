"""The goldens format (edpo_export/goldens.py): seeded projection signs shared bit for bit
with Rust, the projection estimate of a gradient error, and a bounded file whatever the model."""

import json

import numpy as np

from edpo_export.goldens import fnv1a64, project, signs, splitmix64


def test_generators_match_their_published_values():
    assert [int(x) for x in splitmix64(0, 0, 2)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]
    assert fnv1a64("") == 0xCBF29CE484222325
    assert fnv1a64("a") == 0xAF63DC4C8601EC8C


def test_first_signs_match_the_rust_list():
    """The same lists are asserted by src/goldens/signs.rs."""
    s = signs("model.norm.weight", 0, 80, 3).astype(int)
    assert s[:16, 0].tolist() == [1, -1, -1, -1, 1, -1, 1, 1, -1, -1, 1, -1, -1, -1, 1, 1]
    assert s[:16, 2].tolist() == [-1, 1, -1, -1, -1, -1, 1, -1, 1, 1, -1, -1, 1, -1, 1, -1]
    assert s[64:80, 1].tolist() == [1, -1, -1, -1, 1, 1, 1, 1, 1, 1, -1, -1, 1, 1, -1, -1]


def test_signs_of_a_slice_equal_the_slice_of_the_signs():
    whole = signs("w", 0, 1000, 16)
    assert np.array_equal(signs("w", 70, 650, 16), whole[70:650])


def test_projections_estimate_the_norm():
    """E[(e·r)²] = ‖e‖²: the mean square of 2,048 projections (64 per name) is within 10% of
    ‖e‖² (the relative std of that mean is ≤ √(2/2048) ≈ 3.1%, so 10% is three of them)."""
    e = np.random.default_rng(0).standard_normal(5000)
    p = np.concatenate([project(f"t{i}", e, 64) for i in range(32)])
    assert abs(np.mean(p**2) / np.sum(e**2) - 1.0) < 0.1


def test_goldens_are_bounded_and_describe_their_band(exported):
    bundle = exported("llama")
    manifest = json.loads((bundle / "edpo-model.json").read_text())
    g = manifest["goldens"]
    assert g["format"] == 2 and g["factor"] > 1 and 0 < g["floor"] < 1e-5
    assert set(g["torch_fp32_error"]) == {
        "reference.token_logps", "reference.topk_logps", "train.loss", "train.logps", "train.logps_plus", "train.logps_minus",
    }  # fmt: skip
    params = {p["name"] for p in manifest["params"]}
    assert set(g["torch_fp32_grad_error"]) == params
    assert 1 <= len(g["full_grads"]) <= 4 and set(g["full_grads"]) <= params
    from safetensors.numpy import load_file

    t = load_file(bundle / "goldens.safetensors")
    k = int(t["reference.in.k"])
    assert t["reference.f64.topk_logps"].shape[-1] == k + g["extra_ranks"] and g["extra_ranks"] > 0
    assert t["reference.f64.topk_logps"].dtype == np.float64
    assert all(t[f"train.grad.proj.{p}"].shape == (g["projections"],) for p in params)
    assert manifest["files"]["goldens.safetensors"]["bytes"] < 1_000_000
