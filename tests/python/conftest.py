"""Shared pieces of the Python tests: paths (ROOT, the sample BUNDLE), the edpo binary, the
environment for child `python -m edpo_…` processes, and a cached tiny-model export.

The edpo_* packages come from python/ (pytest.ini's `pythonpath`); test modules take the
constants and helpers here with `from conftest import …`."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "data-samples" / "bundle"
# Child Python processes (`python -m edpo_bench.torch_train`, …) find the packages through it.
PY_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "python"), os.environ.get("PYTHONPATH")]))}


def edpo_bin() -> str:
    if os.environ.get("EDPO_BIN"):
        return os.environ["EDPO_BIN"]
    target = os.environ.get("CARGO_TARGET_DIR", str(Path.home() / ".cache/edpo/target"))
    return str(Path(target) / "debug" / "edpo")


@pytest.fixture(scope="session")
def samples() -> Path:
    return ROOT / "data-samples"


@pytest.fixture(scope="session")
def exported(tmp_path_factory, samples):
    """Export each tiny config once per session: {arch: bundle path}."""
    import edpo_export

    cache = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            out = tmp_path_factory.mktemp(f"bundle-{arch}")
            edpo_export.main([
                "--model", str(samples / "configs" / f"{arch}-tiny"),
                "--random-init", "0", "--out", str(out), "--topk-default", "8",
            ])  # fmt: skip
            cache[arch] = out
        return cache[arch]

    return get
