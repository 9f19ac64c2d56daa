"""The ε-DPO objective of ../shared/spec/objective.md in PyTorch.

Two users: `edpo_export` traces `EpsDpoLoss` into the joint training graph, and the tests /
baselines use `exact_eps_dpo` (full-vocabulary reference logits, the paper's computation) as
the oracle the graph is compared with. Sequences are laid out as in the graphs: rows 0..B are
the chosen sequences, rows B..2B the rejected ones of the same pairs; position t of every
per-token tensor belongs to label token t (predicted from tokens < t); position 0 is unused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Floor on the tail masses R_θ and R_ref of the tail-merged estimate (objective.md §7).
# At K = V the tails are zero up to float rounding; the floor keeps log() finite and adds
# at most ~1e-10 to a sum of order 1, far below float32 resolution.
TAIL_FLOOR = 1e-10


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or unchanged when it is float64 (the goldens' float64 pass keeps its dtype)."""
    return x if x.dtype == torch.float64 else x.float()


def label_logps(logp_next: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Gather log p(label) from [N, T-1, V] log-probs predicting labels [N, T-1]."""
    return logp_next.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def perturbed_token_logps_sparse(
    a: torch.Tensor,
    p_label: torch.Tensor,
    q_label: torch.Tensor,
    p_topk: torch.Tensor,
    q_topk: torch.Tensor,
    label_in_topk: torch.Tensor,
) -> torch.Tensor:
    """log π̂_a(y) per token from the cached sparse reference (objective.md §7).

    p_* are policy log-probs, q_* reference log-probs; *_label are [N, T'] (or [M] at M label
    positions), *_topk [N, T', K] (or [M, K]); label_in_topk, shaped as *_label, marks tokens whose label is already one of the K cached ids (then
    S = T_K and the label must not be counted twice).
    """
    neg_inf = torch.full_like(p_label, float("-inf"))
    # log Σ_{v∈S} exp p(v) and the same for q, with the label entry dropped when duplicated.
    p_label_extra = torch.where(label_in_topk, neg_inf, p_label)
    q_label_extra = torch.where(label_in_topk, neg_inf, q_label)
    p_in_set = torch.logsumexp(torch.cat([p_topk, p_label_extra.unsqueeze(-1)], -1), -1)
    q_in_set = torch.logsumexp(torch.cat([q_topk, q_label_extra.unsqueeze(-1)], -1), -1)
    tail_policy = torch.clamp(1.0 - torch.exp(p_in_set), min=TAIL_FLOOR)
    tail_ref = torch.clamp(1.0 - torch.exp(q_in_set), min=TAIL_FLOOR)
    mix_topk = a * p_topk + (1.0 - a) * q_topk
    mix_label = a * p_label + (1.0 - a) * q_label
    mix_label_extra = torch.where(label_in_topk, neg_inf, mix_label)
    mix_tail = a * torch.log(tail_policy) + (1.0 - a) * torch.log(tail_ref)
    normaliser = torch.logsumexp(
        torch.cat([mix_topk, mix_label_extra.unsqueeze(-1), mix_tail.unsqueeze(-1)], -1), -1
    )
    return mix_label - normaliser


def steps_and_loss(
    logps: torch.Tensor,
    logps_plus: torch.Tensor,
    logps_minus: torch.Tensor,
    ref_logps: torch.Tensor,
    beta: torch.Tensor,
    epsilon: torch.Tensor,
    label_smoothing: torch.Tensor,
    step_tolerance: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair step k, loss, z and β_i (objective.md §3–§4). Gradients flow via logps."""
    n = logps.shape[0]
    b = n // 2
    s_w, s_l = logps[:b], logps[b:]
    g = (s_w - s_l).detach()
    g_plus = logps_plus[:b] - logps_plus[b:]
    g_minus = logps_minus[:b] - logps_minus[b:]
    delta = step_tolerance * (1.0 + s_w.detach().abs() + s_l.detach().abs())
    up = (g_plus - g > delta) & (g - g_minus > delta)
    down = (g_minus - g > delta) & (g - g_plus > delta)
    steps = up.to(torch.int64) - down.to(torch.int64)
    beta_i = beta / (1.0 + epsilon * steps.to(logps.dtype))
    z = (s_w - s_l) - (ref_logps[:b] - ref_logps[b:])
    losses = -(1.0 - label_smoothing) * F.logsigmoid(beta_i * z) - label_smoothing * F.logsigmoid(
        -beta_i * z
    )
    return steps, losses, z, beta_i


def chunk_bounds(m, chunks: int):
    """Slice size and padded length so that `chunks` slices of equal size cover m positions."""
    size = (m + chunks - 1) // chunks
    return size, size * chunks


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x with `rows` zero rows appended along dim 0 (works with symbolic sizes, unlike F.pad)."""
    return torch.cat([x, x.new_zeros((rows, *x.shape[1:]))])


def loss_positions(loss_mask: torch.Tensor) -> torch.Tensor:
    """label_positions of a batch: flat indices r·T + t of loss_mask's 1s at t ≥ 1 (every
    position t ≥ 1 for a mask of ones)."""
    flat = loss_mask.clone()
    flat[:, 0] = 0
    return torch.nonzero(flat.reshape(-1) > 0).reshape(-1)


def pack_pairs(input_ids: torch.Tensor, attention_mask: torch.Tensor, label_positions: torch.Tensor) -> dict:
    """The joint graph's packed inputs (common.PACKED_INPUTS) of a right-padded batch: pair i's
    rows i (chosen) and B + i (rejected) as one packed row — their common prefix once (the
    longest run of equal tokens from the start, within both rows' real tokens), the rest of the
    chosen row, the rest of the rejected row, padding — and for each label position r·T + t the
    flat index of the packed token holding row r's token t − 1. src/packing.rs builds the same."""
    n, t = input_ids.shape
    b = n // 2
    lengths = attention_mask.sum(-1).tolist()
    ids = input_ids.tolist()
    layout = []  # per pair: (shared, chosen length, rejected length)
    for i in range(b):
        lc, lr = lengths[i], lengths[b + i]
        shared = 0
        while shared < min(lc, lr) and ids[i][shared] == ids[b + i][shared]:
            shared += 1
        layout.append((shared, lc, lr))
    s = max(lc + lr - shared for shared, lc, lr in layout)
    packed_ids = torch.zeros(b, s, dtype=torch.int64)
    positions = torch.zeros(b, s, dtype=torch.int64)
    branch = torch.full((b, s), -1, dtype=torch.int64)
    for i, (shared, lc, lr) in enumerate(layout):
        tail = lr - shared
        packed_ids[i, :lc] = input_ids[i, :lc]
        packed_ids[i, lc : lc + tail] = input_ids[b + i, shared:lr]
        positions[i, :lc] = torch.arange(lc)
        positions[i, lc : lc + tail] = torch.arange(shared, lr)
        branch[i, :shared], branch[i, shared:lc], branch[i, lc : lc + tail] = 0, 1, 2
    hidden_at = []
    for pos in label_positions.tolist():
        r, u = divmod(pos, t)
        i, rejected = r % b, r >= b
        shared, lc, _ = layout[i]
        u -= 1  # the state predicting token u + 1
        slot = u + (lc - shared) if rejected and u >= shared else u
        hidden_at.append(i * s + slot)
    return {
        "packed_ids": packed_ids,
        "packed_positions": positions,
        "packed_branch": branch,
        "hidden_at": torch.tensor(hidden_at, dtype=torch.int64),
    }


def at_label_positions(hidden: torch.Tensor, input_ids: torch.Tensor, pos: torch.Tensor):
    """The final hidden states predicting the label tokens at `pos` [M, H] and those labels [M]:
    label token r·T + t is predicted from the hidden state at r·T + t − 1."""
    n, t, h = hidden.shape
    return hidden.reshape(n * t, h).index_select(0, pos - 1), input_ids.reshape(n * t).index_select(0, pos)


def loss_grad_wrt_z(z: torch.Tensor, beta_i: torch.Tensor, label_smoothing: torch.Tensor) -> torch.Tensor:
    """dℓ_i/dz_i of the per-pair loss of objective.md §4 (β_i held constant)."""
    bz = beta_i * z
    return beta_i * (-(1.0 - label_smoothing) * torch.sigmoid(-bz) + label_smoothing * torch.sigmoid(bz))


# Output-projection slices per product added to the surrogate's Gw [V, H] (the projection's
# gradient, `_chunked_surrogate`): every product passes over all of Gw (SmolLM2: 108 MB), so
# 16 slices add it in 4 products, each over [V, 4·size] probabilities recomputed for it (the
# default 4 slices in one).
GW_SLICES_PER_PRODUCT = 4


class EpsDpoLoss(torch.nn.Module):
    """Wraps a causal LM: batch + cached sparse reference → ε-DPO loss and per-pair outputs.

    This is the module traced into `policy.train.onnx`. Outputs, in order: loss (mean over
    pairs, times `grad_scale`; the joint graph differentiates it), logps, logps_plus, logps_minus [N], steps [B].

    `lm_head_chunks = 0` is the dense computation (full [N, T, V] logits; autograd keeps them
    for the backward pass). `lm_head_chunks = C > 0` never holds more than one [M/C, V] slice
    of the logits, and takes a thirteenth input, `label_positions` (the M positions of loss_mask's
    label tokens, `loss_positions`): the output projection, log-softmax and the K+1 gathers run
    over C slices of those positions only (not over prompt and padding), and the gradient of
    the projection is attached by a surrogate term built from per-slice stop-gradient terms (see
    `_chunked_surrogate`). The values are the same
    computation; the gradients are the same up to float rounding (checked by `python -m
    edpo_export --verify` against the dense path in eager PyTorch).
    """

    def __init__(self, model: torch.nn.Module, lm_head_chunks: int = 0):
        super().__init__()
        self.model = model
        self.lm_head_chunks = lm_head_chunks

    def forward(
        self,
        input_ids,
        attention_mask,
        loss_mask,
        ref_logps,
        ref_token_logps,
        ref_topk_ids,
        ref_topk_logps,
        beta,
        epsilon,
        label_smoothing,
        step_tolerance,
        grad_scale=None,
        label_positions=None,
        packed_ids=None,
        packed_positions=None,
        packed_branch=None,
        hidden_at=None,
    ):
        """`grad_scale` (None: 1) weights the loss output, hence every gradient: the
        micro-batch's share of the optimiser step, applied by the backward pass itself. The
        packed inputs (`pack_pairs`; sliced path only, under block-causal attention, which reads
        `packed_branch`) run the transformer body over each pair's packed row instead of its two
        rows: the same values."""
        batch = (input_ids, attention_mask, loss_mask, ref_logps, ref_token_logps, ref_topk_ids, ref_topk_logps)
        settings = (beta, epsilon, label_smoothing, step_tolerance)
        packed = None if packed_ids is None else (packed_ids, packed_positions, packed_branch, hidden_at)
        if self.lm_head_chunks > 0:
            loss, *rest = self._sliced_forward(*batch, *settings, label_positions, packed)
        else:
            loss, *rest = self._dense_forward(*batch, *settings)
        return (loss if grad_scale is None else loss * grad_scale, *rest)

    def _dense_forward(
        self, input_ids, attention_mask, loss_mask, ref_logps, ref_token_logps, ref_topk_ids, ref_topk_logps,
        beta, epsilon, label_smoothing, step_tolerance,
    ):  # fmt: skip
        """`forward` with the full [N, T, V] logits (autograd differentiates the loss itself)."""
        labels = input_ids[:, 1:]
        topk_ids = ref_topk_ids[:, 1:, :]
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        logp_next = torch.log_softmax(at_least_fp32(logits[:, :-1, :]), dim=-1)
        token_logps = label_logps(logp_next, labels)
        p_topk = logp_next.detach().gather(-1, topk_ids)
        mask = loss_mask[:, 1:] > 0
        zeros = torch.zeros_like(token_logps)
        logps = torch.where(mask, token_logps, zeros).sum(-1)

        # ε-step decision signals: no gradient (objective.md §2).
        p_label = token_logps.detach()
        q_topk = ref_topk_logps[:, 1:, :]
        q_label = ref_token_logps[:, 1:]
        label_in_topk = (topk_ids == labels.unsqueeze(-1)).any(-1)
        one = torch.ones_like(epsilon)
        per_a = []
        for a in (one + epsilon, one - epsilon):
            tok = perturbed_token_logps_sparse(a, p_label, q_label, p_topk, q_topk, label_in_topk)
            per_a.append(torch.where(mask, tok, zeros).sum(-1))
        logps_plus, logps_minus = per_a

        steps, losses, z, beta_i = steps_and_loss(
            logps, logps_plus, logps_minus, ref_logps, beta, epsilon, label_smoothing, step_tolerance
        )
        return losses.mean(), logps.detach(), logps_plus, logps_minus, steps

    def _sliced_forward(
        self, input_ids, attention_mask, loss_mask, ref_logps, ref_token_logps, ref_topk_ids, ref_topk_logps,
        beta, epsilon, label_smoothing, step_tolerance, label_positions, packed=None,
    ):  # fmt: skip
        """`forward` with the output projection in slices, at the M label positions only
        (`label_positions`, flat indices r·T + t with loss_mask[r, t] = 1, t ≥ 1; None: those
        of `loss_mask`). Every per-token value is computed at those positions, [M] or [M, K],
        and summed per row in the [N, T] layout, zeros elsewhere, as the dense form sums."""
        n, t = input_ids.shape
        k = ref_topk_ids.shape[-1]
        pos = label_positions if label_positions is not None else loss_positions(loss_mask)
        topk_ids = ref_topk_ids.reshape(n * t, k).index_select(0, pos)
        hidden, labels, h_pad, weight, token_logps, p_topk, lse = self._chunked_logps(
            input_ids, attention_mask, pos, topk_ids, packed
        )
        # A listed position outside loss_mask contributes nothing (the mask stays the contract).
        keep = loss_mask.reshape(n * t).index_select(0, pos) > 0
        zeros = torch.zeros_like(token_logps)

        def row_sums(values):
            flat = torch.zeros(n * t, dtype=values.dtype).index_put((pos,), torch.where(keep, values, zeros))
            return flat.reshape(n, t).sum(-1)

        logps = row_sums(token_logps)
        q_topk = ref_topk_logps.reshape(n * t, k).index_select(0, pos)
        q_label = ref_token_logps.reshape(n * t).index_select(0, pos)
        label_in_topk = (topk_ids == labels.unsqueeze(-1)).any(-1)
        one = torch.ones_like(epsilon)
        logps_plus, logps_minus = (
            row_sums(perturbed_token_logps_sparse(a, token_logps, q_label, p_topk, q_topk, label_in_topk))
            for a in (one + epsilon, one - epsilon)
        )
        steps, losses, z, beta_i = steps_and_loss(
            logps, logps_plus, logps_minus, ref_logps, beta, epsilon, label_smoothing, step_tolerance
        )
        dz = loss_grad_wrt_z(z.detach(), beta_i, label_smoothing) / z.shape[0]
        row = torch.div(pos, t, rounding_mode="floor")
        coef = torch.where(keep, torch.cat([dz, -dz]).index_select(0, row), zeros)  # dL/d token_logps [M]
        surrogate = self._chunked_surrogate(hidden, h_pad, weight, labels, lse, coef)
        loss = losses.mean().detach() + (surrogate - surrogate.detach())
        return loss, logps, logps_plus, logps_minus, steps

    def _chunked_logps(self, input_ids, attention_mask, pos, topk_ids, packed=None):
        """Label and top-K log-probs at the label positions `pos` [M] (`topk_ids` [M, K]: the
        cached ids there) without materialising [M, V] (values only, no gradient).

        Returns the differentiable final hidden states predicting them [M, H], the labels [M],
        the hidden states detached and padded to C equal slices [M_padded, H], the output
        projection W [V, H], token log-probs [M] (detached), policy log-probs at the cached ids
        [M, K] and the per-position log-normaliser [M_padded]; the surrogate reuses the padded
        states and normaliser.
        """
        base = self.model.get_decoder()
        weight = self.model.get_output_embeddings().weight
        if packed is None:
            last = base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            hidden, labels = at_label_positions(last, input_ids, pos)
        else:
            ids, positions, branch, hidden_at = packed
            real = (branch >= 0).to(ids.dtype)
            last = base(input_ids=ids, attention_mask=real, position_ids=positions, edpo_branch=branch).last_hidden_state
            hidden = last.reshape(-1, last.shape[-1]).index_select(0, hidden_at)
            labels = input_ids.reshape(-1).index_select(0, pos)
        m = pos.shape[0]
        size, padded = chunk_bounds(m, self.lm_head_chunks)
        pad = padded - m
        h_pad = pad_rows(hidden.detach(), pad)
        y_pad = pad_rows(labels, pad)
        ids_pad = pad_rows(topk_ids, pad)
        w = weight.detach()
        labels_out, topk_out, lse_out = [], [], []
        for c in range(self.lm_head_chunks):
            rows = slice(c * size, (c + 1) * size)
            logits = (h_pad[rows] @ w.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            labels_out.append(logits.gather(-1, y_pad[rows].unsqueeze(-1)).squeeze(-1) - lse)
            topk_out.append(logits.gather(-1, ids_pad[rows]) - lse.unsqueeze(-1))
            lse_out.append(lse)
        return hidden, labels, h_pad, weight, torch.cat(labels_out)[:m], torch.cat(topk_out)[:m], torch.cat(lse_out)

    def _chunked_surrogate(self, hidden, h_pad, weight, labels, lse, coef):
        """A scalar whose gradient is Σ_t coef_t · ∇ log p(y_t) (its value is discarded).

        With P_t = softmax(W h_t) and D_t = onehot(y_t) − P_t ([V]):
          ∂ log p(y_t)/∂h_t = Wᵀ D_t,   ∂ log p(y_t)/∂W = D_t ⊗ h_t.
        Gh_t = Wᵀ D_t [M, H] and Gw = Σ_t coef_t D_t ⊗ h_t [V, H] are computed slice by slice
        under stop-gradient, so surrogate = Σ_t coef_t h_t·Gh_t + ⟨W, Gw⟩ has exactly that
        gradient. The label's one-hot enters D_t within each [V, size] slice, so no gradient
        is scattered into a [V, H] tensor for the label rows, and ⟨W, Gw⟩ is one matrix
        product (no [V, H] element-wise product on either pass). The logits are recomputed here
        as W·hᵀ (transposed), and again for Gw over wider slices, so that graph optimisers do
        not merge them with the forward slices (nor Gw's with Gh's) and keep [V, size] slices
        alive until the end of the backward pass. A frozen W (a LoRA graph's output
        projection) needs no Gw: its [V, H] products are not computed.
        """
        m = hidden.shape[0]
        size, padded = chunk_bounds(m, self.lm_head_chunks)
        c_pad = pad_rows(coef, padded - m)
        y_pad = pad_rows(labels, padded - m)
        w = weight.detach()
        vocab = torch.arange(w.shape[0], dtype=labels.dtype).unsqueeze(-1)  # [V, 1]

        def d_of(rows):  # D for the positions `rows`: [V, rows]
            probs_t = torch.exp((w @ h_pad[rows].t()).float() - lse[rows].unsqueeze(0))
            return (vocab == y_pad[rows].unsqueeze(0)).to(probs_t.dtype) - probs_t

        grad_h = torch.cat([d_of(slice(c * size, (c + 1) * size)).t() @ w for c in range(self.lm_head_chunks)])[:m]
        grad_w = None
        if weight.requires_grad:
            # Gw from D recomputed over GW_SLICES_PER_PRODUCT slices at a time (a wider product,
            # a different expression from the slices above, which graph optimisers would
            # otherwise merge and keep alive until Gw is needed at the end of the backward pass).
            wide = size * GW_SLICES_PER_PRODUCT
            for g in range(0, self.lm_head_chunks, GW_SLICES_PER_PRODUCT):
                rows = slice(g * size, g * size + wide)
                part = d_of(rows) @ (c_pad[rows].unsqueeze(-1) * h_pad[rows])
                grad_w = part if grad_w is None else grad_w + part
        surrogate = (coef * (hidden * grad_h).sum(-1)).sum()
        if grad_w is None:
            return surrogate
        # ⟨W, Gw⟩ as a dot product of the flattened tensors: its backward is Gw times the
        # incoming scalar, one [V, H] Mul, where an element-wise product and sum would add a
        # [V, H] Mul and Expand on both passes, and a [1, V·H] × [V·H, 1] product a Transpose
        # copy and a [1, 1] × [1, V·H] MatMul (SmolLM2: 0.44 s of a 256-token pair's run).
        return surrogate + torch.dot(weight.reshape(-1), grad_w.reshape(-1))


def full_logps_next(model, input_ids, attention_mask) -> torch.Tensor:
    """[N, T-1, V] log-probs predicting tokens 1..T-1 (fp32)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return torch.log_softmax(logits[:, :-1, :].float(), dim=-1)


def exact_eps_dpo(
    policy_logp_next: torch.Tensor,
    ref_logp_next: torch.Tensor,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    beta: float,
    epsilon: float,
    label_smoothing: float = 0.0,
    step_tolerance: float = 1e-6,
):
    """The paper's computation with full-vocabulary reference log-probs (objective.md §2–§4).

    Returns a dict of loss (mean, differentiable through policy_logp_next), logps,
    logps_plus, logps_minus, ref_logps [N], steps, z [B].
    """
    labels = input_ids[:, 1:]
    mask = (loss_mask[:, 1:] > 0).to(policy_logp_next.dtype)
    logps = (label_logps(policy_logp_next, labels) * mask).sum(-1)
    ref_logps = (label_logps(ref_logp_next, labels) * mask).sum(-1)
    out = {}
    with torch.no_grad():
        p = policy_logp_next.detach()
        for name, a in (("logps_plus", 1.0 + epsilon), ("logps_minus", 1.0 - epsilon)):
            mixed = torch.log_softmax(a * p + (1.0 - a) * ref_logp_next, dim=-1)
            out[name] = (label_logps(mixed, labels) * mask).sum(-1)
    t = lambda v: torch.tensor(v, dtype=policy_logp_next.dtype)  # noqa: E731
    steps, losses, z, _ = steps_and_loss(
        logps,
        out["logps_plus"],
        out["logps_minus"],
        ref_logps,
        t(beta),
        t(epsilon),
        t(label_smoothing),
        t(step_tolerance),
    )
    out.update(loss=losses.mean(), logps=logps, ref_logps=ref_logps, steps=steps, z=z)
    return out
