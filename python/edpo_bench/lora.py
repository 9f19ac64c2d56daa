"""`make bench-lora`: LoRA against full fine-tuning on real sizes — export, prep and train time
and peak RSS, on the same shards with the same batch (`edpo train`, release build), for each
of the exporter's --recompute choices (attention probabilities only, the default; whole layers,
i.e. gradient checkpointing).

Two models:
  * SmolLM2-135M-Instruct (edpo_experiments.smollm2): the full bundle and a LoRA bundle (rank 16,
    alpha 32, every linear layer);
  * a model at the public configuration of Qwen2.5-0.5B-Instruct (24 layers, hidden 896,
    intermediate 4,864, 14 heads / 2 KV heads, vocabulary 151,936, tied embeddings), randomly
    initialised (seed 0), with SmolLM2's tokenizer (49,152 tokens fit the vocabulary; no Qwen
    tokenizer is available offline): exported full and LoRA, so export time and RSS are measured.

Data: real chat pairs when ~/.cache/edpo/real/pairs-*/train.jsonl exists, else the sample chat
pairs (data-samples/prefs/train.chat.jsonl) rendered with SmolLM2's chat template by prep. One
prep per model with the full bundle; both bundles train on those shards (one reference).
Every command runs alone, measured with os.wait4 (peak RSS of the process).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from edpo_bench.common import CACHE, PY, ROOT, child_env, edpo_release, export_sources_tag, measured, write_results

QWEN_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936,
    "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
    "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
    "max_window_layers": 21, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "sliding_window": 32768,
    "use_sliding_window": False, "tie_word_embeddings": True, "hidden_act": "silu",
    "initializer_range": 0.02, "attention_dropout": 0.0, "use_cache": True,
}  # fmt: skip
LORA_FLAGS = ["--lora", "--lora-rank", "16", "--lora-alpha", "32", "--lora-targets", "all-linear"]


def data_file() -> tuple[Path, str]:
    real = sorted((Path.home() / ".cache" / "edpo" / "real").glob("pairs-*/train.jsonl"))
    if real:
        return real[-1], "real chat pairs"
    return ROOT / "data-samples" / "prefs" / "train.chat.jsonl", "sample chat pairs, SmolLM2's chat template"


def qwen_folder(smollm2: Path) -> Path:
    """The Qwen2.5-0.5B-shaped config with SmolLM2's tokenizer (ids of its specials)."""
    out = CACHE / "qwen2.5-0.5b-shape"
    out.mkdir(parents=True, exist_ok=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (smollm2 / f).is_file():
            shutil.copy(smollm2 / f, out / f)
    special = json.loads((smollm2 / "config.json").read_text())
    config = {**QWEN_CONFIG, **{k: special.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def export(model: Path, out: Path, extra: list[str], random_init: bool) -> dict:
    """Exports a bundle once (cached by exporter version); returns its measurement."""
    stamp = out / "bench-export.json"
    if stamp.is_file():
        return json.loads(stamp.read_text())
    shutil.rmtree(out, ignore_errors=True)
    init = ["--random-init", "0"] if random_init else []
    m = measured([PY, "-m", "edpo_export", "--model", str(model), "--out", str(out), "--threads", "2", *init, *extra], env=child_env())
    result = {"wall_s": round(m["wall_s"], 1), "peak_rss_mb": round(m["peak_rss_mb"])}
    stamp.write_text(json.dumps(result))
    return result


def edpo(args: argparse.Namespace, *cmd: str) -> dict:
    m = measured([str(edpo_release()), "--quiet", "--threads", str(args.threads), *cmd, "--json"])
    return {"wall_s": round(m["wall_s"], 1), "peak_rss_mb": round(m["peak_rss_mb"]), "summary": json.loads(m["stdout"])}


def train(args, bundle: Path, shards: Path, run: Path, batch: dict) -> dict:
    shutil.rmtree(run, ignore_errors=True)
    m = edpo(args, "train", "--model", str(bundle), "--shards", str(shards), "--out", str(run), "--lr", "1e-5",
             "--beta", "0.1", "--epsilon", "0.01", "--max-steps", str(batch["steps"]), "--batch-size",
             str(batch["batch_size"]), "--micro-batch", str(batch["micro_batch"]))  # fmt: skip
    s = m.pop("summary")
    return {**m, "pairs_per_s": round(s["pairs_per_second"], 3), "steps": s["steps"], "pairs": s["pairs_seen"]}


def bench_model(args, name: str, model: Path, random_init: bool, batch: dict, limit: int) -> dict:
    """Per --recompute choice: a full and a LoRA bundle, each trained on the same shards (one
    prep, with the first choice's full bundle: every bundle of the model has its reference)."""
    tag = export_sources_tag()
    data, kind = data_file()
    res: dict = {"batch": batch, "recompute": {}}
    shards = CACHE / f"{name}-shards-{tag}"
    for recompute in args.recompute:
        flags = ["--recompute", recompute]
        full = CACHE / f"{name}-full-{recompute}-{tag}"
        lora = CACHE / f"{name}-lora-r16-{recompute}-{tag}"
        exports = {"full": export(model, full, flags, random_init), "lora": export(model, lora, [*LORA_FLAGS, *flags], random_init)}
        if "prep" not in res:
            shutil.rmtree(shards, ignore_errors=True)
            p = edpo(args, "prep", "--model", str(full), "--data", str(data), "--out", str(shards), "--limit", str(limit),
                     "--max-length", str(args.max_length))  # fmt: skip
            s = p.pop("summary")
            res["data"] = {"file": str(data), "kind": kind, "pairs": s["pairs_written"]}
            res["prep"] = {**p, "tokens_per_s": round(s["tokens_per_second"]), "pairs_per_s": round(s["pairs_per_second"], 2)}
        trained = {
            "full": train(args, full, shards, CACHE / f"{name}-run-full", batch),
            "lora": train(args, lora, shards, CACHE / f"{name}-run-lora", batch),
        }
        res["recompute"][recompute] = {
            "export": exports,
            "train": trained,
            "rss_ratio_lora_vs_full": round(trained["lora"]["peak_rss_mb"] / trained["full"]["peak_rss_mb"], 3),
            "speed_ratio_lora_vs_full": round(trained["lora"]["pairs_per_s"] / trained["full"]["pairs_per_s"], 3),
        }
        manifest = json.loads((lora / "edpo-model.json").read_text())
        res["lora"] = {k: manifest["lora"][k] for k in ("rank", "alpha", "target_modules", "num_parameters")}
        res["num_parameters"] = manifest["num_parameters"]
        print(json.dumps({name: res}, indent=2), flush=True)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--only", choices=["smollm2", "qwen"], help="one model only (results merged into the file)")
    ap.add_argument(
        "--recompute", nargs="+", choices=["attention", "layers", "none"], default=["attention", "layers"],
        help="the exporter's --recompute choices to compare (default: attention, layers)",
    )  # fmt: skip
    args = ap.parse_args()
    from edpo_experiments.smollm2 import ensure

    smollm2 = ensure()
    path = ROOT / "bench-results" / "lora.json"
    results = json.loads(path.read_text()) if args.only and path.is_file() else {}
    results["threads"] = args.threads
    if args.only in (None, "smollm2"):
        batch = {"steps": 4, "batch_size": 8, "micro_batch": 4}
        results["smollm2-135m"] = bench_model(args, "smollm2", smollm2, False, batch, 64)
    if args.only in (None, "qwen"):
        batch = {"steps": 2, "batch_size": 4, "micro_batch": 2}
        results["qwen2.5-0.5b-shape"] = bench_model(args, "qwen05", qwen_folder(smollm2), True, batch, 16)
    print(f"results: {write_results('lora', results)}")


if __name__ == "__main__":
    main()
