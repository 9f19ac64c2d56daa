"""`make profile-real`: where the time of prep and train goes on the real model, by ONNX Runtime
operator type — ONNX Runtime's profiler (edpo's EDPO_ORT_PROFILE=PREFIX turns it on) over a few
batches of SmolLM2-135M-Instruct on real chat pairs (release build).

    python -m edpo_bench.profile [--max-length 1024] [--pairs 16] [--steps 2]
    python -m edpo_bench.profile --summarize TRACE.json ...

For each stage: wall time of the command, time inside the graph runs (the profiler's
`model_run` events), and per operator type its share of the node time (`Node` events, kernel
time summed over the nodes of that type). Writes bench-results/profile-real.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

from edpo_bench.common import edpo_release, measured, write_results


# Control-flow operators: their time is their body's nodes, which the trace lists too.
CONTAINERS = {"Loop", "If", "Scan"}


def summarize(traces: list[Path]) -> dict:
    """Node time per operator type and graph-run time from ONNX Runtime trace files (the nodes
    inside a Loop's body counted as themselves, not also as the Loop)."""
    by_op: dict[str, float] = defaultdict(float)
    runs_us = 0.0
    for trace in traces:
        for ev in json.loads(trace.read_text()):
            if ev.get("cat") == "Session" and ev.get("name") == "model_run":
                runs_us += ev.get("dur", 0)
            elif ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
                op = ev.get("args", {}).get("op_name", "?")
                if op not in CONTAINERS:
                    by_op[op] += ev.get("dur", 0)
    node_us = sum(by_op.values())
    ops = sorted(by_op.items(), key=lambda kv: -kv[1])
    return {
        "graph_runs_s": round(runs_us / 1e6, 2),
        "node_s": round(node_us / 1e6, 2),
        "ops": [{"op": op, "s": round(us / 1e6, 2), "share": round(us / max(node_us, 1), 4)} for op, us in ops],
    }


def profiled(cmd: list[str], prefix: Path) -> dict:
    m = measured(cmd, env={"EDPO_ORT_PROFILE": str(prefix)})
    traces = sorted(prefix.parent.glob(prefix.name + "*.json"))
    return {"wall_s": round(m["wall_s"], 1), "peak_rss_mb": round(m["peak_rss_mb"]), **summarize(traces)}


def print_stage(name: str, r: dict, top: int = 12) -> None:
    print(f"\n{name}: wall {r['wall_s']} s, graph runs {r['graph_runs_s']} s, node time {r['node_s']} s")
    print(f"  {'operator':<28} {'s':>8} {'share':>7}")
    for op in r["ops"][:top]:
        print(f"  {op['op']:<28} {op['s']:>8.2f} {100 * op['share']:>6.1f}%")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--summarize", nargs="+", type=Path, metavar="TRACE")
    args = ap.parse_args()
    if args.summarize:
        print_stage("traces", {"wall_s": "-", **summarize(args.summarize)}, top=40)
        return
    from edpo_bench.real_data import build as real_pairs
    from edpo_experiments.smollm2 import bundle as smollm2_bundle
    from edpo_experiments.smollm2 import ensure

    bundle = smollm2_bundle()
    data = real_pairs(64, args.max_length, ensure())
    work = Path(tempfile.mkdtemp(prefix="edpo-profile-"))
    try:
        edpo = [str(edpo_release()), "--quiet", "--threads", str(args.threads)]
        shards = work / "shards"
        prep = profiled([*edpo, "prep", "--model", str(bundle), "--data", str(data), "--out", str(shards),
                         "--limit", str(args.pairs), "--max-length", str(args.max_length),
                         "--max-prompt-length", str(args.max_length * 3 // 4)], work / "prep")  # fmt: skip
        train = profiled([*edpo, "train", "--model", str(bundle), "--shards", str(shards), "--out", str(work / "run"),
                          "--max-steps", str(args.steps), "--batch-size", "4", "--micro-batch", "1", "--lr", "1e-6",
                          "--beta", "0.1", "--epsilon", "0.01"], work / "train")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_stage(f"prep ({args.pairs} pairs, max length {args.max_length})", prep)
    print_stage(f"train ({args.steps} steps of 4 pairs, micro-batch 1)", train)
    result = {"model": "SmolLM2-135M-Instruct", "threads": args.threads, "max_length": args.max_length,
              "pairs": args.pairs, "train_steps": args.steps, "prep": prep, "train": train}  # fmt: skip
    print(f"\nresults: {write_results('profile-real', result)}")


if __name__ == "__main__":
    main()
