"""Rewrites of the joint forward+backward graph that trade compute for memory: the backward pass
reads copies of forward values recomputed when it needs them, instead of the forward's own
tensors kept alive from the forward pass to the backward.

Two granularities: `recompute_attention` (each layer's attention probabilities, the one
[rows, heads, T, T] tensor per layer) with `recompute_elementwise` (values a few element-wise
products away from values the backward keeps anyway: an RMSNorm's normalised input and output,
SwiGLU's SiLU(gate) and SiLU(gate)·up), the default; and `checkpoint_layers` (every value inside
a decoder layer but its inputs, as Hugging Face's gradient checkpointing; an export option).

ONNX Runtime would undo a plain copy: its common-subexpression pass merges two nodes with the
same inputs, and nothing would stop it from running the copy during the forward pass. So the
copied nodes read their activation inputs (Q for the attention copy; every float input from
outside the layer for a layer copy; for an element-wise copy, the smallest input every copied
node depends on) through `x + 0·max(g)`, g a value of the backward pass found
next to the nodes the copy serves (the gradient arriving at the layer; it must depend on a graph
input, or ONNX Runtime would fold the gate away): the copy is a different expression and cannot
start before g exists. x + 0 is x, so the copy computes the same numbers with the same kernels.
"""

from __future__ import annotations

import re
import time

from .common import TRAIN_STAT_OUTPUTS, fail, log

# Ops that may sit between an attention score MatMul and its Softmax (scale, mask, casts, the
# reshapes around the batched matmul).
SCORE_CHAIN_OPS = {"Reshape", "Mul", "Div", "Add", "Sub", "Cast", "Identity", "Where"}
# Matrix products as (op, domain): MatMul, or FusedMatMul carrying a folded scale or transpose
# (graphs.scaled_products runs after this module's rewrite at export; a graph exported with
# `--recompute none` and rewritten later has them in its attention scores).
PRODUCT_OPS = {("MatMul", ""), ("MatMul", "ai.onnx"), ("FusedMatMul", "com.microsoft")}
VIEW_OPS = {"Identity", "Reshape"}
# Nodes never copied: a copy of a random op would draw other numbers (exports are in eval mode,
# so none are expected); a node with a subgraph is not cloned attribute by attribute.
RANDOM_OPS = {"Dropout", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


def copyable(nodes) -> bool:
    import onnx_ir as ir

    return not any(
        node.op_type in RANDOM_OPS or any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values())
        for node in nodes
    )


def forward_nodes(graph, output_names: list[str]) -> set:
    """Nodes that the named graph outputs depend on: the forward pass of a joint graph."""
    seen: set = set()
    stack = [v.producer() for v in graph.outputs if v.name in output_names]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(v.producer() for v in node.inputs if v is not None)
    return seen


def score_chain(softmax) -> list | None:
    """[MatMul, …, Softmax]: the nodes from the attention scores' product (`PRODUCT_OPS`) to
    `softmax`, following the one input of each that leads back to one within a few steps; None
    if there is none."""

    def path_to_matmul(value, depth):
        node = value.producer() if value is not None else None
        if node is None or depth == 0:
            return None
        if (node.op_type, node.domain) in PRODUCT_OPS:
            return [node]
        if node.op_type not in SCORE_CHAIN_OPS:
            return None
        for inp in node.inputs:
            below = path_to_matmul(inp, depth - 1)
            if below is not None:
                return [*below, node]
        return None

    below = path_to_matmul(softmax.inputs[0], 8)
    return None if below is None else [*below, softmax]


def recompute_in_backward(model, what: str) -> int:
    """Applies the exporter's --recompute choice ("attention", "layers" or "none") to a joint
    graph whose statistics outputs are TRAIN_STAT_OUTPUTS; returns the softmaxes ("attention":
    one per layer and query block) or layers ("layers") rewritten."""
    stats = [name for name, _, _ in TRAIN_STAT_OUTPUTS]
    t0 = time.time()
    if what == "attention":
        done, skipped = recompute_attention(model, stats)
        log(f"attention probabilities recomputed in the backward pass: {done} softmaxes ({skipped} left alone)")
        log(f"element-wise values recomputed in the backward pass: {recompute_elementwise(model, stats)}")
    elif what == "layers":
        done = checkpoint_layers(model, stats)
        if done == 0:
            fail("--recompute layers: no decoder layers found (no parameter names with a layer number)")
        log(f"gradient checkpointing: {done} layers recomputed in the backward pass")
    else:
        return 0
    log(f"recompute rewrite: {time.time() - t0:.1f}s")
    return done


def recompute_attention(model, stat_outputs: list[str]) -> tuple[int, int]:
    """The backward's reads of each layer's attention probabilities P (and of P's reshapes) go to
    a copy of the chain MatMul(Q, Kᵀ) → … → Softmax computed from Q and K (which the backward
    keeps anyway) when the layer's backward starts, so the forward's P is freed right after P·V
    (9 GB of SmolLM2's 20 GB at two rows of 2,048 tokens). Returns (softmaxes recomputed,
    softmaxes left alone)."""
    graph = model.graph
    forward = forward_nodes(graph, stat_outputs)
    done = skipped = 0
    for softmax in [n for n in graph.all_nodes() if n.op_type == "Softmax" and n in forward]:
        chain = score_chain(softmax)
        uses = backward_uses(softmax.outputs[0], forward)
        seed = backward_seed(uses, forward, softmax.outputs[0].dtype) if chain and uses and copyable(chain) else None
        if seed is None:
            skipped += 1
            continue
        tag = softmax.name or softmax.outputs[0].name
        q = chain[0].inputs[0]
        copies = {q: plus(graph, q, zero_after(graph, seed, tag), tag)}
        probs_copy = copy_of(graph, softmax.outputs[0], set(chain), copies)
        rewire_backward(graph, softmax.outputs[0], probs_copy, forward)
        done += 1
    graph.sort()
    return done, skipped


# Ops whose values the backward may recompute instead of keeping (element-wise products and
# the views between them); CHEAP_CONE_NODES bounds how many such nodes one value's copy runs.
CHEAP_OPS = {"Mul", "Sigmoid"} | VIEW_OPS
CHEAP_CONE_NODES = 6


def recompute_elementwise(model, stat_outputs: list[str]) -> int:
    """The backward's reads of each forward value that is a few element-wise products
    (CHEAP_OPS) away from values the backward keeps anyway (its leaves: activations it reads
    itself, parameters, constants) go to a copy computed from those leaves when the backward
    needs it, so the forward's value is freed after its last forward use. In a Llama layer: the
    RMSNorms' normalised inputs x·r and outputs w·x·r (from the residual x, the inverse RMS r
    and the weight w) and SwiGLU's SiLU(g) and SiLU(g)·u (from g and u): 6 of the 14 values
    of hidden width or wider that the backward read, 45% of their bytes. Returns the number of
    values recomputed."""
    graph = model.graph
    forward = forward_nodes(graph, stat_outputs)
    plans = []
    for node in [n for n in graph if n in forward and n.op_type in CHEAP_OPS - VIEW_OPS]:
        value = node.outputs[0]
        uses = backward_uses(value, forward)
        cone = cheap_cone(value, forward) if uses and value.dtype is not None and value.dtype.is_floating_point() else None
        if cone is not None and copyable(cone[0]):
            plans.append((value, *cone, uses))
    done = 0
    for group in overlapping(plans):
        # Values whose copies share nodes (SiLU(g) inside SiLU(g)·u) wait for one gate and
        # share those nodes' copies.
        seed = backward_seed([use for plan in group for use in plan[3]], forward, None)
        if seed is None:
            continue
        tag = f"{group[0][0].name}_ew"
        zero = zero_after(graph, seed, tag)
        copies: dict = {}
        for value, nodes, leaves, _ in group:
            gated = gated_leaves(nodes, leaves)
            if not gated:  # no activation leaf (parameters, constants): an ungated copy would be merged back
                continue
            for leaf in gated:
                if leaf not in copies:
                    copies[leaf] = plus(graph, leaf, zero, tag)
            rewire_backward(graph, value, copy_of(graph, value, nodes, copies), forward)
            done += 1
    graph.sort()
    return done


def overlapping(plans: list) -> list[list]:
    """`plans` ((value, cone nodes, leaves, uses)) grouped so that plans sharing a cone node are
    in one group, in their order."""
    groups: list[tuple[set, list]] = []
    for plan in plans:
        joined = [g for g in groups if g[0] & plan[1]]
        nodes, members = set(plan[1]), []
        for g in joined:
            nodes |= g[0]
            members += g[1]
            groups.remove(g)
        groups.append((nodes, [*members, plan]))
    return [members for _, members in groups]


def cheap_cone(value, forward: set):
    """(nodes, leaves): the CHEAP_OPS nodes `value` is computed by from its leaves, None if a
    leaf is a value the backward would not keep otherwise, or the cone is too large. Leaves:
    graph inputs and initializers, non-float values (shapes), and forward activations that the
    backward reads themselves or through views."""
    nodes: set = set()
    leaves: list = []
    stack = [value]
    while stack:
        current = stack.pop()
        node = current.producer()
        if node is not None and node.op_type in CHEAP_OPS and node in forward and not view_of_kept(current, forward):
            if node not in nodes:
                nodes.add(node)
                stack.extend(v for v in node.inputs if v is not None)
            continue
        if node is None or node.op_type == "Constant":
            continue
        if current.dtype is None:
            return None
        if not current.dtype.is_floating_point():
            continue
        if node not in forward or not kept_by_backward(current, forward):
            return None
        leaves.append(current)
    computing = [n for n in nodes if n.op_type not in VIEW_OPS]
    if not computing or len(computing) > CHEAP_CONE_NODES:
        return None
    return nodes, list(dict.fromkeys(leaves))


def view_source(value):
    """The value `value` is a view of (through VIEW_OPS), or `value` itself."""
    node = value.producer()
    while node is not None and node.op_type in VIEW_OPS:
        value = node.inputs[0]
        node = value.producer()
    return value


def view_of_kept(value, forward: set) -> bool:
    """Whether `value` is a view (through VIEW_OPS) of a value not made by CHEAP_OPS: a leaf."""
    node = view_source(value).producer()
    return node is None or node.op_type not in CHEAP_OPS or node not in forward


def kept_by_backward(value, forward: set) -> bool:
    """Whether the backward reads `value`'s buffer anyway: the value, its source or a view
    (`value` is a forward value, and so is everything it is a view of)."""
    return bool(backward_uses(view_source(value), forward))


def gated_leaves(nodes: set, leaves: list) -> list:
    """The leaves a copy of `nodes` reads through the gate: the smallest leaf every node of the
    cone depends on (one copy of it: a norm's inverse RMS, SwiGLU's g), else every activation
    leaf."""
    covering = [leaf for leaf in leaves if descendants([u for u, _ in leaf.uses() if u in nodes], within=nodes) >= nodes]
    if covering:
        return [min(covering, key=estimated_size)]
    return leaves  # cheap_cone's leaves are all activations


def estimated_size(value) -> float:
    """Element count with every symbolic dimension taken as 4,096; unknown shapes as infinite."""
    if value.shape is None:
        return float("inf")
    size = 1.0
    for dim in value.shape:
        size *= dim if isinstance(dim, int) else 4096
    return size


def zero_after(graph, seed, tag: str):
    """A scalar 0·max(seed): zero, computed once `seed` exists."""
    import onnx_ir as ir

    zero_const = ir.Value(name=f"{tag}_rc_zero_const", const_value=ir.tensor(0.0, dtype=seed.dtype))
    graph.register_initializer(zero_const)
    seed_max = named(ir.node("ReduceMax", [seed], {"keepdims": 0}, name=f"{tag}_rc_seed"))
    zero = named(ir.node("Mul", [seed_max.outputs[0], zero_const], name=f"{tag}_rc_zero"))
    for value in (seed_max.outputs[0], zero.outputs[0]):
        value.type, value.shape = ir.TensorType(seed.dtype), ir.Shape([])
    graph.extend([seed_max, zero])
    return zero.outputs[0]


def plus(graph, value, zero, tag: str):
    """value + zero: `value` for a copy that must wait for `zero`."""
    import onnx_ir as ir

    if zero.dtype != value.dtype:
        cast = named(ir.node("Cast", [zero], {"to": value.dtype}, name=f"{tag}_rc_zero_{value.name}"))
        cast.outputs[0].type, cast.outputs[0].shape = ir.TensorType(value.dtype), ir.Shape([])
        graph.append(cast)
        zero = cast.outputs[0]
    node = named(ir.node("Add", [value, zero], name=f"{tag}_rc_{value.name}"))
    node.outputs[0].type, node.outputs[0].shape = value.type, value.shape
    graph.append(node)
    return node.outputs[0]


# A parameter's layer: the first `.<number>.` in its name (layers.3.mlp…, transformer.h.3.attn…).
LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)\.")


def checkpoint_layers(model, stat_outputs: list[str]) -> int:
    """Gradient checkpointing: the backward of each decoder layer reads copies of the layer's
    values recomputed from the layer's inputs when its backward starts, so the forward keeps
    only what crosses from one layer to the next. Costs one more forward pass of every layer.
    Returns the number of layers rewritten.

    A layer's nodes are found from its parameters (numbered names): the forward nodes that
    depend on layer i's parameters but not on layer i+1's (nor on the parameters of the output
    head after the last layer). Values a layer passes on to later forward nodes are its
    checkpoints and stay as they are.
    """
    graph = model.graph
    forward = forward_nodes(graph, stat_outputs)
    layers = layer_segments(graph, forward)
    order = {node: position for position, node in enumerate(graph)}
    done = 0
    for i in sorted(layers, reverse=True):
        segment = sorted(layers[i], key=order.__getitem__)
        done += checkpoint_segment(graph, segment, forward, f"layer{i}")
    graph.sort()
    return done


def layer_segments(graph, forward: set) -> dict[int, set]:
    """{layer index: its forward nodes}. Parameters are the graph's inputs at this point (the
    frozen weights of a LoRA graph become initializers later); the other inputs (the batch,
    unnumbered parameters) that the last layer's descendants read mark the output head."""
    by_layer: dict[int, list] = {}
    others = []
    for value in graph.inputs:
        match = LAYER_INDEX.search(value.name or "")
        (by_layer.setdefault(int(match.group(1)), []) if match else others).append(value)
    if not by_layer:
        return {}
    reach = {i: forward_descendants(values, forward) for i, values in by_layer.items()}
    last = max(reach)
    head_readers = [node for value in others for node, _ in value.uses() if node in reach[last]]
    head = forward_descendants_of_nodes(head_readers, forward)
    segments = {}
    for i in sorted(reach):
        nodes = reach[i] - reach.get(i + 1, set()) - head
        if nodes:
            segments[i] = nodes
    return segments


def forward_descendants(values, forward: set) -> set:
    return forward_descendants_of_nodes([node for value in values for node, _ in value.uses()], forward)


def forward_descendants_of_nodes(nodes, forward: set) -> set:
    return {node for node in descendants(nodes) if node in forward}


def checkpoint_segment(graph, segment: list, forward: set, tag: str) -> int:
    """Rewires the backward's reads of `segment`'s values (its nodes in graph order) to copies
    (see checkpoint_layers); returns 1 if the segment had any, else 0."""
    members = set(segment)
    produced = [value for node in segment for value in node.outputs]
    made_here = set(produced)
    passed_on = {value for value in produced if any(n in forward and n not in members for n, _ in value.uses())}
    inputs = list(dict.fromkeys(
        value for node in segment for value in node.inputs
        if value is not None and value not in made_here and value.producer() in forward
        and value.dtype is not None and value.dtype.is_floating_point()
    ))  # fmt: skip
    gated_cone = forward_descendants_of_nodes([n for v in inputs for n, _ in v.uses() if n in members], members)
    reads = [(node, index, value) for value in produced
             if value not in passed_on and value.producer() in gated_cone
             for node, index in value.uses() if node not in forward]  # fmt: skip
    if not reads or not copyable(gated_cone):
        return 0
    seed = backward_seed([(node, index) for node, index, _ in reads], forward, None)
    if seed is None:
        return 0
    zero = zero_after(graph, seed, tag)
    copies = {value: plus(graph, value, zero, tag) for value in inputs}
    for node, index, value in reads:
        node.replace_input_with(index, copy_of(graph, value, gated_cone, copies))
    return 1


def copy_of(graph, value, copied: set, copies: dict):
    """The copy of `value`: its producer and the producers it needs, as far as they are in
    `copied`, cloned once each and appended to `graph`; `copies` maps originals to copies (the
    gated inputs to start with). Values made outside `copied` are read as they are."""
    if value in copies:
        return copies[value]
    node = value.producer()
    if node is None or node not in copied:
        return value
    clone = clone_node(node, [copy_of(graph, v, copied, copies) if v is not None else None for v in node.inputs])
    graph.append(clone)
    copies.update(zip(node.outputs, clone.outputs))
    return copies[value]


def named(node):
    """Names a new node's outputs after the node (ONNX values need names)."""
    for i, value in enumerate(node.outputs):
        value.name = f"{node.name}_{i}" if len(node.outputs) > 1 else node.name
    return node


def clone_node(node, inputs):
    import onnx_ir as ir

    clone = ir.Node(node.domain, node.op_type, inputs, attributes=list(node.attributes.values()),
                    num_outputs=len(node.outputs), name=f"{node.name}_rc")  # fmt: skip
    for old, new in zip(node.outputs, clone.outputs):
        new.name = f"{old.name}_rc"
        new.type, new.shape = old.type, old.shape
    return clone


def backward_uses(value, forward: set) -> list:
    """(node, input index) of the backward nodes that read `value` directly or through views."""
    uses = []
    for node, index in value.uses():
        if node not in forward:
            uses.append((node, index))
        elif node.op_type in VIEW_OPS and index == 0:
            uses.extend(backward_uses(node.outputs[0], forward))
    return uses


def descendants(nodes, within: set | None = None) -> set:
    """`nodes` and every node that depends on them (through nodes of `within` only, if given)."""
    seen: set = set()
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(user for out in node.outputs for user, _ in out.uses() if within is None or user in within)
    return seen


def backward_seed(uses, forward: set, dtype, depth: int = 3):
    """A float value computed in the backward pass, not downstream of the backward nodes `uses`,
    that those nodes or the nodes right after them read (the gradient arriving at the layer):
    a copy needed by `uses` can start once it exists. `dtype`: the seed's (None: any float).
    None if there is none within `depth` steps."""
    after = descendants(node for node, _ in uses)
    frontier = [node for node, _ in uses]
    for _ in range(depth):
        for node in frontier:
            for inp in node.inputs:
                producer = inp.producer() if inp is not None else None
                if producer is None or producer in forward or producer in after or producer.op_type == "Constant":
                    continue
                float_ok = inp.dtype == dtype or (dtype is None and inp.dtype is not None and inp.dtype.is_floating_point())
                if float_ok and reads_a_graph_input(inp):
                    return inp
        frontier = [user for node in frontier for out in node.outputs for user, _ in out.uses()]
    return None


def reads_a_graph_input(value) -> bool:
    """Whether `value` depends on a graph input (not only on constants and initializers, which
    ONNX Runtime folds away, and a copy waiting on a constant could run any time)."""
    seen: set = set()
    stack = [value]
    while stack:
        current = stack.pop()
        node = current.producer()
        if node is None:
            if current.is_graph_input():
                return True
            continue
        if node in seen:
            continue
        seen.add(node)
        stack.extend(v for v in node.inputs if v is not None)
    return False


def rewire_backward(graph, value, copy, forward: set) -> None:
    """Point the backward's reads of `value` (and of its forward views) at `copy`."""
    for node, index in list(value.uses()):
        if node not in forward:
            node.replace_input_with(index, copy)
        elif node.op_type in VIEW_OPS and index == 0 and backward_uses(node.outputs[0], forward):
            view = clone_node(node, [copy, *node.inputs[1:]])
            graph.extend([view])
            rewire_backward(graph, node.outputs[0], view.outputs[0], forward)
