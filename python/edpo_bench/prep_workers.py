"""`make bench-prep-workers`: `edpo prep` split across worker processes on this machine.

1. Scaling: wall time of prep over the same 2,000 bench pairs (8 shards of 250) with 1, 2 and 4
   workers started at once, threads per worker set so that they share the cores (`--threads`:
   2 for one worker, 1 for each of 2 or 4); each output is checked to be byte-identical to the
   one-worker output.
2. Input cost at 1M rows: a 1M-row JSONL and Parquet input (made once under the bench cache,
   string `id` column); for the first and the last worker of 4 (shards of 2,048 rows), the time
   to reach its first row, the duplicate-id pass (its own rows' ids, then the ids of the other
   rows before its last one) and the peak RSS so far, as the worker logs them (EDPO_LOG=info);
   the worker is stopped there, before tokenising and scoring.
"""

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from edpo_bench.common import CACHE, ROOT, bench_bundle, bench_pairs, edpo_release, write_results

# The release binary measured: EDPO_BIN, else the build's (a shared target folder may hold
# another checkout's build: copy yours and point EDPO_BIN at it).
EDPO = os.environ.get("EDPO_BIN") or str(edpo_release())


def digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def run_workers(bundle: Path, data: Path, out: Path, workers: int, threads: int, args) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [EDPO, "--quiet", "--threads", str(threads), "prep", "--json", "--model", str(bundle),
           "--data", str(data), "--out", str(out), "--shard-size", str(args.shard_size),
           "--batch-tokens", str(args.batch_tokens)]  # fmt: skip
    load_before = os.getloadavg()
    t0 = time.time()
    procs = [subprocess.Popen(cmd + ["--worker", f"{i}/{workers}"], stdout=subprocess.PIPE) for i in range(workers)]
    per_worker = []
    for p in procs:
        out_bytes = p.stdout.read()
        _, status, usage = os.wait4(p.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"worker failed: {' '.join(p.args)}")
        s = json.loads(out_bytes)
        per_worker.append({"worker": s["worker"], "wall_s": s["wall_seconds"], "shards": s["shards"],
                           "tokens": s["sequence_tokens"], "cpu_s": usage.ru_utime + usage.ru_stime,
                           "peak_rss_mb": usage.ru_maxrss / 1024.0})  # fmt: skip
    wall = time.time() - t0
    tokens = sum(w["tokens"] for w in per_worker)
    # Other processes on the machine change wall times: the load average before and after.
    return {"workers": workers, "threads_per_worker": threads, "wall_s": wall, "tokens": tokens,
            "tokens_per_s": tokens / wall, "cpu_s": sum(w["cpu_s"] for w in per_worker),
            "load_average": {"before": load_before, "after": os.getloadavg()},
            "per_worker": per_worker, "files": digest(out)}  # fmt: skip


def scaling(args) -> dict:
    bundle = bench_bundle()
    data = bench_pairs(args.pairs)
    runs = []
    for workers, threads in ((1, 2), (2, 1), (4, 1)):
        r = run_workers(bundle, data, CACHE / f"shards-workers-{workers}", workers, threads, args)
        print(f"  {workers} worker(s) × {threads} thread(s): {r['wall_s']:.1f} s, {r['tokens_per_s']:.0f} tokens/s", flush=True)
        runs.append(r)
    for r in runs[1:]:
        assert r["files"] == runs[0]["files"], f"{r['workers']} workers: output differs from one worker's"
    for r in runs:
        r["identical_to_one_worker"] = True
        r["speed_vs_one_worker"] = runs[0]["wall_s"] / r["wall_s"]
        del r["files"]
    return {"pairs": args.pairs, "shard_size": args.shard_size, "batch_tokens": args.batch_tokens, "runs": runs}


def million_rows(rows: int) -> tuple[Path, Path]:
    """A JSONL and a Parquet input of `rows` short plain pairs with string ids (made once)."""
    folder = CACHE / f"input-{rows}"
    jsonl, parquet = folder / "pairs.jsonl", folder / "pairs.parquet"
    if jsonl.is_file() and parquet.is_file():
        return jsonl, parquet
    from edpo_experiments.make_samples import BAD, FRAMES, GOOD, ITEMS, PROMPTS

    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(3)

    def text(words, n):
        return " ".join(rng.choice(FRAMES).format(item=rng.choice(ITEMS), a=rng.choice(words), b=rng.choice(words)) for _ in range(n))

    columns = {"id": [], "prompt": [], "chosen": [], "rejected": []}
    with open(jsonl, "w") as f:
        for i in range(rows):
            row = {"id": f"pair-{i:08d}", "prompt": " ".join(rng.choice(PROMPTS).format(item=rng.choice(ITEMS)) for _ in range(3)),
                   "chosen": text(GOOD, 3), "rejected": text(BAD, 3)}  # fmt: skip
            f.write(json.dumps(row) + "\n")
            for k, v in row.items():
                columns[k].append(v)
    # Row groups of 10,000 rows (pyarrow's default would put 1M rows in one group).
    pq.write_table(pa.table(columns), parquet, row_group_size=10_000)
    return jsonl, parquet


def input_cost(data: Path, worker: int, workers: int, shard_size: int) -> dict:
    """Starts worker `worker` of `workers` over `data`, stops it after its duplicate-id pass."""
    out = CACHE / "shards-input-cost"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [EDPO, "--quiet", "--threads", "1", "prep", "--model", str(ROOT / "data-samples" / "bundle"),
           "--data", str(data), "--out", str(out), "--shard-size", str(shard_size), "--worker", f"{worker}/{workers}"]  # fmt: skip
    env = {**os.environ, "EDPO_LOG": "edpo::prep=info", "NO_COLOR": "1"}
    t0 = time.time()
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env, text=True)
    fields = None
    for line in p.stderr:
        if "duplicate-id pass done" in line:
            wall = time.time() - t0
            plain = re.sub(r"\x1b\[[0-9;]*m", "", line)
            fields = dict(kv.split("=", 1) for kv in plain.split() if "=" in kv)
            break
    p.send_signal(signal.SIGKILL)
    p.wait()
    if fields is None:
        raise SystemExit(f"no duplicate-id pass logged: {' '.join(cmd)}")
    num = lambda k: float(fields[k])  # noqa: E731
    return {"worker": f"{worker}/{workers}", "first_row_s": num("first_row_s"), "own_rows_s": num("own_rows_s"),
            "id_scan_s": num("id_scan_s"), "rows_scanned": int(num("rows_scanned")), "candidates": int(num("candidates")),
            "peak_rss_mb": num("peak_rss_mb"), "process_wall_s": wall}  # fmt: skip


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--shard-size", type=int, default=250)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--skip-scaling", action="store_true")
    args = ap.parse_args()
    res = {"binary": EDPO, "machine": {"cores": os.cpu_count(), "load_average_at_start": os.getloadavg()}}
    jsonl, parquet = million_rows(args.rows)
    res["input_cost"] = {"rows": args.rows, "shard_size": 2048, "files": {}}
    for data in (jsonl, parquet):
        # Each measurement three times (a warm page cache after the first); the median is shown.
        runs = {w: [input_cost(data, w, 4, 2048) for _ in range(3)] for w in (0, 3)}
        median = {w: sorted(rs, key=lambda r: r["own_rows_s"] + r["id_scan_s"])[1] for w, rs in runs.items()}
        res["input_cost"]["files"][data.suffix[1:]] = {"bytes": data.stat().st_size, "workers": list(median.values()),
                                                        "all_runs": [r for rs in runs.values() for r in rs]}  # fmt: skip
        for r in median.values():
            print(f"  {data.suffix[1:]} worker {r['worker']}: first row {r['first_row_s']:.3f} s, own rows {r['own_rows_s']:.2f} s, "
                  f"id scan {r['id_scan_s']:.2f} s ({r['rows_scanned']} rows), peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)  # fmt: skip
    if not args.skip_scaling:
        res["scaling"] = scaling(args)
    print(f"results: {write_results('prep-workers', res)}")


if __name__ == "__main__":
    main()
