"""`make real-kl`: what ε-DPO buys on the real model — held-out preference accuracy against the
mean per-token KL(π_θ‖π_ref), for DPO at three β and ε-DPO at two ε.

Same start (SmolLM2-135M-Instruct), same pairs and data order (seed 42), the training settings of
`make real` (edpo_experiments.real.TRAIN_ARGS) but for β / ε. Accuracy: `edpo eval` on the
held-out shards (fraction of pairs with z > 0). KL: the exact full-vocabulary
KL(π_θ(·|x, y<t) ‖ π_ref(·|x, y<t)), averaged over every response token of the held-out pairs
(chosen and rejected, teacher-forced), computed in float64 from transformers' logits of the
trained `final/` and of the base model. Writes bench-results/real-kl.json and
bench-results/real-kl.png, prints the table and how long it took.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from edpo_bench.common import ROOT

from .real import TRAIN_ARGS, Stages, edpo, evaluate, prepared

# (name, β, ε): plain DPO at three β, ε-DPO from β = 0.1 at two ε.
RUNS = [("dpo β=0.05", 0.05, 0.0), ("dpo β=0.1", 0.1, 0.0), ("dpo β=0.3", 0.3, 0.0),
        ("ε-dpo ε=0.01", 0.1, 0.01), ("ε-dpo ε=0.03", 0.1, 0.03)]  # fmt: skip


# make real's two runs are this study's β = 0.1 DPO and ε = 0.01 runs (same command).
MAKE_REAL_RUNS = ROOT / "out/real/runs"
MAKE_REAL_NAMES = {(0.1, 0.0): "dpo", (0.1, 0.01): "eps-dpo"}


def train_args(beta: float) -> list[str]:
    args = list(TRAIN_ARGS)
    args[args.index("--beta") + 1] = str(beta)
    return args


def heldout_sequences(shards: Path) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) of every held-out response, chosen and rejected."""
    out = []
    for f in sorted(shards.glob("*.parquet")):
        t = pq.read_table(f, columns=["prompt_ids", "chosen_ids", "rejected_ids"]).to_pydict()
        for p, c, r in zip(t["prompt_ids"], t["chosen_ids"], t["rejected_ids"]):
            out += [(p, c), (p, r)]
    return out


def mean_token_kl(policy_dir: Path, reference_dir: Path, sequences) -> float:
    """Σ_t KL(π_θ‖π_ref) over response positions / number of response tokens (float64)."""
    import torch
    from transformers import AutoModelForCausalLM

    def load(d):
        return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()

    policy, reference = load(policy_dir), load(reference_dir)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for prompt, response in sequences:
            ids = torch.tensor([prompt + response])
            # Logits at positions predicting each response token.
            sl = slice(len(prompt) - 1, len(prompt) + len(response) - 1)
            lp = torch.log_softmax(policy(ids).logits[0, sl].double(), -1)
            lr = torch.log_softmax(reference(ids).logits[0, sl].double(), -1)
            total += float((lp.exp() * (lp - lr)).sum())
            tokens += len(response)
    return total / max(tokens, 1)


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    for kind, marker, color in (("dpo", "o", "tab:blue"), ("ε-dpo", "s", "tab:red")):
        pts = [(r["kl_per_token"], r["accuracy"], name) for name, r in rows.items() if name.split(" ")[0] == kind]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, linestyle="", color=color, label=kind.upper())
        for x, y, name in pts:
            ax.annotate(name.split(" ", 1)[1], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ref = rows.get("reference")
    if ref:
        ax.axhline(ref["accuracy"], color="gray", linestyle=":", label="reference (KL 0)")
    ax.set_xlabel("mean per-token KL(π_θ ‖ π_ref), held-out responses")
    ax.set_ylabel("held-out preference accuracy")
    ax.set_title("SmolLM2-135M-Instruct, ShareGPT pairs: accuracy vs KL")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edpo_experiments.real_kl", description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=128)
    parser.add_argument("--heldout", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--reuse-runs", action="store_true", help="keep finished runs of an earlier make real / real-kl with these settings instead of training again")
    args = parser.parse_args(argv)
    stages = Stages()
    model, _, _, bundle, shards = prepared(stages, args.train, args.heldout, args.max_new_tokens, verify=False)
    sequences = heldout_sequences(shards["heldout"])
    ref_eval = stages.run("eval reference", evaluate, bundle, shards["heldout"])
    rows = {"reference": {"beta": None, "epsilon": None, "accuracy": ref_eval["accuracy"], "kl_per_token": 0.0}}
    runs = ROOT / "out/real-kl/runs"
    for name, beta, eps in RUNS:
        run = runs / name.replace(" ", "_").replace("=", "")
        same = MAKE_REAL_RUNS / MAKE_REAL_NAMES.get((beta, eps), "-")
        if args.reuse_runs and (run / "final/model.safetensors").is_file():
            print(f"== train {name}: reusing {run} (--reuse-runs)", flush=True)
        elif args.reuse_runs and (same / "final/model.safetensors").is_file():
            # `make real` ran this very command (its TRAIN_ARGS and ε) into another folder.
            print(f"== train {name}: reusing {same}, the same command run by make real", flush=True)
            shutil.rmtree(run, ignore_errors=True)
            shutil.copytree(same, run)
        else:
            shutil.rmtree(run, ignore_errors=True)
            stages.run(f"train {name}", edpo, "--quiet", "train", "--model", bundle, "--shards", shards["train"], "--out", run, "--epsilon", str(eps), *train_args(beta))
        ev = stages.run(f"eval {name}", evaluate, bundle, shards["heldout"], run / "final/model.safetensors")
        kl = stages.run(f"KL {name}", mean_token_kl, run / "final", model, sequences)
        final_beta = pq.read_table(run / "metrics.parquet", columns=["kl/beta_next"]).column(0).to_pylist()[-1]
        rows[name] = {"beta": beta, "epsilon": eps, "final_beta": final_beta, "accuracy": ev["accuracy"], "mean_z": ev["mean_z"], "kl_per_token": kl}
    total = round(time.time() - stages.started, 1)
    png = ROOT / "bench-results/real-kl.png"
    plot(rows, png)
    print(f"\n{'run':<16} {'β (start)':>9} {'β (end)':>9} {'accuracy':>9} {'KL/token':>10}")
    for name, r in rows.items():
        b0 = "" if r["beta"] is None else f"{r['beta']:.3g}"
        b1 = f"{r['final_beta']:.4g}" if "final_beta" in r else ""
        print(f"{name:<16} {b0:>9} {b1:>9} {r['accuracy']:>9.3f} {r['kl_per_token']:>10.5f}")
    print(f"\nheld-out responses: {len(sequences)}; total {total:.0f}s; plot: {png}")
    out = {"runs": rows, "train_args": TRAIN_ARGS, "reused_runs": args.reuse_runs, "heldout_responses": len(sequences), "stages_s": stages.times, "total_s": total}
    (ROOT / "bench-results/real-kl.json").write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
