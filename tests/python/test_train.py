"""`edpo train` against the paper's algorithm in PyTorch (fidelity), and its `final/` model
loaded in transformers (same log-probs as edpo's scoring of those parameters)."""

import json
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
import torch

from conftest import BUNDLE, PY_ENV, ROOT, edpo_bin

HP = ["--lr", "1e-3", "--beta", "0.1", "--epsilon", "0.05"]


@pytest.fixture(scope="module")
def exact_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("fidelity")
    shards, run = d / "shards", d / "run"
    subprocess.run([edpo_bin(), "--quiet", "prep", "--model", str(BUNDLE), "--data",
                    str(ROOT / "data-samples/prefs/train.chat.jsonl"), "--out", str(shards), "--limit", "320"],
                   check=True)  # fmt: skip
    subprocess.run([edpo_bin(), "--quiet", "train", "--model", str(BUNDLE), "--shards", str(shards), "--out", str(run),
                    "--reference", "online", "--batch-size", "16", "--micro-batch", "8", "--max-steps", "20", *HP],
                   check=True)  # fmt: skip
    torch_json, torch_params = d / "torch.json", d / "torch.safetensors"
    subprocess.run([sys.executable, "-m", "edpo_bench.torch_train", "--bundle", str(BUNDLE),
                    "--shards", str(shards), "--order", str(run / "pairs.parquet"), "--steps", "20",
                    "--micro-batch", "8", "--lr", "1e-3", "--beta", "0.1", "--epsilon", "0.05",
                    "--out", str(torch_json), "--save-params", str(torch_params)], check=True, env=PY_ENV)  # fmt: skip
    return {"shards": shards, "run": run, "torch": json.loads(torch_json.read_text()), "torch_params": torch_params}


def test_exact_mode_matches_the_paper_algorithm(exact_run):
    from safetensors.numpy import load_file

    run, ref = exact_run["run"], exact_run["torch"]
    metrics = pl.read_parquet(run / "metrics.parquet").sort("step")
    assert metrics.height == 20
    loss, beta = metrics["loss"].to_numpy(), metrics["kl/beta"].to_numpy()
    np.testing.assert_allclose(loss, ref["loss"], rtol=1e-5, err_msg="loss trajectory")
    np.testing.assert_allclose(beta, ref["beta"], rtol=1e-5, err_msg="β trajectory")
    assert beta[-1] != beta[0], "β moved"
    pairs = pl.read_parquet(run / "pairs.parquet").join(pl.DataFrame(ref["pairs"]), on=["step", "pair_id"], suffix="_torch")
    assert pairs.height == 320
    g, gp, gm = (pairs[c].to_numpy() for c in ("g_torch", "g_plus_torch", "g_minus_torch"))
    margin = np.minimum(np.abs(gp - g), np.abs(g - gm))
    robust = margin > 10 * pairs["delta"].to_numpy()
    assert robust.sum() >= 200, f"only {robust.sum()} pairs decided beyond 10δ"
    differ = (pairs["k"].to_numpy() != pairs["k_torch"].to_numpy()) & robust
    assert differ.sum() == 0, f"{differ.sum()} robust pairs took another step"
    assert set(pairs["k"].unique().to_list()) - {0}, "some pairs took a non-zero step"
    ours, theirs = load_file(run / "final/model.safetensors"), load_file(exact_run["torch_params"])
    assert set(ours) == set(theirs)
    for name, want in theirs.items():
        rel = np.linalg.norm(ours[name] - want) / np.linalg.norm(want)
        assert rel <= 1e-4, f"{name}: relative difference {rel:.2e}"


def test_final_model_loads_in_transformers_and_matches_edpo_scoring(exact_run, tmp_path):
    from transformers import AutoModelForCausalLM

    run, shards = exact_run["run"], exact_run["shards"]
    per_pair = tmp_path / "scores.parquet"
    subprocess.run([edpo_bin(), "--quiet", "eval", "--model", str(BUNDLE), "--shards", str(shards), "--params",
                    str(run / "final/model.safetensors"), "--per-pair", str(per_pair), "--json"],
                   check=True, capture_output=True)  # fmt: skip
    scores = pl.read_parquet(per_pair)
    model = AutoModelForCausalLM.from_pretrained(run / "final", dtype=torch.float32).eval()
    rows = pl.read_parquet(sorted(shards.glob("part-*.parquet"))).head(24)
    want = dict(zip(scores["pair_id"].to_list(), scores.iter_rows(named=True)))
    for row in rows.iter_rows(named=True):
        for side in ("chosen", "rejected"):
            ids = torch.tensor([row["prompt_ids"] + row[f"{side}_ids"]])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            p = len(row["prompt_ids"])
            total = sum(float(logp[t - 1, ids[0, t]]) for t in range(p, ids.shape[1]))
            assert abs(total - want[row["pair_id"]][f"logps_{side}"]) < 1e-4


def test_eval_on_reference_parameters_prefers_nothing(exact_run):
    out = subprocess.run([edpo_bin(), "--quiet", "eval", "--model", str(BUNDLE), "--shards", str(exact_run["shards"]),
                          "--json"], check=True, capture_output=True)  # fmt: skip
    report = json.loads(out.stdout)
    assert report["ties"] == 1.0 and report["accuracy"] == 0.0
    assert abs(report["mean_z"]) < 1e-4 and abs(report["mean_token_log_ratio_chosen"]) < 1e-6


def test_demo_settings_improve_held_out_accuracy(tmp_path):
    """What `make demo` claims: training with configs/demo.toml lifts held-out accuracy from
    0 (reference: every pair a tie) to at least 0.95, for ε-DPO and plain DPO."""
    for split in ("train", "heldout"):
        subprocess.run([edpo_bin(), "--quiet", "prep", "--model", str(BUNDLE), "--data",
                        str(ROOT / f"data-samples/prefs/{split}.plain.jsonl"), "--out", str(tmp_path / split)],
                       check=True)  # fmt: skip

    def accuracy(params=None):
        extra = ["--params", str(params)] if params else []
        out = subprocess.run([edpo_bin(), "--quiet", "eval", "--model", str(BUNDLE), "--shards", str(tmp_path / "heldout"),
                              "--json", *extra], check=True, capture_output=True)  # fmt: skip
        return json.loads(out.stdout)["accuracy"]

    assert accuracy() == 0.0
    for name, extra in (("eps", []), ("dpo", ["--epsilon", "0"])):
        run = tmp_path / name
        subprocess.run([edpo_bin(), "--quiet", "train", "--config", str(ROOT / "configs/demo.toml"), "--model",
                        str(BUNDLE), "--shards", str(tmp_path / "train"), "--out", str(run), *extra], check=True)  # fmt: skip
        assert accuracy(run / "final/model.safetensors") >= 0.95, name
