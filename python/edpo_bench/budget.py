"""`make bench-budget`: prep's token budget (`--batch-tokens`) on the real model — `edpo prep` and
the PyTorch scorer at each budget, same pairs, same command (edpo_bench.real's prep row), so
each tool's best budget and the ratio at every budget are measured rather than assumed.

    python -m edpo_bench.budget [--lengths 256 512] [--budgets 512 1024 2048 4096 8192]
    python -m edpo_bench.budget --layer-gemm 2048 8192   # one layer's products, ONNX Runtime

Results: bench-results/prep-budget.json (`--results NAME`) and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import time

from edpo_bench.common import write_results
from edpo_bench.flops import measure_peak
from edpo_bench.real import bench_prep, cpu_description
from edpo_bench.real_data import build as real_pairs
from edpo_experiments.smollm2 import bundle as smollm2_bundle
from edpo_experiments.smollm2 import ensure


# SmolLM2's linear layers as (in, out): q, k, v, o, gate, up, down.
SMOLLM2_LAYER = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]


def layer_gemm_ms(rows: int, threads: int, repeats: int = 5) -> float:
    """Milliseconds per 2,048 rows for one SmolLM2 layer's seven products in ONNX Runtime (one
    MatMul node per weight, constant weights, best of `repeats` runs)."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    total = 0.0
    for k, n in SMOLLM2_LAYER:
        w = numpy_helper.from_array((rng.standard_normal((k, n)) * 0.02).astype(np.float32), "w")
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, k])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, n])], [w])  # fmt: skip
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        x = rng.standard_normal((rows, k)).astype(np.float32)
        session.run(None, {"x": x})
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            session.run(None, {"x": x})
            times.append(time.perf_counter() - start)
        total += min(times)
    return 1e3 * total * 2048 / rows


def best_of(rows: list[dict], tool: str) -> dict:
    """The row where `tool` prepped the most tokens per second."""
    return max(rows, key=lambda r: r[tool]["tokens_per_s"])


def print_table(res: dict) -> None:
    print("| max length | token budget | edpo tokens/s | PyTorch tokens/s | ratio | edpo peak RSS MB | PyTorch peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        e, t = r["edpo"], r["torch"]
        print(f"| {r['length']} | {r['batch_tokens']:,} | {e['tokens_per_s']:.0f} | {t['tokens_per_s']:.0f} | {r['speedup']:.2f}× | "
              f"{e['peak_rss_mb']:,.0f} | {t['peak_rss_mb']:,.0f} |")  # fmt: skip
    for length in sorted({r["length"] for r in res["rows"]}):
        rows = [r for r in res["rows"] if r["length"] == length]
        e, t = best_of(rows, "edpo"), best_of(rows, "torch")
        ratio = e["edpo"]["tokens_per_s"] / t["torch"]["tokens_per_s"]
        print(f"max length {length}: each at its best budget, edpo {e['batch_tokens']:,} vs PyTorch {t['batch_tokens']:,}: {ratio:.2f}×")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edpo_bench.budget", description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--budgets", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--results", default="prep-budget", help="results file name in bench-results/ (default prep-budget)")
    ap.add_argument("--layer-gemm", type=int, nargs="+", metavar="ROWS",
                    help="only time one layer's products at these row counts (ms per 2,048 rows)")
    args = ap.parse_args(argv)
    if args.layer_gemm:
        for rows in args.layer_gemm:
            print(f"{rows} rows: {layer_gemm_ms(rows, args.threads):.1f} ms per 2,048 rows", flush=True)
        return 0
    bundle = smollm2_bundle()
    res = {"threads": args.threads, "cpu": cpu_description(), "model": "SmolLM2-135M-Instruct", "rows": []}
    res["gemm_peak"] = [measure_peak(args.threads)]
    for length in args.lengths:
        data = real_pairs(args.pairs, length, ensure())
        for budget in args.budgets:
            row = bench_prep(bundle, data, length, args.threads, budget)
            res["rows"].append({**row, "batch_tokens": budget})
            print(f"max length {length}, budget {budget}: {row['speedup']:.2f}×", flush=True)
            write_results(args.results, res)
    res["gemm_peak"].append(measure_peak(args.threads))
    path = write_results(args.results, res)
    print_table(res)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
