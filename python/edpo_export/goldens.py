"""The goldens: a fixed batch, and what PyTorch computes on it for both graphs in float64,
stored in the bundle so that `--verify` (and `edpo verify`) can replay the batch through ONNX
Runtime and judge its error against PyTorch float32's own error on the same batch.

Goldens format 2 — a contract with the Rust reader (src/goldens/; ARCHITECTURE.md, "Contracts").

goldens.safetensors (N = 2B rows, chosen then rejected; K = `reference.in.k`; E extra ranks):

    reference.in.input_ids, reference.in.attention_mask   int64 [N, T]
    reference.in.label_positions                          int64 [N·(T−1)] every position t ≥ 1 (sliced graphs' input)
    reference.in.k                                        int64 []      the K the graph is run with
    reference.f64.token_logps                             float64 [N, T]
    reference.f64.topk_logps, reference.f64.topk_ids      float64 / int64 [N, T, K + E], ranks 0…K+E−1
    train.in.<input>                                      the joint graph's inputs (float32 / int64;
                                                          label_positions: the sliced graph's)
    train.in.param.<param>                                float32 [shape]  LoRA bundles: the adapter
                                                                        values the goldens use (every
                                                                        lora_B non-zero); verify feeds
                                                                        them instead of the bundle's
    train.f64.loss []; train.f64.logps, train.f64.logps_plus, train.f64.logps_minus [N]   float64
    train.f64.steps                                       int64 [B]     per-pair k in float64
    train.f64.step_margin                                 float64 [B]   min distance of g₊ − g and
                                                                        g − g₋ from ±δ (objective.md §3)
    train.grad.norm.<param>                               float64 []    ‖g‖₂ of the float64 gradient
    train.grad.proj.<param>                               float64 [R]   g · r_j, j < R (signs below)
    train.grad.full.<param>                               float64 [shape]  for the names in `full_grads`

Gradients are keyed by stored parameter name (params.safetensors; a tied weight's gradients
summed; a LoRA bundle's: its adapter matrices, PEFT's saved key names). The manifest's `goldens` section:

    file, format (2), factor, floor, extra_ranks (E), projections (R), full_grads [names],
    torch_fp32_error {"reference.token_logps", "reference.topk_logps" (first K ranks),
                      "train.loss", "train.logps", "train.logps_plus", "train.logps_minus"}:
                      max |PyTorch fp32 − float64|,
    torch_fp32_grad_error {param: ‖g32 − g64‖ / ‖g64‖},
    torch_fp32_topk_ids_differ, torch_fp32_steps_differ: counts, for information.

An output passes when ONNX Runtime's error against float64 ≤ factor × torch_fp32_error +
floor × max(1, max |float64 value|) (gradients: relative errors, + floor); see verify.py for
the top-K id and step rules. Both PyTorch passes are eager: the scoring module of the
reference graph, and the dense ε-DPO loss (`EpsDpoLoss(model)`, autograd on the tied model),
in float32 and on a float64 copy of the model (whose rotary tables Hugging Face still
computes in float32, as the model defines them).

Projection signs (R ≤ 64): r_j[i], the sign of element i (row-major) of the parameter `name`
in projection j, is bit j of output number i + 1 of splitmix64 seeded with the FNV-1a 64-bit
hash of `name`'s UTF-8 bytes; bit 0 → +1, bit 1 → −1. Since E[(e·r)²] = ‖e‖² for such signs,
the norm of an error vector e is estimated from its R projections.
"""

from __future__ import annotations

import copy

import numpy as np

from .common import (
    BAND_FACTOR, BAND_FLOOR, EXTRA_RANKS, FULL_GRAD_MAX_NUMEL, FULL_GRADS, GOLDENS_FORMAT, GRAD_PROJECTIONS,
    TRAIN_BATCH_INPUTS,
)  # fmt: skip
from .graphs import ReferenceScorer

TRAIN_OUTPUTS = ["loss", "logps", "logps_plus", "logps_minus", "steps"]
_MASK64 = (1 << 64) - 1
_SIGN_CHUNK = 1 << 18  # elements per block when projecting


def fnv1a64(text: str) -> int:
    """FNV-1a, 64 bits, of the UTF-8 bytes of `text`: the seed of a tensor's signs."""
    h = 0xCBF29CE484222325
    for byte in text.encode():
        h = ((h ^ byte) * 0x100000001B3) & _MASK64
    return h


def splitmix64(seed: int, start: int, count: int) -> np.ndarray:
    """Outputs start+1 … start+count (uint64) of splitmix64 seeded with `seed`."""
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + np.uint64(0x9E3779B97F4A7C15) * np.arange(start + 1, start + count + 1, dtype=np.uint64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def signs(name: str, begin: int, end: int, projections: int) -> np.ndarray:
    """[end − begin, projections] signs ±1 (float64): row i is element begin + i of the tensor
    `name`, column j its sign in projection j (bit j of splitmix64 output number i + 1)."""
    x = splitmix64(fnv1a64(name), begin, end - begin).astype("<u8")
    low_bytes = x.view(np.uint8).reshape(-1, 8)[:, : (projections + 7) // 8]  # little-endian: bits 0…
    bits = np.unpackbits(low_bytes, axis=1, bitorder="little")[:, :projections]
    return 1.0 - 2.0 * bits.astype(np.float64)


def project(name: str, flat, projections: int = GRAD_PROJECTIONS) -> np.ndarray:
    """[g · r_j for j < projections] in float64 for a flat gradient (any float dtype)."""
    flat = np.asarray(flat)
    out = np.zeros(projections)
    for begin in range(0, flat.size, _SIGN_CHUNK):
        end = min(begin + _SIGN_CHUNK, flat.size)
        out += flat[begin:end].astype(np.float64) @ signs(name, begin, end, projections)
    return out


def golden_batch(vocab: int, seed: int = 1234, pairs: int = 5, length: int = 12, tie_last: bool = True):
    """A fixed, padded batch: rows 0..B chosen, B..2B rejected, shared prompts.

    With tie_last the last pair's rejected response equals its chosen one, so its step must be 0.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    n = 2 * pairs
    ids = torch.zeros(n, length, dtype=torch.int64)
    attn = torch.zeros(n, length, dtype=torch.int64)
    loss = torch.zeros(n, length, dtype=torch.int64)
    for i in range(pairs):
        prompt_len = int(torch.randint(2, 5, (1,), generator=gen))
        prompt = torch.randint(0, vocab, (prompt_len,), generator=gen)
        for row in (i, i + pairs):
            resp_len = int(torch.randint(2, length - prompt_len + 1, (1,), generator=gen))
            if row == 0:
                resp_len = length - prompt_len  # one row without padding
            total = prompt_len + resp_len
            ids[row, :prompt_len] = prompt
            ids[row, prompt_len:total] = torch.randint(0, vocab, (resp_len,), generator=gen)
            attn[row, :total] = 1
            loss[row, prompt_len:total] = 1
    if tie_last:
        for t in (ids, attn, loss):
            t[2 * pairs - 1] = t[pairs - 1]
    return ids, attn, loss


def perturbed(model, scale: float, seed: int):
    import torch

    ref = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * (p.std() if p.numel() > 1 else 1.0))
    return ref


def max_abs_error(got, want) -> float:
    return float((got.double() - want.double()).abs().max())


def step_margins(logps, logps_plus, logps_minus, step_tolerance):
    """Per pair, how far g₊ − g and g − g₋ are from the thresholds ±δ of objective.md §3: a
    change of the log-probs smaller than this cannot change the step k."""
    import torch

    b = logps.shape[0] // 2
    g = logps[:b] - logps[b:]
    d_plus = (logps_plus[:b] - logps_plus[b:]) - g
    d_minus = g - (logps_minus[:b] - logps_minus[b:])
    delta = step_tolerance * (1.0 + logps[:b].abs() + logps[b:].abs())
    gaps = [(d - s * delta).abs() for d in (d_plus, d_minus) for s in (1.0, -1.0)]
    return torch.stack(gaps).min(0).values


def train_inputs(model, ids, attn, loss_mask, k: int) -> dict:
    """The joint graph's inputs on the golden batch: the cached reference is the model with
    its weights perturbed (so policy ≠ reference and the steps are not all 0), scored in fp32."""
    import torch

    from .objective import loss_positions, pack_pairs

    with torch.no_grad():
        ref_tok, ref_topv, ref_topi = ReferenceScorer.build(perturbed(model, 0.05, seed=99), k)(ids, attn)
    positions = loss_positions(loss_mask)
    return {
        "input_ids": ids,
        "attention_mask": attn,
        "loss_mask": loss_mask,
        "ref_logps": (ref_tok * loss_mask).sum(-1),
        "ref_token_logps": ref_tok,
        "ref_topk_ids": ref_topi,
        "ref_topk_logps": ref_topv,
        "beta": torch.tensor(0.1),
        "epsilon": torch.tensor(0.1),
        "label_smoothing": torch.tensor(0.0),
        "step_tolerance": torch.tensor(1e-6),
        "grad_scale": torch.tensor(1.0),
        "label_positions": positions,  # the sliced joint graph's input
        **pack_pairs(ids, attn, positions),  # a shared-prefix joint graph's (common.PACKED_INPUTS)
    }


def train_outputs(model, train_in: dict, names: dict | None = None):
    """Eager autograd in the model's dtype (the dense ε-DPO loss on the tied model): the five
    outputs and {stored parameter name: gradient} of every parameter that requires one
    (`names` maps parameter names to stored names where they differ: a LoRA bundle's adapters)."""
    import torch

    from .objective import EpsDpoLoss

    names = names or {}
    dtype = next(model.parameters()).dtype
    args = [train_in[n] if train_in[n].dtype == torch.int64 else train_in[n].to(dtype) for n, _, _ in TRAIN_BATCH_INPUTS]
    model.zero_grad(set_to_none=True)
    outs = EpsDpoLoss(model)(*args)
    outs[0].backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            grads[names.get(name, name)], p.grad = p.grad.detach(), None  # handed over, not copied
    return dict(zip(TRAIN_OUTPUTS, [o.detach() for o in outs])), grads


def full_gradient_names(model, names: dict | None = None) -> list[str]:
    """Up to FULL_GRADS small trainable tensors (≤ FULL_GRAD_MAX_NUMEL elements, stored names),
    evenly spread over the parameter list (for a Llama: the first layer's norm … the final norm)."""
    names = names or {}
    small = [names.get(n, n) for n, p in model.named_parameters() if p.requires_grad and p.numel() <= FULL_GRAD_MAX_NUMEL]
    if len(small) <= FULL_GRADS:
        return small
    picks = sorted({round(i * (len(small) - 1) / (FULL_GRADS - 1)) for i in range(FULL_GRADS)})
    return [small[i] for i in picks]


def reference_goldens(model, model64, ids, attn, k: int, ranks: int, tensors: dict, errors: dict) -> int:
    """Float64 scoring outputs into `tensors`, PyTorch fp32's errors into `errors`; returns
    how many of fp32's top-K ids differ from float64's."""
    import torch

    from .objective import loss_positions

    with torch.no_grad():
        tok32, topv32, topi32 = ReferenceScorer.build(model, k)(ids, attn)
        tok64, topv64, topi64 = ReferenceScorer.build(model64, ranks)(ids, attn)
    tensors.update({
        "reference.in.input_ids": ids,
        "reference.in.attention_mask": attn,
        "reference.in.label_positions": loss_positions(torch.ones_like(ids)),
        "reference.in.k": torch.tensor(k, dtype=torch.int64),
        "reference.f64.token_logps": tok64,
        "reference.f64.topk_logps": topv64,
        "reference.f64.topk_ids": topi64,
    })  # fmt: skip
    errors["reference.token_logps"] = max_abs_error(tok32, tok64)
    errors["reference.topk_logps"] = max_abs_error(topv32, topv64[..., :k])
    return int((topi32 != topi64[..., :k]).sum())


def gradient_goldens(grads32: dict, grads64: dict, full: list[str], tensors: dict) -> dict:
    """Norms, projections and the chosen full tensors of the float64 gradients into `tensors`;
    returns PyTorch fp32's relative error per tensor."""
    import torch

    rel = {}
    for name, g64 in grads64.items():
        norm = float(g64.norm())
        tensors[f"train.grad.norm.{name}"] = torch.tensor(norm, dtype=torch.float64)
        tensors[f"train.grad.proj.{name}"] = torch.from_numpy(project(name, g64.reshape(-1).numpy()))
        rel[name] = float((grads32[name].double() - g64).norm()) / max(norm, 1e-300)
    for name in full:
        tensors[f"train.grad.full.{name}"] = grads64[name]
    return rel


def compute_goldens(model, topk: int, adapter=None) -> tuple[dict, dict]:
    """(tensors of goldens.safetensors, the manifest's `goldens` section without `file`):
    PyTorch float64 outputs of both graphs on the fixed batch and PyTorch fp32's errors.

    `adapter` (a LoRA bundle): (graph names {parameter: stored name}, a function that sets the
    goldens' adapter values on the model and returns them by stored name). The model holds the
    PEFT adapter at its initial values: the reference (base + initial adapter) is scored
    first; the joint graph's goldens then use the adapter values the function sets (stored as
    `train.in.param.<name>`, what verify feeds the graph), with gradients of the adapters only.
    """
    vocab = model.get_output_embeddings().weight.shape[0]
    ids, attn, loss_mask = golden_batch(vocab)
    k = min(topk, vocab)
    ranks = min(k + EXTRA_RANKS, vocab)
    names = adapter[0] if adapter else None
    model64 = copy.deepcopy(model).double()
    tensors: dict = {}
    errors: dict = {}
    ids_differ = reference_goldens(model, model64, ids, attn, k, ranks, tensors, errors)
    if adapter:
        del model64
        tensors.update({f"train.in.param.{name}": value.float() for name, value in adapter[1](model).items()})
        model64 = copy.deepcopy(model).double()
    train_in = train_inputs(model, ids, attn, loss_mask, k)
    out64, grads64 = train_outputs(model64, train_in, names)
    del model64
    out32, grads32 = train_outputs(model, train_in, names)
    tensors.update({f"train.in.{name}": value for name, value in train_in.items()})
    tensors.update({f"train.f64.{name}": value for name, value in out64.items()})
    tau = train_in["step_tolerance"].double()
    tensors["train.f64.step_margin"] = step_margins(out64["logps"], out64["logps_plus"], out64["logps_minus"], tau)
    for name in TRAIN_OUTPUTS[:4]:
        errors[f"train.{name}"] = max_abs_error(out32[name], out64[name])
    full = full_gradient_names(model, names)
    grad_errors = gradient_goldens(grads32, grads64, full, tensors)
    section = {
        "format": GOLDENS_FORMAT,
        "factor": BAND_FACTOR,
        "floor": BAND_FLOOR,
        "extra_ranks": ranks - k,
        "projections": GRAD_PROJECTIONS,
        "full_grads": full,
        "torch_fp32_error": errors,
        "torch_fp32_grad_error": grad_errors,
        "torch_fp32_topk_ids_differ": ids_differ,
        "torch_fp32_steps_differ": int((out32["steps"] != out64["steps"]).sum()),
    }
    return {name: value.contiguous() for name, value in tensors.items()}, section
