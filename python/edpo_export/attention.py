"""The scoring graph's attention as one ONNX Runtime kernel: com.microsoft GroupQueryAttention
(causal; the grouped K/V heads read as they are, not expanded to every query head; the softmax
over each query's causal prefix only, no additive mask) instead of the eager chain Q·Kᵀ, scale,
+ [rows, 1, T, T] mask, softmax, ·V.

Causal attention without a padding mask gives every real token of a right-padded row the same
value as the masked one (its keys are the tokens before it, none of them padding); the values at
padding positions differ, and nothing reads them (edpo pads rows on the right, batch.rs, and
scores only label positions). The joint graph keeps the eager chain: the kernel has no gradient.

In PyTorch the kernel is the custom op `edpo::causal_gqa`, registered as a transformers attention
implementation (FUSED) for the trace; its ONNX translation is the contrib op.
"""

# No `from __future__ import annotations`: torch.library reads the custom op's annotations.

FUSED = "edpo_causal_gqa"
_registered = False


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
    layers = [m for m in model.modules() if hasattr(m, "num_key_value_groups") and hasattr(m, "scaling")]
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
    """Registers `edpo::causal_gqa` and the FUSED attention implementation (once)."""
    global _registered
    if _registered:
        return
    import torch
    from transformers import AttentionInterface

    @torch.library.custom_op("edpo::causal_gqa", mutates_args=())
    def causal_gqa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, num_heads: int, kv_num_heads: int,
                   scale: float) -> torch.Tensor:  # fmt: skip
        """query [B, S, N·D], key and value [B, S, G·D] → [B, S, N·D]: causal attention of N
        query heads over G key-value heads (GroupQueryAttention's layout)."""
        b, s, _ = query.shape
        d = query.shape[-1] // num_heads

        def heads(x, n):
            return x.reshape(b, s, n, d).transpose(1, 2)

        k = heads(key, kv_num_heads).repeat_interleave(num_heads // kv_num_heads, dim=1)
        v = heads(value, kv_num_heads).repeat_interleave(num_heads // kv_num_heads, dim=1)
        scores = torch.matmul(heads(query, num_heads), k.transpose(2, 3)) * scale
        future = torch.ones(s, s, dtype=torch.bool, device=query.device).triu(1)
        probs = torch.softmax(scores.float().masked_fill(future, float("-inf")), dim=-1).to(query.dtype)
        return torch.matmul(probs, v).transpose(1, 2).reshape(b, s, num_heads * d)

    @causal_gqa.register_fake
    def _(query, key, value, num_heads, kv_num_heads, scale):
        return torch.empty_like(query)

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        used = [k for k in ("sliding_window", "softcap", "s_aux", "position_bias") if kwargs.get(k) is not None]
        if used or dropout:
            raise ValueError(f"{type(module).__name__} passes {used or ['dropout']}, which the causal kernel does not take")
        b, n, s, d = query.shape
        g = key.shape[1]
        scale = float(scaling if scaling is not None else d**-0.5)

        def packed(x):
            return x.transpose(1, 2).reshape(b, s, x.shape[1] * d)

        out = torch.ops.edpo.causal_gqa(packed(query), packed(key), packed(value), n, g, scale)
        return out.reshape(b, s, n, d), None

    AttentionInterface.register(FUSED, attention)
    _registered = True


def onnx_translation() -> dict:
    """{the custom op: its ONNX function}, for torch.onnx.export's custom_translation_table."""
    import onnx
    import onnxscript
    import torch
    from onnxscript import opset18 as op

    gqa = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "GroupQueryAttention", gqa_schema())

    def causal_gqa(query, key, value, num_heads: int, kv_num_heads: int, scale: float):
        rows = op.Shape(query, start=0, end=1)
        length = op.Cast(op.Shape(query, start=1, end=2), to=onnx.TensorProto.INT32)
        # Every row taken as full length (seqlens_k = T − 1, total length T), no past keys.
        one = op.Cast(op.Constant(value_ints=[1]), to=onnx.TensorProto.INT32)
        seqlens_k = op.Expand(op.Sub(length, one), rows)
        total = op.Reshape(length, op.Constant(value_ints=[]))
        out, _, _ = gqa(query, key, value, None, None, seqlens_k, total, num_heads=num_heads, kv_num_heads=kv_num_heads,
                        scale=scale)  # fmt: skip
        return out

    return {torch.ops.edpo.causal_gqa.default: causal_gqa}


def gqa_schema():
    """The inputs, outputs and attributes of com.microsoft GroupQueryAttention that this module
    uses (ONNX Runtime's contrib schema is not in the onnx package)."""
    from onnx.defs import OpSchema

    optional = OpSchema.FormalParameterOption.Optional

    def param(name, types, option=OpSchema.FormalParameterOption.Single):
        return OpSchema.FormalParameter(name, types, "", param_option=option)

    inputs = [param("query", "T"), param("key", "T", optional), param("value", "T", optional),
              param("past_key", "T", optional), param("past_value", "T", optional),
              param("seqlens_k", "M"), param("total_sequence_length", "M")]  # fmt: skip
    outputs = [param("output", "T"), param("present_key", "T"), param("present_value", "T")]
    attributes = [OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, ""),
                  OpSchema.Attribute("kv_num_heads", OpSchema.AttrType.INT, ""),
                  OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "")]  # fmt: skip
    return OpSchema(
        "GroupQueryAttention", "com.microsoft", 1, inputs=inputs, outputs=outputs,
        type_constraints=[("T", ["tensor(float)"], ""), ("M", ["tensor(int32)"], "")], attributes=attributes,
    )  # fmt: skip
