"""The scoring graph's output projection over the scored positions as one ONNX Loop over row
slices: slice c of the positions → logits (Gemm with the [V, H] weight) → log-softmax → the
label's log-prob and the top-K, one slice at a time, so at most one [M/C, V] slice of logits is
alive.

Traced as C unrolled slices, the graph had C Gemm nodes reading the same weight, and ONNX
Runtime pre-packs a constant weight once per node that reads it (then keeps one copy): with
the then-default 16 slices, 16 pre-packs of SmolLM2's 113 MB projection, 1.2 s of its 2.3 s
session creation. The Loop's body
has one Gemm, pre-packed once; its kernels and their order are the unrolled slices', so the
outputs are the same bits.

In PyTorch the slices are the custom op `edpo::sliced_scores` (for the eager checks: the same
slices in a Python loop); its ONNX translation is a placeholder node (`edpo.export` domain)
that `loop_sliced_scores` replaces by the Loop once the graph is serialized.
"""

# No `from __future__ import annotations`: torch.library reads the custom op's annotations.

PLACEHOLDER_DOMAIN = "edpo.export"
PLACEHOLDER = "SlicedScores"
_registered = False


def register() -> None:
    """Registers `edpo::sliced_scores` (once)."""
    global _registered
    if _registered:
        return
    import torch

    from .objective import at_least_fp32

    @torch.library.custom_op("edpo::sliced_scores", mutates_args=())
    def sliced_scores(h: torch.Tensor, y: torch.Tensor, w: torch.Tensor, chunks: int,
                      k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """h [P, H] (P = chunks · size), y [P], w [V, H] → the label log-prob [P] and the top-k
        log-probs [P, k] and ids [P, k] of every row, `chunks` slices of rows at a time."""
        size = h.shape[0] // chunks
        tok, vals, ids = [], [], []
        for c in range(chunks):
            rows = slice(c * size, (c + 1) * size)
            logp = torch.log_softmax(at_least_fp32(torch.nn.functional.linear(h[rows], w)), dim=-1)
            tok.append(logp.gather(-1, y[rows].unsqueeze(-1)).squeeze(-1))
            v, i = torch.topk(logp, k, dim=-1)
            vals.append(v)
            ids.append(i)
        return torch.cat(tok), torch.cat(vals), torch.cat(ids)

    @sliced_scores.register_fake
    def _(h, y, w, chunks, k):
        out = at_least_fp32(h.new_empty(0)).dtype
        p = h.shape[0]
        return h.new_empty(p, dtype=out), h.new_empty(p, k, dtype=out), y.new_empty(p, k)

    _registered = True


def onnx_translation() -> dict:
    """{the custom op: the placeholder node}, for torch.onnx.export's custom_translation_table."""
    import onnxscript
    import torch

    placeholder = onnxscript.values.Op(onnxscript.values.Opset(PLACEHOLDER_DOMAIN, 1), PLACEHOLDER, _schema())

    def sliced_scores(h, y, w, chunks: int, k: int):
        return placeholder(h, y, w, chunks=chunks, k=k)

    return {torch.ops.edpo.sliced_scores.default: sliced_scores}


def _schema():
    from onnx.defs import OpSchema

    def param(name, types):
        return OpSchema.FormalParameter(name, types, "")

    return OpSchema(
        PLACEHOLDER, PLACEHOLDER_DOMAIN, 1,
        inputs=[param("h", "T"), param("y", "I"), param("w", "T")],
        outputs=[param("token_logps", "F"), param("topk_logps", "F"), param("topk_ids", "I")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
                          ("F", ["tensor(float)"], ""), ("I", ["tensor(int64)"], "")],
        attributes=[OpSchema.Attribute("chunks", OpSchema.AttrType.INT, ""), OpSchema.Attribute("k", OpSchema.AttrType.INT, "")],
    )  # fmt: skip


def loop_sliced_scores(proto) -> int:
    """Replaces every placeholder node of `proto` by its Loop (module doc); returns how many.
    The body's TopK takes the traced k as a constant (make_k_an_input turns it into the input)."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = proto.graph
    # The weight is a graph input or an initializer here, as parameters are at this stage.
    weight_types = {t.name: t.data_type for t in graph.initializer}
    weight_types.update({v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info]})
    replaced = 0
    for node in [n for n in graph.node if n.domain == PLACEHOLDER_DOMAIN and n.op_type == PLACEHOLDER]:
        index = list(graph.node).index(node)
        attrs = {a.name: a.i for a in node.attribute}
        h, y, w = node.input
        if w not in weight_types:
            raise RuntimeError(f"the output projection's weight `{w}` has no known type in the scoring graph")
        pre = f"edpo_sliced_scores_{replaced}"
        consts = {
            f"{pre}_chunks": np.array([attrs["chunks"]], np.int64),
            f"{pre}_trip": np.array(attrs["chunks"], np.int64),
            f"{pre}_k": np.array([attrs["k"]], np.int64),
            f"{pre}_axis0": np.array([0], np.int64),
            f"{pre}_last": np.array([-1], np.int64),
        }
        graph.initializer.extend(numpy_helper.from_array(v, name) for name, v in consts.items())
        size = f"{pre}_size"
        outer = [
            helper.make_node("Shape", [h], [f"{pre}_rows"], start=0, end=1),
            helper.make_node("Div", [f"{pre}_rows", f"{pre}_chunks"], [size]),
        ]
        stacked = [f"{pre}_tok", f"{pre}_vals", f"{pre}_ids"]
        loop = helper.make_node(
            "Loop", [f"{pre}_trip", ""], stacked, name=f"{pre}_loop",
            body=_body(pre, h, y, w, size, weight_types[w]),
        )  # fmt: skip
        # Scan outputs stack the slices: [C, size(, K)] → [P(, K)].
        flat = [
            helper.make_node("Reshape", [stacked[0], f"{pre}_last"], [node.output[0]]),
            helper.make_node("Flatten", [stacked[1]], [node.output[1]], axis=2),
            helper.make_node("Flatten", [stacked[2]], [node.output[2]], axis=2),
        ]
        graph.node.remove(node)
        for offset, new in enumerate([*outer, loop, *flat]):
            graph.node.insert(index + offset, new)
        replaced += 1
    if replaced:
        keep = [o for o in proto.opset_import if o.domain != PLACEHOLDER_DOMAIN]
        del proto.opset_import[:]
        proto.opset_import.extend(keep)
        kept = [f for f in proto.functions if f.domain != PLACEHOLDER_DOMAIN]
        del proto.functions[:]
        proto.functions.extend(kept)
    return replaced


def _body(pre: str, h: str, y: str, w: str, size: str, w_type: int):
    """One slice: rows [i·size, (i+1)·size) of h and y → label log-prob, top-k log-probs and ids
    (h, y, w and size from the outer graph)."""
    from onnx import TensorProto, helper

    logits = f"{pre}_b_logits"
    nodes = [
        helper.make_node("Unsqueeze", [f"{pre}_b_i", f"{pre}_axis0"], [f"{pre}_b_i1"]),
        helper.make_node("Mul", [f"{pre}_b_i1", size], [f"{pre}_b_start"]),
        helper.make_node("Add", [f"{pre}_b_start", size], [f"{pre}_b_end"]),
        helper.make_node("Slice", [h, f"{pre}_b_start", f"{pre}_b_end", f"{pre}_axis0"], [f"{pre}_b_h"]),
        helper.make_node("Slice", [y, f"{pre}_b_start", f"{pre}_b_end", f"{pre}_axis0"], [f"{pre}_b_y"]),
        helper.make_node("Gemm", [f"{pre}_b_h", w], [logits if w_type == TensorProto.FLOAT else f"{pre}_b_raw"], transB=1),
    ]
    if w_type != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", [f"{pre}_b_raw"], [logits], to=TensorProto.FLOAT))
    nodes += [
        helper.make_node("LogSoftmax", [logits], [f"{pre}_b_logp"], axis=-1),
        helper.make_node("Unsqueeze", [f"{pre}_b_y", f"{pre}_last"], [f"{pre}_b_y1"]),
        helper.make_node("GatherElements", [f"{pre}_b_logp", f"{pre}_b_y1"], [f"{pre}_b_tok1"], axis=-1),
        helper.make_node("Squeeze", [f"{pre}_b_tok1", f"{pre}_last"], [f"{pre}_b_tok"]),
        helper.make_node("TopK", [f"{pre}_b_logp", f"{pre}_k"], [f"{pre}_b_vals", f"{pre}_b_ids"], axis=-1, largest=1, sorted=1),
        helper.make_node("Identity", [f"{pre}_b_cond"], [f"{pre}_b_cond_out"]),
    ]  # fmt: skip
    return helper.make_graph(
        nodes, f"{pre}_body",
        [helper.make_tensor_value_info(f"{pre}_b_i", TensorProto.INT64, []),
         helper.make_tensor_value_info(f"{pre}_b_cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info(f"{pre}_b_cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info(f"{pre}_b_tok", TensorProto.FLOAT, None),
         helper.make_tensor_value_info(f"{pre}_b_vals", TensorProto.FLOAT, None),
         helper.make_tensor_value_info(f"{pre}_b_ids", TensorProto.INT64, None)],
    )  # fmt: skip
