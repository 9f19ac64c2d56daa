"""edpo_export: the three architectures export and verify; K = V gives the exact ε-step."""

import json
import shutil

import numpy as np
import pytest
import torch

from edpo_export.common import packed_feeds, plain_gradient_feeds
from edpo_export.goldens import golden_batch, perturbed
from edpo_export.graphs import ReferenceScorer, export_train_graph
from edpo_export.objective import exact_eps_dpo, full_logps_next, loss_positions
from edpo_export.verify import verify


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_export_then_verify_passes(exported, arch, capsys):
    bundle = exported(arch)
    assert verify(bundle) == 0
    text = capsys.readouterr().out
    assert "verify passed" in text and "FAIL" not in text
    manifest = json.loads((bundle / "edpo-model.json").read_text())
    # GPT-2's attention module is not transformers' grouped-query interface: eager.
    assert manifest["export"]["scoring_attention"] == ("eager" if arch == "gpt2" else "fused")
    # Weight transposes are folded into the products (Llama and Qwen2's nn.Linear; GPT-2's
    # Conv1D multiplies by W as it is).
    import onnx

    graph = onnx.load(bundle / manifest["graphs"]["reference"]["file"], load_external_data=False).graph
    weights = set(manifest["graphs"]["reference"]["weights"])
    assert not [n.name for n in graph.node if n.op_type == "Transpose" and n.input[0] in weights]
    fused = sum(n.op_type == "FusedMatMul" for n in graph.node)
    config = json.loads((bundle / "config.json").read_text())
    layers = config.get("num_hidden_layers", config.get("n_layer"))
    assert fused == (0 if arch == "gpt2" else 7 * layers), fused
    # Llama and Qwen2's scoring graph takes each pair's rows packed: the kernel's attention_bias
    # (input 10) hides chosen keys from rejected queries; the rotary stays in the graph, at each
    # token's position in its own row (rows_llama: the kernel's rotary).
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == (0 if arch == "gpt2" else layers)
    assert manifest["export"]["scoring_shared_prefix"] == (arch != "gpt2")
    assert all(len(n.input) == 11 and n.input[10] for n in gqa)
    assert all(next(a.i for a in n.attribute if a.name == "do_rotary") == 0 for n in gqa)
    packed_inputs = {"packed_ids", "packed_positions", "packed_branch", "hidden_at"}
    assert (packed_inputs <= {i["name"] for i in manifest["graphs"]["reference"]["inputs"]}) == (arch != "gpt2")
    # The output projection's slices are one Loop, so one Gemm reads (and pre-packs) its weight.
    from edpo_export.graphs import graphs_within

    (loop,) = [n for n in graph.node if n.op_type == "Loop"]
    (body,) = [a.g for a in loop.attribute if a.name == "body"]
    (head,) = [n.input[1] for n in body.node if n.op_type == "Gemm"]
    assert head in weights
    assert len([n for g in graphs_within(graph) for n in g.node if head in n.input]) == 1
    # The attention scale is the alpha of the products next to it: per layer the scores of the
    # forward pass and of their recomputation, and the two products of the scores' gradient.
    # The joint graph's attention runs in 4 query blocks (attention.block_causal): those four
    # products per block. GPT-2's attention module keeps the eager attention over the square.
    blocks = manifest["export"]["train_attention_blocks"]
    assert blocks == (1 if arch == "gpt2" else 4), blocks
    joint = onnx.load(bundle / manifest["graphs"]["train"]["file"], load_external_data=False).graph
    scaled = sum(n.op_type == "FusedMatMul" and any(a.name == "alpha" for a in n.attribute) for n in joint.node)
    assert scaled == 4 * layers * blocks, scaled
    assert sum(n.op_type == "Softmax" for n in joint.node) == 2 * layers * blocks  # forward + recomputation
    # rotate_half's backward is a Concat (attention.rotary_by_split), not the slices' ScatterND
    # into zeros between transposes of the whole [rows, heads, T, D] gradient.
    made_by = {o: n for n in joint.node for o in n.output}
    scattered = [n.name for n in joint.node if n.op_type == "ScatterND" and made_by.get(n.input[0]) is not None
                 and made_by[n.input[0]].op_type == "Transpose"
                 and len(next(a.ints for a in made_by[n.input[0]].attribute if a.name == "perm")) == 4]  # fmt: skip
    assert not scattered, scattered
    # The embeddings' gradients are scattered into their accumulators (with a tied output
    # projection's gradient added to the accumulator first): no zero [V, H] tensor, no [V, H]
    # sum of two raw gradients (graphs.accumulate_gradients).
    producers = {o: n for n in joint.node for o in n.output}
    accumulators = manifest["graphs"]["train"]["grad_accumulation"]["accumulators"]
    scattered = {out: producers[out] for out in accumulators if producers[out].op_type == "ScatterND"}
    assert len(scattered) == (2 if arch == "gpt2" else 1), sorted(scattered)  # GPT-2: tokens and positions
    for out, node in scattered.items():
        data = node.input[0]
        assert data == accumulators[out] or accumulators[out] in producers[data].input, (out, data)
    tied = manifest["tied"]
    if arch in ("qwen2", "gpt2"):
        # Tied embeddings: one stored tensor, two graph inputs, one summed gradient.
        assert len(tied) == 1, tied
        alias, stored = next(iter(tied.items()))
        assert manifest["graphs"]["train"]["param_inputs"][alias] == stored
        assert alias not in {p["name"] for p in manifest["params"]}
        # The graph sums the two gradients into the stored tensor's one output (verify checks it).
        grads = manifest["graphs"]["train"]["grad_outputs"]
        assert f"grad.{alias}" not in grads and grads[f"grad.{stored}"] == stored
        accumulators = manifest["graphs"]["train"]["grad_accumulation"]["accumulators"]
        assert set(accumulators) == set(grads)
    else:
        assert tied == {}
    steps = set(np.asarray(__import__("safetensors.numpy").numpy.load_file(bundle / "goldens.safetensors")["train.f64.steps"]).tolist())
    assert steps == {-1, 0, 1}, f"golden batch exercises every step value, got {steps}"


def test_a_folded_weight_transpose_gives_the_same_bits():
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from edpo_export.graphs import transposed_weight_products

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 64])
    w = helper.make_tensor_value_info("w", TensorProto.FLOAT, [48, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]), helper.make_node("MatMul", ["x", "wt"], ["y"])]
    proto = helper.make_model(helper.make_graph(nodes, "g", [x, w], [y]), opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((2, 5, 64), dtype=np.float32), "w": rng.standard_normal((48, 64), dtype=np.float32)}

    def run(model):
        # w as an initializer, as in the scoring graph (pre-packed by ONNX Runtime).
        model = onnx.ModelProto.FromString(model.SerializeToString())
        model.graph.initializer.append(onnx.numpy_helper.from_array(feeds["w"], "w"))
        del model.graph.input[1]
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": feeds["x"]})[0]

    before = run(proto)
    assert transposed_weight_products(proto, {"w"}) == 1
    assert [n.op_type for n in proto.graph.node] == ["FusedMatMul"]
    assert np.array_equal(run(proto), before)
    assert transposed_weight_products(proto, {"w"}) == 0


def test_a_folded_scaling_gives_the_same_bits():
    """Both forms of scaled_products: the scores' Reshape(MatMul)·s (bit for bit) and the
    gradient's Reshape(x·s) read by two products (a power-of-two scale: also bit for bit)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from edpo_export.graphs import scaled_products

    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info(n, f, s) for n, s in (("q", [6, 7, 8]), ("k", [6, 8, 7]), ("g", [2, 3, 7, 7]), ("v", [6, 7, 5]))]
    outputs = [helper.make_tensor_value_info(n, f, None) for n in ("scores", "dv", "dq")]
    s = helper.make_tensor("s", f, [], [0.125])
    shape4, shape3 = (helper.make_tensor(n, TensorProto.INT64, [len(v)], v) for n, v in (("shape4", [2, 3, 7, 7]), ("shape3", [6, 7, 7])))
    nodes = [
        helper.make_node("MatMul", ["q", "k"], ["qk"]),
        helper.make_node("Reshape", ["qk", "shape4"], ["qk4"]),
        helper.make_node("Mul", ["qk4", "s"], ["scores"]),
        helper.make_node("Mul", ["g", "s"], ["gs"]),
        helper.make_node("Reshape", ["gs", "shape3"], ["gs3"]),
        helper.make_node("MatMul", ["gs3", "v"], ["dv"]),
        helper.make_node("MatMul", ["k", "gs3"], ["dq"]),
    ]
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=[s, shape4, shape3])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    rng = np.random.default_rng(0)
    feeds = {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim], dtype=np.float32) for i in inputs}

    def run(model):
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)

    before = run(proto)
    assert scaled_products(proto) == 2
    assert sorted(n.op_type for n in proto.graph.node) == ["FusedMatMul"] * 3 + ["Reshape"] * 2
    assert all(next(a.f for a in n.attribute if a.name == "alpha") == 0.125 for n in proto.graph.node if n.op_type == "FusedMatMul")
    for a, b in zip(before, run(proto)):
        assert np.array_equal(a, b)
    assert scaled_products(proto) == 0


def test_verify_refuses_a_changed_file(exported, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(exported("llama"), bundle)
    data = bytearray((bundle / "params.safetensors").read_bytes())
    data[-1] ^= 0x55
    (bundle / "params.safetensors").write_bytes(bytes(data))
    with pytest.raises(SystemExit) as exc:
        verify(bundle)
    assert exc.value.code == 2


def test_scoring_graph_k_is_a_runtime_input(exported):
    import onnxruntime as ort

    bundle = exported("llama")
    sess = ort.InferenceSession(str(bundle / "reference.onnx"), providers=["CPUExecutionProvider"])
    ids = np.array([[1, 5, 9, 13, 2], [3, 4, 5, 6, 7]], dtype=np.int64)
    mask = np.ones_like(ids)
    every = np.array([r * 5 + t for r in range(2) for t in range(1, 5)], dtype=np.int64)
    for k in (1, 3, 512):
        feeds = {"input_ids": ids, "attention_mask": mask, "label_positions": every, "k": np.array(k, dtype=np.int64)}
        spec = json.loads((bundle / "edpo-model.json").read_text())["graphs"]["reference"]
        tok, vals, top = sess.run(None, {**feeds, **packed_feeds(spec, feeds)})
        assert vals.shape == (2, 5, k) and top.shape == (2, 5, k)
    # At K = V the top-K log-probs are the whole distribution: they sum to 1 in probability.
    assert np.allclose(np.exp(vals[:, 1:, :]).sum(-1), 1.0, atol=1e-5)


def test_full_vocabulary_cache_gives_the_exact_eps_step(exported):
    """K = V through the joint graph equals the paper's full-logit computation."""
    import onnxruntime as ort
    from safetensors.numpy import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    bundle = exported("llama")
    manifest = json.loads((bundle / "edpo-model.json").read_text())
    vocab = manifest["vocab_size"]
    params = load_file(bundle / "params.safetensors")
    config = AutoConfig.from_pretrained(bundle)
    policy = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    policy.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()}, strict=False)
    reference = perturbed(policy, 0.05, seed=3)
    ids, attn, loss_mask = golden_batch(vocab, seed=21, pairs=8, length=14, tie_last=False)
    with torch.no_grad():
        p_next = full_logps_next(policy, ids, attn)
        q_next = full_logps_next(reference, ids, attn)
        exact = exact_eps_dpo(p_next, q_next, ids, loss_mask, beta=0.1, epsilon=0.1)
        ref_tok, ref_topv, ref_topi = ReferenceScorer.build(reference, vocab)(ids, attn)
    feeds = {
        "input_ids": ids.numpy(), "attention_mask": attn.numpy(), "loss_mask": loss_mask.numpy(),
        "ref_logps": exact["ref_logps"].numpy(), "ref_token_logps": ref_tok.numpy(),
        "ref_topk_ids": ref_topi.numpy(), "ref_topk_logps": ref_topv.numpy(),
        "beta": np.array(0.1, np.float32), "epsilon": np.array(0.1, np.float32),
        "label_smoothing": np.array(0.0, np.float32), "step_tolerance": np.array(1e-6, np.float32),
        "grad_scale": np.array(1.0, np.float32),
        "label_positions": loss_positions(loss_mask).numpy(),
    }  # fmt: skip
    feeds.update(packed_feeds(manifest["graphs"]["train"], feeds))
    for graph_name, stored in manifest["graphs"]["train"]["param_inputs"].items():
        feeds[graph_name] = params[stored]
    feeds.update(plain_gradient_feeds(manifest["graphs"]["train"], feeds))
    sess = ort.InferenceSession(str(bundle / "policy.train.onnx"), providers=["CPUExecutionProvider"])
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    for name in ("logps", "logps_plus", "logps_minus"):
        np.testing.assert_allclose(out[name], exact[name].numpy(), atol=1e-4, err_msg=name)
    assert abs(float(out["loss"]) - float(exact["loss"])) < 1e-5
    assert out["steps"].tolist() == exact["steps"].tolist()
    assert set(out["steps"].tolist()) - {0}, "some pair takes a non-zero step"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("chunks", [4, 16])
def test_sliced_output_projection_matches_the_dense_loss_and_gradients(samples, arch, chunks):
    """EpsDpoLoss with the sliced lm_head (what the joint graph is traced from) against the
    dense [N, T, V] computation in eager PyTorch: same outputs, gradients to float rounding.
    The last slice is padded (checked below), so padded rows are exercised."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from edpo_export.objective import EpsDpoLoss

    cfg = AutoConfig.from_pretrained(samples / "configs" / f"{arch}-tiny")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager").eval()
    vocab = model.get_output_embeddings().weight.shape[0]
    ids, attn, loss_mask = golden_batch(vocab)
    n, t = ids.shape
    assert len(loss_positions(loss_mask)) % chunks != 0, "the last slice is padded"
    gen = torch.Generator().manual_seed(3)
    ref_tok = -torch.rand(n, t, generator=gen) * 5
    top_ids = torch.randint(0, vocab, (n, t, 8), generator=gen)
    top_vals = -torch.rand(n, t, 8, generator=gen) * 3 - 1
    scalars = [torch.tensor(v) for v in (0.1, 0.1, 0.1, 1e-6)]  # β, ε, λ (smoothing on), τ
    batch = (ids, attn, loss_mask, (ref_tok * loss_mask).sum(-1), ref_tok, top_ids, top_vals, *scalars)
    results = []
    for c in (0, chunks):
        model.zero_grad()
        out = EpsDpoLoss(model, c)(*batch)
        out[0].backward()
        results.append(([o.detach() for o in out], {k: p.grad.clone() for k, p in model.named_parameters()}))
    (dense, dense_grads), (sliced, sliced_grads) = results
    assert torch.allclose(dense[0], sliced[0], atol=1e-6)
    for a, b in zip(dense[1:4], sliced[1:4]):
        assert torch.allclose(a, b, atol=2e-5)
    assert torch.equal(dense[4], sliced[4])
    for name, g in dense_grads.items():
        rel = ((sliced_grads[name] - g).norm() / g.norm()).item()
        assert rel < 1e-5, f"{name}: relative gradient difference {rel:.2e}"


def test_export_refuses_slicing_a_model_whose_logits_are_not_the_plain_projection(samples, tmp_path, capsys):
    """A model that scales its logits (like soft-capping architectures) must not be exported
    with the sliced projection: export stops and names `--lm-head-chunks 0`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(samples / "configs" / "llama-tiny")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    plain_forward = model.forward

    def scaled_forward(*args, **kwargs):
        out = plain_forward(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out

    model.forward = scaled_forward
    ids, attn, loss_mask = golden_batch(512, seed=7, pairs=2, length=8, tie_last=False)
    example = (
        ids, attn, loss_mask, torch.zeros(4), torch.zeros(4, 8),
        torch.zeros(4, 8, 4, dtype=torch.int64), torch.zeros(4, 8, 4),
        torch.tensor(0.1), torch.tensor(0.1), torch.tensor(0.0), torch.tensor(1e-6), torch.tensor(1.0),
    )  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        export_train_graph(model, tmp_path / "t.onnx", False, example, 16)
    assert exc.value.code == 2
    assert "--lm-head-chunks 0" in capsys.readouterr().err


@pytest.fixture(scope="module")
def eager_llama(tmp_path_factory, samples):
    """The tiny Llama exported with transformers' eager attention in both graphs."""
    import edpo_export

    out = tmp_path_factory.mktemp("eager") / "bundle"
    edpo_export.main([
        "--model", str(samples / "configs" / "llama-tiny"), "--random-init", "0", "--out", str(out),
        "--topk-default", "8", "--scoring-attention", "eager", "--train-attention-blocks", "1",
    ])  # fmt: skip
    return out


@pytest.fixture(scope="module")
def rows_llama(tmp_path_factory, samples):
    """The tiny Llama exported with two rows per pair in both graphs (block-causal training
    attention; the scoring graph's kernel rotates queries and keys itself)."""
    import edpo_export

    out = tmp_path_factory.mktemp("rows") / "bundle"
    edpo_export.main([
        "--model", str(samples / "configs" / "llama-tiny"), "--random-init", "0", "--out", str(out),
        "--topk-default", "8", "--train-shared-prefix", "off", "--scoring-shared-prefix", "off",
    ])  # fmt: skip
    return out


def test_fused_scoring_attention_gives_the_eager_values_at_real_tokens(exported, eager_llama, rows_llama):
    """The default scoring graph (attention as ONNX Runtime's causal GroupQueryAttention, no padding
    mask; each pair's rows packed, their common prefix once) and its `--scoring-shared-prefix off`
    export (two rows per pair, the kernel's rotary) against an export with transformers' eager
    attention, on right-padded pairs' rows of different lengths — a shared prompt, a common
    start of the responses, rows that share no token, equal rows: the same log-probs and top-K at
    every real token."""
    import onnx
    import onnxruntime as ort

    packed, rows, eager = exported("llama"), rows_llama, eager_llama
    nodes = {path: onnx.load(path / "reference.onnx").graph.node for path in (packed, rows, eager)}
    gqa = {path: [n for n in nodes[path] if n.op_type == "GroupQueryAttention"] for path in nodes}
    assert gqa[packed] and gqa[rows] and not gqa[eager]
    # Two rows per pair: the kernel's rotary (do_rotary), no rotate_half (Neg) left in the graph.
    assert all(next(a.i for a in n.attribute if a.name == "do_rotary") == 1 for n in gqa[rows])
    assert not [n for n in nodes[rows] if n.op_type == "Neg"]
    for path, attention, shared in ((packed, "fused", True), (rows, "fused", False), (eager, "eager", False)):
        export = json.loads((path / "edpo-model.json").read_text())["export"]
        assert (export["scoring_attention"], export["scoring_shared_prefix"]) == (attention, shared)
    rng = np.random.default_rng(3)
    t, pairs = 13, 4
    ids = rng.integers(0, 500, size=(2 * pairs, t)).astype(np.int64)
    ids[pairs : pairs + 2, :5] = ids[:2, :5]  # pairs 0 and 1: a 5-token prompt
    ids[pairs + 1, 5:7] = ids[1, 5:7]  # pair 1: the responses' first 2 tokens equal too
    ids[2 * pairs - 1] = ids[pairs - 1]  # pair 3: equal rows (pair 2 shares nothing)
    lengths = [13, 9, 4, 11, 7, 12, 6, 11]
    mask = (np.arange(t)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": mask, "k": np.array(5, dtype=np.int64),
             "label_positions": loss_positions(torch.from_numpy(mask)).numpy()}  # fmt: skip
    spec = json.loads((packed / "edpo-model.json").read_text())["graphs"]["reference"]
    outs = {}
    for path in (packed, rows, eager):
        sess = ort.InferenceSession(str(path / "reference.onnx"), providers=["CPUExecutionProvider"])
        outs[path] = sess.run(None, {**feeds, **(packed_feeds(spec, feeds) if path == packed else {})})
    real = mask == 1
    for path in (packed, rows):
        (tok, vals, top), (tok_e, vals_e, top_e) = outs[path], outs[eager]
        assert np.abs(tok[real] - tok_e[real]).max() < 1e-5, path.name
        assert np.abs(vals[real] - vals_e[real]).max() < 1e-5, path.name
        assert np.array_equal(top[real], top_e[real]), path.name


def training_feeds(bundle, length: int, seed: int) -> dict:
    """A joint-graph batch of 3 pairs at `length`: right-padded rows (row 0 without padding,
    prompts of 1 to length/3 tokens, responses of at least one; pair 1's rejected row starts
    with another token, so its rows share no prefix; pair 2's rows are equal), made-up reference
    values, the packed inputs where the graph shares each pair's prefix, the bundle's parameters
    and zero gradient accumulators."""
    from safetensors.numpy import load_file

    manifest = json.loads((bundle / "edpo-model.json").read_text())
    rng = np.random.default_rng(seed)
    pairs, k, vocab = 3, 8, manifest["vocab_size"]
    ids = np.zeros((2 * pairs, length), np.int64)
    mask, loss_mask = np.zeros_like(ids), np.zeros_like(ids)
    for i in range(pairs):
        prompt = rng.integers(0, vocab, int(rng.integers(1, max(2, length // 3) + 1)))
        p = len(prompt)
        for row in (i, i + pairs):
            r = length - p if row == 0 else int(rng.integers(1, length - p + 1))
            ids[row, :p], ids[row, p : p + r] = prompt, rng.integers(0, vocab, r)
            mask[row, : p + r], loss_mask[row, p : p + r] = 1, 1
    ids[pairs + 1, 0] = (ids[1, 0] + 1) % vocab
    for x in (ids, mask, loss_mask):
        x[2 * pairs - 1] = x[pairs - 1]
    feeds = {
        "input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask,
        "ref_logps": rng.normal(-20, 3, 2 * pairs).astype(np.float32),
        "ref_token_logps": (-5 * rng.random((2 * pairs, length))).astype(np.float32),
        "ref_topk_ids": rng.integers(0, vocab, (2 * pairs, length, k)),
        "ref_topk_logps": -np.sort(8 * rng.random((2 * pairs, length, k)), axis=-1).astype(np.float32),
        "beta": np.array(0.1, np.float32), "epsilon": np.array(0.1, np.float32),
        "label_smoothing": np.array(0.0, np.float32), "step_tolerance": np.array(1e-6, np.float32),
        "grad_scale": np.array(1.0, np.float32),
        "label_positions": loss_positions(torch.from_numpy(loss_mask)).numpy(),
    }  # fmt: skip
    feeds.update(packed_feeds(manifest["graphs"]["train"], feeds))
    params = load_file(bundle / "params.safetensors")
    for graph_name, stored in manifest["graphs"]["train"]["param_inputs"].items():
        feeds[graph_name] = params[stored]
    feeds.update(plain_gradient_feeds(manifest["graphs"]["train"], feeds))
    return feeds


def test_blocked_training_attention_gives_the_eager_outputs_and_gradients(exported, eager_llama, rows_llama):
    """The default joint graph (causal attention in 4 query blocks, attention.block_causal; no
    padding mask; the query heads of a key-value head multiplied with it as one block; each
    pair's rows packed, their common prefix once) and its `--train-shared-prefix off` export
    (two rows per pair) against transformers' eager attention over the whole square on plain
    rows: every output — loss, log-probs, ε-steps, each gradient — agrees to float rounding
    (relative to its largest value) on right-padded batches, including lengths below the number
    of blocks (an empty first block), rows that share no prefix and equal rows."""
    import onnx
    import onnxruntime as ort

    packed = exported("llama")
    blocked = (packed, rows_llama)
    softmaxes = {path: sum(n.op_type == "Softmax" for n in onnx.load(path / "policy.train.onnx").graph.node)
                 for path in (*blocked, eager_llama)}  # fmt: skip
    # 2 layers × blocks × (forward, recomputation)
    assert softmaxes == {packed: 16, rows_llama: 16, eager_llama: 4}, softmaxes
    exports = {path: json.loads((path / "edpo-model.json").read_text())["export"] for path in (*blocked, eager_llama)}
    assert exports[eager_llama]["train_attention_blocks"] == 1 and not exports[eager_llama]["train_shared_prefix"]
    assert exports[packed]["train_shared_prefix"] and not exports[rows_llama]["train_shared_prefix"]
    assert exports[rows_llama]["train_attention_blocks"] == 4
    sessions = {path: ort.InferenceSession(str(path / "policy.train.onnx"), providers=["CPUExecutionProvider"])
                for path in (*blocked, eager_llama)}  # fmt: skip
    for length in (3, 4, 5, 8, 13, 21):
        outs = {}
        for path, sess in sessions.items():
            outs[path] = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, training_feeds(path, length, seed=length))))
        for path in blocked:
            assert outs[path].keys() == outs[eager_llama].keys()
            for name, want in outs[eager_llama].items():
                got = outs[path][name]
                if want.dtype.kind != "f":
                    assert np.array_equal(got, want), (path.name, length, name)
                    continue
                rel = float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-30))
                assert rel < 5e-6, f"{path.parent.name}, length {length}: {name} differs by {rel:.2e} of its largest value"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"sliding_window": 4}, "sliding_window"),
        ({"attention_chunk_size": 4}, "attention_chunk_size"),
        ({"layer_types": ["sliding_attention", "full_attention"]}, "layer_types"),
        ({"head_dim": 12}, "head size 12"),
    ],
)
def test_fused_scoring_attention_is_refused_where_the_kernel_does_not_apply(samples, change, reason):
    """The exporter keeps the eager chain (and says why) for attention the causal kernel does not
    compute: windows, per-layer kinds, head sizes ONNX Runtime's kernel refuses."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from edpo_export.attention import unsupported_reason

    config = AutoConfig.from_pretrained(samples / "configs" / "llama-tiny")
    assert unsupported_reason(AutoModelForCausalLM.from_config(config)) is None
    for key, value in change.items():
        setattr(config, key, value)
    got = unsupported_reason(AutoModelForCausalLM.from_config(config))
    assert got is not None and reason in got, got


def unequal_halves(rotary_forward):
    """A rotary embedding's forward whose cos/sin no longer repeat their first half."""

    def forward(*args, **kwargs):
        return tuple(c * torch.linspace(0.5, 1.5, c.shape[-1]) for c in rotary_forward(*args, **kwargs))

    return forward


def test_rotate_half_by_split_is_the_models_own_and_is_restored(samples):
    """Within `rotary_by_split` the model's rotate_half is the split form and its outputs and
    gradients are the model's own, bit for bit; afterwards the original is back."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from edpo_export import attention

    config = AutoConfig.from_pretrained(samples / "configs" / "llama-tiny")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    ids, attn, _ = golden_batch(config.vocab_size)
    namespace = type(attention.attention_layers(model)[0]).forward.__globals__
    original = namespace["rotate_half"]

    def logits_and_grad():
        model.zero_grad()
        logits = model(input_ids=ids, attention_mask=attn).logits
        logits.square().mean().backward()
        return logits.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()

    before = logits_and_grad()
    with attention.rotary_by_split(model) as patched:
        assert patched == 1 and namespace["rotate_half"] is attention.rotate_half_by_split
        within = logits_and_grad()
    assert namespace["rotate_half"] is original
    assert torch.equal(before[0], within[0]) and torch.equal(before[1], within[1])


@pytest.mark.parametrize("plain", [True, False])
def test_rotary_is_left_to_the_kernel_only_in_its_plain_form(samples, plain):
    """The scoring trace hands the rotary embedding to the kernel (GroupQueryAttention's
    do_rotary) where it is transformers' plain form, cos/sin halves equal; a rotary of another
    form (here cos/sin scaled along the head, halves unequal) stays the model's own. Either way
    the fused scorer gives the eager model's log-probs at real tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from edpo_export import attention

    config = AutoConfig.from_pretrained(samples / "configs" / "llama-tiny")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()
    if not plain:
        model.model.rotary_emb.forward = unequal_halves(model.model.rotary_emb.forward)
    ids, attn, _ = golden_batch(config.vocab_size)
    scorer = ReferenceScorer.build(model, 5)
    with torch.no_grad():
        eager = scorer(ids, attn)
        attention.register()
        model.config._attn_implementation = attention.FUSED
        with attention.rotary_in_kernel(model) as count:
            fused = scorer(ids, attn)
    layers = config.num_hidden_layers
    assert (count.held_back, count.left) == ((layers, 0) if plain else (0, layers))
    real = attn.bool()
    for a, b in zip(eager[:2], fused[:2]):
        assert (a[real] - b[real]).abs().max() < 1e-5
    assert torch.equal(eager[2][real][:, :3], fused[2][real][:, :3])


def test_a_rotary_not_in_the_plain_form_exports_without_the_kernels_rotary(samples, tmp_path, monkeypatch):
    """Exporting a model whose rotary is not the plain form (the eager pass decides; the trace,
    which has no values to compare, repeats that decision): the attention kernel without
    do_rotary, the model's own rotary in the graph, and verify passes."""
    import onnx
    from transformers.models.llama import modeling_llama

    import edpo_export

    plain_forward = modeling_llama.LlamaRotaryEmbedding.forward
    monkeypatch.setattr(
        modeling_llama.LlamaRotaryEmbedding, "forward",
        lambda self, *a, **kw: unequal_halves(plain_forward.__get__(self))(*a, **kw),
    )  # fmt: skip
    out = tmp_path / "bundle"
    edpo_export.main([
        "--model", str(samples / "configs" / "llama-tiny"), "--random-init", "0", "--out", str(out), "--topk-default", "8",
        "--scoring-shared-prefix", "off",  # packed rows keep the rotary in the graph anyway
    ])  # fmt: skip
    graph = onnx.load(out / "reference.onnx", load_external_data=False).graph
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert gqa and all(next(a.i for a in n.attribute if a.name == "do_rotary") == 0 for n in gqa)
    assert [n for n in graph.node if n.op_type == "Neg"], "rotate_half stays in the graph"
    assert verify(out) == 0
