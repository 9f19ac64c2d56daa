"""`make demo`: prep → train (ε-DPO, and plain DPO on the same budget) → eval on the held-out
split of data-samples/, then `edpo report`. Prints held-out preference accuracy before and
after. Everything goes under out/demo/ (prep shards are reused on reruns)."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EDPO = os.environ.get("EDPO_BIN") or str(Path(os.environ.get("CARGO_TARGET_DIR", Path.home() / ".cache/edpo/target")) / "debug/edpo")
BUNDLE = ROOT / "data-samples/bundle"
OUT = ROOT / "out/demo"


def edpo(*args, capture=False):
    cmd = [EDPO, *map(str, args)]
    print("$ edpo " + " ".join(map(str, args)), flush=True)
    res = subprocess.run(cmd, check=True, capture_output=capture, text=True)
    return res.stdout


def evaluate(params=None):
    extra = ["--params", params] if params else []
    return json.loads(edpo("--quiet", "eval", "--model", BUNDLE, "--shards", OUT / "heldout", "--beta", "0.1", "--json", *extra, capture=True))


def main():
    t0 = time.time()
    OUT.mkdir(parents=True, exist_ok=True)
    for split in ("train", "heldout"):
        # --overwrite: shards of an earlier demo made with another bundle are replaced (the
        # same settings resume, i.e. are kept).
        edpo("--quiet", "prep", "--model", BUNDLE, "--data", ROOT / f"data-samples/prefs/{split}.plain.jsonl",
             "--out", OUT / split, "--overwrite")  # fmt: skip
    before = evaluate()
    results = {}
    for name, eps in (("eps-dpo", None), ("dpo", "0")):
        run = OUT / "runs" / name
        shutil.rmtree(run, ignore_errors=True)
        extra = ["--epsilon", eps] if eps else []
        edpo("--quiet", "train", "--config", ROOT / "configs/demo.toml", "--model", BUNDLE, "--shards", OUT / "train", "--out", run, *extra)
        results[name] = evaluate(run / "final/model.safetensors")
        import pyarrow.parquet as pq

        m = pq.read_table(run / "metrics.parquet", columns=["kl/beta", "kl/beta_next"]).to_pydict()
        results[name]["beta_start"], results[name]["beta_end"] = m["kl/beta"][0], m["kl/beta_next"][-1]
    edpo("report", OUT / "runs/eps-dpo")
    print()
    print(f"Held-out preference accuracy ({before['pairs']} pairs; z > 0 means the model prefers the chosen response more than the reference does):")
    print(f"  {'model':<28} {'accuracy':>9} {'mean z':>9} {'KL/token':>9} {'β start → end':>18}")
    print(f"  {'reference (before)':<28} {before['accuracy']:>9.3f} {before['mean_z']:>9.3f} {before['mean_token_log_ratio_chosen']:>9.4f} {'':>18}")
    for name, label in (("eps-dpo", "ε-DPO (ε = 0.05), after"), ("dpo", "DPO (ε = 0), after")):
        r = results[name]
        print(f"  {label:<28} {r['accuracy']:>9.3f} {r['mean_z']:>9.3f} {r['mean_token_log_ratio_chosen']:>9.4f} {r['beta_start']:>8.4f} → {r['beta_end']:.4f}")
    print()
    print(f"Report: {OUT / 'runs/eps-dpo/report/index.html'} (PNGs beside it)")
    print(f"Runs: {OUT / 'runs'}; demo took {time.time() - t0:.0f}s")
    if not results["eps-dpo"]["accuracy"] > before["accuracy"]:
        sys.exit("demo: ε-DPO did not improve held-out accuracy")


if __name__ == "__main__":
    main()
