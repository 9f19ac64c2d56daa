"""`edpo prep` against PyTorch and transformers: the shards hold what the reference model
computes (sequence log-probs within 1e-4, top-K ids identical where values are not tied), the
token ids are what transformers' tokenizer and chat template give (TRL's rules), and the
shards read in polars and pyarrow."""

import json
import subprocess
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch

from conftest import BUNDLE, ROOT, edpo_bin


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = {}
    for fmt in ("plain", "chat"):
        d = tmp_path_factory.mktemp(f"shards-{fmt}")
        subprocess.run(
            [edpo_bin(), "--quiet", "prep", "--model", str(BUNDLE), "--data",
             str(ROOT / f"data-samples/prefs/heldout.{fmt}.jsonl"), "--out", str(d), "--limit", "60",
             "--shard-size", "25", "--topk", "16"],
            check=True,
        )  # fmt: skip
        out[fmt] = d
    return out


@pytest.fixture(scope="module")
def model():
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(BUNDLE)
    m = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    missing, unexpected = m.load_state_dict(load_file(BUNDLE / "params.safetensors"), strict=False)
    assert not unexpected and all("lm_head" in k for k in missing)
    return m


def read_all(d: Path) -> pl.DataFrame:
    return pl.read_parquet(sorted(d.glob("part-*.parquet")))


def test_shards_read_in_polars_and_pyarrow(shards):
    for d in shards.values():
        df = read_all(d)
        table = pq.read_table(sorted(d.glob("part-*.parquet"))[0])
        expected = {
            "pair_id", "source_row", "prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps",
            "ref_rejected_logps", "ref_chosen_token_logps", "ref_rejected_token_logps",
            "ref_chosen_topk_ids", "ref_rejected_topk_ids", "ref_chosen_topk_logps",
            "ref_rejected_topk_logps", "prompt_truncated", "response_truncated",
        }  # fmt: skip
        assert set(df.columns) == expected and set(table.column_names) == expected
        assert df.height == 60 and df["pair_id"].n_unique() == 60
        assert df.schema["ref_chosen_topk_ids"] == pl.List(pl.List(pl.UInt32))
        lens = df.select(pl.col("chosen_ids").list.len(), pl.col("ref_chosen_token_logps").list.len())
        assert (lens[:, 0] == lens[:, 1]).all()
        meta = pq.read_metadata(sorted(d.glob("part-*.parquet"))[0]).metadata
        assert meta[b"edpo.topk"] == b"16"
        manifest = json.loads((d / "manifest.json").read_text())
        assert manifest["complete"] and manifest["topk"] == 16


def test_token_ids_match_transformers_and_trl_rules(shards):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(BUNDLE)
    rows = [json.loads(line) for line in (ROOT / "data-samples/prefs/heldout.plain.jsonl").read_text().splitlines()[:60]]
    df = read_all(shards["plain"]).sort("source_row")
    for row, got in zip(rows, df.iter_rows(named=True)):
        enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        assert got["prompt_ids"] == enc(row["prompt"])
        assert got["chosen_ids"] == enc(row["chosen"]) + [tok.eos_token_id]
        assert got["rejected_ids"] == enc(row["rejected"]) + [tok.eos_token_id]
    rows = [json.loads(line) for line in (ROOT / "data-samples/prefs/heldout.chat.jsonl").read_text().splitlines()[:60]]
    df = read_all(shards["chat"]).sort("source_row")
    for row, got in zip(rows, df.iter_rows(named=True)):
        prompt = tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False)
        assert full.startswith(prompt)
        assert got["prompt_ids"] == tok(prompt, add_special_tokens=False)["input_ids"]
        # TRL 0.13 (the paper's code base) appends EOS to conversational responses too.
        assert got["chosen_ids"] == tok(full[len(prompt):], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_reference_scores_match_pytorch(shards, model):
    df = read_all(shards["chat"])
    worst_seq, ids_differ_untied, compared = 0.0, 0, 0
    for row in df.iter_rows(named=True):
        for side in ("chosen", "rejected"):
            prompt, resp = row["prompt_ids"], row[f"{side}_ids"]
            ids = torch.tensor([prompt + resp])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            positions = range(len(prompt) - 1, len(prompt) + len(resp) - 1)
            tok_lp = np.array([float(logp[p, ids[0, p + 1]]) for p in positions])
            worst_seq = max(worst_seq, abs(tok_lp.sum() - row[f"ref_{side}_logps"]))
            np.testing.assert_allclose(row[f"ref_{side}_token_logps"], tok_lp, atol=1e-5)
            vals, top = torch.topk(logp[list(positions)], 16, dim=-1)
            got_ids = np.array(row[f"ref_{side}_topk_ids"])
            got_vals = np.array(row[f"ref_{side}_topk_logps"])
            np.testing.assert_allclose(got_vals, vals.numpy(), atol=1e-5)
            v = vals.numpy()
            tied = np.zeros_like(v, dtype=bool)
            tied[:, 1:] |= np.abs(np.diff(v, axis=-1)) < 1e-5
            tied[:, :-1] |= np.abs(np.diff(v, axis=-1)) < 1e-5
            ids_differ_untied += int(((got_ids != top.numpy()) & ~tied).sum())
            compared += 1
    assert compared == 120
    assert worst_seq <= 1e-4, f"sequence log-prob differs by {worst_seq:.2e}"
    assert ids_differ_untied == 0
