"""The paper's ε-DPO training step in plain PyTorch, written from objective.md: full-vocabulary
reference logits computed online by a frozen reference model, eager autograd, torch AdamW (no
decay on biases and norms, as the Hugging Face Trainer), transformers' LR schedules,
clip_grad_norm_, and the global β rule after every optimiser step.

LoRA: with a LoRA bundle (`python -m edpo_export --lora`), or `--adapter DIR` (any PEFT LoRA
adapter), the policy is base + the adapter through PEFT, only the adapter is trained, and the
reference is base + that adapter merged when any lora_B is non-zero (an SFT adapter as the
starting point), else the base — edpo's rule. `--save-params` then writes the adapter with
PEFT's saved key names.

Two uses:
  * the fidelity oracle for `edpo train --reference online` (tests): `--order RUN/pairs.parquet`
    replays edpo's exact step composition and the result JSON holds the loss/β trajectories,
    per-pair steps and margins; `--save-params` writes the final parameters;
  * the PyTorch baseline of `make bench-train` (`--steps N`, sequential batches).
"""

import argparse
import json
import math
import resource
import time
from pathlib import Path

import torch

from edpo_export.objective import exact_eps_dpo, full_logps_next


def load_model(bundle: Path):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(bundle)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    missing, unexpected = model.load_state_dict(load_file(bundle / "params.safetensors"), strict=False)
    assert not unexpected, unexpected
    model.tie_weights()
    return model


def load_models(bundle: Path, adapter: Path | None):
    """(policy, reference, whether the policy is a PEFT model): the bundle's model, or base +
    `adapter` (default: a LoRA bundle's own adapter/) with the reference as edpo defines it."""
    manifest = json.loads((bundle / "edpo-model.json").read_text())
    if adapter is None and manifest.get("lora"):
        adapter = bundle / manifest["lora"]["adapter_dir"]
    if adapter is None:
        return load_model(bundle), load_model(bundle), False
    from peft import PeftModel
    from safetensors.torch import load_file

    policy = PeftModel.from_pretrained(load_model(bundle), adapter, is_trainable=True)
    b_nonzero = any(bool(v.abs().max() > 0) for k, v in load_file(adapter / "adapter_model.safetensors").items() if "lora_B" in k)
    reference = load_model(bundle)
    if b_nonzero:
        reference = PeftModel.from_pretrained(reference, adapter).merge_and_unload()
    return policy, reference, True


def save_params(policy, path: str, lora: bool) -> None:
    """The trained parameters: every parameter (a tied weight once), or the adapter by PEFT key."""
    from safetensors.torch import save_file

    if lora:
        from peft import get_peft_model_state_dict

        save_file({n: p.detach().contiguous() for n, p in get_peft_model_state_dict(policy).items()}, path)
        return
    tied = {n for n, _ in policy.named_parameters(remove_duplicate=False)} - {n for n, _ in policy.named_parameters()}
    save_file({n: p.detach().contiguous() for n, p in policy.named_parameters() if n not in tied}, path)


def read_pairs(shards: Path) -> dict:
    import pyarrow.parquet as pq

    pairs = {}
    for f in sorted(shards.glob("part-*.parquet")):
        t = pq.read_table(f, columns=["pair_id", "prompt_ids", "chosen_ids", "rejected_ids"]).to_pylist()
        for row in t:
            pairs[row["pair_id"]] = row
    return pairs


def batch_tensors(rows, pad_id):
    seqs = [(r["prompt_ids"], r["chosen_ids"]) for r in rows] + [(r["prompt_ids"], r["rejected_ids"]) for r in rows]
    t = max(len(p) + len(c) for p, c in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), t), dtype=torch.long)
    loss = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, (p, c) in enumerate(seqs):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        attn[i, : len(p) + len(c)] = 1
        loss[i, len(p) : len(p) + len(c)] = 1
    return ids, attn, loss


def lr_factor(schedule, step, warmup, total):
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--shards", required=True)
    ap.add_argument("--order", help="edpo run's pairs.parquet: replay its step composition")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=16, help="pairs per step without --order")
    ap.add_argument("--micro-batch", type=int, default=0, help="pairs per forward/backward (0 = whole step)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--epsilon", type=float, default=0.01)
    ap.add_argument("--label-smoothing", type=float, default=0.0)
    ap.add_argument("--step-tolerance", type=float, default=1e-6)
    ap.add_argument("--schedule", default="cosine")
    ap.add_argument("--warmup-ratio", type=float, default=0.1)
    ap.add_argument("--total-steps", type=int, help="schedule length (default: --steps)")
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", help="result JSON")
    ap.add_argument("--save-params", help="final parameters as safetensors (LoRA: the adapter, PEFT key names)")
    ap.add_argument("--adapter", help="PEFT LoRA adapter folder to train (default: a LoRA bundle's adapter/)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bundle, shards = Path(args.bundle), Path(args.shards)
    policy, reference, lora = load_models(bundle, Path(args.adapter) if args.adapter else None)
    policy.eval()  # TRL disables dropout; the exported graph has none
    reference.eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    pad_id = reference.config.pad_token_id or 0
    pairs = read_pairs(shards)
    if args.order:
        import pyarrow.parquet as pq

        order = pq.read_table(args.order, columns=["step", "pair_id"]).to_pylist()
        steps = {}
        for r in order:
            steps.setdefault(r["step"], []).append(r["pair_id"])
        plan = [steps[s] for s in sorted(steps)][: args.steps]
    else:
        ids = list(pairs)
        plan = [ids[(i * args.batch_size) % len(ids):][: args.batch_size] for i in range(args.steps)]
    trainable = [(n, p) for n, p in policy.named_parameters() if p.requires_grad]
    no_decay = [p for n, p in trainable if n.endswith(".bias") or "norm" in n.lower() or ".ln_" in n]
    decay = [p for n, p in trainable if all(p is not q for q in no_decay)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
    )  # fmt: skip
    total = args.total_steps or len(plan)
    warmup = math.ceil(total * args.warmup_ratio)
    beta = args.beta
    result = {"loss": [], "beta": [], "pairs": []}
    t0 = time.time()
    for step, pair_ids in enumerate(plan):
        lr = args.lr * lr_factor(args.schedule, step, warmup, total)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        rows = [pairs[i] for i in pair_ids]
        micro = args.micro_batch or len(rows)
        step_loss, step_k = 0.0, []
        for start in range(0, len(rows), micro):
            chunk = rows[start : start + micro]
            ids, attn, loss_mask = batch_tensors(chunk, pad_id)
            with torch.no_grad():
                q_next = full_logps_next(reference, ids, attn)
            p_next = full_logps_next(policy, ids, attn)
            out = exact_eps_dpo(p_next, q_next, ids, loss_mask, beta, args.epsilon, args.label_smoothing, args.step_tolerance)
            weight = len(chunk) / len(rows)
            (out["loss"] * weight).backward()
            step_loss += float(out["loss"].detach()) * weight
            b = len(chunk)
            for j, r in enumerate(chunk):
                g = float(out["logps"][j] - out["logps"][j + b])
                gp = float(out["logps_plus"][j] - out["logps_plus"][j + b])
                gm = float(out["logps_minus"][j] - out["logps_minus"][j + b])
                delta = args.step_tolerance * (1 + abs(float(out["logps"][j])) + abs(float(out["logps"][j + b])))
                k = int(out["steps"][j])
                step_k.append(k)
                result["pairs"].append({"step": step, "pair_id": r["pair_id"], "k": k, "g": g, "g_plus": gp, "g_minus": gm, "delta": delta})
        torch.nn.utils.clip_grad_norm_([p for _, p in trainable], args.max_grad_norm)
        opt.step()
        result["loss"].append(step_loss)
        result["beta"].append(beta)
        beta = beta / (1.0 + args.epsilon * (sum(step_k) / len(step_k)))
    result["final_beta"] = beta
    result["seconds"] = time.time() - t0
    result["pairs_per_s"] = sum(len(p) for p in plan) / result["seconds"]
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.save_params:
        save_params(policy, args.save_params, lora)
    text = json.dumps(result)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(json.dumps({k: v for k, v in result.items() if k != "pairs"}))


if __name__ == "__main__":
    main()
