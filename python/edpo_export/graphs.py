"""Loading a Hugging Face model and tracing its two ONNX graphs: the reference scoring graph
(weights pointed at params.safetensors, K a runtime input) and the joint forward+backward
training graph of the ε-DPO loss (parameters as inputs, one gradient output per parameter)."""

from __future__ import annotations

import contextlib
import copy
import json
import struct
import time
from pathlib import Path

from . import projection
from .common import PARAMS_FILE, REFERENCE_OUTPUTS, TRACE_TOPK, TRAIN_STAT_OUTPUTS, accumulator_name, fail, log
from .remat import PRODUCT_OPS, recompute_in_backward

# The joint graph's attention is traced as transformers' eager implementation (the scoring
# graph's, where it can, as one ONNX Runtime kernel: attention.py): scores + an additive float mask,
# softmax, matmul. The SDPA implementation traces a boolean mask into Where/IsNaN passes over
# every [rows, heads, T, T] score tensor (and `_safe_softmax`'s Where in the joint graph and its
# backward), which took 19% of prep's and 35% of train's operator time on SmolLM2 at length
# 1,024 (`make profile-real`). Masked positions get a finite minimum instead of -inf, so a
# padding row's softmax is uniform instead of NaN-then-zeroed; those rows are masked out of
# every log-probability, so the outputs are the same.
ATTENTION = "eager"

def load_model(model_dir: Path, random_init_seed: int | None):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (model_dir / "config.json").is_file():
        fail(f"`{model_dir}/config.json` not found: --model must be a Hugging Face model folder")
    config = AutoConfig.from_pretrained(model_dir)
    has_weights = any(model_dir.glob("*.safetensors")) or any(model_dir.glob("*.bin"))
    if has_weights and random_init_seed is None:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation=ATTENTION
        )
    elif random_init_seed is not None:
        torch.manual_seed(random_init_seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=ATTENTION)
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
    """Factory for the scoring module (kept here so the module is picklable-free).

    `packed_ids`, `packed_positions`, `packed_branch`, `hidden_at` (sliced graphs that share each
    pair's prefix; common.PACKED_INPUTS): the decoder runs on the packed rows and the label
    positions read their predicting states at `hidden_at`; the outputs keep the rows' layout.

    `lm_head_chunks = 0`: the model's own logits, [N, T, V] at once, at every position (the
    goldens' PyTorch reference). `C > 0`: the module takes a third input, `label_positions`
    [M] (flat indices r·T + t, 1 ≤ t < T, of the label tokens to score), and the output
    projection, log-softmax, label gather and top-K run only at those positions, on C slices
    of them in turn, so at most one [M/C, V] slice of logits and of log-probs is alive (the
    dense form held two [N, T, V] tensors: 3.2 GB for 8 rows of 1,024 tokens of a
    49,152-token vocabulary). Prep scores the response tokens only, so the prompt and padding
    positions cost nothing past the last decoder layer. The outputs keep the [N, T(, K)]
    layout, with zeros at the positions not asked for; the values at the others are the dense
    form's (each position's row is computed alike).
    """

    @staticmethod
    def build(model, k: int, lm_head_chunks: int = 0):
        import torch

        from .objective import at_label_positions, at_least_fp32, chunk_bounds, loss_positions, pad_rows

        if lm_head_chunks > 0:
            projection.register()

        class Scorer(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.model = inner

            def forward(self, input_ids, attention_mask, label_positions=None, packed_ids=None, packed_positions=None,
                        packed_branch=None, hidden_at=None):  # fmt: skip
                if lm_head_chunks > 0:
                    if label_positions is None:
                        label_positions = loss_positions(torch.ones_like(input_ids))
                    packed = None if packed_ids is None else (packed_ids, packed_positions, packed_branch, hidden_at)
                    return self.sliced(input_ids, attention_mask, label_positions, packed)
                logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
                logp = torch.log_softmax(at_least_fp32(logits[:, :-1, :]), dim=-1)
                tok = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
                top_vals, top_ids = torch.topk(logp, k, dim=-1)
                token_logps = torch.cat([torch.zeros_like(tok[:, :1]), tok], dim=1)
                topk_logps = torch.cat([torch.zeros_like(top_vals[:, :1, :]), top_vals], dim=1)
                topk_ids = torch.cat([torch.zeros_like(top_ids[:, :1, :]), top_ids], dim=1)
                return token_logps, topk_logps, topk_ids

            def sliced(self, input_ids, attention_mask, label_positions, packed=None):
                decoder = self.model.get_decoder()
                n, t = input_ids.shape
                m = label_positions.shape[0]
                if packed is None:
                    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
                    h_sel, y_sel = at_label_positions(hidden, input_ids, label_positions)
                else:  # each pair's rows packed, their common prefix once (objective.pack_pairs)
                    ids, positions, branch, hidden_at = packed
                    real = (branch >= 0).to(ids.dtype)
                    hidden = decoder(input_ids=ids, attention_mask=real, position_ids=positions, edpo_branch=branch)
                    hidden = hidden.last_hidden_state
                    h_sel = hidden.reshape(-1, hidden.shape[-1]).index_select(0, hidden_at)
                    y_sel = input_ids.reshape(-1).index_select(0, label_positions)
                size, padded = chunk_bounds(m, lm_head_chunks)
                h_pad, y_pad = pad_rows(h_sel, padded - m), pad_rows(y_sel, padded - m)
                w = self.model.get_output_embeddings().weight
                # One ONNX Loop over the slices in the graph (projection.py).
                scores = torch.ops.edpo.sliced_scores(h_pad, y_pad, w, lm_head_chunks, k)
                # Back to the [N, T] layout: slot[r·T + t] is 1 + the position's index among the
                # scored ones, 0 (a zero row prepended to each output) where it was not asked for.
                slot = torch.zeros(n * t, dtype=torch.int64).index_put(
                    (label_positions,), torch.arange(1, m + 1, dtype=torch.int64)
                )

                def spread(values):
                    values = values[:m]
                    return torch.cat([torch.zeros_like(values[:1]), values]).index_select(0, slot)

                # -1, not k: K becomes a graph input after tracing (make_k_an_input).
                return (
                    spread(scores[0]).reshape(n, t),
                    spread(scores[1]).reshape(n, t, -1),
                    spread(scores[2]).reshape(n, t, -1),
                )

        return Scorer(model)


def strip_model_prefix(name: str) -> str:
    return name[len("model.") :] if name.startswith("model.") else name


def finish_onnx(onnx_program, param_names: set[str], output_names: list[str], optimize: bool, rename=None, tied=None):
    """Rename initializers to HF names, turn parameters into graph inputs (named by `rename`
    where it has them), name outputs. `tied` ({alias: stored name}): a tied parameter that the
    exporter lifted under an alias's name (e.g. `lm_head.weight`) is found by it."""
    import onnx_ir as ir

    rename = rename or {}
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
        for alias in [a for a, stored in (tied or {}).items() if stored == name and value is None]:
            value = graph.initializers.pop(alias, None)
        if value is None:
            raise RuntimeError(f"parameter {name} has no initializer in the exported graph")
        value.const_value = None
        value.name = rename.get(name, name)
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
    log(f"{drop_unit_powers(model)} Pow(x, 1) nodes replaced by x")
    log(f"{drop_identity_transposes(model)} identity Transposes dropped")
    ir.passes.common.RemoveUnusedNodesPass()(model)
    return model


def constant_of(value):
    """The numpy value of a graph value that is an initializer or a Constant node's output."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is not None and node.op_type == "Constant" and "value" in node.attributes:
        return node.attributes["value"].value.numpy()
    return None


def drop_identity_transposes(model) -> int:
    """Transpose(x, perm = 0, 1, …) → x. The exporter's index_put (the embedding's backward, a
    scatter into a zero [V, H] tensor) wraps its data and result in such Transposes, and ONNX
    Runtime runs each as a full copy: four [V, H] copies per run of the joint graph."""
    replaced = 0
    for node in list(model.graph.all_nodes()):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        perm = node.attributes.get("perm")
        out, data = node.outputs[0], node.inputs[0]
        if perm is None or list(perm.value) != list(range(len(perm.value))) or out.is_graph_output():
            continue
        out.replace_all_uses_with(data)
        replaced += 1
    return replaced


def drop_unit_powers(model) -> int:
    """Pow(x, 1) → x. The backward of x² traces as 2·Pow(x, 1); ONNX Runtime runs that Pow
    through powf element by element (its fast paths are the exponents 2 and 3), one pass per
    RMSNorm in the joint graph, for the value x itself."""
    replaced = 0
    for node in list(model.graph.all_nodes()):
        if node.op_type != "Pow" or node.domain not in ("", "ai.onnx"):
            continue
        exponent = constant_of(node.inputs[1])
        out, base = node.outputs[0], node.inputs[0]
        if exponent is None or exponent.size != 1 or float(exponent.reshape(())) != 1.0:
            continue
        if out.is_graph_output() or base.dtype != out.dtype:
            continue
        out.replace_all_uses_with(base)
        replaced += 1
    return replaced


def export_train_graph(untied, out: Path, optimize: bool, example, lm_head_chunks: int, lora=None, recompute: str = "attention",
                       attention_blocks: int = 1, shared_prefix: bool = True) -> tuple[list[str], int, int, bool]:  # fmt: skip
    """The joint graph of `untied` (a model without tied parameters), one gradient output per
    parameter that requires a gradient; returns their graph names, the number of layers whose
    values the backward recomputes (`recompute`: "attention", "layers" or "none"; remat.py),
    the attention's query blocks (`attention_blocks` where the model allows them, else 1:
    `training_attention`) and whether the graph shares each pair's prefix (`shared_prefix`,
    with the sliced output projection and block-causal attention: it then takes
    common.PACKED_INPUTS, objective.pack_pairs).

    `lora` (a LoRA bundle): (graph names {parameter: name}, params.safetensors path, {alias:
    stored name} of tied weights). The model then holds PEFT adapters and frozen base weights
    (tied ones may stay tied: they get no gradient); the base weights become initializers
    whose data are references into params.safetensors, and only the adapters are inputs.
    """
    import torch
    import torch.export.experimental  # noqa: F401  (registers _export_forward_backward)
    import torch.utils._pytree as pytree
    from torch.export import Dim
    from torch.export.graph_signature import OutputKind, OutputSpec

    from .attention import rotary_by_split
    from .objective import EpsDpoLoss, loss_positions, pack_pairs

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
        {0: n, 1: t, 2: k}, {0: n, 1: t, 2: k}, None, None, None, None, None,
    )  # fmt: skip
    packed = None
    if lm_head_chunks > 0:
        m = Dim("M", min=1)
        example = (*example, loss_positions(example[2]))
        dynamic = (*dynamic, {0: m})
        if shared_prefix:
            packed = tuple(pack_pairs(example[0], example[1], example[-1]).values())
            s = Dim("S", min=3)
            packed_dynamic = ({0: b, 1: s}, {0: b, 1: s}, {0: b, 1: s}, {0: m})
    t0 = time.time()
    # Size-oblivious, as torch.onnx.export traces: the padding of the last output-projection
    # slice (0 to C − 1 rows for M label positions) must not be specialised to "not 0 or 1".
    with (
        torch.fx.experimental._config.patch(backed_size_oblivious=True),
        rotary_by_split(untied) as split,
        training_attention(untied, module, example, attention_blocks, packed) as blocks,
    ):
        packed = packed if blocks > 1 else None  # the eager attention does not read packed rows
        if packed is not None:
            example, dynamic = (*example, *packed), (*dynamic, *packed_dynamic)
        ep = torch.export.export(
            module, example, dynamic_shapes=dynamic, strict=False, prefer_deferred_runtime_asserts_over_guards=True
        )
        jep = torch.export.experimental._export_forward_backward(ep, joint_loss_index=0)
    if split:
        log("joint graph: rotate_half through split (its backward one Concat)")
    if packed is not None:
        log("joint graph: each pair's prefix shared (packed rows)")
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
            pname = lora[0].get(pname, pname) if lora else pname
            grad_of.append(pname)
            output_names.append(f"grad.{pname}")
        sig.output_specs[i] = OutputSpec(kind=OutputKind.USER_OUTPUT, arg=spec.arg, target=None)
    jep.module_call_graph[0].signature.out_spec = pytree.tree_flatten(tuple(range(len(sig.output_specs))))[1]

    t0 = time.time()
    program = torch.onnx.export(jep, example, dynamo=True, external_data=False, optimize=False, verbose=False)
    log(f"joint graph translated to ONNX in {time.time() - t0:.1f}s")
    params = {name for name, _ in untied.named_parameters()}
    rename, tied = (lora[0], lora[2]) if lora else (None, None)
    model = finish_onnx(program, params, output_names, optimize, rename, tied)
    recomputed = recompute_in_backward(model, recompute)
    if recompute == "attention":
        recomputed //= blocks  # one softmax per query block
    import onnx
    import onnx_ir as ir

    proto = ir.serde.serialize_model(model)
    del model, program
    scalings = scaled_products(proto)
    log(f"joint graph: {scalings} scalings folded into their products")
    grad_of = accumulate_gradients(proto, grad_of, tied or tied_alias_map(untied))
    if lora is not None:
        names, params_path, alias = lora
        frozen = {names.get(n, n) for n, p in untied.named_parameters() if not p.requires_grad}
        point_params_at_safetensors(proto, frozen, params_path, alias)
        proto.graph.ClearField("value_info")
    onnx.save(proto, out)
    return grad_of, recomputed, blocks, packed is not None


@contextlib.contextmanager
def training_attention(untied, module, example, blocks: int, packed=None):
    """Within: `untied` attends in `blocks` query blocks (attention.block_causal) if `blocks` > 1
    and its architecture allows it (attention.unsupported_reason, and the ε-DPO outputs of
    `module` on `example` — on its packed rows where `packed` is given — match the eager
    attention's on the plain rows); yields the blocks used (1: the eager attention over the full
    square)."""
    import torch

    from . import attention

    reason = attention.unsupported_reason(untied) if blocks > 1 else None
    if blocks <= 1 or reason is not None:
        if reason is not None:
            log(f"training attention: eager ({reason})")
        yield 1
        return
    with torch.no_grad():
        eager = module(*example)
    with attention.blocked_training(untied, blocks):
        try:
            with torch.no_grad():
                got = module(*example, *(packed or ()))
        except attention.KernelUnsupported as e:
            got = None
            log(f"training attention: eager ({e})")
        if got is not None:
            gap = max(float((a.float() - b.float()).abs().max()) for a, b in zip(eager[:4], got[:4]))
            if gap > 1e-4:
                fail(
                    f"{type(untied).__name__}: block-causal attention without the padding mask"
                    f"{' over packed rows' if packed else ''} differs from the model's attention (max |Δ| of the loss "
                    f"outputs = {gap:.2e}); export with `--train-attention-blocks 1`"
                    f"{' or `--train-shared-prefix off`' if packed else ''}"
                )
            log(f"training attention: causal in {blocks} query blocks (max |Δ| of the loss outputs = {gap:.2e})")
            yield blocks
            return
    yield 1


def accumulate_gradients(proto, grad_of: list[str], tied: dict[str, str]) -> list[str]:
    """Sum the gradients into accumulators, in the graph: the gradient outputs grad.X of one
    stored tensor (X and its tied aliases, `tied`: {alias: stored name}) become one output
    grad.S = grad_acc.S + Σ (their values), S the stored tensor's graph input, with a new input
    grad_acc.S (its shape). The Add is the last node of that output, so a trainer that binds
    grad_acc.S and grad.S to one buffer accumulates in place (the Add reads each element
    before it writes it). An embedding's gradient, a scatter-add of its rows' gradients into a
    zero [V, H] tensor, is scattered into the sum of the accumulator and the other terms
    instead (`zero_scatter`): grad.S = ScatterND(Σ others + grad_acc.S, ids, rows, add), each
    Add's temporary term first, so ONNX Runtime may write the sum over it. The zero tensor,
    the scatter's own [V, H] result and its sum with the others are gone (SmolLM2's tied
    embedding: three 113 MB temporaries per run). Returns the graph inputs that keep a
    gradient output, in `grad_of`'s order."""
    from onnx import ValueInfoProto, helper

    groups: dict[str, list[str]] = {}
    for name in grad_of:
        groups.setdefault(tied.get(name, name), []).append(name)
    if any(stored not in members for stored, members in groups.items()):
        raise RuntimeError(f"a tied parameter's stored tensor is not a graph input: {groups}")
    outputs = {o.name: o for o in proto.graph.output}
    raw = {f"grad.{name}": f"grad.{name}.raw" for name in grad_of}
    for node in proto.graph.node:
        node.output[:] = [raw.get(o, o) for o in node.output]
        node.input[:] = [raw.get(i, i) for i in node.input]
    for info in proto.graph.value_info:
        info.name = raw.get(info.name, info.name)
    kept = [o for o in proto.graph.output if o.name not in raw or o.name[len("grad."):] in groups]
    del proto.graph.output[:]
    proto.graph.output.extend(kept)
    producers = {o: n for n in proto.graph.node for o in n.output}
    for stored, members in groups.items():
        out = f"grad.{stored}"
        acc = ValueInfoProto(name=accumulator_name(out), type=outputs[out].type)
        proto.graph.input.append(acc)
        terms = [raw[f"grad.{member}"] for member in [stored, *(m for m in members if m != stored)]]
        scatter = next((found for term in terms if (found := zero_scatter(producers, term)) is not None), None)
        if scatter is None:
            total = terms[0]
            for term in terms[1:]:
                summed = f"{total}+{term.removeprefix('grad.').removesuffix('.raw')}"
                proto.graph.node.append(helper.make_node("Add", [total, term], [summed]))
                total = summed
            proto.graph.node.append(helper.make_node("Add", [acc.name, total], [out], name=f"{out}.accumulate"))
            continue
        node, term = scatter
        for reader in proto.graph.node:  # the zero tensor's shape (the rows' Expand reads it) is the accumulator's
            if reader.op_type == "Shape" and reader.input[0] == node.input[0]:
                reader.input[0] = acc.name
        total = acc.name
        for other in (t for t in terms if t != term):
            summed = f"{other}+acc"
            proto.graph.node.append(helper.make_node("Add", [other, total], [summed]))
            total = summed
        proto.graph.node.append(
            helper.make_node("ScatterND", [total, *node.input[1:]], [out], name=f"{out}.accumulate", reduction="add")
        )
    prune_unused(proto)
    return [name for name in grad_of if name in groups]


def zero_scatter(producers: dict, name: str):
    """(the ScatterND node, `name`) if `name` is a scatter-add into zeros (an embedding's
    gradient: ScatterND(zeros, ids, rows, reduction add), read through identity Transposes), else
    None."""
    from onnx import helper, numpy_helper

    node = producers.get(name)
    while node is not None and node.op_type == "Transpose":
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        if perm != list(range(len(perm or []))):
            return None
        node = producers.get(node.input[0])
    if node is None or node.op_type != "ScatterND":
        return None
    if next((helper.get_attribute_value(a) for a in node.attribute if a.name == "reduction"), b"none") != b"add":
        return None
    zeros = producers.get(node.input[0])
    while zeros is not None and zeros.op_type in ("Expand", "Cast"):
        zeros = producers.get(zeros.input[0])
    if zeros is None or zeros.op_type not in ("Constant", "ConstantOfShape"):
        return None
    value = next((a.t for a in zeros.attribute if a.name == "value"), None)
    if value is not None and numpy_helper.to_array(value).any():
        return None
    return node, name


def prune_unused(proto) -> int:
    """Removes the top-level nodes none of whose outputs is read (by a node, a subgraph or the
    graph's outputs), until none is left; returns how many."""
    removed = 0
    while True:
        read = {o.name for o in proto.graph.output}
        for graph in graphs_within(proto.graph):
            read.update(i for n in graph.node for i in n.input)
            read.update(o.name for o in graph.output)
        dead = [n for n in proto.graph.node if not any(o in read for o in n.output if o)]
        if not dead:
            return removed
        remove_nodes(proto, dead)
        removed += len(dead)


def transposed_weight_products(proto, params: set[str]) -> int:
    """MatMul(x, Transpose(W)) → com.microsoft FusedMatMul(x, W, transB=1) for parameters W
    (nn.Linear on a batch of sequences traces so; on a 2-D input it traces as Gemm, which
    takes transB itself). ONNX Runtime would fold each Transpose into a transposed copy of
    the weight when it builds the session (SmolLM2: 210 weights, 0.3 s, and the copies) before
    pre-packing the copy; FusedMatMul pre-packs W as it is, transposing while it packs. Same
    kernel, same packed layout: the outputs are bit for bit those of the MatMul."""
    from onnx import helper

    graph_outputs = {o.name for o in proto.graph.output}
    consumers = consumers_of(proto)
    folded = []
    for node in proto.graph.node:
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx") or node.input[0] not in params:
            continue
        perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
        out = node.output[0]
        uses = consumers.get(out, [])
        if perm != [[1, 0]] or not uses or out in graph_outputs:
            continue
        if any(u.op_type != "MatMul" or u.domain not in ("", "ai.onnx") or list(u.input) != [u.input[0], out] or u.input[0] == out for u in uses):
            continue
        for use in uses:
            use.op_type, use.domain = "FusedMatMul", "com.microsoft"
            use.input[1] = node.input[0]
            use.attribute.append(helper.make_attribute("transB", 1))
        folded.append(node)
    remove_nodes(proto, folded)
    return len(folded)


def consumers_of(proto) -> dict[str, list]:
    """{value name: the nodes reading it} of a graph proto's top-level nodes."""
    consumers: dict[str, list] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def remove_nodes(proto, nodes: list) -> None:
    """Drops `nodes` from the graph (one pass) and declares the com.microsoft opset that the
    rewrites above introduce."""
    from onnx import helper

    if not nodes:
        return
    gone = {id(n) for n in nodes}
    kept = [n for n in proto.graph.node if id(n) not in gone]
    del proto.graph.node[:]
    proto.graph.node.extend(kept)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def scaled_products(proto) -> int:
    """Folds a float32 scalar that multiplies a matrix product's result, or its input, into the
    product as com.microsoft FusedMatMul's alpha; returns how many Muls went. Two forms, each
    through the Reshape that a batched `matmul` traces with:

    - the product's result is scaled: MatMul → Reshape → Mul(s) becomes FusedMatMul(alpha=s) →
      Reshape;
    - a value is scaled and then only multiplied: Mul(s) → Reshape → products becomes
      Reshape → products with alpha=s.

    The joint graph's eager attention scales its [rows, heads, T, T] scores after their product
    and their gradient before its two products; the Reshape kept ONNX Runtime's own fusion from
    reaching those Muls, so each was a full pass over the scores (SmolLM2 at 2,048 tokens: 90
    passes, 5% of the joint graph's node time). LoRA's scaling of its B product goes the same
    way. ONNX Runtime's CPU product applies alpha to each 128-wide block of the inner dimension:
    bit for bit the unfused result when the scale is a power of two or the inner size fits one
    block (attention's head size), else within a rounding of it."""
    from onnx import helper, numpy_helper

    scalars = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            scalars[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    scalars = {k: float(v.reshape(())) for k, v in scalars.items() if v.size == 1 and v.ndim <= 1 and v.dtype == "float32"}
    graph_inputs = {i.name for i in proto.graph.input}
    scalars = {k: v for k, v in scalars.items() if k not in graph_inputs}
    producer = {o: n for n in proto.graph.node for o in n.output}
    consumers = consumers_of(proto)
    graph_outputs = {o.name for o in proto.graph.output}

    def product(node) -> bool:
        return (node.op_type, node.domain) in PRODUCT_OPS

    def scale(node, factor: float) -> None:
        alpha = [a for a in node.attribute if a.name == "alpha"]
        if alpha:
            alpha[0].f *= factor
        else:
            node.attribute.append(helper.make_attribute("alpha", factor))
        node.op_type, node.domain = "FusedMatMul", "com.microsoft"

    def only_use(name: str):
        uses = consumers.get(name, [])
        return uses[0] if len(uses) == 1 and name not in graph_outputs else None

    folded = []
    for mul in proto.graph.node:
        if mul.op_type != "Mul" or mul.domain not in ("", "ai.onnx") or len(mul.input) != 2:
            continue
        factors = [x for x in mul.input if x in scalars]
        if len(factors) != 1:
            continue
        x = mul.input[1] if mul.input[0] == factors[0] else mul.input[0]
        reshape = producer.get(x)
        source = producer.get(reshape.input[0]) if reshape is not None and reshape.op_type == "Reshape" else None
        if source is not None and product(source) and only_use(source.output[0]) is reshape and only_use(x) is mul:
            scale(source, scalars[factors[0]])
            reshape.output[0] = mul.output[0]
            folded.append(mul)
            continue
        reshape = only_use(mul.output[0])
        if reshape is None or reshape.op_type != "Reshape" or reshape.input[0] != mul.output[0]:
            continue
        uses = consumers.get(reshape.output[0], [])
        if not uses or reshape.output[0] in graph_outputs or not all(product(u) for u in uses):
            continue
        for use in uses:
            scale(use, scalars[factors[0]])
        reshape.input[0] = x
        folded.append(mul)
    remove_nodes(proto, folded)
    return len(folded)


def export_reference_graph(untied, out: Path, params_path: Path, optimize: bool, example, lm_head_chunks: int,
                           attention: str = "fused", shared_prefix: bool = True) -> tuple[str, bool]:  # fmt: skip
    """The scoring graph; `attention` "fused" traces each layer's attention as ONNX Runtime's
    causal GroupQueryAttention kernel (attention.py) where the model's attention allows it, else
    as the eager chain. With `shared_prefix`, the kernel and the sliced output projection, the
    graph also takes each pair's rows packed (common.PACKED_INPUTS: their common prefix scored
    once). `example`: (input_ids, attention_mask) of pairs' rows. Returns the attention traced
    ("fused" or "eager") and whether the graph takes packed rows."""
    import onnx
    import torch
    from torch.export import Dim

    from .objective import loss_positions, pack_pairs

    scorer = ReferenceScorer.build(untied, TRACE_TOPK, lm_head_chunks)
    shared_prefix = shared_prefix and lm_head_chunks > 0
    if not shared_prefix:
        example = tuple(x[:3] for x in example)  # three rows, as every row graph was traced
    n, t = Dim("N", min=2), Dim("T", min=3)
    dynamic = ({0: n, 1: t}, {0: n, 1: t})
    if lm_head_chunks > 0:
        with torch.no_grad():
            sliced, dense = scorer(*example), ReferenceScorer.build(untied, TRACE_TOPK)(*example)
        gap = max(float((a.float() - b.float()).abs().max()) for a, b in zip(sliced[:2], dense[:2]))
        if gap > 1e-3:
            fail(
                f"{type(untied).__name__}: the sliced output projection differs from the model's "
                f"logits in the scoring graph (max |Δ| = {gap:.2e}); export with `--lm-head-chunks 0`"
            )
        # Traced on a subset of the positions (t ≥ 2), as prep asks for the response tokens.
        from_t2 = torch.ones_like(example[0])
        from_t2[:, 1] = 0
        example = (*example, loss_positions(from_t2))
        m = Dim("M", min=1)
        dynamic = (*dynamic, {0: m})
    packed = tuple(pack_pairs(*example).values()) if shared_prefix else None
    t0 = time.time()
    with scoring_attention(untied, scorer, example, attention, packed) as (attention, translation, packed):
        if packed is not None:
            b, s = Dim("B", min=1), Dim("S", min=3)
            example, dynamic = (*example, *packed), (*dynamic, {0: b, 1: s}, {0: b, 1: s}, {0: b, 1: s}, {0: m})
        if lm_head_chunks > 0:
            translation = {**(translation or {}), **projection.onnx_translation()}
        program = torch.onnx.export(
            scorer, example, dynamic_shapes=dynamic, dynamo=True, external_data=False, optimize=False,
            custom_translation_table=translation,
        )  # fmt: skip
    log(f"reference graph exported in {time.time() - t0:.1f}s (attention: {attention}"
        f"{'; each pair prefix shared, packed rows' if packed is not None else ''})")
    params = {name for name, _ in untied.named_parameters()}
    model = finish_onnx(program, params, [name for name, _, _ in REFERENCE_OUTPUTS], optimize)
    import onnx_ir as ir

    proto = ir.serde.serialize_model(model)
    loops = projection.loop_sliced_scores(proto)
    make_k_an_input(proto)
    transposes = transposed_weight_products(proto, params)
    scalings = scaled_products(proto)
    log(f"{transposes} weight transposes and {scalings} scalings folded into their products"
        + (f"; the output projection's {lm_head_chunks} slices are one Loop" if loops else ""))
    point_params_at_safetensors(proto, params, params_path, tied_alias_map(untied))
    proto.graph.ClearField("value_info")
    onnx.save(proto, out)
    return attention, packed is not None


@contextlib.contextmanager
def scoring_attention(untied, scorer, example, attention: str, packed=None):
    """Within: `untied` traced with the `attention` asked for if its architecture allows it;
    yields (the attention used, torch.onnx's custom translation table for it, `packed` if the
    graph takes the packed rows: the kernel with the branch mask as its attention_bias, the
    outputs on them matching the eager model's on the plain rows; else None)."""
    import torch

    from . import attention as fused

    reason = fused.unsupported_reason(untied) if attention == "fused" else None
    if attention != "fused" or reason is not None:
        if reason is not None:
            log(f"scoring attention: eager ({reason})")
        if packed is not None:
            log("scoring graph: two rows per pair (the shared prefix needs the attention kernel)")
        yield "eager", None, None
        return
    fused.register()
    previous = untied.config._attn_implementation
    with torch.no_grad():
        eager = scorer(*example)
    untied.config._attn_implementation = fused.FUSED
    try:
        with contextlib.ExitStack() as stack:
            stack.callback(fused.forget_packed_masks)
            try:
                # Packed rows keep the rotary in the graph: the kernel's reads positions 0…S − 1.
                got = kernel_rotary(untied, scorer, example, eager) if packed is None else None
                if got is not None:  # the trace repeats the eager pass's decision (tracing has no values)
                    stack.enter_context(fused.rotary_in_kernel(untied, trace=True))
                else:
                    with torch.no_grad():
                        got = scorer(*example, *(packed or ()))
            except fused.KernelUnsupported as e:
                untied.config._attn_implementation = previous
                log(f"scoring attention: eager ({e})")
                yield "eager", None, None
                return
            gap = real_position_gap(eager, got, example[1])
            if gap > 1e-4:
                fail(
                    f"{type(untied).__name__}: causal attention without the padding mask differs from the model's "
                    f"attention at real tokens{' over packed rows' if packed else ''} (max |Δ| = {gap:.2e}); export "
                    f"with `--scoring-attention eager`{' or `--scoring-shared-prefix off`' if packed else ''}"
                )
            fused.forget_packed_masks()  # the trace makes its own
            yield "fused", fused.onnx_translation(), packed
    finally:
        untied.config._attn_implementation = previous


def kernel_rotary(untied, scorer, example, eager):
    """The fused scorer's outputs with the rotary embedding left to the kernel
    (attention.rotary_in_kernel) if every attention layer's rotary call has the plain form and
    the outputs match the eager model's at real tokens; else None (the rotary stays in the
    graph)."""
    import torch

    from . import attention as fused

    layers = len(fused.attention_layers(untied))
    try:
        with fused.rotary_in_kernel(untied) as count, torch.no_grad():
            got = scorer(*example)
    except fused.KernelUnsupported:  # the kernel does not fit this model at all (scoring_attention)
        raise
    except Exception as e:  # the kernel's rotary does not fit this model's: keep the model's
        log(f"scoring attention: the rotary embedding stays in the graph ({type(e).__name__}: {e})")
        return None
    if count.held_back != layers or count.left:
        if count.held_back or count.left:
            log(f"scoring attention: the rotary embedding stays in the graph ({count.held_back} of {layers} "
                f"layers' calls in the kernel's form, {count.left} not)")  # fmt: skip
        return None
    gap = real_position_gap(eager, got, example[1])
    if gap > 1e-4:
        log(f"scoring attention: the rotary embedding stays in the graph (in the kernel max |Δ| = {gap:.2e})")
        return None
    return got


def real_position_gap(a, b, attention_mask) -> float:
    """Largest |a − b| of the scoring outputs (token and top-K log-probs) at real tokens."""
    real = attention_mask.bool()
    return max(float((x[real].float() - y[real].float()).abs().max()) for x, y in zip(a[:2], b[:2]))


def tied_alias_map(untied) -> dict[str, str]:
    return getattr(untied, "_edpo_tied", {})


def make_k_an_input(proto) -> None:
    """Replace the traced constant K of the TopK nodes (the dense graph's one, or the one in the
    body of the output projection's Loop, projection.py) by the scalar int64 graph input `k`."""
    from onnx import TensorProto, helper, numpy_helper

    topk = [n for g in graphs_within(proto.graph) for n in g.node if n.op_type == "TopK"]
    if not topk:
        raise RuntimeError("expected a TopK node in the scoring graph, found none")
    proto.graph.input.append(helper.make_tensor_value_info("k", TensorProto.INT64, []))
    shape = numpy_helper.from_array(__import__("numpy").array([1], dtype="int64"), "edpo_k_shape")
    proto.graph.initializer.append(shape)
    proto.graph.node.insert(0, helper.make_node("Reshape", ["k", "edpo_k_shape"], ["edpo_k_1d"]))
    old_ks = {node.input[1] for node in topk}
    for node in topk:
        node.input[1] = "edpo_k_1d"
    used = {i for g in graphs_within(proto.graph) for n in g.node for i in n.input}
    unused = old_ks - used
    if unused:
        keep = [t for t in proto.graph.initializer if t.name not in unused]
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(keep)
        kept_nodes = [n for n in proto.graph.node if not (n.op_type == "Constant" and set(n.output) & unused)]
        del proto.graph.node[:]
        proto.graph.node.extend(kept_nodes)
    for out in proto.graph.output:
        dims = out.type.tensor_type.shape.dim
        if len(dims) == 3:
            dims[2].ClearField("dim_value")
            dims[2].dim_param = "K"


def graphs_within(graph) -> list:
    """`graph` and every subgraph of its nodes (Loop and If bodies), depth first."""
    out = [graph]
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                out.extend(graphs_within(sub))
    return out


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
