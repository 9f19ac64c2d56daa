"""`make bench-graph-cache`: `edpo train` on the default SmolLM2 bundle without `--graph-cache`
(ONNX Runtime optimises the joint graph in the session), then with a fresh cache folder (the
session optimises and writes it), then again (the session loads it), release build, 2 threads,
on the same shards: start-up, graph runs, peak RSS, and whether the per-pair records
(`pairs.parquet`) came out the same and how far the trained weights are from the first run's.

    python -m edpo_bench.graph_cache [--lengths 256 512 2048]

Results: bench-results/graph-cache.json (`--results NAME`) and a table on stdout.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil

from edpo_bench.attention_blocks import prep_shards, train_run
from edpo_bench.common import CACHE, write_results
from edpo_experiments.smollm2 import bundle as smollm2_bundle

MODES = ("optimised in the session", "written to the cache", "loaded from the cache")


def train_once(bundle, shards, steps: int, batch: int, run, cache) -> dict:
    flags = ["--graph-cache", str(cache)] if cache else []
    summary, m = train_run(bundle, shards, steps, batch, run, flags)
    return {"cache": summary["graph_cache"]["use"], "startup_s": summary["stages"]["startup"],
            "graph_run_s": summary["stages"]["graph_run"], "pairs_per_s": summary["pairs_per_second"],
            "wall_s": m["wall_s"], "peak_rss_mb": m["peak_rss_mb"]}  # fmt: skip


def compare(a, b) -> dict:
    """Whether two runs wrote the same per-pair records, and the largest difference between
    their trained weights (two runs without the cache differ in the last bits too)."""
    from safetensors.numpy import load_file

    wa, wb = (load_file(str(r / "final" / "model.safetensors")) for r in (a, b))
    diff = max(float(abs(wa[k].astype("float64") - wb[k]).max()) for k in wa)
    return {"same_records": filecmp.cmp(a / "pairs.parquet", b / "pairs.parquet", shallow=False), "weights_max_abs_diff": diff}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edpo_bench.graph_cache", description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 2048])
    ap.add_argument("--pairs", type=int, default=32, help="pairs prepped per length")
    ap.add_argument("--long-from", type=int, default=1024, help="lengths from here train 1 step of 2 pairs, shorter ones 2 of 4")
    ap.add_argument("--results", default="graph-cache")
    args = ap.parse_args(argv)
    bundle = smollm2_bundle()
    res = {"bundle": bundle.name, "rows": []}
    for length in args.lengths:
        shards = prep_shards(bundle, length, args.pairs)
        steps, batch = (1, 2) if length >= args.long_from else (2, 4)
        cache = CACHE / f"graph-cache-{length}"
        shutil.rmtree(cache, ignore_errors=True)
        runs = [CACHE / f"graph-cache-run-{i}" for i in range(len(MODES))]
        for mode, run, folder in zip(MODES, runs, (None, cache, cache)):
            row = {"length": length, "mode": mode, "steps": steps, "batch": batch,
                   **train_once(bundle, shards, steps, batch, run, folder)}  # fmt: skip
            if run != runs[0]:
                row.update(compare(runs[0], run))
            res["rows"].append(row)
            print(f"{length:>5} tokens, {mode}: start-up {row['startup_s']:.1f} s, graph runs {row['graph_run_s']:.1f} s, "
                  f"peak RSS {row['peak_rss_mb']:.0f} MB, {row.get('same_records', '-')} / {row.get('weights_max_abs_diff', '-')}", flush=True)  # fmt: skip
            write_results(args.results, res)
    print("\n| max length | joint graph | start-up | graph runs | peak RSS | pairs.parquet | weights max abs diff |\n|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        same = {True: "same bytes", False: "differs", None: "-"}[r.get("same_records")]
        diff = f"{r['weights_max_abs_diff']:.1e}" if "weights_max_abs_diff" in r else "-"
        print(f"| {r['length']:,} | {r['mode']} | {r['startup_s']:.1f} s | {r['graph_run_s']:.1f} s | {r['peak_rss_mb']:,.0f} MB | {same} | {diff} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
