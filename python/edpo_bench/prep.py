"""`make bench-prep`: tokens/s and peak RSS of `edpo prep` against a PyTorch baseline, run in
the same command on the same machine, same thread count, same pairs, same token budget.

Model: ≈25M parameters, vocabulary 32,000 (edpo_bench.common.BENCH_CONFIG), random init.
Data: 2,000 plain pairs (~60-token prompts, ~150-token responses); RSS flatness: 1k vs 20k
short pairs (~40 tokens per sequence).
"""

import argparse
import json

from edpo_bench.common import CACHE, PY, TOPK_DEFAULT, bench_bundle, bench_pairs, child_env, edpo_release, measured, write_results


def edpo_prep(bundle, data, out, threads, batch_tokens, topk):
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    r = measured([str(edpo_release()), "--quiet", "--threads", str(threads), "prep", "--model", str(bundle),
                  "--data", str(data), "--out", str(out), "--topk", str(topk), "--batch-tokens", str(batch_tokens), "--json"])  # fmt: skip
    s = json.loads(r["stdout"])
    return {"tokens": s["sequence_tokens"], "wall_s": r["wall_s"], "peak_rss_mb": r["peak_rss_mb"],
            "tokens_per_s": s["sequence_tokens"] / r["wall_s"], "scoring_tokens_per_s": s["tokens_per_second"],
            "padding_fraction": s["padding_fraction"], "pairs": s["pairs_written"]}  # fmt: skip


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--rss-pairs", type=int, nargs=2, default=[1000, 20000])
    ap.add_argument("--topk", type=int, default=TOPK_DEFAULT, help=f"K cached per token (default {TOPK_DEFAULT}, the exporter's)")
    args = ap.parse_args()
    bundle = bench_bundle()
    data = bench_pairs(args.pairs)
    res = {"threads": args.threads, "batch_tokens": args.batch_tokens, "pairs": args.pairs, "topk": args.topk}
    res["edpo"] = edpo_prep(bundle, data, CACHE / "shards-bench", args.threads, args.batch_tokens, args.topk)
    r = measured([PY, "-m", "edpo_bench.prep_torch", "--bundle", str(bundle), "--data", str(data),
                  "--threads", str(args.threads), "--batch-tokens", str(args.batch_tokens), "--topk", str(args.topk)],
                 env=child_env())  # fmt: skip
    t = json.loads(r["stdout"])
    res["torch"] = {"tokens": t["tokens"], "wall_s": r["wall_s"], "peak_rss_mb": r["peak_rss_mb"],
                    "tokens_per_s": t["tokens"] / r["wall_s"], "scoring_tokens_per_s": t["tokens"] / t["score_s"]}  # fmt: skip
    res["speedup_end_to_end"] = res["edpo"]["tokens_per_s"] / res["torch"]["tokens_per_s"]
    res["speedup_scoring"] = res["edpo"]["scoring_tokens_per_s"] / res["torch"]["scoring_tokens_per_s"]
    res["rss_ratio"] = res["edpo"]["peak_rss_mb"] / res["torch"]["peak_rss_mb"]
    rss = {}
    for n in args.rss_pairs:
        # Short pairs (~40 tokens per sequence): memory flatness is about the number of pairs.
        data_n = bench_pairs(n, seed=7, prompt_sentences=2, response_sentences=3)
        rss[n] = edpo_prep(bundle, data_n, CACHE / f"shards-rss-{n}", args.threads, args.batch_tokens, args.topk)
    res["rss_flatness"] = {str(n): {"pairs": r["pairs"], "peak_rss_mb": r["peak_rss_mb"], "wall_s": r["wall_s"]} for n, r in rss.items()}
    path = write_results("prep", res)
    e, p = res["edpo"], res["torch"]
    print(f"bench-prep ({args.pairs} pairs, {args.threads} threads, 25M-param model, V=32000, K={args.topk})")
    print("| | tokens/s (end to end) | tokens/s (scoring) | peak RSS MB |")
    print("|---|---|---|---|")
    print(f"| edpo prep | {e['tokens_per_s']:.0f} | {e['scoring_tokens_per_s']:.0f} | {e['peak_rss_mb']:.0f} |")
    print(f"| PyTorch (HF forward + log-softmax + gather + top-K) | {p['tokens_per_s']:.0f} | {p['scoring_tokens_per_s']:.0f} | {p['peak_rss_mb']:.0f} |")
    print(f"| ratio | {res['speedup_end_to_end']:.2f}× | {res['speedup_scoring']:.2f}× | {res['rss_ratio']:.2f}× |")
    a, b = (rss[n] for n in args.rss_pairs)
    print(f"edpo peak RSS: {a['peak_rss_mb']:.0f} MB at {a['pairs']} pairs, {b['peak_rss_mb']:.0f} MB at {b['pairs']} pairs")
    print(f"results: {path}")


if __name__ == "__main__":
    main()
