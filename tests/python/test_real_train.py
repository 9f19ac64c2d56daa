"""Fidelity at real depth: `edpo train --reference online` (the exact ε-step, K = V) against
the PyTorch reference trainer (edpo_bench.torch_train, written from objective.md) on
SmolLM2-135M-Instruct for 5 optimiser steps, and its `final/` loaded in transformers giving
edpo's scores. Marked `real` (`make test-real`)."""

import json
import os
import subprocess
import sys

import numpy as np
import polars as pl
import pytest

from conftest import PY_ENV, ROOT, edpo_bin

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(os.environ.get("EDPO_REAL") != "1", reason="real-model check: set EDPO_REAL=1"),
]

STEPS, BATCH, MICRO = 5, 8, 2
HP = ["--lr", "1e-5", "--beta", "0.1", "--epsilon", "0.05"]


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    from edpo_experiments.smollm2 import bundle as smollm2_bundle

    bundle = smollm2_bundle()
    d = tmp_path_factory.mktemp("real-fidelity")
    shards, run = d / "shards", d / "run"
    subprocess.run([edpo_bin(), "--quiet", "prep", "--model", str(bundle), "--data",
                    str(ROOT / "data-samples/prefs/train.chat.jsonl"), "--out", str(shards),
                    "--limit", str(STEPS * BATCH), "--max-length", "160"], check=True)  # fmt: skip
    subprocess.run([edpo_bin(), "--quiet", "train", "--model", str(bundle), "--shards", str(shards), "--out", str(run),
                    "--reference", "online", "--batch-size", str(BATCH), "--micro-batch", str(MICRO),
                    "--max-steps", str(STEPS), *HP], check=True)  # fmt: skip
    torch_json, torch_params = d / "torch.json", d / "torch.safetensors"
    subprocess.run([sys.executable, "-m", "edpo_bench.torch_train", "--bundle", str(bundle),
                    "--shards", str(shards), "--order", str(run / "pairs.parquet"), "--steps", str(STEPS),
                    "--micro-batch", str(MICRO), *HP, "--out", str(torch_json),
                    "--save-params", str(torch_params)], check=True, env=PY_ENV)  # fmt: skip
    return {"bundle": bundle, "shards": shards, "run": run, "torch": json.loads(torch_json.read_text()), "torch_params": torch_params}


def test_exact_mode_matches_the_pytorch_trainer_on_smollm2(real_run):
    from safetensors.numpy import load_file

    run, ref = real_run["run"], real_run["torch"]
    metrics = pl.read_parquet(run / "metrics.parquet").sort("step")
    assert metrics.height == STEPS
    loss = metrics["loss"].to_numpy()
    rel_loss = np.abs(loss - np.array(ref["loss"])) / np.abs(np.array(ref["loss"]))
    print(f"\nloss {loss.tolist()}\nrelative loss difference per step {rel_loss.tolist()}")
    assert rel_loss.max() <= 1e-5, "loss within 1e-5 relative"
    np.testing.assert_allclose(metrics["kl/beta"].to_numpy(), ref["beta"], rtol=1e-12, err_msg="β trajectory")
    pairs = pl.read_parquet(run / "pairs.parquet").join(pl.DataFrame(ref["pairs"]), on=["step", "pair_id"], suffix="_torch")
    assert pairs.height == STEPS * BATCH
    g, gp, gm = (pairs[c].to_numpy() for c in ("g_torch", "g_plus_torch", "g_minus_torch"))
    margin = np.minimum(np.abs(gp - g), np.abs(g - gm))
    robust = margin > 10 * pairs["delta"].to_numpy()
    differ = (pairs["k"].to_numpy() != pairs["k_torch"].to_numpy()) & robust
    print(f"pairs decided beyond 10δ: {int(robust.sum())} of {pairs.height}; k values {sorted(set(pairs['k'].to_list()))}")
    assert robust.sum() >= pairs.height // 2, "most pairs are decided beyond 10δ"
    assert differ.sum() == 0, f"{differ.sum()} robust pairs took another step"
    ours, theirs = load_file(run / "final/model.safetensors"), load_file(real_run["torch_params"])
    worst = max(float(np.linalg.norm(ours[n] - w) / np.linalg.norm(w)) for n, w in theirs.items())
    print(f"largest relative parameter difference {worst:.2e}")
    assert worst <= 1e-5, "parameters within 1e-5 relative"


def test_final_loads_in_transformers_and_gives_edpos_scores(real_run, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    run, shards = real_run["run"], real_run["shards"]
    per_pair = tmp_path / "scores.parquet"
    subprocess.run([edpo_bin(), "--quiet", "eval", "--model", str(real_run["bundle"]), "--shards", str(shards),
                    "--params", str(run / "final/model.safetensors"), "--per-pair", str(per_pair), "--json"],
                   check=True, capture_output=True)  # fmt: skip
    want = {r["pair_id"]: r for r in pl.read_parquet(per_pair).iter_rows(named=True)}
    model = AutoModelForCausalLM.from_pretrained(run / "final", dtype=torch.float32).eval()
    worst = 0.0
    for row in pl.read_parquet(sorted(shards.glob("part-*.parquet"))).head(8).iter_rows(named=True):
        for side in ("chosen", "rejected"):
            ids = torch.tensor([row["prompt_ids"] + row[f"{side}_ids"]])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            p = len(row["prompt_ids"])
            total = sum(float(logp[t - 1, ids[0, t]]) for t in range(p, ids.shape[1]))
            worst = max(worst, abs(total - want[row["pair_id"]][f"logps_{side}"]))
    print(f"\nlargest |Δ| of a sequence log-prob, transformers vs edpo eval: {worst:.2e}")
    assert worst < 5e-3, "the same sequence log-probs (fp32 at depth 30, sums over ~100 tokens)"
