"""`make bench-mpi`: time per optimiser step and bytes summed per step of `edpo train` over 1 and
2 MPI ranks, one thread per rank (release build with `--features mpi`), on the bench-size model
(≈25M parameters, edpo_bench.common.BENCH_CONFIG) and the bench pairs, batch 16, micro-batch 4.

Rows: one process without `mpirun`, `mpirun -n 1` and `mpirun -n 2`. Time per step is the median
of the steps after the first (metrics.parquet `elapsed_s` differences); sum bytes per step is
what each rank sends to the step's sums and receives back (TrainSummary.sum_bytes_per_step).
Peak RSS is the largest process of the command (os.wait4).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics

import pyarrow.parquet as pq

from edpo_bench.common import CACHE, bench_bundle, bench_train_shards, edpo_release, measured, write_results

MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none"]


def step_seconds(run) -> list[float]:
    elapsed = pq.read_table(run / "metrics.parquet", columns=["elapsed_s"]).column(0).to_pylist()
    return [b - a for a, b in zip(elapsed, elapsed[1:])]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    bundle = bench_bundle()
    shards = bench_train_shards(bundle)
    rows = {}
    for name, launcher in (("one process", []), ("mpirun -n 1", [*MPIRUN, "-n", "1"]), ("mpirun -n 2", [*MPIRUN, "-n", "2"])):
        run = CACHE / "run-mpi"
        shutil.rmtree(run, ignore_errors=True)
        m = measured([*launcher, str(edpo_release()), "--quiet", "--threads", "1", "train", "--model", str(bundle),
                      "--shards", str(shards), "--out", str(run), "--max-steps", str(args.steps), "--batch-size", "16",
                      "--micro-batch", "4", "--lr", "1e-5", "--beta", "0.1", "--epsilon", "0.01", "--json"])  # fmt: skip
        s = json.loads(m["stdout"])
        steps = step_seconds(run)
        rows[name] = {
            "ranks": s["ranks"],
            "step_s_median": round(statistics.median(steps), 3),
            "step_s": [round(x, 3) for x in steps],
            "sum_bytes_per_step": s["sum_bytes_per_step"],
            "pairs_per_s": round(s["pairs_per_second"], 2),
            "wall_s": round(m["wall_s"], 1),
            "peak_rss_mb": round(m["peak_rss_mb"]),
        }
        print(f"{name:<12} ranks {s['ranks']}  step {rows[name]['step_s_median']:.3f} s  "
              f"sum bytes/step {s['sum_bytes_per_step']:,}  peak RSS {rows[name]['peak_rss_mb']} MB", flush=True)  # fmt: skip
    manifest = json.loads((bundle / "edpo-model.json").read_text())
    result = {"model": "bench ≈25M (edpo_bench.common.BENCH_CONFIG)", "num_parameters": manifest.get("num_parameters"),
              "batch_size": 16, "micro_batch": 4, "threads_per_rank": 1, "steps": args.steps, "runs": rows}  # fmt: skip
    print(f"results: {write_results('mpi', result)}")


if __name__ == "__main__":
    main()
