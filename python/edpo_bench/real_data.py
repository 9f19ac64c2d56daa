"""Benchmark data at real length: chat pairs from real ShareGPT conversations, long enough for a
given maximum length. prompt = every turn before a conversation's last assistant reply (several
turns when needed to reach the length), chosen = that reply, rejected = the last reply of the
next conversation. Real text and real lengths for timing; not a preference signal (the pairs of
`make real` are built for that, see edpo_experiments.real_pairs).

    python -m edpo_bench.real_data --pairs 100 --min-tokens 1024
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edpo_experiments.real_pairs import CACHE, conversations, sharegpt_json

ROLES = {"human": "user", "gpt": "assistant"}


def messages(turns: list[dict]) -> list[dict] | None:
    out = []
    for t in turns:
        role = ROLES.get(t.get("from"))
        value = (t.get("value") or "").strip()
        if role is None or not value:
            return None
        out.append({"role": role, "content": value})
    return out


def candidates():
    """(id, prompt messages, last assistant reply) of conversations that alternate user/assistant."""
    for conv in conversations(sharegpt_json()):
        msgs = messages(conv.get("conversations") or [])
        if not msgs or len(msgs) < 2:
            continue
        while msgs and msgs[-1]["role"] != "assistant":
            msgs.pop()
        if len(msgs) < 2 or any(m["role"] != ("user" if i % 2 == 0 else "assistant") for i, m in enumerate(msgs)):
            continue
        text = "".join(m["content"] for m in msgs)
        if sum(c.isascii() for c in text) < 0.97 * len(text):
            continue
        yield conv["id"], msgs[:-1], msgs[-1]["content"]


def build(n: int, min_tokens: int, tokenizer_dir: Path) -> Path:
    """`n` pairs whose shorter sequence has at least `min_tokens` tokens (chat-rendered)."""
    out = CACHE / f"bench-pairs-{n}-{min_tokens}.jsonl"
    if out.is_file():
        return out
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    chosen_rows = []
    prev = None
    for conv_id, prompt, reply in candidates():
        if prev is not None:
            rejected = prev
            lengths = [
                len(tok(tok.apply_chat_template(prompt + [{"role": "assistant", "content": r}], tokenize=False), add_special_tokens=False)["input_ids"])
                for r in (reply, rejected)
            ]
            if min(lengths) >= min_tokens:
                chosen_rows.append(
                    {
                        "id": conv_id,
                        "prompt": prompt,
                        "chosen": [{"role": "assistant", "content": reply}],
                        "rejected": [{"role": "assistant", "content": rejected}],
                    }
                )
                if len(chosen_rows) == n:
                    break
        prev = reply
    if len(chosen_rows) < n:
        sys.exit(f"error: only {len(chosen_rows)} conversations reach {min_tokens} tokens")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chosen_rows))
    tmp.rename(out)
    return out


def main(argv=None) -> int:
    from edpo_experiments.smollm2 import ensure

    ap = argparse.ArgumentParser(prog="python -m edpo_bench.real_data", description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=100)
    ap.add_argument("--min-tokens", type=int, default=1024)
    args = ap.parse_args(argv)
    print(build(args.pairs, args.min_tokens, ensure()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
