"""`make study-k`: how good is the cached ε-step? Agreement of the top-K estimate with the exact
full-vocabulary step, for K ∈ {1, 2, 4, …, 256, V}, on a model whose next-token distributions
are peaked like a real LM's.

Steps (each cached under ~/.cache/edpo/study, so a rerun only redoes what is missing):
  1. corpus: the Python standard library's source (real text every machine here has);
  2. a byte-level BPE tokenizer with 32,000 tokens trained on it;
  3. the bench-size model (≈25M parameters, edpo_bench.common.BENCH_CONFIG) trained briefly as a
     language model on that text, then exported as an edpo bundle;
  4. preference pairs from held-out files: prompt = a code prefix, chosen = its true
     continuation, rejected = a continuation taken from another place;
  5. `edpo prep`, then `edpo train` with a large learning rate so that policy and reference
     move apart, and `edpo study-k` at the start (policy = reference) and after training.
Prints the table and writes bench-results/study-k-KIND[-seedN].json; `--summarize` prints the
top-K agreement of every run found there side by side, with the default-K rule.
"""

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from edpo_bench.common import BENCH_CONFIG, PY, ROOT, child_env, edpo_release, write_results

# Cache estimates compared (`edpo study-k --estimators`): top-K is what training uses.
ESTIMATORS = "topk,sampled,sampled-sn,head-tail,head-tail-sn"
CACHE = Path(os.environ.get("EDPO_STUDY_CACHE", Path.home() / ".cache" / "edpo" / "study"))


def log(msg):
    print(f"[study-k] {msg}", flush=True)


def corpus():
    """(train texts, held-out texts): stdlib .py files, split by file."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if "test" not in p.parts and "site-packages" not in p.parts)
    texts = []
    for p in files:
        try:
            t = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if len(t) > 2000:
            texts.append(t)
    rng = random.Random(0)
    rng.shuffle(texts)
    cut = int(len(texts) * 0.9)
    return texts[:cut], texts[cut:]


def tokenizer(train_texts):
    out = CACHE / "tokenizer"
    if (out / "tokenizer.json").is_file():
        return out
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    trainer = trainers.BpeTrainer(vocab_size=BENCH_CONFIG["vocab_size"], special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)  # fmt: skip
    tok.train_from_iterator(train_texts, trainer=trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>",
           "bos_token": None, "model_max_length": 1024}  # fmt: skip
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    log(f"tokenizer: {tok.get_vocab_size()} tokens")
    return out


def lm_train(train_texts, heldout_texts, tok_dir, minutes, seq, batch, lr):
    """Trains the bench config as a causal LM for `minutes`; returns the HF model folder."""
    out = CACHE / "lm"
    if (out / "model.safetensors").is_file():
        return out
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    eos, pad = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|pad|>")
    ids = []
    for t in train_texts:
        ids.extend(tok.encode(t).ids + [eos])
    data = torch.tensor(ids)
    held = []
    for t in heldout_texts[:40]:
        held.extend(tok.encode(t).ids + [eos])
    held = torch.tensor(held[: 64 * seq]).view(-1, seq)
    cfg = dict(BENCH_CONFIG, eos_token_id=eos, pad_token_id=pad, bos_token_id=eos)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**cfg), dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    log(f"LM training on {len(ids) / 1e6:.1f}M tokens for {minutes} min (seq {seq}, batch {batch})")
    t0, step, warm = time.time(), 0, 50
    model.train()
    while time.time() - t0 < minutes * 60:
        starts = torch.randint(0, len(data) - seq - 1, (batch,))
        x = torch.stack([data[s : s + seq] for s in starts])
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warm)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            log(f"  step {step}: loss {loss.item():.3f} ({(time.time() - t0) / step:.2f} s/step)")
    model.eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=held[:16]).logits[:, :-1].float(), -1)
        top = logp.exp().topk(16, -1).values
        stats = {"lm_steps": step, "heldout_loss": float(-logp.gather(-1, held[:16, 1:].unsqueeze(-1)).mean()),
                 "top1_mass": float(top[..., 0].mean()), "top16_mass": float(top.sum(-1).mean())}  # fmt: skip
    log(f"LM: {stats}")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / f, out / f)
    (out / "lm-stats.json").write_text(json.dumps(stats, indent=2))
    return out


def pairs(heldout_texts, tok_dir, n, prompt_tokens, response_tokens, kind="foreign"):
    """kind "foreign": rejected = a continuation from another file (an easy preference);
    kind "noisy": rejected = a continuation from elsewhere in the same file, and 30% of the
    pairs have chosen and rejected swapped (a hard, partly contradictory preference, so that
    trained policies end up with decisions on both sides of the step rule)."""
    path = CACHE / f"pairs-{kind}-{n}.jsonl"
    if path.is_file():
        return path
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    rng = random.Random(1)
    encoded = [tok.encode(t).ids for t in heldout_texts]
    encoded = [e for e in encoded if len(e) > prompt_tokens + response_tokens + 10]
    rows = []
    while len(rows) < n:
        a, b = rng.sample(range(len(encoded)), 2)
        ea = encoded[a]
        eb = ea if kind == "noisy" else encoded[b]
        s = rng.randrange(0, len(ea) - prompt_tokens - response_tokens)
        r = rng.randrange(0, len(eb) - response_tokens)
        chosen = ea[s + prompt_tokens : s + prompt_tokens + response_tokens]
        rejected = eb[r : r + response_tokens]
        if kind == "noisy" and rng.random() < 0.3:
            chosen, rejected = rejected, chosen
        if chosen == rejected:
            continue
        rows.append({"id": f"s{len(rows)}", "prompt": ea[s : s + prompt_tokens], "chosen": chosen, "rejected": rejected})
    path.write_text("".join(json.dumps(x) + "\n" for x in rows))
    return path


def edpo(*args):
    cmd = [str(edpo_release()), *map(str, args)]
    log("$ edpo " + " ".join(map(str, args)))
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def summarize() -> dict:
    """The top-K rows of every study run in bench-results/ (both pair kinds, every seed) side by
    side, and the default-K rule: the smallest K with ≥ 99% agreement at both points (start and
    after training) in every run of a pair kind."""
    runs = []
    for path in sorted((ROOT / "bench-results").glob("study-k-*.json")):
        r = json.loads(path.read_text())
        vocab = r["points"]["trained"]["vocab"]
        rows = {
            name: {x["k"]: x["agreement_pct"] for x in point["rows"] if x.get("estimator", "topk") == "topk"}
            for name, point in r["points"].items()
        }
        runs.append({"file": path.name, "kind": r["pair_kind"], "seed": r.get("seed", 42), "vocab": vocab,
                     "kl": r["points"]["trained"]["mean_token_kl"], "rows": rows})  # fmt: skip
    runs.sort(key=lambda x: (x["kind"] != "noisy", x["seed"] != 42, x["seed"]))
    ks = sorted(runs[0]["rows"]["trained"])
    print("| K | " + " | ".join(f"{x['kind']} seed {x['seed']} (KL {x['kl']:.2f})" for x in runs) + " | bytes/token |")
    print("|---" * (len(runs) + 2) + "|")
    for k in ks:
        name = "V" if k >= runs[0]["vocab"] else str(k)
        cells = " | ".join(f"{x['rows']['trained'][k]:.1f}%" for x in runs)
        print(f"| {name} | {cells} | {k * 8 + 4:,} |")
    print("agreement at the start (policy = reference): " + ", ".join(
        f"{x['kind']} seed {x['seed']} min {min(x['rows']['start'].values()):.1f}%" for x in runs))
    summary = {}
    for kind in sorted({x["kind"] for x in runs}):
        mine = [x for x in runs if x["kind"] == kind]
        ok = [k for k in ks if k < mine[0]["vocab"] and all(min(x["rows"]["start"][k], x["rows"]["trained"][k]) >= 99 for x in mine)]
        summary[kind] = min(ok) if ok else None
        print(f"{kind} ({len(mine)} runs): smallest K with ≥99% agreement at both points in every run: {summary[kind]}")
    return summary


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--summarize", action="store_true", help="only print the top-K table of every run in bench-results/")
    ap.add_argument("--lm-minutes", type=float, default=20)
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--train-steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--epsilon", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pair-kind", choices=["foreign", "noisy"], default="noisy")
    ap.add_argument("--seed", type=int, default=42, help="seed of edpo train's data order (a replicate of the study)")
    ap.add_argument("--estimators", default=ESTIMATORS, help=f"edpo study-k --estimators (default {ESTIMATORS})")
    args = ap.parse_args()
    if args.summarize:
        summarize()
        return 0
    CACHE.mkdir(parents=True, exist_ok=True)
    train_texts, heldout_texts = corpus()
    log(f"corpus: {len(train_texts)} train files, {len(heldout_texts)} held-out files")
    tok_dir = tokenizer(train_texts)
    lm = lm_train(train_texts, heldout_texts, tok_dir, args.lm_minutes, seq=128, batch=16, lr=2e-3)
    bundle = CACHE / "bundle"
    if not (bundle / "edpo-model.json").is_file():
        subprocess.run([PY, "-m", "edpo_export", "--model", str(lm), "--out", str(bundle)], check=True, env=child_env())
    # Train on the first half of the pairs, study the decisions on the other half (unseen
    # pairs, whose z can have either sign).
    data = pairs(heldout_texts, tok_dir, 2 * args.pairs, prompt_tokens=48, response_tokens=32, kind=args.pair_kind)
    lines = data.read_text().splitlines(keepends=True)
    train_data, study_data = data.with_suffix(".train.jsonl"), data.with_suffix(".study.jsonl")
    train_data.write_text("".join(lines[: args.pairs]))
    study_data.write_text("".join(lines[args.pairs :]))
    train_shards, shards = CACHE / f"shards-{args.pair_kind}-train", CACHE / f"shards-{args.pair_kind}-study"
    for d, out in ((train_data, train_shards), (study_data, shards)):
        edpo("--quiet", "--threads", args.threads, "prep", "--model", bundle, "--data", d, "--out", out, "--topk", "16")
    run = CACHE / f"run-{args.pair_kind}-{args.train_steps}-{args.lr}-{args.seed}"
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.time()
    edpo("--quiet", "--threads", args.threads, "train", "--model", bundle, "--shards", train_shards, "--out", run,
         "--lr", args.lr, "--beta", "0.1", "--epsilon", args.epsilon, "--batch-size", "8", "--micro-batch", "8",
         "--max-steps", args.train_steps, "--warmup-ratio", "0", "--schedule", "constant", "--seed", args.seed,
         "--epochs", math.ceil(args.train_steps * 8 / args.pairs))  # fmt: skip
    log(f"trained {args.train_steps} steps in {time.time() - t0:.0f}s")
    ks = "1,2,4,8,16,32,64,128,256,V"
    points = {}
    for name, params in (("start", None), ("trained", run / "final/model.safetensors")):
        extra = ["--params", params] if params else []
        out = edpo("--threads", args.threads, "study-k", "--model", bundle, "--shards", shards, "--topks", ks,
                   "--epsilon", args.epsilon, "--limit", args.pairs, "--estimators", args.estimators, "--json",
                   *extra)  # fmt: skip
        points[name] = json.loads(out)
    lm_stats = json.loads((lm / "lm-stats.json").read_text())
    res = {"lm": lm_stats, "pair_kind": args.pair_kind, "seed": args.seed, "epsilon": args.epsilon, "pairs": args.pairs, "train_steps": args.train_steps, "lr": args.lr, "points": points}
    topk = {name: [r for r in point["rows"] if r["estimator"] == "topk"] for name, point in points.items()}
    finite = [(s, t) for s, t in zip(topk["start"], topk["trained"]) if t["k"] < points["trained"]["vocab"]]
    supported = [t["k"] for s, t in finite if t["agreement_pct"] >= 99 and s["agreement_pct"] >= 99]
    res["smallest_k_with_99pct"] = min(supported) if supported else None
    # Where no finite K reaches 99%: the smallest K that reaches the best agreement any
    # finite K reaches (at both points).
    best = max(min(s["agreement_pct"], t["agreement_pct"]) for s, t in finite)
    res["smallest_k_at_best_finite_agreement"] = min(t["k"] for s, t in finite if min(s["agreement_pct"], t["agreement_pct"]) == best)
    path = write_results(f"study-k-{args.pair_kind}" + ("" if args.seed == 42 else f"-seed{args.seed}"), res)
    v = points["trained"]["vocab"]
    print(f"model: 25M params, V = {v}, LM-trained {lm_stats['lm_steps']} steps on Python stdlib source; "
          f"reference top-1 mass {points['start']['ref_top1_mass']:.3f}, top-16 mass {points['start']['ref_top16_mass']:.3f}")
    print(f"pairs: {args.pairs} unseen pairs studied, {args.pairs} trained on ({args.pair_kind}: see pairs()), ε = {args.epsilon}, {args.train_steps} steps at lr {args.lr}")
    print("| estimate | K | agreement at start | agreement after training | confusion after (exact rows −1/0/+1) | MAE g₊ / g₋ after | largest exact margin missed | bytes/token |")
    print("|---|---|---|---|---|---|---|---|")
    for s, t in zip(points["start"]["rows"], points["trained"]["rows"]):
        k = "V" if t["k"] >= v else t["k"]
        print(f"| {t['estimator']} | {k} | {s['agreement_pct']:.1f}% | {t['agreement_pct']:.1f}% | {t['confusion']} | "
              f"{t['mae_g_plus']:.2e} / {t['mae_g_minus']:.2e} | {t['max_disagreeing_margin']:.1e} | {t['cache_bytes_per_token']} |")
    print(f"mean per-token KL: start {points['start']['mean_token_kl']:.4f}, after training {points['trained']['mean_token_kl']:.4f}; "
          f"exact steps after training (−1/0/+1): {points['trained']['exact_steps']}")
    print(f"smallest top-K with ≥99% agreement at both points: {res['smallest_k_with_99pct']}; "
          f"smallest top-K at the best finite-K agreement ({best:.1f}%): {res['smallest_k_at_best_finite_agreement']}")
    print(f"results: {path}")


if __name__ == "__main__":
    sys.exit(main())
