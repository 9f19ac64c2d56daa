"""`make bench-attention-blocks`: `edpo train` on SmolLM2 bundles that differ only in the
training graph's attention blocks (`edpo_export --train-attention-blocks`), run alternately on
the same shards (real chat pairs, the reference graph and so the shards shared by every
bundle), release build, 2 threads: pairs/s in the loop, start-up, peak RSS, and the GFLOP/s
counted as `make bench-real` counts them (edpo_bench.flops: the full T × T square) against the
GEMM peak measured before and after.

    python -m edpo_bench.attention_blocks [--blocks 1 2 4] [--lengths 2048 512 256] [--reps 2]

Results: bench-results/train-attention-blocks.json (`--results NAME`) and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import shutil

from edpo_bench.common import CACHE, edpo_release, measured, write_results
from edpo_bench.flops import ModelShape, measure_peak, train_flops_per_pair
from edpo_bench.real_data import build as real_pairs
from edpo_experiments.smollm2 import bundle as smollm2_bundle
from edpo_experiments.smollm2 import ensure


def prep_shards(bundle, length: int, pairs: int):
    """Shards of `pairs` real pairs at `length` (made once; every bundle's reference is the same)."""
    shards = CACHE / f"blocks-shards-{length}"
    if not (shards / "manifest.json").is_file():
        shutil.rmtree(shards, ignore_errors=True)
        data = real_pairs(pairs, length, ensure())
        measured([str(edpo_release()), "--quiet", "--threads", "2", "prep", "--model", str(bundle), "--data", str(data),
                  "--out", str(shards), "--json", "--max-length", str(length), "--max-prompt-length", str(length * 3 // 4)])  # fmt: skip
    return shards


def train_run(bundle, shards, steps: int, batch: int, run, flags=()) -> tuple[dict, dict]:
    """`edpo train` (release, 2 threads, micro-batch 1) into a fresh `run` folder, with the
    global `flags`: its summary and what `measured` measured (also edpo_bench.graph_cache)."""
    shutil.rmtree(run, ignore_errors=True)
    m = measured([str(edpo_release()), "--quiet", "--threads", "2", *flags, "train", "--model", str(bundle), "--shards", str(shards),
                  "--out", str(run), "--max-steps", str(steps), "--batch-size", str(batch), "--micro-batch", "1", "--json",
                  "--lr", "1e-6", "--beta", "0.1", "--epsilon", "0.01"])  # fmt: skip
    return json.loads(m["stdout"]), m


def train_once(bundle, shards, steps: int, batch: int) -> dict:
    summary, m = train_run(bundle, shards, steps, batch, CACHE / "blocks-run")
    return {"pairs_per_s": summary["pairs_per_second"], "wall_s": m["wall_s"], "peak_rss_mb": m["peak_rss_mb"],
            "startup_s": summary["stages"]["startup"], "graph_run_s": summary["stages"]["graph_run"]}  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edpo_bench.attention_blocks", description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 512, 256])
    ap.add_argument("--pairs", type=int, default=32, help="pairs prepped per length")
    ap.add_argument("--reps", type=int, default=2, help="alternations of the bundles per length")
    ap.add_argument("--long-from", type=int, default=1024, help="lengths from here train 1 step of 2 pairs, shorter ones 2 of 4")
    ap.add_argument("--results", default="train-attention-blocks")
    args = ap.parse_args(argv)
    bundles = {b: smollm2_bundle(attention_blocks=b) for b in args.blocks}
    shape = ModelShape.of_bundle(bundles[args.blocks[0]])
    res = {"gemm_peak": [measure_peak(2)], "rows": []}
    for length in args.lengths:
        shards = prep_shards(bundles[args.blocks[0]], length, args.pairs)
        steps, batch = (1, 2) if length >= args.long_from else (2, 4)
        gflop = train_flops_per_pair(shape, shards) / 1e9
        for rep in range(args.reps):
            for b in args.blocks:
                row = {"length": length, "blocks": b, "rep": rep, "steps": steps, "batch": batch,
                       **train_once(bundles[b], shards, steps, batch)}  # fmt: skip
                row["gflops"] = row["pairs_per_s"] * gflop
                res["rows"].append(row)
                print(f"{length:>5} tokens, {b} blocks, run {rep + 1}: {row['pairs_per_s']:.4f} pairs/s "
                      f"({row['gflops']:.1f} GFLOP/s), start-up {row['startup_s']:.1f} s, peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)  # fmt: skip
                write_results(args.results, res)
    res["gemm_peak"].append(measure_peak(2))
    peak = max(p["gflops"] for p in res["gemm_peak"])
    print(f"\nGEMM peak {peak:.1f} GFLOP/s (best of {len(res['gemm_peak'])})\n")
    print("| max length | blocks | pairs/s (runs) | share of peak | start-up | peak RSS |\n|---|---|---|---|---|---|")
    for length in args.lengths:
        for b in args.blocks:
            rows = [r for r in res["rows"] if r["length"] == length and r["blocks"] == b]
            speeds = ", ".join(f"{r['pairs_per_s']:.4f}" for r in rows)
            shares = ", ".join(f"{100 * r['gflops'] / peak:.1f}%" for r in rows)
            startups = ", ".join(f"{r['startup_s']:.1f} s" for r in rows)
            rss = max(r["peak_rss_mb"] for r in rows)
            print(f"| {length:,} | {b} | {speeds} | {shares} | {startups} | {rss:,.0f} MB |")
    write_results(args.results, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
