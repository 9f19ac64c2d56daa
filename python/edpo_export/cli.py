"""Export a Hugging Face causal LM into an edpo model bundle, or verify one.

    python -m edpo_export --model HF_DIR --out BUNDLE [--topk-default K] [--optimize]
    python -m edpo_export --verify BUNDLE

The bundle (see ../shared/spec/architecture.md, export-notes.md):
  reference.onnx       scoring graph: input_ids, attention_mask, k → token_logps, topk_logps,
                       topk_ids. Its weights are initializers stored *outside* the graph, as
                       references into params.safetensors (so ONNX Runtime reads them from the
                       one weights file; edpo overrides them by name to score a checkpoint).
  policy.train.onnx    joint forward+backward graph, parameters as graph inputs, the ε-DPO
                       loss of objective.md §2–§7 and one `grad.<param>` output per parameter.
  params.safetensors   θ₀ with Hugging Face names (tied weights stored once).
  tokenizer.json, tokenizer_config.json (chat template inlined), config.json
  goldens.safetensors  a fixed batch and what PyTorch computed for both graphs on it.
  edpo-model.json      manifest: graph I/O contract, parameters, tied weights, hashes, versions.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import struct
import sys
import time
from pathlib import Path

MANIFEST = "edpo-model.json"
FORMAT_VERSION = 1
REFERENCE_FILE = "reference.onnx"
TRAIN_FILE = "policy.train.onnx"
PARAMS_FILE = "params.safetensors"
GOLDENS_FILE = "goldens.safetensors"
# TopK size used while tracing the scoring graph; replaced by the graph input `k` afterwards.
TRACE_TOPK = 7
# Default K of the sparse reference cache: the smallest K with ≥ 99% agreement of the cached
# ε-step with the exact one at both points of every noisy-preference run of `make study-k`
# (README, "How good is the cached ε-step?").
TOPK_DEFAULT = 128

TRAIN_BATCH_INPUTS = [
    ("input_ids", "int64", ["N", "T"]),
    ("attention_mask", "int64", ["N", "T"]),
    ("loss_mask", "int64", ["N", "T"]),
    ("ref_logps", "float32", ["N"]),
    ("ref_token_logps", "float32", ["N", "T"]),
    ("ref_topk_ids", "int64", ["N", "T", "K"]),
    ("ref_topk_logps", "float32", ["N", "T", "K"]),
    ("beta", "float32", []),
    ("epsilon", "float32", []),
    ("label_smoothing", "float32", []),
    ("step_tolerance", "float32", []),
]
TRAIN_STAT_OUTPUTS = [
    ("loss", "float32", []),
    ("logps", "float32", ["N"]),
    ("logps_plus", "float32", ["N"]),
    ("logps_minus", "float32", ["N"]),
    ("steps", "int64", ["B"]),
]
REFERENCE_INPUTS = [
    ("input_ids", "int64", ["N", "T"]),
    ("attention_mask", "int64", ["N", "T"]),
    ("k", "int64", []),
]
REFERENCE_OUTPUTS = [
    ("token_logps", "float32", ["N", "T"]),
    ("topk_logps", "float32", ["N", "T", "K"]),
    ("topk_ids", "int64", ["N", "T", "K"]),
]
TOLERANCES = {"loss_abs": 1e-5, "grad_rel": 1e-4, "logps_abs": 1e-4}


def log(msg: str) -> None:
    print(f"[export] {msg}", file=sys.stderr, flush=True)


def fail(msg: str) -> "NoReturn":  # noqa: F821
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------- loading


def load_model(model_dir: Path, random_init_seed: int | None):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (model_dir / "config.json").is_file():
        fail(f"`{model_dir}/config.json` not found: --model must be a Hugging Face model folder")
    config = AutoConfig.from_pretrained(model_dir)
    has_weights = any(model_dir.glob("*.safetensors")) or any(model_dir.glob("*.bin"))
    if has_weights and random_init_seed is None:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation="sdpa"
        )
    elif random_init_seed is not None:
        torch.manual_seed(random_init_seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    else:
        fail(
            f"`{model_dir}` has a config but no weights; pass `--random-init SEED` to export a "
            "randomly initialised model of that config"
        )
    model.eval()
    return model


def tied_pairs(model) -> dict[str, str]:
    """{alias parameter name: stored parameter name} for parameters that share storage."""
    seen: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        key = p.data_ptr()
        if key in seen:
            tied[name] = seen[key]
        else:
            seen[key] = name
    return tied


def untied_copy(model):
    """A deep copy whose tied parameters are separate tensors (same values)."""
    import torch

    m = copy.deepcopy(model)
    for alias, _ in tied_pairs(model).items():
        mod_name, _, attr = alias.rpartition(".")
        mod = m.get_submodule(mod_name)
        setattr(mod, attr, torch.nn.Parameter(getattr(mod, attr).detach().clone()))
    m.config.tie_word_embeddings = False
    assert not tied_pairs(m), "untying failed"
    return m


# ----------------------------------------------------------------------------- tracing


class ReferenceScorer:
    """Factory for the scoring module (kept here so the module is picklable-free)."""

    @staticmethod
    def build(model, k: int):
        import torch

        class Scorer(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.model = inner

            def forward(self, input_ids, attention_mask):
                logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
                logp = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)
                tok = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
                top_vals, top_ids = torch.topk(logp, k, dim=-1)
                token_logps = torch.cat([torch.zeros_like(tok[:, :1]), tok], dim=1)
                topk_logps = torch.cat([torch.zeros_like(top_vals[:, :1, :]), top_vals], dim=1)
                topk_ids = torch.cat([torch.zeros_like(top_ids[:, :1, :]), top_ids], dim=1)
                return token_logps, topk_logps, topk_ids

        return Scorer(model)


def strip_model_prefix(name: str) -> str:
    return name[len("model.") :] if name.startswith("model.") else name


def finish_onnx(onnx_program, param_names: set[str], output_names: list[str], optimize: bool):
    """Rename initializers to HF names, turn parameters into graph inputs, name outputs."""
    import onnx_ir as ir

    model = onnx_program.model
    graph = model.graph
    for old in list(graph.initializers):
        value = graph.initializers[old]
        new = strip_model_prefix(old)
        if new != old:
            graph.initializers.pop(old)
            value.name = new
            graph.initializers[new] = value
    for name in sorted(param_names):
        value = graph.initializers.pop(name, None)
        if value is None:
            raise RuntimeError(f"parameter {name} has no initializer in the exported graph")
        value.const_value = None
        graph.inputs.append(value)
    if len(graph.outputs) != len(output_names):
        raise RuntimeError(f"graph has {len(graph.outputs)} outputs, expected {len(output_names)}")
    for value, name in zip(graph.outputs, output_names):
        value.name = name
    for node in graph.all_nodes():
        node.metadata_props.clear()  # stack traces: most of the file size otherwise
        node.doc_string = None
    if optimize:
        import onnxscript.optimizer

        t0 = time.time()
        onnxscript.optimizer.optimize(model)
        log(f"onnxscript optimiser: {time.time() - t0:.1f}s")
    ir.passes.common.RemoveUnusedNodesPass()(model)
    return model


def export_train_graph(untied, out: Path, optimize: bool, example, lm_head_chunks: int):
    import torch
    import torch.export.experimental  # noqa: F401  (registers _export_forward_backward)
    import torch.utils._pytree as pytree
    from torch.export import Dim
    from torch.export.graph_signature import OutputKind, OutputSpec
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from .objective import EpsDpoLoss

    module = EpsDpoLoss(untied, lm_head_chunks)
    if lm_head_chunks > 0:
        # The sliced path assumes logits = lm_head(final hidden state); architectures that scale,
        # soft-cap or bias their logits differently would silently train on other numbers.
        with torch.no_grad():
            sliced = module(*example)
            dense = EpsDpoLoss(untied, 0)(*example)
        gap = max(float((a.float() - b.float()).abs().max()) for a, b in zip(sliced[:4], dense[:4]))
        if gap > 1e-3:
            fail(
                f"{type(untied).__name__}: the sliced output projection differs from the model's "
                f"logits (max |Δ| = {gap:.2e}); export with `--lm-head-chunks 0`"
            )
    b = Dim("B", min=2)
    n, t, k = 2 * b, Dim("T", min=3), Dim("K")
    dynamic = (
        {0: n, 1: t}, {0: n, 1: t}, {0: n, 1: t}, {0: n}, {0: n, 1: t},
        {0: n, 1: t, 2: k}, {0: n, 1: t, 2: k}, None, None, None, None,
    )  # fmt: skip
    t0 = time.time()
    with sdpa_kernel(SDPBackend.MATH):
        ep = torch.export.export(module, example, dynamic_shapes=dynamic, strict=False)
        jep = torch.export.experimental._export_forward_backward(ep, joint_loss_index=0)
    log(f"joint program traced in {time.time() - t0:.1f}s")

    graph = jep.graph_module.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target == torch.ops.aten.empty_permuted.default:
            size, perm = node.args[0], node.args[1]
            if list(perm) != list(range(len(perm))):
                raise RuntimeError(f"empty_permuted with a real permutation {perm}")
            with graph.inserting_before(node):
                new = graph.call_function(torch.ops.aten.empty.memory_format, (size,), dict(node.kwargs))
            new.meta = node.meta
            node.replace_all_uses_with(new)
            graph.erase_node(node)
    # `matmul` decomposes into expand + view + bmm; an expand to the shape its input already
    # has is a full copy in ONNX Runtime (Expand always materialises), and the copy of the
    # attention probabilities is kept for the backward pass next to the original: one extra
    # [N, heads, T, T] tensor per layer. Drop those no-op expands.
    def same_shape(a, b) -> bool:
        va, vb = a.meta.get("val"), b.meta.get("val")
        return va is not None and vb is not None and [str(d) for d in va.shape] == [str(d) for d in vb.shape]

    dropped = 0
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target == torch.ops.aten.expand.default:
            src = node.args[0]
            if isinstance(src, torch.fx.Node) and same_shape(src, node):
                node.replace_all_uses_with(src)
                graph.erase_node(node)
                dropped += 1
    jep.graph_module.recompile()
    log(f"joint graph: {dropped} no-op expands dropped")

    sig = jep.graph_signature
    output_names = [name for name, _, _ in TRAIN_STAT_OUTPUTS]
    grad_of: list[str] = []
    for i, spec in enumerate(sig.output_specs):
        if spec.kind == OutputKind.GRADIENT_TO_PARAMETER:
            pname = strip_model_prefix(spec.target)
            grad_of.append(pname)
            output_names.append(f"grad.{pname}")
        sig.output_specs[i] = OutputSpec(kind=OutputKind.USER_OUTPUT, arg=spec.arg, target=None)
    jep.module_call_graph[0].signature.out_spec = pytree.tree_flatten(tuple(range(len(sig.output_specs))))[1]

    t0 = time.time()
    program = torch.onnx.export(jep, example, dynamo=True, external_data=False, optimize=False, verbose=False)
    log(f"joint graph translated to ONNX in {time.time() - t0:.1f}s")
    params = {name for name, _ in untied.named_parameters()}
    model = finish_onnx(program, params, output_names, optimize)
    import onnx_ir as ir

    ir.save(model, out)
    return grad_of


def export_reference_graph(untied, out: Path, params_path: Path, optimize: bool, example):
    import onnx
    import torch
    from torch.export import Dim
    from torch.nn.attention import SDPBackend, sdpa_kernel

    scorer = ReferenceScorer.build(untied, TRACE_TOPK)
    dynamic = ({0: Dim("N", min=2), 1: Dim("T", min=3)}, {0: Dim("N", min=2), 1: Dim("T", min=3)})
    t0 = time.time()
    with sdpa_kernel(SDPBackend.MATH):
        program = torch.onnx.export(
            scorer, example, dynamic_shapes=dynamic, dynamo=True, external_data=False, optimize=False
        )
    log(f"reference graph exported in {time.time() - t0:.1f}s")
    params = {name for name, _ in untied.named_parameters()}
    model = finish_onnx(program, params, [name for name, _, _ in REFERENCE_OUTPUTS], optimize)
    import onnx_ir as ir

    proto = ir.serde.serialize_model(model)
    make_k_an_input(proto)
    point_params_at_safetensors(proto, params, params_path, tied_alias_map(untied))
    proto.graph.ClearField("value_info")
    onnx.save(proto, out)


def tied_alias_map(untied) -> dict[str, str]:
    return getattr(untied, "_edpo_tied", {})


def make_k_an_input(proto) -> None:
    """Replace the traced constant K of the TopK node by the scalar int64 graph input `k`."""
    from onnx import TensorProto, helper, numpy_helper

    topk = [n for n in proto.graph.node if n.op_type == "TopK"]
    if len(topk) != 1:
        raise RuntimeError(f"expected one TopK node in the scoring graph, found {len(topk)}")
    proto.graph.input.append(helper.make_tensor_value_info("k", TensorProto.INT64, []))
    shape = numpy_helper.from_array(__import__("numpy").array([1], dtype="int64"), "edpo_k_shape")
    proto.graph.initializer.append(shape)
    proto.graph.node.insert(0, helper.make_node("Reshape", ["k", "edpo_k_shape"], ["edpo_k_1d"]))
    old_k = topk[0].input[1]
    topk[0].input[1] = "edpo_k_1d"
    if not any(old_k in n.input for n in proto.graph.node):
        keep = [t for t in proto.graph.initializer if t.name != old_k]
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(keep)
        kept_nodes = [n for n in proto.graph.node if not (n.op_type == "Constant" and old_k in n.output)]
        del proto.graph.node[:]
        proto.graph.node.extend(kept_nodes)
    for out in proto.graph.output:
        dims = out.type.tensor_type.shape.dim
        if len(dims) == 3:
            dims[2].ClearField("dim_value")
            dims[2].dim_param = "K"


def safetensors_offsets(path: Path) -> dict[str, tuple[int, int, list[int], str]]:
    """{name: (absolute byte offset, length, shape, dtype)} from a safetensors header."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    base = 8 + header_len
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        begin, end = meta["data_offsets"]
        out[name] = (base + begin, end - begin, meta["shape"], meta["dtype"])
    return out


def point_params_at_safetensors(proto, params: set[str], params_path: Path, alias: dict[str, str]):
    """Turn parameter graph inputs into initializers whose data lives in params.safetensors."""
    from onnx import TensorProto

    offsets = safetensors_offsets(params_path)
    keep = [i for i in proto.graph.input if i.name not in params]
    del proto.graph.input[:]
    proto.graph.input.extend(keep)
    for name in sorted(params):
        stored = alias.get(name, name)
        offset, length, shape, dtype = offsets[stored]
        if dtype != "F32":
            raise RuntimeError(f"{stored} is {dtype}; bundles are fp32")
        t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=shape)
        t.data_location = TensorProto.EXTERNAL
        for key, val in (("location", PARAMS_FILE), ("offset", str(offset)), ("length", str(length))):
            entry = t.external_data.add()
            entry.key, entry.value = key, val
        proto.graph.initializer.append(t)


# ----------------------------------------------------------------------------- goldens


def golden_batch(vocab: int, seed: int = 1234, pairs: int = 5, length: int = 12, tie_last: bool = True):
    """A fixed, padded batch: rows 0..B chosen, B..2B rejected, shared prompts.

    With tie_last the last pair's rejected response equals its chosen one, so its step must be 0.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    n = 2 * pairs
    ids = torch.zeros(n, length, dtype=torch.int64)
    attn = torch.zeros(n, length, dtype=torch.int64)
    loss = torch.zeros(n, length, dtype=torch.int64)
    for i in range(pairs):
        prompt_len = int(torch.randint(2, 5, (1,), generator=gen))
        prompt = torch.randint(0, vocab, (prompt_len,), generator=gen)
        for row in (i, i + pairs):
            resp_len = int(torch.randint(2, length - prompt_len + 1, (1,), generator=gen))
            if row == 0:
                resp_len = length - prompt_len  # one row without padding
            total = prompt_len + resp_len
            ids[row, :prompt_len] = prompt
            ids[row, prompt_len:total] = torch.randint(0, vocab, (resp_len,), generator=gen)
            attn[row, :total] = 1
            loss[row, prompt_len:total] = 1
    if tie_last:
        for t in (ids, attn, loss):
            t[2 * pairs - 1] = t[pairs - 1]
    return ids, attn, loss


def perturbed(model, scale: float, seed: int):
    import torch

    ref = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * (p.std() if p.numel() > 1 else 1.0))
    return ref


def compute_goldens(model, untied, topk: int):
    """PyTorch outputs of both graphs on the fixed batch (eager autograd on the tied model)."""
    import torch

    from .objective import EpsDpoLoss

    vocab = model.config.vocab_size if hasattr(model.config, "vocab_size") else model.get_output_embeddings().weight.shape[0]
    ids, attn, loss_mask = golden_batch(vocab)
    k = min(topk, vocab)
    with torch.no_grad():
        ref_model = perturbed(model, 0.05, seed=99)
        ref_tok, ref_topv, ref_topi = ReferenceScorer.build(ref_model, k)(ids, attn)
        pol_tok, pol_topv, pol_topi = ReferenceScorer.build(model, k)(ids, attn)
    ref_logps = (ref_tok * loss_mask).sum(-1)
    scalars = {
        "beta": torch.tensor(0.1),
        "epsilon": torch.tensor(0.1),
        "label_smoothing": torch.tensor(0.0),
        "step_tolerance": torch.tensor(1e-6),
    }
    train_in = {
        "input_ids": ids,
        "attention_mask": attn,
        "loss_mask": loss_mask,
        "ref_logps": ref_logps,
        "ref_token_logps": ref_tok,
        "ref_topk_ids": ref_topi,
        "ref_topk_logps": ref_topv,
        **scalars,
    }
    module = EpsDpoLoss(model)
    model.zero_grad()
    loss, logps, lp_plus, lp_minus, steps = module(*[train_in[n] for n, _, _ in TRAIN_BATCH_INPUTS])
    loss.backward()
    goldens = {f"train.in.{k_}": v.contiguous() for k_, v in train_in.items()}
    for name, value in zip(["loss", "logps", "logps_plus", "logps_minus", "steps"], [loss, logps, lp_plus, lp_minus, steps]):
        goldens[f"train.out.{name}"] = value.detach().contiguous()
    for name, p in model.named_parameters():
        goldens[f"train.out.grad.{name}"] = p.grad.detach().clone().contiguous()
    model.zero_grad()
    goldens.update(
        {
            "reference.in.input_ids": ids,
            "reference.in.attention_mask": attn,
            "reference.in.k": torch.tensor(k, dtype=torch.int64),
            "reference.out.token_logps": pol_tok.contiguous(),
            "reference.out.topk_logps": pol_topv.contiguous(),
            "reference.out.topk_ids": pol_topi.contiguous(),
        }
    )
    return goldens


# ----------------------------------------------------------------------------- export


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

    goldens = compute_goldens(model, untied, args.topk_default)
    save_file({k_: v.clone() for k_, v in goldens.items()}, out / GOLDENS_FILE)

    params = [{"name": n, "shape": list(p.shape), "dtype": "float32"} for n, p in stored.items()]
    graph_param_inputs = {name: tied.get(name, name) for name, _ in untied.named_parameters()}
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
        "goldens": {"file": GOLDENS_FILE, "tolerances": TOLERANCES},
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


# ----------------------------------------------------------------------------- verify


def verify(bundle: Path) -> int:
    import numpy as np
    import onnxruntime as ort
    from safetensors.numpy import load_file

    manifest_path = bundle / MANIFEST
    if not manifest_path.is_file():
        fail(f"`{manifest_path}` not found: not an edpo bundle")
    manifest = json.loads(manifest_path.read_text())
    for name, meta in manifest["files"].items():
        digest = sha256_file(bundle / name)
        if digest != meta["sha256"]:
            fail(f"`{bundle / name}` has sha256 {digest}, the manifest says {meta['sha256']}: re-export the bundle")
    goldens = load_file(bundle / manifest["goldens"]["file"])
    tol = manifest["goldens"]["tolerances"]
    params = load_file(bundle / manifest["params_file"])
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    failures = []

    def check(label, ok, detail):
        print(f"  {'ok  ' if ok else 'FAIL'} {label:<48} {detail}")
        if not ok:
            failures.append(label)

    print(f"verify {bundle}")
    ref = ort.InferenceSession(str(bundle / manifest["graphs"]["reference"]["file"]), opts, providers=["CPUExecutionProvider"])
    feeds = {i["name"]: goldens[f"reference.in.{i['name']}"] for i in manifest["graphs"]["reference"]["inputs"]}
    outs = dict(zip([o.name for o in ref.get_outputs()], ref.run(None, feeds)))
    tl_err = float(np.abs(outs["token_logps"] - goldens["reference.out.token_logps"]).max())
    check("reference token_logps (abs)", tl_err <= tol["logps_abs"], f"max |Δ| = {tl_err:.2e}")
    tv_err = float(np.abs(outs["topk_logps"] - goldens["reference.out.topk_logps"]).max())
    check("reference topk_logps (abs)", tv_err <= tol["logps_abs"], f"max |Δ| = {tv_err:.2e}")
    ids_same = outs["topk_ids"] == goldens["reference.out.topk_ids"]
    # Ids may legitimately swap where two values tie within float noise.
    vals = goldens["reference.out.topk_logps"]
    tie = np.zeros_like(ids_same)
    tie[..., 1:] |= np.abs(np.diff(vals, axis=-1)) < 1e-5
    tie[..., :-1] |= np.abs(np.diff(vals, axis=-1)) < 1e-5
    check("reference topk_ids (untied values)", bool((ids_same | tie).all()), f"{int((~ids_same).sum())} differ, all at ties")

    train_meta = manifest["graphs"]["train"]
    train = ort.InferenceSession(str(bundle / train_meta["file"]), opts, providers=["CPUExecutionProvider"])
    feeds = {i["name"]: goldens[f"train.in.{i['name']}"] for i in train_meta["inputs"]}
    for graph_name, stored in train_meta["param_inputs"].items():
        feeds[graph_name] = params[stored]
    outs = dict(zip([o.name for o in train.get_outputs()], train.run(None, feeds)))
    loss_err = abs(float(outs["loss"]) - float(goldens["train.out.loss"]))
    check("train loss (abs)", loss_err <= tol["loss_abs"], f"|Δ| = {loss_err:.2e}")
    for name in ("logps", "logps_plus", "logps_minus"):
        err = float(np.abs(outs[name] - goldens[f"train.out.{name}"]).max())
        check(f"train {name} (abs)", err <= tol["logps_abs"], f"max |Δ| = {err:.2e}")
    same = bool((outs["steps"] == goldens["train.out.steps"]).all())
    check("train steps (identical)", same, f"{outs['steps'].tolist()} vs {goldens['train.out.steps'].tolist()}")
    grads: dict[str, np.ndarray] = {}
    for out_name, stored in train_meta["grad_outputs"].items():
        stored = train_meta["param_inputs"][stored]
        grads[stored] = grads.get(stored, 0) + outs[out_name]
    worst = (0.0, "")
    for stored, grad in grads.items():
        want = goldens[f"train.out.grad.{stored}"]
        rel = float(np.linalg.norm(grad - want) / max(np.linalg.norm(want), 1e-30))
        worst = max(worst, (rel, stored))
        if rel > tol["grad_rel"]:
            check(f"grad {stored} (rel)", False, f"{rel:.2e}")
    check(f"gradients, {len(grads)} tensors (rel, worst)", worst[0] <= tol["grad_rel"], f"{worst[0]:.2e} ({worst[1]})")
    nonzero = int((goldens["train.out.steps"] != 0).sum())
    print(f"  golden batch: {len(goldens['train.out.steps'])} pairs, {nonzero} with a non-zero ε-step")
    if failures:
        print(f"verify FAILED: {len(failures)} check(s)")
        return 1
    print("verify passed")
    return 0


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
        "--lm-head-chunks", type=int, default=16, metavar="C",
        help="slices of the output projection in the training graph (0 = dense [N,T,V] logits; default 16)",
    )  # fmt: skip
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
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    export(args)
    return 0

