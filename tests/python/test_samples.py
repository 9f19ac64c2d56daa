"""The committed sample data: sizes, splits, formats agree, and the tokenizer covers it."""

import json

import pyarrow.parquet as pq


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pairs_splits_and_formats(samples):
    prefs = samples / "prefs"
    train = read_jsonl(prefs / "train.plain.jsonl")
    heldout = read_jsonl(prefs / "heldout.plain.jsonl")
    assert len(train) + len(heldout) >= 1000
    assert not {r["id"] for r in train} & {r["id"] for r in heldout}
    seen = {(r["prompt"], r["chosen"]) for r in train}
    assert not any((r["prompt"], r["chosen"]) in seen for r in heldout), "held-out pairs are unseen"
    chat = read_jsonl(prefs / "train.chat.jsonl")
    assert [c["chosen"][0]["content"] for c in chat] == [r["chosen"] for r in train]
    assert all(c["prompt"][-1]["role"] == "user" for c in chat)
    table = pq.read_table(prefs / "train.plain.parquet")
    assert table.num_rows == len(train) and set(table.column_names) >= {"prompt", "chosen", "rejected"}


def test_tokenizer_has_chat_template_and_specials(samples):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(samples / "tokenizer" / "tokenizer.json"))
    cfg = json.loads((samples / "tokenizer" / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in cfg["chat_template"]
    assert tok.token_to_id(cfg["eos_token"]) is not None
    enc = tok.encode("The movie was wonderful and lovely.")
    assert tok.decode(enc.ids) == "The movie was wonderful and lovely."
