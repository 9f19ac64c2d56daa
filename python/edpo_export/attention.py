"""The scoring graph's attention as one ONNX Runtime kernel: com.microsoft GroupQueryAttention
(causal; the grouped K/V heads read as they are, not expanded to every query head; the softmax
over each query's causal prefix only, no additive mask) instead of the eager chain Q·Kᵀ, scale,
+ [rows, 1, T, T] mask, softmax, ·V.

Causal attention without a padding mask gives every real token of a right-padded row the same
value as the masked one (its keys are the tokens before it, none of them padding); the values at
padding positions differ, and nothing reads them (edpo pads rows on the right, batch.rs, and
scores only label positions). The joint graph keeps the eager chain: the kernel has no gradient.

Where the model's rotary embedding is transformers' plain form (rotate_half over the whole head,
cos/sin halves equal: Llama, Qwen2 and their kind), the kernel rotates queries and keys itself
(do_rotary, with the traced cos/sin rows as its caches), which removes the graph's
Slice/Neg/Concat/Mul/Add passes over them (`rotary_in_kernel`).

On packed rows (a scoring graph that shares each pair's prefix, objective.pack_pairs) the kernel
takes the branch mask as its attention_bias (`packed_bias`: rejected queries skip chosen keys)
and the rotary stays in the graph, at each token's position in its own row (the kernel's
rotary of a first prompt reads positions 0…S − 1 whatever position_ids says).

In PyTorch the kernel is the custom op `edpo::causal_gqa` (`edpo::causal_gqa_rotary`,
`edpo::causal_gqa_bias`), registered as a transformers attention implementation (FUSED) for the
trace; its ONNX translation is the contrib op.

The joint graph's attention (`block_causal`, registered as BLOCKED) is plain PyTorch, so its
backward is traced with it: the queries in B blocks along the sequence, block i's scores over the
keys up to its last query only — the causal square's blocks above the diagonal are never
computed, (B + 1)/(2B) of it is (5/8 at B = 4) — each with the causal mask of its own rows,
softmax, ·V, the blocks' outputs concatenated. It drops the padding mask as the kernel does (the
same values at real tokens of right-padded rows).
"""

# No `from __future__ import annotations`: torch.library reads the custom op's annotations.

import contextlib

FUSED = "edpo_causal_gqa"
BLOCKED = "edpo_block_causal"
_registered = False
# The number of query blocks `block_causal` splits the sequence into (set by `blocked_training`).
_blocks = [1]
# {(id(packed_branch), dtype): (packed_branch, its blocks' masks)} (`packed_masks`).
_packed_masks: dict = {}
# (cos, sin) of the rotary that `rotary_in_kernel` held back, for the attention call after it.
_unrotated: list = []


class KernelUnsupported(ValueError):
    """An attention call passes what the causal kernel does not take (the export falls back to
    the eager attention)."""


def unsupported_reason(model) -> str | None:
    """Why `model`'s attention cannot be the causal kernel (None if it can): the kernel has no
    sliding or chunked window, soft-capping or sinks, one head size for queries, keys and
    values, a multiple of 8 (ONNX Runtime refuses others when the graph runs)."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return f"config.sliding_window = {config.sliding_window}"
    for name in ("attn_logit_softcapping", "attention_chunk_size"):
        if getattr(config, name, None):
            return f"config.{name} = {getattr(config, name)}"
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        return f"config.layer_types has {sorted(kinds - {'full_attention'})}"
    layers = attention_layers(model)
    if not layers:
        return "no attention module takes transformers' attention interface"
    for m in layers:
        if not getattr(m, "is_causal", False) or hasattr(m, "sinks") or getattr(m, "sliding_window", None):
            return f"{type(m).__name__} is not plain causal attention"
        head = getattr(m, "head_dim", None)
        if head is None or head % 8 or getattr(m, "v_head_dim", head) != head:
            return f"{type(m).__name__}'s head size {head} (the kernel takes one, a multiple of 8)"
    return None


def register() -> None:
    """Registers `edpo::causal_gqa`, `edpo::causal_gqa_rotary` and the FUSED attention
    implementation (once)."""
    global _registered
    if _registered:
        return
    import torch
    from transformers import AttentionInterface

    def attend(query, key, value, num_heads, kv_num_heads, scale, rotary=None, bias=None):
        b, s, _ = query.shape
        d = query.shape[-1] // num_heads

        def heads(x, n):
            x = x.reshape(b, s, n, d).transpose(1, 2)
            if rotary is None:
                return x
            cos, sin = (torch.cat([c, c], dim=-1)[:s] for c in rotary)
            half = d // 2
            return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin

        k = heads(key, kv_num_heads).repeat_interleave(num_heads // kv_num_heads, dim=1)
        v = value.reshape(b, s, kv_num_heads, d).transpose(1, 2).repeat_interleave(num_heads // kv_num_heads, dim=1)
        scores = torch.matmul(heads(query, num_heads), k.transpose(2, 3)) * scale
        scores = scores if bias is None else scores + bias
        future = torch.ones(s, s, dtype=torch.bool, device=query.device).triu(1)
        probs = torch.softmax(scores.float().masked_fill(future, float("-inf")), dim=-1).to(query.dtype)
        return torch.matmul(probs, v).transpose(1, 2).reshape(b, s, num_heads * d)

    @torch.library.custom_op("edpo::causal_gqa", mutates_args=())
    def causal_gqa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, num_heads: int, kv_num_heads: int,
                   scale: float) -> torch.Tensor:  # fmt: skip
        """query [B, S, N·D], key and value [B, S, G·D] → [B, S, N·D]: causal attention of N
        query heads over G key-value heads (GroupQueryAttention's layout)."""
        return attend(query, key, value, num_heads, kv_num_heads, scale)

    @torch.library.custom_op("edpo::causal_gqa_rotary", mutates_args=())
    def causal_gqa_rotary(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor,
                          sin: torch.Tensor, num_heads: int, kv_num_heads: int, scale: float) -> torch.Tensor:  # fmt: skip
        """causal_gqa of query and key rotated first: position t's halves (x1, x2) of each head
        become (x1·cos − x2·sin, x2·cos + x1·sin) with cos, sin = row t of the [≥ S, D/2] caches
        (transformers' rotate_half form; GroupQueryAttention's do_rotary)."""
        return attend(query, key, value, num_heads, kv_num_heads, scale, (cos, sin))

    @torch.library.custom_op("edpo::causal_gqa_bias", mutates_args=())
    def causal_gqa_bias(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor,
                        num_heads: int, kv_num_heads: int, scale: float) -> torch.Tensor:  # fmt: skip
        """causal_gqa with `bias` [B, 1, S, S] added to the scores before the softmax
        (GroupQueryAttention's attention_bias): packed rows' branch mask (`packed_bias`)."""
        return attend(query, key, value, num_heads, kv_num_heads, scale, bias=bias)

    @causal_gqa.register_fake
    def _(query, key, value, num_heads, kv_num_heads, scale):
        return torch.empty_like(query)

    @causal_gqa_bias.register_fake
    def _(query, key, value, bias, num_heads, kv_num_heads, scale):
        return torch.empty_like(query)

    @causal_gqa_rotary.register_fake
    def _(query, key, value, cos, sin, num_heads, kv_num_heads, scale):
        return torch.empty_like(query)

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        rotary = _unrotated.pop() if _unrotated else None
        if rotary is not None and rotary[0].shape[-1] != query.shape[-1]:
            raise RuntimeError("a held-back rotary does not fit this attention call's head size")
        refuse_unsupported(module, dropout, kwargs, "the causal kernel")
        b, n, s, d = query.shape
        g = key.shape[1]
        scale = float(scaling if scaling is not None else d**-0.5)

        def packed(x):
            return x.transpose(1, 2).reshape(b, s, x.shape[1] * d)

        branch = kwargs.get("edpo_branch")
        if branch is not None:
            if rotary is not None:
                raise RuntimeError("packed rows keep the rotary embedding in the graph (the kernel's rotary "
                                   "reads positions 0…S − 1 of a first prompt, not position_ids)")  # fmt: skip
            bias = packed_bias(branch, query.dtype)
            out = torch.ops.edpo.causal_gqa_bias(packed(query), packed(key), packed(value), bias, n, g, scale)
        elif rotary is None:
            out = torch.ops.edpo.causal_gqa(packed(query), packed(key), packed(value), n, g, scale)
        else:
            cos, sin = (c[0, :, : d // 2] for c in rotary)
            out = torch.ops.edpo.causal_gqa_rotary(packed(query), packed(key), packed(value), cos, sin, n, g, scale)
        return out.reshape(b, s, n, d), None

    AttentionInterface.register(FUSED, attention)
    AttentionInterface.register(BLOCKED, block_causal)
    _registered = True


def block_causal(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention interface: query [B, N, T, D], key and value [B, G, T, D] →
    ([B, T, N, D], None), causal attention computed in `_blocks[0]` query blocks (module
    docstring). Block i holds the queries lo…hi − 1 (lo = i·T // blocks) and reads the keys
    0…hi − 1; its scores get the additive causal mask of its rows (the mask's minimum above the
    diagonal, as transformers' eager attention adds), so the values at every real token are the
    eager ones. With `edpo_branch` [B, T] (packed rows, objective.pack_pairs) the mask also
    hides the chosen branch's keys (1) from the rejected branch's queries (2): each packed
    token attends to exactly the tokens before it in its own row. The blocks are `split`s and
    key prefixes `cat`s of key blocks, whose backwards are a Concat and a Split (a slice's is a
    ScatterND into zeros of the whole tensor). The N/G query heads that share a key-value head
    are multiplied with it as one [N/G · q, D] block ([B, G, N/G · q, k] scores), so keys and
    values are never repeated per query head (transformers' `repeat_kv` copies them)."""
    import torch

    refuse_unsupported(module, dropout, kwargs, "block-causal attention")
    b, n, length, d = query.shape
    g = key.shape[1]
    grouped = query.reshape(b, g, n // g, length, d)  # head h = g·(N/G) + j, as repeat_kv orders them
    scale = scaling if scaling is not None else d**-0.5
    blocks = _blocks[0]
    bounds = [(i * length) // blocks for i in range(blocks + 1)]
    sizes = [hi - lo for lo, hi in zip(bounds[:-1], bounds[1:])]
    queries = grouped.split(sizes, dim=3)
    keys, values = (x.split(sizes, dim=2) for x in (key, value))
    branch = kwargs.get("edpo_branch")
    masks = packed_masks(branch, bounds, sizes, query.dtype) if branch is not None else None
    outputs = []
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        k, v = (torch.cat(x[: i + 1], dim=2) if i + 1 < blocks else y for x, y in ((keys, key), (values, value)))
        mask = masks[i] if masks is not None else additive(future_keys(lo, hi, query.device), query.dtype)
        rows = (n // g) * (hi - lo)  # no −1 in the reshapes: a block may be empty (T < blocks)
        scores = torch.matmul(queries[i].reshape(b, g, rows, d), k.transpose(2, 3)) * scale
        scores = scores.reshape(b, g, n // g, hi - lo, hi) + mask
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        outputs.append(torch.matmul(probs.reshape(b, g, rows, hi), v).reshape(b, n, hi - lo, d))
    out = torch.cat(outputs, dim=2) if blocks > 1 else outputs[0]
    return out.transpose(1, 2).contiguous(), None


def future_keys(lo, hi, device):
    """[q, k]: whether key 0…hi − 1 comes after query lo…hi − 1."""
    import torch

    return torch.arange(hi, device=device)[None, :] > torch.arange(lo, hi, device=device)[:, None]


def additive(hidden, dtype):
    """The additive mask of the boolean `hidden`: the dtype's minimum where set, else 0 (as
    transformers' eager attention adds)."""
    import torch

    return torch.zeros(hidden.shape, dtype=dtype, device=hidden.device).masked_fill(hidden, torch.finfo(dtype).min)


def packed_masks(branch, bounds: list, sizes: list, dtype) -> list:
    """The additive masks [B, 1, 1, q, k] of `block_causal`'s query blocks over packed rows
    (`branch`: objective.pack_pairs' packed_branch): block i's queries lo…hi − 1 against the keys
    0…hi − 1, the mask's minimum where the key comes after the query or a rejected query (2)
    meets a chosen key (1). Made at the first layer's call and the same tensors for every
    later one (`_packed_masks`, emptied when `blocked_training` ends), so the graph computes
    them once, not once per layer."""
    import torch

    key = (id(branch), dtype)
    if key in _packed_masks:
        return _packed_masks[key][1]
    rejected, chosen = (branch == 2).split(sizes, dim=1), branch == 1
    masks = []
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        seen = torch.cat(chosen.split(sizes, dim=1)[: i + 1], dim=1) if i + 1 < len(sizes) else chosen
        hidden = future_keys(lo, hi, branch.device) | (rejected[i][:, :, None] & seen[:, None, :])
        masks.append(additive(hidden[:, None, None], dtype))
    _packed_masks[key] = (branch, masks)  # the branch kept alive, so that its id is not reused
    return masks


def packed_bias(branch, dtype):
    """The kernel's attention_bias [B, 1, S, S] over packed rows (`branch`: objective.pack_pairs'
    packed_branch): the dtype's minimum where a rejected query (2) meets a chosen key (1), else 0
    (the kernel masks the keys after each query itself). Made at the first layer's call, the
    same tensor for every later one (`_packed_masks`, emptied by `forget_packed_masks`)."""
    key = (id(branch), dtype, "bias")
    if key not in _packed_masks:
        hidden = (branch == 2)[:, :, None] & (branch == 1)[:, None, :]
        _packed_masks[key] = (branch, additive(hidden[:, None], dtype))
    return _packed_masks[key][1]


def forget_packed_masks() -> None:
    """Empties the masks made for one trace (`packed_masks`, `packed_bias`)."""
    _packed_masks.clear()


def refuse_unsupported(module, dropout, kwargs: dict, by: str) -> None:
    """Raises KernelUnsupported if an attention call passes what plain causal attention (`by`:
    the kernel, or block_causal) does not take: a window, soft-capping, sinks, a position bias
    or dropout."""
    used = [k for k in ("sliding_window", "softcap", "s_aux", "position_bias") if kwargs.get(k) is not None]
    if used or dropout:
        raise KernelUnsupported(f"{type(module).__name__} passes {used or ['dropout']}, which {by} does not take")


@contextlib.contextmanager
def blocked_training(model, blocks: int):
    """Within: `model` attends with `block_causal` in `blocks` query blocks."""
    register()
    previous, _blocks[0] = _blocks[0], blocks
    implementation = model.config._attn_implementation
    model.config._attn_implementation = BLOCKED
    try:
        yield
    finally:
        model.config._attn_implementation = implementation
        _blocks[0] = previous
        forget_packed_masks()


class HeldBack:
    """What `rotary_in_kernel` did while it was entered: the rotary calls it held back for the
    kernel and the ones it left to the model (not in the plain form)."""

    def __init__(self):
        self.held_back = 0
        self.left = 0


@contextlib.contextmanager
def rotary_in_kernel(model, trace: bool = False):
    """Within: the attention modules' rotary embedding (the `apply_rotary_pos_emb` their forward
    calls) is left to the kernel (`causal_gqa_rotary`: GroupQueryAttention's do_rotary) where it
    has transformers' plain form — cos/sin [1, T, D] of a rotation over the whole head, D a
    multiple of 16 (ONNX Runtime's rotary), their two halves equal; other calls rotate as the
    model does. The halves are compared on real tensors; `trace` (tracing placeholders, no
    values) takes the form as checked by an eager pass before. Yields a HeldBack count.
    The export keeps it only if every layer's call was held back and the outputs match the
    eager model's (graphs.kernel_rotary)."""
    count = HeldBack()
    namespaces = {id(g): g for g in (type(m).forward.__globals__ for m in attention_layers(model))}
    patched = {}
    try:
        for key, namespace in namespaces.items():
            original = namespace.get("apply_rotary_pos_emb")
            if original is None:
                continue

            def held_back(q, k, cos, sin, *args, _original=original, **kwargs):
                d = q.shape[-1]
                plain = (not args and not kwargs and cos.dim() == 3 and cos.shape[0] == 1 and cos.shape == sin.shape
                         and cos.shape[-1] == d and d % 16 == 0 and (trace or halves_equal(cos, sin)))  # fmt: skip
                if not plain:
                    count.left += 1
                    return _original(q, k, cos, sin, *args, **kwargs)
                count.held_back += 1
                _unrotated.append((cos, sin))
                return q, k

            patched[key] = original
            namespace["apply_rotary_pos_emb"] = held_back
        yield count
    finally:
        _unrotated.clear()
        for key, original in patched.items():
            namespaces[key]["apply_rotary_pos_emb"] = original


def rotate_half_by_split(x):
    """transformers' `rotate_half` (cat(−x₂, x₁) of the last axis' halves) through one `split`:
    the same values, and in the joint graph its backward is one Concat, where the two slices'
    is a ScatterND into zeros between transposes of the whole [rows, heads, T, D] gradient."""
    import torch

    x1, x2 = torch.split(x, x.shape[-1] // 2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@contextlib.contextmanager
def rotary_by_split(model):
    """Within: the attention modules' `rotate_half` is `rotate_half_by_split`, where it computes
    the same values on a probe (an even head size); elsewhere the model's own. Yields the number
    of module namespaces patched."""
    import torch

    probe = torch.arange(2 * 3 * 4 * 8, dtype=torch.float32).reshape(2, 3, 4, 8)
    namespaces = {id(g): g for g in (type(m).forward.__globals__ for m in attention_layers(model))}
    patched = {}
    try:
        for key, namespace in namespaces.items():
            original = namespace.get("rotate_half")
            if original is None or not torch.equal(original(probe), rotate_half_by_split(probe)):
                continue
            patched[key] = original
            namespace["rotate_half"] = rotate_half_by_split
        yield len(patched)
    finally:
        for key, original in patched.items():
            namespaces[key]["rotate_half"] = original


def halves_equal(cos, sin) -> bool:
    """Whether cos and sin repeat their first half (transformers' rotate_half layout)."""
    import torch

    h = cos.shape[-1] // 2
    return bool(torch.equal(cos[..., :h], cos[..., h:]) and torch.equal(sin[..., :h], sin[..., h:]))


def attention_layers(model) -> list:
    """The modules that take transformers' attention interface."""
    return [m for m in model.modules() if hasattr(m, "num_key_value_groups") and hasattr(m, "scaling")]


def onnx_translation() -> dict:
    """{each custom op: its ONNX function}, for torch.onnx.export's custom_translation_table."""
    import onnx
    import onnxscript
    import torch
    from onnxscript import opset18 as op

    gqa = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "GroupQueryAttention", gqa_schema())

    def lengths(query):
        rows = op.Shape(query, start=0, end=1)
        length = op.Cast(op.Shape(query, start=1, end=2), to=onnx.TensorProto.INT32)
        # Every row taken as full length (seqlens_k = T − 1, total length T), no past keys.
        one = op.Cast(op.Constant(value_ints=[1]), to=onnx.TensorProto.INT32)
        return op.Expand(op.Sub(length, one), rows), op.Reshape(length, op.Constant(value_ints=[]))

    def causal_gqa(query, key, value, num_heads: int, kv_num_heads: int, scale: float):
        seqlens_k, total = lengths(query)
        out, _, _ = gqa(query, key, value, None, None, seqlens_k, total, None, None, num_heads=num_heads,
                        kv_num_heads=kv_num_heads, scale=scale, do_rotary=0, rotary_interleaved=0)  # fmt: skip
        return out

    def causal_gqa_rotary(query, key, value, cos, sin, num_heads: int, kv_num_heads: int, scale: float):
        seqlens_k, total = lengths(query)
        out, _, _ = gqa(query, key, value, None, None, seqlens_k, total, cos, sin, num_heads=num_heads,
                        kv_num_heads=kv_num_heads, scale=scale, do_rotary=1, rotary_interleaved=0)  # fmt: skip
        return out

    def causal_gqa_bias(query, key, value, bias, num_heads: int, kv_num_heads: int, scale: float):
        seqlens_k, total = lengths(query)
        out, _, _ = gqa(query, key, value, None, None, seqlens_k, total, None, None, None, bias, num_heads=num_heads,
                        kv_num_heads=kv_num_heads, scale=scale, do_rotary=0, rotary_interleaved=0)  # fmt: skip
        return out

    return {
        torch.ops.edpo.causal_gqa.default: causal_gqa,
        torch.ops.edpo.causal_gqa_rotary.default: causal_gqa_rotary,
        torch.ops.edpo.causal_gqa_bias.default: causal_gqa_bias,
    }


def gqa_schema():
    """The inputs, outputs and attributes of com.microsoft GroupQueryAttention that this module
    uses (ONNX Runtime's contrib schema is not in the onnx package)."""
    from onnx.defs import OpSchema

    optional = OpSchema.FormalParameterOption.Optional

    def param(name, types, option=OpSchema.FormalParameterOption.Single):
        return OpSchema.FormalParameter(name, types, "", param_option=option)

    inputs = [param("query", "T"), param("key", "T", optional), param("value", "T", optional),
              param("past_key", "T", optional), param("past_value", "T", optional),
              param("seqlens_k", "M"), param("total_sequence_length", "M"),
              param("cos_cache", "T", optional), param("sin_cache", "T", optional),
              param("position_ids", "P", optional), param("attention_bias", "T", optional)]  # fmt: skip
    outputs = [param("output", "T"), param("present_key", "T"), param("present_value", "T")]
    attributes = [OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, ""),
                  OpSchema.Attribute("kv_num_heads", OpSchema.AttrType.INT, ""),
                  OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, ""),
                  OpSchema.Attribute("do_rotary", OpSchema.AttrType.INT, ""),
                  OpSchema.Attribute("rotary_interleaved", OpSchema.AttrType.INT, "")]  # fmt: skip
    return OpSchema(
        "GroupQueryAttention", "com.microsoft", 1, inputs=inputs, outputs=outputs,
        type_constraints=[("T", ["tensor(float)"], ""), ("M", ["tensor(int32)"], ""), ("P", ["tensor(int64)"], "")], attributes=attributes,
    )  # fmt: skip
