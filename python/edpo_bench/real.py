"""`make bench-real`: edpo against the PyTorch baselines on a real model, SmolLM2-135M-Instruct
(30 layers, width 576, vocabulary 49,152), with real chat pairs (ShareGPT conversations long
enough for each maximum length; edpo_bench.real_data), release build, same thread count, each
pair of measurements in one command:

* export: wall time and peak RSS of `python -m edpo_export` (once);
* prep: tokens/s end to end and peak RSS of `edpo prep` vs the PyTorch scorer
  (edpo_bench.prep_torch: HF forward + log-softmax + gather + top-K, same tokenisation rule and
  batching) at maximum lengths 256, 512, 1,024 and 2,048;
* train: pairs/s in the loop and peak RSS of `edpo train` (cached reference, default K) vs the
  paper's step in PyTorch (edpo_bench.torch_train: policy forward+backward and the online
  full-vocabulary reference), same pairs, batch and micro-batch, at the same lengths;
* the CPU's fp32 matrix-multiply peak (a timed GEMM, before and after the runs) and each
  stage's share of it, FLOPs counted from the model's shapes (edpo_bench.flops), with edpo's
  per-stage time breakdown (its summaries' `stages`).

Results: bench-results/real-bench.json and markdown tables on stdout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from edpo_bench.common import CACHE, PY, TOPK_DEFAULT, child_env, edpo_release, measured, write_results
from edpo_bench.flops import ModelShape, measure_peak, prep_flops, train_flops_per_pair
from edpo_bench.real_data import build as real_pairs
from edpo_experiments.smollm2 import bundle as smollm2_bundle
from edpo_experiments.smollm2 import ensure


def bench_export(threads: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix="edpo-export-"))
    try:
        r = measured([PY, "-m", "edpo_export", "--model", str(ensure()), "--out", str(out / "b"), "--threads", str(threads)], env=child_env())
        return {"wall_s": r["wall_s"], "peak_rss_mb": r["peak_rss_mb"]}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def bench_prep(bundle: Path, data: Path, length: int, threads: int, batch_tokens: int, peak_gflops: float) -> dict:
    out = CACHE / f"real-shards-{length}"
    shutil.rmtree(out, ignore_errors=True)
    limits = ["--max-length", str(length), "--max-prompt-length", str(length * 3 // 4)]
    e = measured([str(edpo_release()), "--quiet", "--threads", str(threads), "prep", "--model", str(bundle), "--data", str(data),
                  "--out", str(out), "--batch-tokens", str(batch_tokens), "--json", *limits])  # fmt: skip
    es = json.loads(e["stdout"])
    t = measured([PY, "-m", "edpo_bench.prep_torch", "--bundle", str(bundle), "--data", str(data), "--threads", str(threads),
                  "--batch-tokens", str(batch_tokens), "--topk", str(TOPK_DEFAULT), *limits], env=child_env())  # fmt: skip
    ts = json.loads(t["stdout"])
    res = {
        "length": length, "pairs": es["pairs_written"], "tokens": es["sequence_tokens"],
        "edpo": {"wall_s": e["wall_s"], "peak_rss_mb": e["peak_rss_mb"], "tokens_per_s": es["sequence_tokens"] / e["wall_s"],
                 "scoring_tokens_per_s": es["tokens_per_second"], "padding_fraction": es["padding_fraction"]},
        "torch": {"wall_s": t["wall_s"], "peak_rss_mb": t["peak_rss_mb"], "tokens_per_s": ts["tokens"] / t["wall_s"],
                  "scoring_tokens_per_s": ts["tokens"] / ts["score_s"]},
    }  # fmt: skip
    res["speedup"] = res["edpo"]["tokens_per_s"] / res["torch"]["tokens_per_s"]
    res["rss_ratio"] = res["edpo"]["peak_rss_mb"] / res["torch"]["peak_rss_mb"]
    flops = prep_flops(ModelShape.of_bundle(bundle), out)
    stages = es["stages"]
    res["gflop"] = flops / 1e9
    res["edpo"]["stages_s"] = stages
    for side, secs, inside in (("edpo", e["wall_s"], stages["graph_run"]), ("torch", t["wall_s"], ts["score_s"])):
        res[side]["peak_share"] = flops / secs / 1e9 / peak_gflops
        res[side]["peak_share_scoring"] = flops / inside / 1e9 / peak_gflops
    return res


def bench_train(bundle: Path, length: int, threads: int, steps: int, batch: int, micro: int, peak_gflops: float) -> dict:
    shards = CACHE / f"real-shards-{length}"
    run = CACHE / "real-run-bench"
    shutil.rmtree(run, ignore_errors=True)
    hp = ["--lr", "1e-6", "--beta", "0.1", "--epsilon", "0.01"]
    e = measured([str(edpo_release()), "--quiet", "--threads", str(threads), "train", "--model", str(bundle), "--shards", str(shards),
                  "--out", str(run), "--max-steps", str(steps), "--batch-size", str(batch), "--micro-batch", str(micro), "--json", *hp],
                 allow_failure=True)  # fmt: skip
    t = measured([PY, "-m", "edpo_bench.torch_train", "--bundle", str(bundle), "--shards", str(shards), "--steps", str(steps),
                  "--batch-size", str(batch), "--micro-batch", str(micro), "--threads", str(threads), *hp], env=child_env(),
                 allow_failure=True)  # fmt: skip
    res = {"length": length, "steps": steps, "batch_size": batch, "micro_batch": micro}
    for side, m in (("edpo", e), ("torch", t)):
        res[side] = {"wall_s": m["wall_s"], "peak_rss_mb": m["peak_rss_mb"], "exit_code": m["exit_code"]}
    if e["exit_code"] != 0 or t["exit_code"] != 0:
        print(f"train at length {length}: edpo exit {e['exit_code']}, PyTorch exit {t['exit_code']} (-9: out of memory)", flush=True)
        return res
    es, ts = json.loads(e["stdout"]), json.loads(t["stdout"])
    res["edpo"]["pairs_per_s"], res["torch"]["pairs_per_s"] = es["pairs_per_second"], ts["pairs_per_s"]
    res["speedup"] = res["edpo"]["pairs_per_s"] / res["torch"]["pairs_per_s"]
    res["rss_ratio"] = res["edpo"]["peak_rss_mb"] / res["torch"]["peak_rss_mb"]
    # Per pair: edpo's step is the policy's forward and backward (3 forwards); the PyTorch step
    # also runs the reference forward (4).
    per_pair = train_flops_per_pair(ModelShape.of_bundle(bundle), shards)
    res["gflop_per_pair"] = per_pair / 1e9
    res["edpo"]["stages_s"] = es["stages"]
    res["edpo"]["peak_share"] = res["edpo"]["pairs_per_s"] * per_pair / 1e9 / peak_gflops
    res["edpo"]["peak_share_graph"] = steps * batch * per_pair / es["stages"]["graph_run"] / 1e9 / peak_gflops
    res["torch"]["peak_share"] = res["torch"]["pairs_per_s"] * per_pair * 4 / 3 / 1e9 / peak_gflops
    return res


def print_stages(rows: list[dict]) -> None:
    """A markdown table of edpo's stage times, one row per maximum length."""
    rows = [r for r in rows if "stages_s" in r["edpo"]]
    names = sorted({name for r in rows for name in r["edpo"]["stages_s"]})
    print("| max length | " + " | ".join(names) + " | wall |")
    print("|---|" + "---|" * (len(names) + 1))
    for r in rows:
        cells = " | ".join(f"{r['edpo']['stages_s'].get(n, 0.0):.1f}" for n in names)
        print(f"| {r['length']} | {cells} | {r['edpo']['wall_s']:.1f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edpo_bench.real", description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--train-steps", type=int, default=2)
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--skip-export", action="store_true")
    args = ap.parse_args(argv)
    bundle = smollm2_bundle()
    res = {"threads": args.threads, "topk": TOPK_DEFAULT, "model": "SmolLM2-135M-Instruct (Q4_1 de-quantised)", "prep": [], "train": []}
    res["gemm_peak"] = [measure_peak(args.threads)]
    peak = res["gemm_peak"][0]["gflops"]
    print(f"fp32 GEMM peak at {args.threads} threads: {peak:.1f} GFLOP/s", flush=True)
    if not args.skip_export:
        res["export"] = bench_export(args.threads)
    for length in args.lengths:
        data = real_pairs(args.pairs, length, ensure())
        res["prep"].append(bench_prep(bundle, data, length, args.threads, max(args.batch_tokens, 2 * length), peak))
        res["train"].append(bench_train(bundle, length, args.threads, args.train_steps, args.train_batch, args.micro_batch, peak))
        write_results("real-bench", res)
    res["gemm_peak"].append(measure_peak(args.threads))
    path = write_results("real-bench", res)
    print(f"fp32 GEMM peak at {args.threads} threads: {peak:.1f} GFLOP/s before the runs, "
          f"{res['gemm_peak'][1]['gflops']:.1f} after (shares below use the first)")  # fmt: skip
    if "export" in res:
        print(f"export: {res['export']['wall_s']:.0f} s, peak RSS {res['export']['peak_rss_mb']:.0f} MB")
    print(f"\nprep ({args.pairs} real chat pairs per length, {args.threads} threads, K={TOPK_DEFAULT})")
    print("| max length | tokens | edpo tokens/s | PyTorch tokens/s | ratio | edpo peak RSS MB | PyTorch peak RSS MB | ratio | edpo / PyTorch share of peak |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in res["prep"]:
        print(f"| {r['length']} | {r['tokens']} | {r['edpo']['tokens_per_s']:.0f} | {r['torch']['tokens_per_s']:.0f} | {r['speedup']:.2f}× | "
              f"{r['edpo']['peak_rss_mb']:.0f} | {r['torch']['peak_rss_mb']:.0f} | {r['rss_ratio']:.2f}× | "
              f"{100 * r['edpo']['peak_share']:.0f}% / {100 * r['torch']['peak_share']:.0f}% |")  # fmt: skip
    print("\nedpo prep, where the time goes (s)")
    print_stages(res["prep"])
    print(f"\ntrain ({args.train_steps} steps × {args.train_batch} pairs, micro-batch {args.micro_batch})")
    print("| max length | edpo pairs/s | PyTorch pairs/s | ratio | edpo peak RSS MB | PyTorch peak RSS MB | ratio | edpo / PyTorch share of peak |")
    print("|---|---|---|---|---|---|---|---|")
    for r in res["train"]:
        if "speedup" not in r:
            print(f"| {r['length']} | exit {r['edpo']['exit_code']} | exit {r['torch']['exit_code']} | | "
                  f"{r['edpo']['peak_rss_mb']:.0f} | {r['torch']['peak_rss_mb']:.0f} | | |")  # fmt: skip
            continue
        print(f"| {r['length']} | {r['edpo']['pairs_per_s']:.3f} | {r['torch']['pairs_per_s']:.3f} | {r['speedup']:.2f}× | "
              f"{r['edpo']['peak_rss_mb']:.0f} | {r['torch']['peak_rss_mb']:.0f} | {r['rss_ratio']:.2f}× | "
              f"{100 * r['edpo']['peak_share']:.0f}% / {100 * r['torch']['peak_share']:.0f}% |")  # fmt: skip
    print("\nedpo train, where the time goes (s)")
    print_stages(res["train"])
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
