"""Shared fixtures for the Python export tests: paths and a cached tiny-model export."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PIPELINES = ROOT / "pipelines"
sys.path.insert(0, str(PIPELINES))


@pytest.fixture(scope="session")
def samples() -> Path:
    return ROOT / "data-samples"


@pytest.fixture(scope="session")
def exported(tmp_path_factory, samples):
    """Export each tiny config once per session: {arch: bundle path}."""
    import export

    cache = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            out = tmp_path_factory.mktemp(f"bundle-{arch}")
            export.main([
                "--model", str(samples / "configs" / f"{arch}-tiny"),
                "--random-init", "0", "--out", str(out), "--topk-default", "8",
            ])  # fmt: skip
            cache[arch] = out
        return cache[arch]

    return get
