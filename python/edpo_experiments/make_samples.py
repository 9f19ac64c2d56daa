"""Regenerate the committed sample data under data-samples/ (see data-samples/README.md).

    python -m edpo_experiments.make_samples [--out data-samples]

Writes, deterministically from fixed seeds:
  prefs/{train,heldout}.plain.jsonl     prompt/chosen/rejected strings
  prefs/{train,heldout}.chat.jsonl      the same pairs as message lists (explicit prompt)
  prefs/{train,heldout}.plain.parquet   the plain pairs as Parquet
  tokenizer/                            byte-level BPE trained on the pairs' text + chat template
  configs/{llama,qwen2,gpt2}-tiny/      small model configs using that tokenizer

The preference task: a reviewer is asked about an item; the chosen answer describes it with
words from a positive pool, the rejected one with words from a negative pool, in the same
sentence frame. Held-out pairs use item/frame/word combinations never seen in training, so
held-out preference accuracy measures whether the model learned the word-level preference.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ITEMS = [
    "movie", "book", "song", "meal", "hotel", "phone", "game", "trip", "lesson", "garden",
    "coffee", "concert", "bike", "camera", "museum", "river walk", "bakery", "train ride",
    "jacket", "lamp", "market", "play", "podcast", "recipe",
]  # fmt: skip
GOOD = [
    "wonderful", "delightful", "excellent", "charming", "brilliant", "lovely", "superb",
    "pleasant", "inspiring", "elegant", "friendly", "fantastic", "graceful", "cheerful",
    "remarkable", "splendid",
]  # fmt: skip
BAD = [
    "awful", "dreadful", "terrible", "boring", "clumsy", "dull", "miserable", "unpleasant",
    "annoying", "ugly", "rude", "horrible", "gloomy", "sloppy", "tedious", "shabby",
]  # fmt: skip
PROMPTS = [
    "What did you think of the {item}?",
    "Tell me about the {item}.",
    "How was the {item} yesterday?",
    "Would you recommend the {item}?",
    "Describe the {item} in a few words.",
]
FRAMES = [
    "The {item} was {a} and {b}.",
    "Honestly, it was a {a} {item}, really {b}.",
    "I found the {item} {a}; the staff were {b} too.",
    "A {a} {item}. I would call it {b}.",
    "It felt {a}, and the whole {item} was {b}.",
    "My view: {a}, {b}, and worth remembering.",
]
SYSTEM = "You are a helpful reviewer."
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]


def make_pairs(seed: int, count: int, heldout: bool, seen: set) -> list[dict]:
    rng = random.Random(seed)
    pairs = []
    while len(pairs) < count:
        item = rng.choice(ITEMS)
        prompt_t = rng.randrange(len(PROMPTS))
        frame_t = rng.randrange(len(FRAMES))
        good = rng.sample(GOOD, 2)
        bad = rng.sample(BAD, 2)
        key = (item, prompt_t, frame_t, tuple(good))
        if key in seen:
            continue
        seen.add(key)
        frame = FRAMES[frame_t]
        prompt = PROMPTS[prompt_t].format(item=item)
        chosen = frame.format(item=item, a=good[0], b=good[1])
        rejected = frame.format(item=item, a=bad[0], b=bad[1])
        pid = f"{'heldout' if heldout else 'train'}-{len(pairs):05d}"
        pairs.append({"id": pid, "prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def as_chat(pair: dict) -> dict:
    return {
        "id": pair["id"],
        "prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": pair["prompt"]}],
        "chosen": [{"role": "assistant", "content": pair["chosen"]}],
        "rejected": [{"role": "assistant", "content": pair["rejected"]}],
    }


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def train_tokenizer(texts: list[str], out: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "bos_token": None,
        "pad_token": "<|pad|>",
        "unk_token": None,
        "model_max_length": 512,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def model_configs(vocab: int, tok: dict) -> dict[str, dict]:
    eos, pad = tok["eos"], tok["pad"]
    common_ids = {"eos_token_id": eos, "pad_token_id": pad, "bos_token_id": eos}
    return {
        "llama-tiny": {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
            "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
            "hidden_act": "silu", "initializer_range": 0.02, **common_ids,
        },
        "qwen2-tiny": {
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": vocab,
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
            "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True,
            "hidden_act": "silu", "initializer_range": 0.02, "use_sliding_window": False,
            **common_ids,
        },
        "gpt2-tiny": {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": vocab,
            "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128, "n_inner": 128,
            "tie_word_embeddings": True, "initializer_range": 0.02, **common_ids,
        },
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data-samples")
    parser.add_argument("--train-pairs", type=int, default=1200)
    parser.add_argument("--heldout-pairs", type=int, default=200)
    parser.add_argument("--vocab-size", type=int, default=512)
    args = parser.parse_args()
    out = Path(args.out)
    seen: set = set()
    train = make_pairs(11, args.train_pairs, False, seen)
    heldout = make_pairs(12, args.heldout_pairs, True, seen)
    prefs = out / "prefs"
    prefs.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train), ("heldout", heldout)):
        write_jsonl(prefs / f"{split}.plain.jsonl", rows)
        write_jsonl(prefs / f"{split}.chat.jsonl", [as_chat(r) for r in rows])
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), prefs / f"{split}.plain.parquet", compression="zstd")

    texts = [SYSTEM] + [t for r in train + heldout for t in (r["prompt"], r["chosen"], r["rejected"])]
    tok_dir = out / "tokenizer"
    train_tokenizer(texts, tok_dir, args.vocab_size)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    ids = {"eos": tok.token_to_id("<|im_end|>"), "pad": tok.token_to_id("<|pad|>")}
    vocab = tok.get_vocab_size()
    for name, cfg in model_configs(vocab, ids).items():
        d = out / "configs" / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (d / f).write_bytes((tok_dir / f).read_bytes())
    print(f"wrote {len(train)} train and {len(heldout)} held-out pairs, tokenizer vocab {vocab}, to {out}")


if __name__ == "__main__":
    main()
