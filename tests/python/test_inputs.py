"""Input layouts that real preference datasets come in, written by the libraries that make them:
a Hugging Face `datasets` folder from `save_to_disk` preps to the same pairs as the same rows in
JSONL; a `DatasetDict` folder is refused with the split to pass."""

import json
import subprocess

import polars as pl
import pytest

from conftest import BUNDLE, ROOT, edpo_bin

datasets = pytest.importorskip("datasets")


def prep(data, out, *extra):
    return subprocess.run(
        [edpo_bin(), "--quiet", "prep", "--json", "--model", str(BUNDLE), "--data", str(data), "--out", str(out), *extra],
        capture_output=True,
        text=True,
    )


def pairs(shards):
    df = pl.read_parquet(str(shards / "part-*.parquet"))
    return df.drop("source_row").sort("pair_id")


@pytest.mark.parametrize("fmt", ["chat", "plain"])
def test_a_save_to_disk_folder_preps_like_the_same_rows_in_jsonl(tmp_path, fmt):
    lines = (ROOT / f"data-samples/prefs/heldout.{fmt}.jsonl").read_text().splitlines()[:48]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    folder = tmp_path / "saved"
    datasets.Dataset.from_list([json.loads(line) for line in lines]).save_to_disk(str(folder), num_shards=3)
    assert len(list(folder.glob("data-*.arrow"))) == 3, "written as three Arrow files by datasets"
    for data, out in ((jsonl, tmp_path / "from-jsonl"), (folder, tmp_path / "from-folder")):
        done = prep(data, out)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["pairs_written"] == 48
    assert pairs(tmp_path / "from-jsonl").equals(pairs(tmp_path / "from-folder"))


def test_a_dataset_dict_folder_names_the_split_to_pass(tmp_path):
    rows = [json.loads(line) for line in (ROOT / "data-samples/prefs/heldout.plain.jsonl").read_text().splitlines()[:4]]
    ds = datasets.Dataset.from_list(rows)
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    done = prep(tmp_path / "dd", tmp_path / "out")
    assert done.returncode == 2, done.stderr
    assert "DatasetDict" in done.stderr and f"--data {tmp_path / 'dd' / 'train'}" in done.stderr
