"""Reading edpo's Parquet in a notebook: prep shards and a run's pairs/metrics, with polars and
with pandas. Runnable as a script (the tests run it on the demo's output):

    python -m edpo_experiments.notebook_example --shards out/demo/train --run out/demo/runs/eps-dpo
"""

import argparse
from pathlib import Path

import pandas as pd
import polars as pl


def shards_with_polars(shards: Path) -> pl.DataFrame:
    """One row per pair: lengths, reference log-probs and the cached top-K size."""
    df = pl.read_parquet(shards / "part-*.parquet")
    return df.select(
        "pair_id",
        "source_row",
        pl.col("prompt_ids").list.len().alias("prompt_tokens"),
        pl.col("chosen_ids").list.len().alias("chosen_tokens"),
        pl.col("rejected_ids").list.len().alias("rejected_tokens"),
        "ref_chosen_logps",
        "ref_rejected_logps",
        (pl.col("ref_chosen_logps") - pl.col("ref_rejected_logps")).alias("ref_margin"),
        pl.col("ref_chosen_token_logps").list.mean().alias("ref_chosen_mean_token_logp"),
        pl.col("ref_rejected_token_logps").list.min().alias("ref_rejected_min_token_logp"),
        pl.col("ref_chosen_topk_ids").list.first().list.len().alias("k"),
        pl.col("ref_chosen_topk_logps").list.first().list.first().alias("ref_chosen_first_top1_logp"),
        pl.col("ref_rejected_topk_ids").list.first().list.first().alias("ref_rejected_first_top1_id"),
        pl.col("ref_rejected_topk_logps").list.first().list.first().alias("ref_rejected_first_top1_logp"),
        "prompt_truncated",
        "response_truncated",
    )


def pairs_with_polars(run: Path) -> pl.DataFrame:
    """Per-step ε-DPO decisions: how often each k was taken, and the mean β_i, z and rewards."""
    pairs = pl.read_parquet(run / "pairs.parquet")
    return (
        pairs.group_by("step")
        .agg(
            (pl.col("k") == 1).mean().alias("frac_k_plus"),
            (pl.col("k") == -1).mean().alias("frac_k_minus"),
            pl.col("beta_i").mean(),
            pl.col("z").mean(),
            (pl.col("g_plus") - pl.col("g")).mean().alias("mean_g_plus_minus_g"),
            (pl.col("g") - pl.col("g_minus")).mean().alias("mean_g_minus_g_minus"),
            (pl.col("reward_chosen") - pl.col("reward_rejected")).mean().alias("reward_margin"),
            pl.col("logps_chosen").mean(),
            pl.col("logps_rejected").mean(),
            pl.col("ref_logps_chosen").mean(),
            pl.col("ref_logps_rejected").mean(),
            pl.col("pair_id").n_unique().alias("pairs"),
        )
        .sort("step")
    )


def metrics_with_pandas(run: Path) -> pd.DataFrame:
    """The step metrics of objective.md §6 as a pandas frame indexed by step."""
    m = pd.read_parquet(run / "metrics.parquet").set_index("step")
    return m[["loss", "kl/beta", "kl/avg_steps", "kl/p_epsilon_steps", "kl/n_epsilon_steps",
              "rewards/margins", "rewards/accuracies", "learning_rate", "grad_norm"]]  # fmt: skip


def pairs_with_pandas(run: Path) -> pd.DataFrame:
    """One pair followed through training: its k and β_i at every step it was seen."""
    p = pd.read_parquet(run / "pairs.parquet")
    first = p["pair_id"].iloc[0]
    return p[p["pair_id"] == first][["step", "k", "beta_i", "z", "reward_chosen", "reward_rejected"]]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=Path, required=True)
    ap.add_argument("--run", type=Path, required=True)
    args = ap.parse_args()
    pl.Config.set_tbl_cols(12)
    shards = shards_with_polars(args.shards)
    print(f"shards: {shards.height} pairs, K = {shards['k'][0]}")
    print(shards.describe())
    print(pairs_with_polars(args.run).head(10))
    print(metrics_with_pandas(args.run).tail(5).to_string())
    print(pairs_with_pandas(args.run).to_string(index=False))


if __name__ == "__main__":
    main()
