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
  full-vocabulary reference), same pairs, batch and micro-batch, at the same lengths; edpo
  also with a `--recompute layers` bundle (gradient checkpointing);
* the CPU's fp32 matrix-multiply peak (a timed GEMM, before and after the runs) and each
  stage's share of it, FLOPs counted from the model's shapes (edpo_bench.flops), with edpo's
  per-stage time breakdown (its summaries' `stages`).

Results: bench-results/real-bench.json (`--results NAME`: bench-results/NAME.json) and markdown
tables on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

from edpo_bench.common import CACHE, PY, ROOT, TOPK_DEFAULT, child_env, edpo_release, measured, write_results
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


def bench_prep(bundle: Path, data: Path, length: int, threads: int, batch_tokens: int) -> dict:
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
    res["gflop"] = prep_flops(ModelShape.of_bundle(bundle), out) / 1e9
    res["edpo"]["stages_s"] = es["stages"]
    res["torch"]["score_s"] = ts["score_s"]
    return res


def run_edpo_train(bundle: Path, shards: Path, threads: int, steps: int, batch: int, micro: int, hp: list[str]) -> dict:
    run = CACHE / "real-run-bench"
    shutil.rmtree(run, ignore_errors=True)
    return measured([str(edpo_release()), "--quiet", "--threads", str(threads), "train", "--model", str(bundle), "--shards", str(shards),
                     "--out", str(run), "--max-steps", str(steps), "--batch-size", str(batch), "--micro-batch", str(micro), "--json", *hp],
                    allow_failure=True)  # fmt: skip


def bench_train(bundle: Path, length: int, threads: int, steps: int, batch: int, micro: int, checkpointed: Path | None = None) -> dict:
    """edpo (the default bundle; also the `--recompute layers` bundle `checkpointed`, as
    `edpo_layers`) and the PyTorch step on the same pairs, batch and micro-batch."""
    shards = CACHE / f"real-shards-{length}"
    hp = ["--lr", "1e-6", "--beta", "0.1", "--epsilon", "0.01"]
    e = run_edpo_train(bundle, shards, threads, steps, batch, micro, hp)
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
    res["gflop_per_pair"] = train_flops_per_pair(ModelShape.of_bundle(bundle), shards) / 1e9
    res["edpo"]["stages_s"] = es["stages"]
    if checkpointed is not None:
        c = run_edpo_train(checkpointed, shards, threads, steps, batch, micro, hp)
        res["edpo_layers"] = {"wall_s": c["wall_s"], "peak_rss_mb": c["peak_rss_mb"], "exit_code": c["exit_code"]}
        if c["exit_code"] == 0:
            cs = json.loads(c["stdout"])
            res["edpo_layers"].update(pairs_per_s=cs["pairs_per_second"], stages_s=cs["stages"])
            res["edpo_layers"]["speedup"] = cs["pairs_per_second"] / res["torch"]["pairs_per_s"]
            res["edpo_layers"]["rss_ratio"] = c["peak_rss_mb"] / res["torch"]["peak_rss_mb"]
    return res


def add_peak_shares(res: dict) -> float:
    """Each stage's FLOP rate as a share of the best GEMM peak measured in `res`; returns it."""
    peak = max(p["gflops"] for p in res["gemm_peak"])
    for r in res["prep"]:
        for side, secs, inside in (("edpo", r["edpo"]["wall_s"], r["edpo"]["stages_s"]["graph_run"]),
                                   ("torch", r["torch"]["wall_s"], r["torch"].get("score_s", r["tokens"] / r["torch"]["scoring_tokens_per_s"]))):  # fmt: skip
            r[side]["peak_share"] = r["gflop"] / secs / peak
            r[side]["peak_share_scoring"] = r["gflop"] / inside / peak
    for r in res["train"]:
        if "speedup" not in r:
            continue
        pairs = r["steps"] * r["batch_size"]
        r["edpo"]["peak_share"] = r["edpo"]["pairs_per_s"] * r["gflop_per_pair"] / peak
        r["edpo"]["peak_share_graph"] = pairs * r["gflop_per_pair"] / r["edpo"]["stages_s"]["graph_run"] / peak
        r["torch"]["peak_share"] = r["torch"]["pairs_per_s"] * r["gflop_per_pair"] * 4 / 3 / peak
    return peak


def print_stages(rows: list[dict]) -> None:
    """A markdown table of edpo's stage times, one row per maximum length."""
    rows = [r for r in rows if "stages_s" in r["edpo"]]
    names = sorted({name for r in rows for name in r["edpo"]["stages_s"]})
    print("| max length | " + " | ".join(names) + " | wall |")
    print("|---|" + "---|" * (len(names) + 1))
    for r in rows:
        cells = " | ".join(f"{r['edpo']['stages_s'].get(n, 0.0):.1f}" for n in names)
        print(f"| {r['length']} | {cells} | {r['edpo']['wall_s']:.1f} |")


def cpu_description() -> str:
    """The CPU model and its widest fp32 vector instructions (the GEMM peak depends on both)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""

    def field(name: str) -> str:
        return next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.split(":")[0].strip() == name), "?")

    flags = set(field("flags").split())
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{field('model name')}, {simd}, {os.cpu_count()} cores"


def print_tables(res: dict, path: Path) -> None:
    peak = add_peak_shares(res)
    write_results(path.stem, res)
    print(f"fp32 GEMM peak at {res['threads']} threads, measured before and after the runs: "
          + ", ".join(f"{p['gflops']:.1f}" for p in res["gemm_peak"]) + f" GFLOP/s; shares below use the best, {peak:.1f}")  # fmt: skip
    if "export" in res:
        print(f"export: {res['export']['wall_s']:.0f} s, peak RSS {res['export']['peak_rss_mb']:.0f} MB")
    print(f"\nprep (real chat pairs, {res['threads']} threads, K={res['topk']})")
    print("| max length | pairs | tokens | edpo tokens/s | PyTorch tokens/s | ratio | edpo peak RSS MB | PyTorch peak RSS MB | ratio | share of peak, edpo / PyTorch |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in res["prep"]:
        print(f"| {r['length']} | {r['pairs']} | {r['tokens']:,} | {r['edpo']['tokens_per_s']:.0f} | {r['torch']['tokens_per_s']:.0f} | {r['speedup']:.2f}× | "
              f"{r['edpo']['peak_rss_mb']:,.0f} | {r['torch']['peak_rss_mb']:,.0f} | {r['rss_ratio']:.2f}× | "
              f"{100 * r['edpo']['peak_share']:.0f}% / {100 * r['torch']['peak_share']:.0f}% |")  # fmt: skip
    print("\nedpo prep, where the time goes (s)")
    print_stages(res["prep"])
    if res["train"]:
        t = res["train"][0]
        print(f"\ntrain ({t['steps']} steps × {t['batch_size']} pairs, micro-batch {t['micro_batch']})")
    print("| max length | edpo pairs/s | PyTorch pairs/s | ratio | edpo peak RSS MB | PyTorch peak RSS MB | ratio | share of peak, edpo / PyTorch |")
    print("|---|---|---|---|---|---|---|---|")
    for r in res["train"]:
        if "speedup" not in r:
            print(f"| {r['length']} | exit {r['edpo']['exit_code']} | exit {r['torch']['exit_code']} | | "
                  f"{r['edpo']['peak_rss_mb']:,.0f} | {r['torch']['peak_rss_mb']:,.0f} | | |")  # fmt: skip
            continue
        print(f"| {r['length']} | {r['edpo']['pairs_per_s']:.3f} | {r['torch']['pairs_per_s']:.3f} | {r['speedup']:.2f}× | "
              f"{r['edpo']['peak_rss_mb']:,.0f} | {r['torch']['peak_rss_mb']:,.0f} | {r['rss_ratio']:.2f}× | "
              f"{100 * r['edpo']['peak_share']:.0f}% / {100 * r['torch']['peak_share']:.0f}% |")  # fmt: skip
    layers = [r for r in res["train"] if "speedup" in r.get("edpo_layers", {})]
    if layers:
        print("\ntrain with the --recompute layers bundle (gradient checkpointing), same PyTorch runs")
        print("| max length | edpo pairs/s | ratio | edpo peak RSS MB | ratio |")
        print("|---|---|---|---|---|")
        for r in layers:
            c = r["edpo_layers"]
            print(f"| {r['length']} | {c['pairs_per_s']:.3f} | {c['speedup']:.2f}× | {c['peak_rss_mb']:,.0f} | {c['rss_ratio']:.2f}× |")
    print("\nedpo train, where the time goes (s)")
    print_stages(res["train"])
    print(f"results: {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edpo_bench.real", description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--batch-tokens", type=int, default=1024, help="token budget of a prep batch, both tools (default 1024, edpo's on CPU)")
    ap.add_argument("--train-steps", type=int, default=2)
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--skip-export", action="store_true")
    ap.add_argument("--skip-prep", action="store_true", help="train only (prep results of earlier runs are kept with --keep)")
    ap.add_argument("--no-checkpointed", action="store_true", help="skip the training runs of the --recompute layers bundle")
    ap.add_argument("--skip-train", action="store_true", help="prep only (train results of earlier runs are kept with --keep)")
    ap.add_argument("--keep", action="store_true",
                    help="keep what the results file already holds for the export and for lengths not run now")
    ap.add_argument("--results", default="real-bench", help="results file name in bench-results/ (default real-bench)")
    ap.add_argument("--reprint", action="store_true",
                    help="measure the GEMM peak again, recompute the shares in the results file, print its tables")
    args = ap.parse_args(argv)
    path = ROOT / "bench-results" / f"{args.results}.json"
    if args.reprint:
        res = json.loads(path.read_text())
        res["gemm_peak"].append(measure_peak(args.threads))
        print_tables(res, path)
        return 0
    bundle = smollm2_bundle()
    res = {"threads": args.threads, "cpu": cpu_description(), "topk": TOPK_DEFAULT, "model": "SmolLM2-135M-Instruct (Q4_1 de-quantised)", "prep": [], "train": []}
    if args.keep and path.is_file():
        kept = json.loads(path.read_text())
        res["gemm_peak"] = kept.get("gemm_peak", [])
        if "export" in kept:
            res["export"] = kept["export"]
        res["prep"] = [r for r in kept.get("prep", []) if args.skip_prep or r["length"] not in args.lengths]
        res["train"] = [r for r in kept.get("train", []) if args.skip_train or r["length"] not in args.lengths]
    res.setdefault("gemm_peak", []).append(measure_peak(args.threads))
    print(f"fp32 GEMM peak at {args.threads} threads: {res['gemm_peak'][-1]['gflops']:.1f} GFLOP/s", flush=True)
    if not args.skip_export and "export" not in res:
        res["export"] = bench_export(args.threads)
    checkpointed = None if args.skip_train or args.no_checkpointed else smollm2_bundle("layers")
    for length in args.lengths:
        data = real_pairs(args.pairs, length, ensure())
        if not args.skip_prep:
            res["prep"].append(bench_prep(bundle, data, length, args.threads, args.batch_tokens))
        if not args.skip_train:
            res["train"].append(bench_train(bundle, length, args.threads, args.train_steps, args.train_batch, args.micro_batch, checkpointed))
        res["prep"].sort(key=lambda r: r["length"])
        res["train"].sort(key=lambda r: r["length"])
        write_results(path.stem, res)
    res["gemm_peak"].append(measure_peak(args.threads))
    print_tables(res, path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
