"""`make bench-train`: pairs/s and peak RSS of `edpo train` (cached reference) against the
paper's step in PyTorch (policy forward+backward plus the online full-vocabulary reference
forward; edpo_bench/torch_train.py), same model, same pairs, same batch and micro-batch,
same thread count, in one command.

Model: ≈25M parameters, vocabulary 32,000 (edpo_bench.common.BENCH_CONFIG). Data: the bench-prep
pairs (~60-token prompts, ~150-token responses), prepped with the exporter's default K.
"""

import argparse
import json
import shutil

from edpo_bench.common import CACHE, PY, TOPK_DEFAULT, bench_bundle, bench_train_shards, child_env, edpo_release, measured, write_results


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--topk", type=int, default=TOPK_DEFAULT, help=f"K of the cached reference (default {TOPK_DEFAULT}, the exporter's)")
    args = ap.parse_args()
    bundle = bench_bundle()
    shards = bench_train_shards(bundle, args.topk, args.threads)
    run = CACHE / "run-bench"
    shutil.rmtree(run, ignore_errors=True)
    common = ["--lr", "1e-5", "--beta", "0.1", "--epsilon", "0.01"]
    e = measured([str(edpo_release()), "--quiet", "--threads", str(args.threads), "train", "--model", str(bundle),
                  "--shards", str(shards), "--out", str(run), "--max-steps", str(args.steps), "--batch-size",
                  str(args.batch_size), "--micro-batch", str(args.micro_batch), "--json", *common])  # fmt: skip
    es = json.loads(e["stdout"])
    t = measured([PY, "-m", "edpo_bench.torch_train", "--bundle", str(bundle), "--shards", str(shards),
                  "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--micro-batch",
                  str(args.micro_batch), "--threads", str(args.threads), *common], env=child_env())  # fmt: skip
    ts = json.loads(t["stdout"])
    res = {
        "threads": args.threads, "topk": args.topk, "steps": args.steps, "batch_size": args.batch_size, "micro_batch": args.micro_batch,
        "edpo": {"pairs_per_s": es["pairs_per_second"], "wall_s": e["wall_s"], "peak_rss_mb": e["peak_rss_mb"]},
        "torch": {"pairs_per_s": ts["pairs_per_s"], "wall_s": t["wall_s"], "peak_rss_mb": t["peak_rss_mb"]},
    }  # fmt: skip
    res["speedup"] = res["edpo"]["pairs_per_s"] / res["torch"]["pairs_per_s"]
    res["rss_ratio"] = res["edpo"]["peak_rss_mb"] / res["torch"]["peak_rss_mb"]
    path = write_results("train", res)
    print(f"bench-train ({args.steps} steps × {args.batch_size} pairs, micro-batch {args.micro_batch}, {args.threads} threads, 25M-param model, V=32000)")
    print("| | pairs/s (training loop) | peak RSS MB |")
    print("|---|---|---|")
    print(f"| edpo train (cached reference, K={args.topk}) | {res['edpo']['pairs_per_s']:.2f} | {res['edpo']['peak_rss_mb']:.0f} |")
    print(f"| PyTorch ε-DPO step (online full-vocab reference) | {res['torch']['pairs_per_s']:.2f} | {res['torch']['peak_rss_mb']:.0f} |")
    print(f"| ratio | {res['speedup']:.2f}× | {res['rss_ratio']:.2f}× |")
    print(f"results: {path}")


if __name__ == "__main__":
    main()
