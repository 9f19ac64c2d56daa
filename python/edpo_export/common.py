"""The bundle's contract and small helpers shared by the exporter's modules: file names, the
format version, the graphs' input/output specs, the goldens' tolerances, the default K, and
logging / failing / hashing."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

MANIFEST = "edpo-model.json"
FORMAT_VERSION = 1
REFERENCE_FILE = "reference.onnx"
TRAIN_FILE = "policy.train.onnx"
PARAMS_FILE = "params.safetensors"
GOLDENS_FILE = "goldens.safetensors"
# TopK size used while tracing the scoring graph; replaced by the graph input `k` afterwards.
TRACE_TOPK = 7
# Default K of the sparse reference cache: the smallest K with ≥ 99% agreement of the cached
# ε-step with the exact one at both points of every noisy-preference run of `make study-k`
# (README, "How good is the cached ε-step?").
TOPK_DEFAULT = 128

TRAIN_BATCH_INPUTS = [
    ("input_ids", "int64", ["N", "T"]),
    ("attention_mask", "int64", ["N", "T"]),
    ("loss_mask", "int64", ["N", "T"]),
    ("ref_logps", "float32", ["N"]),
    ("ref_token_logps", "float32", ["N", "T"]),
    ("ref_topk_ids", "int64", ["N", "T", "K"]),
    ("ref_topk_logps", "float32", ["N", "T", "K"]),
    ("beta", "float32", []),
    ("epsilon", "float32", []),
    ("label_smoothing", "float32", []),
    ("step_tolerance", "float32", []),
]
TRAIN_STAT_OUTPUTS = [
    ("loss", "float32", []),
    ("logps", "float32", ["N"]),
    ("logps_plus", "float32", ["N"]),
    ("logps_minus", "float32", ["N"]),
    ("steps", "int64", ["B"]),
]
REFERENCE_INPUTS = [
    ("input_ids", "int64", ["N", "T"]),
    ("attention_mask", "int64", ["N", "T"]),
    ("k", "int64", []),
]
REFERENCE_OUTPUTS = [
    ("token_logps", "float32", ["N", "T"]),
    ("topk_logps", "float32", ["N", "T", "K"]),
    ("topk_ids", "int64", ["N", "T", "K"]),
]
TOLERANCES = {"loss_abs": 1e-5, "grad_rel": 1e-4, "logps_abs": 1e-4}


def log(msg: str) -> None:
    print(f"[export] {msg}", file=sys.stderr, flush=True)


def fail(msg: str) -> "NoReturn":  # noqa: F821
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
