"""`make bench-shared-prefix`: `edpo train` on two SmolLM2 bundles that differ only in whether
the training graph shares each pair's prefix (`edpo_export --train-shared-prefix on`, the
default, against `off`: two rows per pair), run alternately on the same shards (real chat
pairs), release build, 2 threads, micro-batch 1: pairs/s in the loop, graph-run seconds, peak
RSS, the tokens the transformer body runs per pair either way, and how far the two runs'
per-pair records (pairs.parquet) are apart.

    python -m edpo_bench.shared_prefix [--lengths 256 512] [--reps 2]

Results: bench-results/train-shared-prefix.json (`--results NAME`) and a table on stdout.
"""

from __future__ import annotations

import argparse

import numpy as np
import pyarrow.parquet as pq

from edpo_bench.attention_blocks import prep_shards, train_run
from edpo_bench.common import CACHE, write_results
from edpo_bench.flops import ModelShape, measure_peak, train_flops_per_pair
from edpo_experiments.smollm2 import bundle as smollm2_bundle

RECORD_COLUMNS = ("logps_chosen", "logps_rejected", "g", "g_plus", "g_minus", "z")


def body_tokens(shards) -> dict:
    """Tokens the transformer body runs over the shards' pairs: two rows per pair padded to the
    longer (`rows`), or one packed row of the common prompt and both responses (`packed`)."""
    rows = packed = 0
    for path in sorted(shards.glob("*.parquet")):
        table = pq.read_table(path, columns=["prompt_ids", "chosen_ids", "rejected_ids"]).to_pylist()
        for r in table:
            p, c, j = len(r["prompt_ids"]), len(r["chosen_ids"]), len(r["rejected_ids"])
            rows += 2 * (p + max(c, j))
            packed += p + c + j
    return {"rows": rows, "packed": packed}


def records(run) -> dict:
    """The per-pair records of a run folder, by column."""
    table = pq.read_table(next(run.rglob("pairs*.parquet"))).to_pandas()
    return {c: table[c].to_numpy() for c in ("pair_id", "step", "k", *RECORD_COLUMNS)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edpo_bench.shared_prefix", description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--pairs", type=int, default=32, help="pairs prepped per length")
    ap.add_argument("--reps", type=int, default=2, help="alternations of the bundles per length")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--results", default="train-shared-prefix")
    args = ap.parse_args(argv)
    bundles = {"packed": smollm2_bundle(), "rows": smollm2_bundle(shared_prefix=False)}
    shape = ModelShape.of_bundle(bundles["packed"])
    res = {"gemm_peak": [measure_peak(2)], "rows": [], "records": {}}
    for length in args.lengths:
        shards = prep_shards(bundles["packed"], length, args.pairs)
        gflop = train_flops_per_pair(shape, shards) / 1e9
        res["records"][str(length)] = {"body_tokens": body_tokens(shards)}
        seen = {}
        for rep in range(args.reps):
            for name, bundle in bundles.items():
                run = CACHE / f"shared-prefix-run-{name}"
                summary, m = train_run(bundle, shards, args.steps, args.batch, run)
                row = {"length": length, "graph": name, "rep": rep, "pairs_per_s": summary["pairs_per_second"],
                       "graph_run_s": summary["stages"]["graph_run"], "startup_s": summary["stages"]["startup"],
                       "wall_s": m["wall_s"], "peak_rss_mb": m["peak_rss_mb"]}  # fmt: skip
                row["gflops"] = row["pairs_per_s"] * gflop
                res["rows"].append(row)
                seen[name] = records(run)
                print(f"{length:>5} tokens, {name}, run {rep + 1}: {row['pairs_per_s']:.4f} pairs/s ({row['gflops']:.1f} "
                      f"GFLOP/s counted), graph runs {row['graph_run_s']:.1f} s, peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)  # fmt: skip
                write_results(args.results, res)
        a, b = seen["rows"], seen["packed"]
        same = {c: bool(np.array_equal(a[c], b[c])) for c in ("pair_id", "step", "k")}
        gaps = {c: float(np.abs(a[c] - b[c]).max()) for c in RECORD_COLUMNS}
        res["records"][str(length)].update({"identical": same, "max_abs_diff": gaps})
        print(f"{length:>5} tokens: records {same}, max |Δ| {gaps}", flush=True)
    res["gemm_peak"].append(measure_peak(2))
    peak = max(p["gflops"] for p in res["gemm_peak"])
    print(f"\nGEMM peak {peak:.1f} GFLOP/s (best of {len(res['gemm_peak'])})\n")
    print("| max length | graph | body tokens | pairs/s (runs) | share of peak (counted) | graph runs | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for length in args.lengths:
        tokens = res["records"][str(length)]["body_tokens"]
        for name in bundles:
            rows = [r for r in res["rows"] if r["length"] == length and r["graph"] == name]
            speeds = ", ".join(f"{r['pairs_per_s']:.4f}" for r in rows)
            shares = ", ".join(f"{100 * r['gflops'] / peak:.1f}%" for r in rows)
            runs = ", ".join(f"{r['graph_run_s']:.1f} s" for r in rows)
            rss = max(r["peak_rss_mb"] for r in rows)
            print(f"| {length:,} | {name} | {tokens[name]:,} | {speeds} | {shares} | {runs} | {rss:,.0f} MB |")
    write_results(args.results, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
