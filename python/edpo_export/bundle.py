"""Writing a bundle: weights, config and tokenizer, both graphs, the goldens and the manifest
(edpo-model.json) with the graph I/O contract, tied weights, file hashes and tool versions."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from .common import (
    FORMAT_VERSION, GOLDENS_FILE, MANIFEST, PARAMS_FILE, REFERENCE_FILE, REFERENCE_INPUTS, REFERENCE_OUTPUTS,
    TRAIN_BATCH_INPUTS, TRAIN_FILE, TRAIN_STAT_OUTPUTS, fail, log, peak_rss_mb, sha256_file,
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
    vocab = model.get_output_embeddings().weight.shape[0]
    log(f"{type(model).__name__}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, vocab {vocab}, tied {tied}")

    stored = {name: p.detach().contiguous() for name, p in model.named_parameters()}
    save_file(stored, out / PARAMS_FILE, metadata={"format": "pt"})
    model.config.save_pretrained(out)
    special = copy_tokenizer(model_dir, Path(args.tokenizer) if args.tokenizer else None, out)
    if special["vocab_size"] > vocab:
        fail(f"tokenizer has {special['vocab_size']} tokens but the model's vocabulary is {vocab}")

    ids, attn, loss_mask = golden_batch(vocab, seed=7, pairs=2, length=8, tie_last=False)
    k = min(args.topk_default, vocab)
    example = (
        ids, attn, loss_mask, torch.zeros(4), torch.zeros(4, 8),
        torch.zeros(4, 8, k, dtype=torch.int64), torch.zeros(4, 8, k),
        torch.tensor(0.1), torch.tensor(0.1), torch.tensor(0.0), torch.tensor(1e-6),
    )  # fmt: skip
    t0 = time.time()
    export_reference_graph(untied, out / REFERENCE_FILE, out / PARAMS_FILE, args.optimize, (ids[:3], attn[:3]))
    t_ref = time.time() - t0
    t0 = time.time()
    grad_of = export_train_graph(untied, out / TRAIN_FILE, args.optimize, example, args.lm_head_chunks)
    t_train = time.time() - t0

    graph_param_inputs = {name: tied.get(name, name) for name, _ in untied.named_parameters()}
    del untied  # the goldens need the tied model only (and room for its float64 copy)
    t0 = time.time()
    goldens, goldens_section = compute_goldens(model, args.topk_default)
    save_file({name: value.clone() for name, value in goldens.items()}, out / GOLDENS_FILE)  # no shared storage
    log(f"goldens (float64 and fp32 PyTorch) computed in {time.time() - t0:.1f}s")

    params = [{"name": n, "shape": list(p.shape), "dtype": "float32"} for n, p in stored.items()]
    manifest = {
        "format_version": FORMAT_VERSION,
        "architecture": type(model).__name__,
        "model_type": model.config.model_type,
        "vocab_size": vocab,
        "num_parameters": sum(p.numel() for p in stored.values()),
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
                "inputs": io_entries(REFERENCE_INPUTS),
                "outputs": io_entries(REFERENCE_OUTPUTS),
                "weights": graph_param_inputs,
            },
            "train": {
                "file": TRAIN_FILE,
                "inputs": io_entries(TRAIN_BATCH_INPUTS),
                "outputs": io_entries(TRAIN_STAT_OUTPUTS),
                "param_inputs": graph_param_inputs,
                "grad_outputs": {f"grad.{g}": g for g in grad_of},
            },
        },
        "goldens": {"file": GOLDENS_FILE, **goldens_section},
        "export": {
            "optimized": bool(args.optimize),
            "lm_head_chunks": args.lm_head_chunks,
            "seconds_reference": round(t_ref, 2),
            "seconds_train": round(t_train, 2),
            "seconds_total": None,
            "peak_rss_mb": None,
        },
        "tools": tool_versions(),
        "files": {},
    }
    for name in [REFERENCE_FILE, TRAIN_FILE, PARAMS_FILE, GOLDENS_FILE, "tokenizer.json", "tokenizer_config.json", "config.json"]:
        path = out / name
        manifest["files"][name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest["export"]["seconds_total"] = round(time.time() - t_start, 2)
    manifest["export"]["peak_rss_mb"] = round(peak_rss_mb(), 1)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    sizes = ", ".join(f"{n} {m['bytes'] / 1e6:.2f} MB" for n, m in manifest["files"].items() if n.endswith((".onnx", ".safetensors")))
    log(f"bundle written to {out} in {manifest['export']['seconds_total']:.1f}s (peak RSS {manifest['export']['peak_rss_mb']:.0f} MB): {sizes}")
