"""The joint graph's recompute rewrites (remat.py): after them the backward pass reads recomputed
copies instead of the forward's tensors, and every output of the graph (loss, log-probs, ε-steps,
each gradient) is what the graph without them computes."""

import numpy as np
import pytest
from conftest import PY_ENV

from edpo_export.common import TRAIN_STAT_OUTPUTS, plain_gradient_feeds

STATS = [name for name, _, _ in TRAIN_STAT_OUTPUTS]


@pytest.fixture(scope="module")
def kept(tmp_path_factory, samples):
    """{arch: bundle exported with --recompute none}, exported on first use."""
    import edpo_export

    cache = {}

    def get(arch: str):
        if arch not in cache:
            out = tmp_path_factory.mktemp(f"bundle-{arch}-none")
            edpo_export.main([
                "--model", str(samples / "configs" / f"{arch}-tiny"), "--random-init", "0",
                "--out", str(out), "--topk-default", "8", "--recompute", "none",
            ])  # fmt: skip
            cache[arch] = out
        return cache[arch]

    return get


def rewritten(bundle, mode: str, tmp_path, elementwise: int = 0):
    """The bundle's joint graph with `mode`'s rewrite applied (as the exporter applies it:
    "attention" with the element-wise values, `elementwise` of them), saved next to nothing else."""
    import onnx_ir as ir

    from edpo_export.remat import checkpoint_layers, recompute_attention, recompute_elementwise

    model = ir.load(bundle / "policy.train.onnx")
    if mode == "attention":
        done, skipped = recompute_attention(model, STATS)
        assert skipped == 0
        recomputed = recompute_elementwise(model, STATS)
        assert recomputed == elementwise, f"{recomputed} element-wise values recomputed, expected {elementwise}"
        expected = 2 * attention_blocks(bundle)  # one softmax per layer and query block
    else:
        done = checkpoint_layers(model, STATS)
        expected = 2  # the tiny models' layers
    assert done == expected, f"{mode}: {done} rewritten, expected {expected}"
    path = tmp_path / f"{mode}.onnx"
    ir.save(model, path)
    return path


def attention_blocks(bundle) -> int:
    """The query blocks of the bundle's training attention (attention.block_causal)."""
    import json

    return json.loads((bundle / "edpo-model.json").read_text())["export"]["train_attention_blocks"]


def run_joint_graph(bundle, graph) -> dict:
    import json

    import onnxruntime as ort
    from safetensors.numpy import load_file

    manifest = json.loads((bundle / "edpo-model.json").read_text())
    spec = manifest["graphs"]["train"]
    goldens = load_file(bundle / "goldens.safetensors")
    params = load_file(bundle / "params.safetensors")
    feeds = {i["name"]: goldens[f"train.in.{i['name']}"] for i in spec["inputs"]}
    for graph_name, stored in spec["param_inputs"].items():
        feeds[graph_name] = params[stored]
    feeds.update(plain_gradient_feeds(spec, feeds))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def gates_after_optimisation(graph, tmp_path) -> tuple[int, int, int]:
    """(gates, element-wise gates, nodes) in ONNX Runtime's optimised form of `graph`: the
    `_rc_seed` nodes that make copies wait for the backward must survive its optimisers, or it
    merges the copies back."""
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.optimized_model_filepath = str(tmp_path / f"{graph.stem}.optimised.onnx")
    ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
    nodes = onnx.load(opts.optimized_model_filepath).graph.node
    gates = [n.name for n in nodes if n.name.endswith("_rc_seed")]
    return len(gates), sum(1 for name in gates if name.endswith("_ew_rc_seed")), len(nodes)


def forward_reads_of_backward(path) -> tuple[int, int]:
    """(forward activations the backward reads, forward Softmax outputs among them, looking
    through reshapes). Forward = the nodes the statistics outputs depend on; activations = float
    values with a batch- or length-dependent dimension (not the transposed weights)."""
    import onnx

    graph = onnx.load(path).graph
    producer = {out: node for node in graph.node for out in node.output}
    forward, stack = set(), [o.name for o in graph.output if o.name in STATS]
    while stack:
        node = producer.get(stack.pop())
        if node is not None and id(node) not in forward:
            forward.add(id(node))
            stack.extend(node.input)
    floats = {v.name for v in [*graph.value_info, *graph.output]
              if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
              and any(d.dim_param for d in v.type.tensor_type.shape.dim)}  # fmt: skip
    read = {name for node in graph.node if id(node) not in forward for name in node.input
            if name in producer and id(producer[name]) in forward and name in floats}  # fmt: skip
    probs = set()
    for node in graph.node:
        if node.op_type == "Softmax":
            probs.add(node.output[0])
    changed = True
    while changed:  # forward views of the probabilities
        views = {n.output[0] for n in graph.node if id(n) in forward and n.op_type in ("Reshape", "Identity") and n.input[0] in probs}
        changed = not views <= probs
        probs |= views
    return len(read), len(read & probs)


# The copies compute the same numbers with the same kernels, so these come out bit for bit.
# GPT-2 with layer copies: even its forward outputs move in the last bits, though the rewrite
# leaves the forward's nodes as they were — ONNX Runtime optimises that forward differently
# once the backward no longer reads its inside.
BIT_IDENTICAL = {("llama", "attention"), ("llama", "layers"), ("gpt2", "attention")}
# Element-wise values recomputed (recompute_elementwise) and the copies' gates: per Llama layer
# the two RMSNorms' x·r and w·x·r and SwiGLU's SiLU(g) and SiLU(g)·u (3 gates: one per norm,
# one for the SwiGLU pair), and the final norm's x·r; per GPT-2 layer GELU's 0.5·x and
# 0.5·x·(1 + tanh(…)) (one gate; its LayerNorms are single nodes).
ELEMENTWISE = {"llama": (13, 7), "gpt2": (4, 2)}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_recomputed_graphs_give_the_same_outputs_and_keep_less(kept, arch, tmp_path):
    bundle = kept(arch)
    plain = bundle / "policy.train.onnx"
    reads_plain, probs_plain = forward_reads_of_backward(plain)
    assert probs_plain >= 2, "without the rewrite the backward reads each layer's attention probabilities"
    expected = run_joint_graph(bundle, plain)
    _, _, plain_nodes = gates_after_optimisation(plain, tmp_path)
    values, value_gates = ELEMENTWISE[arch]
    reads = {}
    for mode in ("attention", "layers"):
        graph = rewritten(bundle, mode, tmp_path, values)
        gates, elementwise_gates, nodes = gates_after_optimisation(graph, tmp_path)
        expected_gates = (2 * attention_blocks(bundle) + value_gates, value_gates) if mode == "attention" else (2, 0)
        assert (gates, elementwise_gates) == expected_gates and nodes > plain_nodes, (
            f"{mode}: {gates} gates ({elementwise_gates} element-wise), {nodes} vs {plain_nodes} nodes after ONNX Runtime's optimisers"
        )
        reads[mode], probs = forward_reads_of_backward(graph)
        assert probs == 0, f"{mode}: the backward still reads {probs} forward attention probabilities"
        got = run_joint_graph(bundle, graph)
        assert got.keys() == expected.keys()
        for name, value in expected.items():
            if value.dtype.kind != "f" or (arch, mode) in BIT_IDENTICAL:
                assert np.array_equal(got[name], value), f"{mode}: output {name} differs"
            else:
                rel = float(np.abs(got[name] - value).max() / max(float(np.abs(value).max()), 1e-30))
                assert rel < 1e-6, f"{mode}: output {name} differs by {rel:.2e} of its largest value"
    assert reads["attention"] <= reads_plain - values, f"attention: {reads['attention']} of {reads_plain} forward values still read"
    # Gradient checkpointing leaves the backward only what crosses between layers (and the
    # output head's values): measured 51 → 13 (llama), 43 → 8 (gpt2); the default rewrite
    # (attention and element-wise values) 29, 36.
    assert reads["layers"] < 0.35 * reads_plain, f"layers: {reads['layers']} of {reads_plain} forward values still read"


def test_export_with_layer_checkpointing_verifies(samples, tmp_path):
    """--recompute layers end to end: the exporter writes it into the manifest and the bundle
    passes verify (ONNX Runtime vs PyTorch float64 on the goldens)."""
    import json
    import subprocess
    import sys

    out = tmp_path / "bundle"
    export = [sys.executable, "-m", "edpo_export", "--model", str(samples / "configs" / "qwen2-tiny"), "--random-init", "0",
              "--out", str(out), "--topk-default", "8", "--recompute", "layers"]  # fmt: skip
    subprocess.run(export, check=True, env=PY_ENV, capture_output=True)
    settings = json.loads((out / "edpo-model.json").read_text())["export"]
    assert (settings["recompute"], settings["recomputed_layers"]) == ("layers", 2)
    verify = subprocess.run([sys.executable, "-m", "edpo_export", "--verify", str(out)], env=PY_ENV, capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
