"""The bundle's contract and small helpers shared by the exporter's modules: file names, the
format version, the graphs' input/output specs, the goldens' format and noise band, the
default K, and logging / failing / hashing."""

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
# LoRA bundles: the initial adapter as a PEFT folder (adapter_config.json, adapter_model.safetensors).
ADAPTER_DIR = "adapter"
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json"]
# TopK size used while tracing the scoring graph; replaced by the graph input `k` afterwards.
TRACE_TOPK = 7
# Default K of the sparse reference cache: the smallest K with ≥ 99% agreement of the cached
# ε-step with the exact one at both points of every noisy-preference run of `make study-k`
# (README, "How good is the cached ε-step?").
TOPK_DEFAULT = 128
# Query blocks of the training graph's causal attention (attention.block_causal; README,
# "Training attention"): measured on SmolLM2's joint graph against 1 and 2 (the CLI takes 1–4).
TRAIN_ATTENTION_BLOCKS = 4

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
    ("grad_scale", "float32", []),
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
# Both sliced graphs' (--lm-head-chunks > 0) extra input: the flat indices r·T + t of the label
# tokens to compute (graphs.ReferenceScorer: the tokens to score; objective.EpsDpoLoss: the loss
# mask's). At least one, and never t = 0 (token 0 has no predicting state; position r·T would
# read row r − 1's last state); edpo builds them so (src/graphs.rs). Dense graphs compute every
# position and have no such input.
LABEL_POSITIONS_INPUT = ("label_positions", "int64", ["M"])
# The joint graph's inputs where it shares each pair's prefix (--train-shared-prefix on, the
# default where the attention is block-causal; objective.pack_pairs, src/packing.rs), and the
# scoring graph's (--scoring-shared-prefix on, the default with the attention kernel): the pair's
# chosen and rejected rows as one packed row — their common prefix (the prompt, at least) once,
# then the rest of the chosen row, then the rest of the rejected row — so the transformer body
# runs the prompt's tokens once, not twice. `packed_positions`: each token's position in its own
# row (the rotary's); `packed_branch`: 0 for the prefix, 1 the chosen rest, 2 the rejected rest,
# −1 padding (rejected tokens do not attend to chosen ones); `hidden_at`: for each label position
# of `label_positions`, the flat index b·S + s of the packed token whose final state predicts it.
PACKED_INPUTS = [
    ("packed_ids", "int64", ["B", "S"]),
    ("packed_positions", "int64", ["B", "S"]),
    ("packed_branch", "int64", ["B", "S"]),
    ("hidden_at", "int64", ["M"]),
]
# The joint graph weights its loss by the input grad_scale (the micro-batch's share of the
# step; 1 in the goldens), so its gradients come weighted from the backward pass itself, and
# sums them into accumulators (graphs.accumulate_gradients): every gradient output is
# grad.X = grad_acc.X + ∂(grad_scale · loss)/∂X, so the trainer binds grad_acc.X and grad.X to
# one buffer and adds a micro-batch's gradient in place, with no second parameter-sized buffer.
# The manifest's `graphs.train.grad_accumulation` names the accumulators; a plain gradient is
# zero accumulators (`plain_gradient_feeds`).


def accumulator_name(grad_output: str) -> str:
    """The accumulator input of gradient output `grad.X`: `grad_acc.X`."""
    return "grad_acc." + grad_output.removeprefix("grad.")


def takes_packed(spec: dict) -> bool:
    """Whether the graph `spec` (the manifest's graphs.train or graphs.reference) takes each
    pair's rows packed (PACKED_INPUTS)."""
    return any(i["name"] == PACKED_INPUTS[0][0] for i in spec["inputs"])


def packed_feeds(spec: dict, feeds: dict) -> dict:
    """The packed inputs (PACKED_INPUTS, numpy) of the batch in `feeds` (numpy arrays by input
    name: input_ids, attention_mask, label_positions) where the graph `spec` shares each pair's
    prefix; {} for a graph that takes the plain rows only."""
    if not takes_packed(spec):
        return {}
    import torch

    from .objective import pack_pairs

    rows = (torch.from_numpy(feeds[name]) for name in ("input_ids", "attention_mask", "label_positions"))
    return {name: value.numpy() for name, value in pack_pairs(*rows).items()}


def plain_gradient_feeds(spec: dict, feeds: dict) -> dict:
    """The joint graph's accumulator feeds for a plain gradient (zeros), given its parameter
    `feeds` (numpy arrays by graph name); {} for a graph that does not accumulate."""
    import numpy as np

    acc = spec.get("grad_accumulation")
    if acc is None:
        return {}
    out = {}
    for grad_output, acc_input in acc["accumulators"].items():
        out[acc_input] = np.zeros_like(feeds[spec["grad_outputs"][grad_output]])
    return out


REFERENCE_OUTPUTS = [
    ("token_logps", "float32", ["N", "T"]),
    ("topk_logps", "float32", ["N", "T", "K"]),
    ("topk_ids", "int64", ["N", "T", "K"]),
]
# Goldens (goldens.py has the file layout). Format 1 stored fp32 outputs, every gradient and
# fixed tolerances; format 2 stores float64 outputs, a bounded gradient sample and the noise band.
GOLDENS_FORMAT = 2
# The noise band of one output: ONNX Runtime's error against float64 may be at most
# BAND_FACTOR × PyTorch fp32's own error on the same batch, plus BAND_FLOOR × max(1, largest
# |float64 value|) (relative gradient errors: plus BAND_FLOOR) so that an output PyTorch fp32
# happens to get exactly right does not demand exactness (2⁻²² ≈ 2.4e-7: four float32
# roundings, 2⁻²⁴ each, of the largest value).
BAND_FACTOR = 8.0
BAND_FLOOR = 2.0**-22
# Float64 top-K values and ids are stored for this many ranks beyond K, so that an id ONNX
# Runtime puts at rank K − 1 but float64 at rank K (a near-tie at the boundary) can be judged.
EXTRA_RANKS = 8
# Gradients: R seeded ±1 projections of every tensor, plus the whole float64 gradient of at
# most FULL_GRADS tensors with ≤ FULL_GRAD_MAX_NUMEL elements (spread over the parameter list).
GRAD_PROJECTIONS = 16
FULL_GRADS = 4
FULL_GRAD_MAX_NUMEL = 4096


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


def reference_sha256(files: dict, names: list[str]) -> str:
    """The identity of what the reference computes: sha256 of the lines "<file> <sha256>\n"
    of `names` (the reference graph, the weights file, the tokenizer files and, when the
    reference includes a LoRA adapter, the adapter's two files), sorted by file name. Shards
    are keyed on it, so a full and a LoRA bundle of one base model share shards. The Rust twin
    is `Bundle::reference_sha256` (src/bundle.rs)."""
    text = "".join(f"{name} {files[name]['sha256']}\n" for name in sorted(names))
    return hashlib.sha256(text.encode()).hexdigest()


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
