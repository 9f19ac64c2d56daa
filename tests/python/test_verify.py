"""`verify` (Python `--verify` and Rust `edpo verify`) on the sample bundle: it passes, and
deliberately broken copies fail on the outputs the break touches, by more than the noise band.

Breaks (broken_bundles.py): the final RMSNorm gain `model.norm.weight` scaled by 1 + 1e-3 (it
is applied after the normalisation, so nothing downstream re-normalises it away: every logit
scales by 1.001); the rotary base of the reference graph halved; the joint graph's gradient
outputs of layer 0's `gate_proj` and `up_proj` (same shape) swapped; a format-1 manifest."""

import json

import pytest

from broken_bundles import SCALED, SWAPPED, as_goldens_format_1, copy_bundle, failed, rust_verify, scale_weight, set_rotary_base, swap_gradient_outputs
from conftest import BUNDLE
from edpo_export.verify import verify

def test_sample_bundle_passes_with_margins():
    code, checks, err = rust_verify(BUNDLE)
    assert code == 0, err
    assert verify(BUNDLE) == 0
    for label, c in checks.items():
        if "band" in c:
            assert c["error"] <= c["band"], f"{label}: {c}"
            assert c["band"] > 0, f"{label}: a zero band would demand exactness"


def test_scaled_weight_fails_far_outside_the_band(tmp_path, capsys):
    bundle = copy_bundle(BUNDLE, tmp_path / "b")
    scale_weight(bundle, SCALED, 1.0 + 1e-3)
    code, checks, _ = rust_verify(bundle)
    assert code == 1
    # Both graphs read params.safetensors: the scores and the training outputs move.
    for label in ("reference token_logps (max abs)", "reference topk_logps (max abs)", "train logps (max abs)"):
        c = checks[label]
        assert not c["ok"] and c["error"] > 3 * c["band"], f"{label}: {c}"
    assert verify(bundle) == 1
    assert "FAIL reference token_logps" in capsys.readouterr().out


def test_wrong_rotary_base_fails_the_reference_graph_only(tmp_path):
    bundle = copy_bundle(BUNDLE, tmp_path / "b")
    old, new = set_rotary_base(bundle, 5000.0)
    assert abs(old - 10000.0) < 1.0, "the sample model's rotary base is 10,000"
    code, checks, _ = rust_verify(bundle)
    assert code == 1
    assert failed(checks) & {"reference token_logps (max abs)", "reference topk_logps (max abs)"}
    assert not {label for label in failed(checks) if label.startswith(("train", "grad"))}
    c = checks["reference token_logps (max abs)"]
    assert c["error"] > 3 * c["band"], c
    assert verify(bundle) == 1


def test_swapped_gradient_outputs_fail_both_tensors(tmp_path, capsys):
    bundle = copy_bundle(BUNDLE, tmp_path / "b")
    swap_gradient_outputs(bundle, *SWAPPED)
    code, checks, _ = rust_verify(bundle)
    assert code == 1
    n_params = len(json.loads((BUNDLE / "edpo-model.json").read_text())["params"])
    assert failed(checks) == {f"grad {name} (rel)" for name in SWAPPED} | {f"gradients, {n_params} tensors (rel)"}
    for name in SWAPPED:
        c = checks[f"grad {name} (rel)"]
        assert c["error"] > 0.1 and c["error"] > 1000 * c["band"], c
    assert verify(bundle) == 1
    out = capsys.readouterr().out
    assert all(f"FAIL grad {name}" in out for name in SWAPPED), out


def test_old_goldens_ask_for_a_reexport(tmp_path, capsys):
    bundle = copy_bundle(BUNDLE, tmp_path / "b")
    as_goldens_format_1(bundle)
    code, _, err = rust_verify(bundle)
    assert code == 2
    assert "goldens format 1" in err and "python -m edpo_export" in err, err
    with pytest.raises(SystemExit) as exc:
        verify(bundle)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "goldens format 1" in err and "re-export" in err, err
