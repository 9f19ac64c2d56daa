"""The notebook example (edpo_experiments/notebook_example.py) runs on a real prep + train output and
reads every column it shows."""

import subprocess
import sys

import pytest

from conftest import BUNDLE, PY_ENV, ROOT, edpo_bin
from edpo_experiments import notebook_example as nb


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("nb")
    subprocess.run([edpo_bin(), "--quiet", "prep", "--model", str(BUNDLE), "--data",
                    str(ROOT / "data-samples/prefs/train.plain.parquet"), "--out", str(d / "shards"), "--limit", "96"],
                   check=True)  # fmt: skip
    subprocess.run([edpo_bin(), "--quiet", "train", "--model", str(BUNDLE), "--shards", str(d / "shards"), "--out",
                    str(d / "run"), "--lr", "1e-3", "--beta", "0.1", "--epsilon", "0.05", "--batch-size", "16",
                    "--micro-batch", "8", "--max-steps", "6"], check=True)  # fmt: skip
    return d


def test_every_function_reads_its_columns(run):
    shards = nb.shards_with_polars(run / "shards")
    assert shards.height == 96 and shards["k"].unique().to_list() == [16]
    assert shards.null_count().sum_horizontal()[0] == 0
    assert (shards["ref_chosen_logps"] < 0).all() and not shards["prompt_truncated"].any()
    steps = nb.pairs_with_polars(run / "run")
    assert steps.height == 6 and steps["pairs"].to_list() == [16] * 6
    assert steps.null_count().sum_horizontal()[0] == 0
    metrics = nb.metrics_with_pandas(run / "run")
    assert len(metrics) == 6 and metrics.notna().all().all()
    one = nb.pairs_with_pandas(run / "run")
    assert len(one) >= 1 and set(one["k"]) <= {-1, 0, 1}


def test_script_runs(run):
    out = subprocess.run([sys.executable, "-m", "edpo_experiments.notebook_example", "--shards", str(run / "shards"),
                          "--run", str(run / "run")], check=True, capture_output=True, text=True, env=PY_ENV)  # fmt: skip
    assert "shards: 96 pairs, K = 16" in out.stdout


def test_report_writes_readable_files(run):
    subprocess.run([edpo_bin(), "report", str(run / "run")], check=True, capture_output=True)
    report = run / "run" / "report"
    pngs = sorted(report.glob("*.png"))
    assert {p.name for p in pngs} >= {"loss.png", "beta.png", "steps.png", "rewards.png", "accuracy.png",
                                      "learning_rate.png", "grad_norm.png", "beta_i_hist.png"}  # fmt: skip
    for p in pngs:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, p
    html = (report / "index.html").read_text()
    assert html.count("data:image/png;base64,") == len(pngs) and len(html) > 100_000
