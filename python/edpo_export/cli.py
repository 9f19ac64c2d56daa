"""Export a Hugging Face causal LM into an edpo model bundle, or verify one.

    python -m edpo_export --model HF_DIR --out BUNDLE [--topk-default K] [--recompute attention|layers|none]
                          [--train-attention-blocks B] [--train-shared-prefix on|off]
                          [--scoring-attention fused|eager] [--scoring-shared-prefix on|off]
    python -m edpo_export --model HF_DIR --out BUNDLE --lora [--lora-rank R] [--lora-alpha A]
                          [--lora-targets q_proj,v_proj | all-linear] [--lora-init ADAPTER_DIR]
    python -m edpo_export --verify BUNDLE

The bundle (see ../shared/spec/architecture.md, export-notes.md):
  reference.onnx       scoring graph: input_ids, attention_mask, k (and label_positions, the
                       tokens to score, unless --lm-head-chunks 0) → token_logps, topk_logps,
                       topk_ids. Its weights are initializers stored *outside* the graph, as
                       references into params.safetensors (so ONNX Runtime reads them from the
                       one weights file; edpo overrides them by name to score a checkpoint).
                       With --scoring-shared-prefix on (the default where its attention is the
                       kernel) it also takes each pair's rows packed, their common prefix
                       scored once (common.PACKED_INPUTS).
  policy.train.onnx    joint forward+backward graph, parameters as graph inputs, the ε-DPO
                       loss of objective.md §2–§7 and one `grad.<param>` output per parameter.
                       With --train-shared-prefix on (the default where its attention is
                       block-causal) it also takes each pair's rows packed, their common
                       prefix once (common.PACKED_INPUTS, objective.pack_pairs).
  params.safetensors   θ₀ with Hugging Face names (tied weights stored once).
  tokenizer.json, tokenizer_config.json (chat template inlined), config.json
  adapter/             LoRA bundles (--lora): the initial adapter as a PEFT folder
                       (adapter_config.json, adapter_model.safetensors). Their joint graph takes
                       the adapter matrices as its only parameter inputs and returns only their
                       gradients; the frozen base weights are initializers read from
                       params.safetensors, like the reference graph's (lora.py).
  goldens.safetensors  a fixed batch, PyTorch's float64 outputs of both graphs on it and a
                       bounded gradient sample (goldens.py); verify judges ONNX Runtime by them.
  edpo-model.json      manifest: graph I/O contract, parameters, tied weights, hashes, versions.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .bundle import export
from .common import TOPK_DEFAULT, TRAIN_ATTENTION_BLOCKS, fail
from .verify import verify


def main(argv=None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Hugging Face model folder (config.json, weights, tokenizer)")
    parser.add_argument("--out", help="bundle folder to write")
    parser.add_argument("--tokenizer", help="folder with tokenizer.json if not in --model")
    parser.add_argument(
        "--topk-default", type=int, default=TOPK_DEFAULT,
        help=f"default K for prep (default {TOPK_DEFAULT}: see TOPK_DEFAULT)",
    )  # fmt: skip
    parser.add_argument("--random-init", type=int, metavar="SEED", help="ignore weights; initialise from config with SEED")
    parser.add_argument(
        "--lm-head-chunks", type=int, default=4, metavar="C",
        help="slices of the output projection in the scoring and training graphs, computed at the response "
        "(label) positions only (0 = dense [N,T,V] logits at every position; default 4)",
    )  # fmt: skip
    parser.add_argument(
        "--recompute", choices=["attention", "layers", "none"], default="attention",
        help="what the backward pass recomputes instead of keeping from the forward pass (remat.py): "
        "attention = each layer's attention probabilities (no [rows, heads, T, T] tensor kept per layer) and "
        "the values a few element-wise products from kept ones (RMSNorm, SwiGLU; default), layers = everything inside each decoder layer (gradient checkpointing: one more "
        "forward pass, activations of one layer at a time), none = keep everything",
    )  # fmt: skip
    parser.add_argument(
        "--scoring-attention", choices=["fused", "eager"], default="fused",
        help="the scoring graph's attention: fused = ONNX Runtime's causal GroupQueryAttention kernel "
        "(default, where the architecture allows it: no sliding window, soft-capping or sinks; attention.py), "
        "eager = scores, additive mask, softmax as transformers' eager attention",
    )  # fmt: skip
    parser.add_argument(
        "--train-attention-blocks", type=int, default=TRAIN_ATTENTION_BLOCKS, metavar="B",
        help="the training graph's causal attention in B query blocks, each over the keys up to its last query "
        f"only: (B + 1)/(2B) of the T×T scores computed (default {TRAIN_ATTENTION_BLOCKS}, where the architecture "
        "allows it as for --scoring-attention fused; 1 = transformers' eager attention over the whole square)",
    )  # fmt: skip
    parser.add_argument(
        "--train-shared-prefix", choices=["on", "off"], default="on",
        help="on (default, with block-causal training attention and the sliced output projection): the training "
        "graph runs each pair's chosen and rejected rows as one packed row, their common prefix (the prompt) once; "
        "off = two rows per pair, the prompt run twice",
    )  # fmt: skip
    parser.add_argument(
        "--scoring-shared-prefix", choices=["on", "off"], default="on",
        help="on (default, with the attention kernel and the sliced output projection): the scoring graph takes each "
        "pair's chosen and rejected rows as one packed row, their common prefix (the prompt) scored once; "
        "off = two rows per pair",
    )  # fmt: skip
    lora = parser.add_argument_group("LoRA (a bundle that trains adapters over the frozen base; lora.py)")
    lora.add_argument("--lora", action="store_true", help="train LoRA adapters instead of every parameter")
    lora.add_argument("--lora-rank", type=int, metavar="R", help="adapter rank r (default 8, PEFT's)")
    lora.add_argument("--lora-alpha", type=float, metavar="A", help="lora_alpha; scaling = alpha / r (default: r)")
    lora.add_argument(
        "--lora-targets", type=lambda s: [t for t in s.split(",") if t], metavar="NAMES",
        help="modules to adapt, comma-separated as PEFT names them (q_proj,v_proj), or all-linear "
        "(every linear layer but the output projection); default: PEFT's defaults for the architecture",
    )  # fmt: skip
    lora.add_argument("--lora-init", metavar="ADAPTER_DIR", help="start from this PEFT LoRA adapter (its rank, alpha, targets); the reference is base + adapter")
    lora.add_argument("--lora-seed", type=int, default=0, help="seed of a fresh adapter's lora_A (lora_B starts at 0)")
    parser.add_argument("--optimize", action="store_true", help="run the onnxscript optimiser on both graphs (slow for deep models)")
    parser.add_argument("--verify", metavar="BUNDLE", help="run the bundle's graphs in onnxruntime against its goldens")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.verify:
        return verify(Path(args.verify))
    if not args.model or not args.out:
        parser.error("--model and --out are required (or --verify BUNDLE)")
    if args.topk_default < 1:
        fail("`--topk-default` must be ≥ 1")
    if args.lm_head_chunks < 0:
        fail("`--lm-head-chunks` must be ≥ 0 (0 = dense logits)")
    if not 1 <= args.train_attention_blocks <= 4:
        fail(
            "`--train-attention-blocks` must be 1 to 4 (1 = the eager attention over the whole square; the joint "
            "graph is traced on 8 tokens, and blocks of one token would fix its length)"
        )
    if args.lora_init:
        args.lora = True
    if not args.lora and (args.lora_rank or args.lora_alpha is not None or args.lora_targets):
        fail("`--lora-rank`, `--lora-alpha` and `--lora-targets` need `--lora`")
    if args.lora_rank is not None and args.lora_rank < 1:
        fail("`--lora-rank` must be ≥ 1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    export(args)
    return 0

