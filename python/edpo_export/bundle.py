"""Writing a bundle: weights, config and tokenizer, both graphs, the goldens and the manifest
(edpo-model.json) with the graph I/O contract, tied weights, file hashes and tool versions."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from .common import (
    FORMAT_VERSION, GOLDENS_FILE, LABEL_POSITIONS_INPUT, MANIFEST, PACKED_INPUTS, PARAMS_FILE, REFERENCE_FILE, REFERENCE_INPUTS,
    REFERENCE_OUTPUTS, TOKENIZER_FILES, TRAIN_BATCH_INPUTS, TRAIN_FILE, TRAIN_STAT_OUTPUTS, accumulator_name, fail, log,
    peak_rss_mb, reference_sha256, sha256_file,
)  # fmt: skip
from .goldens import compute_goldens, golden_batch
from .graphs import export_reference_graph, export_train_graph, load_model, tied_pairs, untied_copy

def copy_tokenizer(src: Path, tokenizer_dir: Path | None, out: Path) -> dict:
    source = tokenizer_dir or src
    tok_json = source / "tokenizer.json"
    if not tok_json.is_file():
        fail(f"`{tok_json}` not found: the bundle needs a fast tokenizer (pass --tokenizer DIR)")
    shutil.copy(tok_json, out / "tokenizer.json")
    cfg_path = source / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    template_file = source / "chat_template.jinja"
    if "chat_template" not in cfg and template_file.is_file():
        cfg["chat_template"] = template_file.read_text()
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)

    def special(name):
        text = getattr(tok, f"{name}_token", None)
        return {"token": text, "id": tok.convert_tokens_to_ids(text) if text is not None else None}

    return {
        "eos": special("eos"),
        "bos": special("bos"),
        "pad": special("pad"),
        "has_chat_template": bool(cfg.get("chat_template")),
        "vocab_size": len(tok),
    }


def io_entries(spec):
    return [{"name": n, "dtype": d, "shape": s} for n, d, s in spec]


def tool_versions() -> dict:
    import onnx
    import onnx_ir
    import onnxruntime
    import onnxscript
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
        "onnx_ir": onnx_ir.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": sys.version.split()[0],
    }


def train_graph_full(model, args, grad_of: list[str], graph_param_inputs: dict) -> dict:
    """The goldens of a full fine-tuning bundle (its joint graph takes every parameter): the
    manifest's train graph entries, the goldens and their manifest section."""
    goldens, section = compute_goldens(model, args.topk_default)
    return {
        "param_inputs": graph_param_inputs,
        "grad_outputs": {f"grad.{g}": g for g in grad_of},
        "goldens": goldens,
        "goldens_section": section,
    }


def train_graph_lora(model, args, out: Path, example, tied: dict) -> dict:
    """Joint graph of a LoRA adapter over the frozen base (lora.py), the initial adapter folder
    and the goldens of the PEFT model; adds the manifest's `lora` section and the adapter files."""
    from . import lora

    peft_model = lora.attach(model, args)  # injects into `model`; its base weights are saved already
    inner = peft_model.base_model.model
    names = lora.graph_names(peft_model)
    reference_includes_adapter = lora.lora_b_nonzero(peft_model)
    adapters = lora.adapter_modules(peft_model)
    log(f"LoRA: {len(adapters)} modules, rank {adapters[0]['rank']}, scaling {adapters[0]['scaling']:g}, "
        f"{sum(p.numel() for p in inner.parameters() if p.requires_grad) / 1e6:.3f}M trainable; "
        f"reference = base{' + the --lora-init adapter' if reference_includes_adapter else ''}")  # fmt: skip
    grad_of, recomputed, blocks, shared = export_train_graph(
        inner, out / TRAIN_FILE, args.optimize, example, args.lm_head_chunks,
        lora=(names, out / PARAMS_FILE, tied), recompute=args.recompute, attention_blocks=args.train_attention_blocks,
        shared_prefix=args.train_shared_prefix == "on",
    )  # fmt: skip
    adapter_files = lora.save_adapter(peft_model, out, Path(args.model))
    trainable = [names[n] for n, p in inner.named_parameters() if p.requires_grad]
    goldens, section = compute_goldens(inner, args.topk_default, adapter=(names, lora.golden_adapter(names)))
    return {
        "param_inputs": {name: name for name in trainable},
        "grad_outputs": {f"grad.{g}": g for g in grad_of},
        "base_weights": {names[n]: tied.get(names[n], names[n]) for n, p in inner.named_parameters() if not p.requires_grad},
        "goldens": goldens,
        "goldens_section": section,
        "lora": lora.manifest_section(peft_model, args, reference_includes_adapter),
        "adapter_files": adapter_files,
        "recomputed_layers": recomputed,
        "attention_blocks": blocks,
        "shared_prefix": shared,
    }


def export(args) -> None:
    import torch
    from safetensors.torch import save_file

    t_start = time.time()
    model_dir = Path(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(model_dir, args.random_init)
    tied = tied_pairs(model)
    untied = untied_copy(model)
    untied._edpo_tied = tied  # alias → stored name, for the reference graph's weight offsets
    weights = {name: tied.get(name, name) for name, _ in untied.named_parameters()}
    vocab = model.get_output_embeddings().weight.shape[0]
    positions = [LABEL_POSITIONS_INPUT] if args.lm_head_chunks > 0 else []
    log(f"{type(model).__name__}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, vocab {vocab}, tied {tied}")

    stored = {name: p.detach().contiguous() for name, p in model.named_parameters()}
    save_file(stored, out / PARAMS_FILE, metadata={"format": "pt"})
    params = [{"name": n, "shape": list(p.shape), "dtype": "float32"} for n, p in stored.items()]
    num_parameters = sum(p.numel() for p in stored.values())
    del stored
    model.config.save_pretrained(out)
    special = copy_tokenizer(model_dir, Path(args.tokenizer) if args.tokenizer else None, out)
    if special["vocab_size"] > vocab:
        fail(f"tokenizer has {special['vocab_size']} tokens but the model's vocabulary is {vocab}")

    ids, attn, loss_mask = golden_batch(vocab, seed=7, pairs=2, length=8, tie_last=False)
    k = min(args.topk_default, vocab)
    example = (
        ids, attn, loss_mask, torch.zeros(4), torch.zeros(4, 8),
        torch.zeros(4, 8, k, dtype=torch.int64), torch.zeros(4, 8, k),
        torch.tensor(0.1), torch.tensor(0.1), torch.tensor(0.0), torch.tensor(1e-6), torch.tensor(1.0),
    )  # fmt: skip
    t0 = time.time()
    scoring_attention, scoring_packed = export_reference_graph(
        untied, out / REFERENCE_FILE, out / PARAMS_FILE, args.optimize, (ids, attn), args.lm_head_chunks,
        args.scoring_attention, shared_prefix=args.scoring_shared_prefix == "on",
    )  # fmt: skip
    t_ref = time.time() - t0
    t0 = time.time()
    if args.lora:
        del untied  # the LoRA graph is traced on the tied model (its base weights get no gradient)
        train = train_graph_lora(model, args, out, example, tied)
    else:
        grad_of, recomputed, blocks, shared = export_train_graph(
            untied, out / TRAIN_FILE, args.optimize, example, args.lm_head_chunks, recompute=args.recompute,
            attention_blocks=args.train_attention_blocks, shared_prefix=args.train_shared_prefix == "on",
        )  # fmt: skip
        del untied  # the goldens need the tied model only (and room for its float64 copy)
        train = train_graph_full(model, args, grad_of, weights) | {
            "recomputed_layers": recomputed, "attention_blocks": blocks, "shared_prefix": shared,
        }  # fmt: skip
    t_train = time.time() - t0
    save_file({name: value.clone() for name, value in train["goldens"].items()}, out / GOLDENS_FILE)  # no shared storage

    manifest = {
        "format_version": FORMAT_VERSION,
        "architecture": type(model).__name__,
        "model_type": model.config.model_type,
        "vocab_size": vocab,
        "num_parameters": num_parameters,
        "dtype": "float32",
        "topk_default": k,
        "special_tokens": {key: special[key] for key in ("eos", "bos", "pad")},
        "has_chat_template": special["has_chat_template"],
        "params_file": PARAMS_FILE,
        "params": params,
        "tied": tied,
        "graphs": {
            "reference": {
                "file": REFERENCE_FILE,
                "inputs": io_entries(REFERENCE_INPUTS + positions + (PACKED_INPUTS if scoring_packed else [])),
                "outputs": io_entries(REFERENCE_OUTPUTS),
                "weights": weights,
            },
            "train": {
                "file": TRAIN_FILE,
                "inputs": io_entries(TRAIN_BATCH_INPUTS + positions + (PACKED_INPUTS if train["shared_prefix"] else [])),
                "outputs": io_entries(TRAIN_STAT_OUTPUTS),
                "param_inputs": train["param_inputs"],
                "grad_outputs": train["grad_outputs"],
                "grad_accumulation": {
                    "accumulators": {out: accumulator_name(out) for out in train["grad_outputs"]},
                },
                **({"base_weights": train["base_weights"]} if "base_weights" in train else {}),
            },
        },
        "goldens": {"file": GOLDENS_FILE, **train["goldens_section"]},
        **({"lora": train["lora"]} if "lora" in train else {}),
        "export": {
            "optimized": bool(args.optimize),
            "lm_head_chunks": args.lm_head_chunks,
            "recompute": args.recompute,
            "recomputed_layers": train["recomputed_layers"],
            "scoring_attention": scoring_attention,
            "scoring_shared_prefix": scoring_packed,
            "train_attention_blocks": train["attention_blocks"],
            "train_shared_prefix": train["shared_prefix"],
            "seconds_reference": round(t_ref, 2),
            "seconds_train": round(t_train, 2),
            "seconds_total": None,
            "peak_rss_mb": None,
        },
        "tools": tool_versions(),
        "files": {},
    }
    adapter_files = train.get("adapter_files", [])
    names = [REFERENCE_FILE, TRAIN_FILE, PARAMS_FILE, GOLDENS_FILE, *TOKENIZER_FILES, "config.json", *adapter_files]
    for name in names:
        path = out / name
        manifest["files"][name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    with_adapter = adapter_files if train.get("lora", {}).get("reference_includes_adapter") else []
    manifest["reference_sha256"] = reference_sha256(manifest["files"], [REFERENCE_FILE, PARAMS_FILE, *TOKENIZER_FILES, *with_adapter])
    manifest["export"]["seconds_total"] = round(time.time() - t_start, 2)
    manifest["export"]["peak_rss_mb"] = round(peak_rss_mb(), 1)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    sizes = ", ".join(f"{n} {m['bytes'] / 1e6:.2f} MB" for n, m in manifest["files"].items() if n.endswith((".onnx", ".safetensors")))
    log(f"bundle written to {out} in {manifest['export']['seconds_total']:.1f}s (peak RSS {manifest['export']['peak_rss_mb']:.0f} MB): {sizes}")
