"""The goldens: a fixed batch and what eager PyTorch computes on it for both graphs, stored
in the bundle so that `--verify` (and `edpo verify`) can replay them through ONNX Runtime."""

from __future__ import annotations

import copy

from .common import TRAIN_BATCH_INPUTS
from .graphs import ReferenceScorer

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


def compute_goldens(model, untied, topk: int):
    """PyTorch outputs of both graphs on the fixed batch (eager autograd on the tied model)."""
    import torch

    from .objective import EpsDpoLoss

    vocab = model.config.vocab_size if hasattr(model.config, "vocab_size") else model.get_output_embeddings().weight.shape[0]
    ids, attn, loss_mask = golden_batch(vocab)
    k = min(topk, vocab)
    with torch.no_grad():
        ref_model = perturbed(model, 0.05, seed=99)
        ref_tok, ref_topv, ref_topi = ReferenceScorer.build(ref_model, k)(ids, attn)
        pol_tok, pol_topv, pol_topi = ReferenceScorer.build(model, k)(ids, attn)
    ref_logps = (ref_tok * loss_mask).sum(-1)
    scalars = {
        "beta": torch.tensor(0.1),
        "epsilon": torch.tensor(0.1),
        "label_smoothing": torch.tensor(0.0),
        "step_tolerance": torch.tensor(1e-6),
    }
    train_in = {
        "input_ids": ids,
        "attention_mask": attn,
        "loss_mask": loss_mask,
        "ref_logps": ref_logps,
        "ref_token_logps": ref_tok,
        "ref_topk_ids": ref_topi,
        "ref_topk_logps": ref_topv,
        **scalars,
    }
    module = EpsDpoLoss(model)
    model.zero_grad()
    loss, logps, lp_plus, lp_minus, steps = module(*[train_in[n] for n, _, _ in TRAIN_BATCH_INPUTS])
    loss.backward()
    goldens = {f"train.in.{k_}": v.contiguous() for k_, v in train_in.items()}
    for name, value in zip(["loss", "logps", "logps_plus", "logps_minus", "steps"], [loss, logps, lp_plus, lp_minus, steps]):
        goldens[f"train.out.{name}"] = value.detach().contiguous()
    for name, p in model.named_parameters():
        goldens[f"train.out.grad.{name}"] = p.grad.detach().clone().contiguous()
    model.zero_grad()
    goldens.update(
        {
            "reference.in.input_ids": ids,
            "reference.in.attention_mask": attn,
            "reference.in.k": torch.tensor(k, dtype=torch.int64),
            "reference.out.token_logps": pol_tok.contiguous(),
            "reference.out.topk_logps": pol_topv.contiguous(),
            "reference.out.topk_ids": pol_topi.contiguous(),
        }
    )
    return goldens
