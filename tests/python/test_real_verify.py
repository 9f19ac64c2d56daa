"""`verify` on a real model, SmolLM2-135M-Instruct (30 layers, vocabulary 49,152): the
correct export passes in Python and Rust, and the scaled-weight and swapped-gradient breaks of
test_verify.py fail outside the noise band. Marked `real` and skipped unless EDPO_REAL=1
(`EDPO_REAL=1 pytest -m real tests/python/test_real_verify.py -s`, or `make test-real`, prints the numbers); the first run
exports the model (~4 min, ~5 GB RAM) into ~/.cache/edpo/real/smollm2-<exporter sources hash>,
later runs reuse it until the exporter's sources change (EDPO_REAL_CACHE moves the folder)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from broken_bundles import SCALED, SWAPPED, copy_bundle, failed, rust_verify, scale_weight, swap_gradient_outputs
from conftest import PY_ENV

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(os.environ.get("EDPO_REAL") != "1", reason="real-model check: set EDPO_REAL=1"),
]

CACHE = Path(os.environ.get("EDPO_REAL_CACHE", Path.home() / ".cache" / "edpo" / "real"))


@pytest.fixture(scope="module")
def smollm2_bundle() -> Path:
    """The SmolLM2 bundle of the current exporter sources, exported once."""
    from edpo_experiments.smollm2 import bundle

    return bundle()


def show(title: str, checks: dict) -> None:
    print(f"\n{title}")
    for label, c in checks.items():
        numbers = f"ORT {c['error']:.2e}  band {c['band']:.2e}  torch fp32 {c['torch_fp32']:.2e}" if "band" in c else c["detail"]
        print(f"  {'ok  ' if c['ok'] else 'FAIL'} {label:<56} {numbers}")


def test_smollm2_verifies_in_rust_and_python(smollm2_bundle):
    code, checks, err = rust_verify(smollm2_bundle)
    show("SmolLM2, intact", checks)
    assert code == 0, err
    out = subprocess.run([sys.executable, "-m", "edpo_export", "--verify", str(smollm2_bundle)], env=PY_ENV, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    manifest = json.loads((smollm2_bundle / "edpo-model.json").read_text())
    assert manifest["files"]["goldens.safetensors"]["bytes"] < 1_500_000, "the goldens are a bounded sample"


def test_smollm2_scaled_weight_fails_outside_the_band(smollm2_bundle, tmp_path):
    bundle = copy_bundle(smollm2_bundle, tmp_path / "b", only=("params.safetensors",))
    scale_weight(bundle, SCALED, 1.0 + 1e-3)
    code, checks, _ = rust_verify(bundle)
    show(f"SmolLM2, {SCALED} × 1.001", checks)
    assert code == 1
    for label in ("reference token_logps (max abs)", "train logps (max abs)"):
        assert checks[label]["error"] > 3 * checks[label]["band"], checks[label]


def test_smollm2_swapped_gradients_fail_outside_the_band(smollm2_bundle, tmp_path):
    bundle = copy_bundle(smollm2_bundle, tmp_path / "b", only=("policy.train.onnx",))
    swap_gradient_outputs(bundle, *SWAPPED)
    code, checks, _ = rust_verify(bundle)
    show(f"SmolLM2, gradients of {SWAPPED[0]} and {SWAPPED[1]} swapped", checks)
    assert code == 1
    assert {f"grad {name} (rel)" for name in SWAPPED} <= failed(checks)
    assert not {label for label in failed(checks) if label.startswith(("reference", "train"))}
    for name in SWAPPED:
        c = checks[f"grad {name} (rel)"]
        assert c["error"] > 1000 * c["band"], c
