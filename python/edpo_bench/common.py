"""Shared pieces of the benchmarks: the bench-size model bundle, bench data, child processes
measured for wall time and peak RSS (os.wait4), and result tables."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import edpo_export
from edpo_export import TOPK_DEFAULT  # the K the benchmarks measure: the exporter's default

ROOT = Path(__file__).resolve().parents[2]
# The folder holding the edpo_* packages: child Python processes get it as PYTHONPATH, so that
# `python -m edpo_export` etc. resolve however this module was found.
PYTHON_DIR = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("EDPO_BENCH_CACHE", Path.home() / ".cache" / "edpo" / "bench"))
PY = sys.executable

# ≈25M parameters with a 32,000-token vocabulary (tied embeddings), Llama architecture.
BENCH_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
    "hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 6,
    "num_attention_heads": 6, "num_key_value_heads": 2, "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True,
    "hidden_act": "silu", "initializer_range": 0.02, "eos_token_id": 2, "pad_token_id": 3, "bos_token_id": 2,
}  # fmt: skip


def child_env() -> dict:
    """The environment for a child `python -m edpo_…` process: ours, with PYTHON_DIR on
    PYTHONPATH (first, unless it is there already)."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(PYTHON_DIR) not in paths:
        paths.insert(0, str(PYTHON_DIR))
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def edpo_release() -> Path:
    target = Path(os.environ.get("CARGO_TARGET_DIR", Path.home() / ".cache/edpo/target"))
    return target / "release" / "edpo"


def export_sources_tag() -> str:
    """Short hash of the export pipeline's sources (the edpo_export package's files, sorted):
    a changed graph gets a fresh bundle."""
    digest = hashlib.sha256()
    for path in sorted(Path(edpo_export.__file__).resolve().parent.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def bundle_sha256(bundle: Path) -> str:
    return hashlib.sha256((bundle / "edpo-model.json").read_bytes()).hexdigest()


def shards_match(shards: Path, bundle: Path) -> bool:
    """True when `shards` holds a finished prep made with this very bundle."""
    manifest = shards / "manifest.json"
    return manifest.is_file() and json.loads(manifest.read_text()).get("bundle_sha256") == bundle_sha256(bundle)


def bench_bundle() -> Path:
    """Exports the bench model once per version of the export sources (random init, seed 0)."""
    bundle = CACHE / f"bundle-25m-{export_sources_tag()}"
    if (bundle / "edpo-model.json").is_file():
        return bundle
    src = CACHE / "model-25m"
    src.mkdir(parents=True, exist_ok=True)
    (src / "config.json").write_text(json.dumps(BENCH_CONFIG, indent=2))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (src / f).write_bytes((ROOT / "data-samples" / "tokenizer" / f).read_bytes())
    subprocess.run(
        [PY, "-m", "edpo_export", "--model", str(src), "--random-init", "0", "--out", str(bundle)],
        check=True,
        env=child_env(),
    )
    return bundle


def bench_pairs(n: int, seed: int = 0, prompt_sentences: int = 6, response_sentences: int = 14) -> Path:
    """Plain pairs with ~60-token prompts and ~150-token responses, from the sample vocabulary."""
    path = CACHE / f"pairs-{n}-{seed}.jsonl"
    if path.is_file():
        return path
    from edpo_experiments.make_samples import BAD, FRAMES, GOOD, ITEMS, PROMPTS

    rng = random.Random(seed)

    def sentence(words):
        return rng.choice(FRAMES).format(item=rng.choice(ITEMS), a=rng.choice(words), b=rng.choice(words))

    lines = []
    for i in range(n):
        prompt = " ".join(rng.choice(PROMPTS).format(item=rng.choice(ITEMS)) for _ in range(prompt_sentences))
        k = rng.randint(response_sentences // 2, response_sentences * 3 // 2)
        chosen = " ".join(sentence(GOOD) for _ in range(k))
        rejected = " ".join(sentence(BAD) for _ in range(k))
        lines.append(json.dumps({"id": f"b{i}", "prompt": prompt, "chosen": chosen, "rejected": rejected}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def bench_train_shards(bundle: Path, topk: int = TOPK_DEFAULT, threads: int = 0) -> Path:
    """The training benchmarks' shards: the first 512 bench pairs prepped with `bundle` at K
    `topk` (once per bundle; `threads` 0 = one per core, which does not change the bytes)."""
    shards = CACHE / f"shards-train-bench-k{topk}"
    if not shards_match(shards, bundle):
        measured([str(edpo_release()), "--quiet", "--threads", str(threads), "prep", "--model", str(bundle),
                  "--data", str(bench_pairs(2000)), "--out", str(shards), "--topk", str(topk), "--limit", "512",
                  "--overwrite"])  # fmt: skip
    return shards


def measured(cmd: list[str], env: dict | None = None, allow_failure: bool = False) -> dict:
    """Runs a command; returns wall seconds, peak RSS (MB), its stdout and exit code. A failing
    command stops the benchmark unless `allow_failure` (then the caller reports the code; -9 is
    the kernel's out-of-memory kill)."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env={**os.environ, **(env or {})})
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0 and not allow_failure:
        raise SystemExit(f"benchmark command failed ({code}): {' '.join(cmd)}")
    return {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024.0, "stdout": out.decode(), "exit_code": code}


def write_results(name: str, results: dict) -> Path:
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path
