"""The top-k KL in plain PyTorch, chunk by chunk: what runs on a CPU, and the reference the Triton path matches.

The maths is in ``naive.py``. Here the same loss is a ``torch.autograd.Function`` that works on chunks of rows
and writes the analytic gradients, so only one chunk of float32 temporaries is alive at a time:

    dloss_n / da_j = p_j * ([j in S] * (r_j + 1) - (loss_n + P))                       (renorm=False)
    dloss_n / da_j = [j in S] * p~_j * (log p~_j - log q~_j - loss_n)                    (renorm=True)
    dloss_n / db_j = q_j * P - [j in S] * p_j                                            (renorm=False)
    dloss_n / db_j = [j in S] * (q~_j - p~_j)                                            (renorm=True)

with r_i = log p_i - log q_i and P = sum_S p_i (S is piecewise constant in a: it has no gradient). The same
formulas hold for any S fixed by the logits, so ``union`` (S the union of both top-k) changes only S. With the
tail bucket (``tail``: loss_n gains T = P_t (log P_t - log Q_t), P_t = 1 - P, Q_t = 1 - Q, Q = sum_S q_i):

    dloss_n / da_j = p_j * ([j in S] * (r_j + 1 - c) - alpha),     alpha = loss0_n + P - c P
    dloss_n / db_j = q_j * ([j in S] * beta + gamma) - [j in S] * p_j,     gamma = P - beta Q

with loss0_n the sum over S, c = log(P_t / Q_t) + 1 and beta = P_t / Q_t (each 0 where its tail is capped,
``naive.TAIL_LOG_MASS_MAX``); without the tail c = beta = 0, which gives the first two lines. Each argument
gets its gradient when it requires grad.

With ``entropy``, each row's full-vocabulary entropies -sum_j p_j log p_j of both sides come from the same
log-softmaxes (the forward pass only).

* ``topk_kl_torch``: from logits [N, V];
* ``fused_linear_topk_kl_torch``: from hidden states and output weights, the logits made chunk by chunk
  (``linear.py``), so no [N, V] tensor ever exists.

Rows per chunk come from ``TORCH_CHUNK_BYTES``, a budget for one chunk's float32 temporaries.
"""

from __future__ import annotations

import torch

from .arguments import check_fused_linear, check_logits, reduce_loss, token_weights, topk_outputs
from .linear import autocast_off, backprop_chunk, compute_dtype, finish_forward, gradient_buffers, logits, scale_saved_grads
from .naive import TAIL_LOG_MASS_MAX, log_tail, topk_ids

# Bytes of float32 temporaries one chunk of rows may hold.
TORCH_CHUNK_BYTES = 256 * 2**20


def rows_per_chunk(V: int, chunk_size: int | None, tensors: int = 6) -> int:
    """Rows per chunk: ``chunk_size`` if given, else what fits ``TORCH_CHUNK_BYTES`` with ``tensors`` float32
    [rows, V] temporaries (log-softmaxes, the gradients, and top-k's masks and int64 running count)."""
    if chunk_size is not None:
        return max(1, chunk_size)
    return max(1, TORCH_CHUNK_BYTES // (tensors * 4 * V))


def entropy_rows(logp_nV: torch.Tensor) -> torch.Tensor:
    """-sum_j p_j log p_j per row from log-probabilities (one temporary; 0 log 0 = 0)."""
    return -logp_nV.exp().mul_(logp_nV).nan_to_num_(nan=0.0).sum(-1)


def union_ids(first_ids_nk: torch.Tensor, second_ids_nk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both rows of ids side by side [n, 2k], and which of them count: every first id (ascending, as
    ``topk_ids`` gives them) and each second id not among them. A repeated id stays in place: a gradient
    written at it twice is written with the same value twice."""
    k = first_ids_nk.shape[1]
    at = torch.searchsorted(first_ids_nk, second_ids_nk).clamp_(max=k - 1)
    fresh = first_ids_nk.gather(1, at) != second_ids_nk
    return torch.cat([first_ids_nk, second_ids_nk], 1), torch.cat([torch.ones_like(fresh), fresh], 1)


def topk_kl_rows(first_nV: torch.Tensor, second_nV: torch.Tensor, k: int, renorm: bool,
                 grad_first: bool = False, grad_second: bool = False, tail: bool = False, entropy: bool = False,
                 union: bool = False):
    """Loss, row statistics and the requested gradients for a chunk of rows, all in float32.

    Returns ``(loss_n, stats_n3, grad_first_nV or None, grad_second_nV or None)``: ``stats_n3`` holds the first's
    mass on S and, with ``entropy``, the two full-vocabulary entropies (else 0); the gradients unscaled
    (d loss_n / d row). ``union``: S is the union of both top-k. This is the row computation every torch path
    shares.
    """
    a = first_nV.float()
    logp = torch.log_softmax(a, dim=-1)
    logq = torch.log_softmax(second_nV.float(), dim=-1)
    ids = topk_ids(a, k)
    counted = None  # with the union: which of the ids count in sums (each id once)
    if union:
        ids, counted = union_ids(ids, topk_ids(second_nV.float(), k))
    # log-probabilities at the ids as sums over S see them (a repeated id at -inf, so counted once)
    once = (lambda x: x) if counted is None else (lambda x: x.masked_fill(~counted, float("-inf")))  # noqa: E731
    logp_k, logq_k = logp.gather(1, ids), logq.gather(1, ids)
    mass_n = once(logp_k).exp().sum(-1)
    if entropy:
        stats_n3 = torch.stack([mass_n, entropy_rows(logp), entropy_rows(logq)], dim=1)
    else:
        stats_n3 = torch.stack([mass_n, torch.zeros_like(mass_n), torch.zeros_like(mass_n)], dim=1)
    if renorm:
        logp_k = logp_k - torch.logsumexp(once(logp_k), dim=-1, keepdim=True)
        logq_k = logq_k - torch.logsumexp(once(logq_k), dim=-1, keepdim=True)
    p_k = logp_k.exp()
    r_k = logp_k - logq_k
    live_k = p_k > 0  # 0 * log 0 is 0: ids with zero first probability (from -inf logits) contribute nothing
    summed_k = live_k if counted is None else live_k & counted
    loss_n = torch.where(summed_k, p_k * r_k, torch.zeros_like(p_k)).sum(-1)
    zero_n = torch.zeros_like(loss_n)
    c_n, beta_n, q_mass_n = zero_n, zero_n, zero_n  # without the tail: c = beta = 0 (Q is then never used)
    if tail:  # the tail bucket's loss, and its share of the gradients (c, beta)
        log_p_mass, log_q_mass = torch.logsumexp(once(logp_k), -1), torch.logsumexp(once(logq_k), -1)
        logp_t, logq_t = log_tail(log_p_mass), log_tail(log_q_mass)
        c_n = torch.where(log_p_mass <= TAIL_LOG_MASS_MAX, logp_t - logq_t + 1, zero_n)
        beta_n = torch.where(log_q_mass <= TAIL_LOG_MASS_MAX, (logp_t - logq_t).exp(), zero_n)
        q_mass_n = log_q_mass.exp()
        tail_loss_n = logp_t.exp() * (logp_t - logq_t)
    grad_first_nV = grad_second_nV = None
    if grad_first:
        if renorm:
            grad_first_nV = torch.zeros_like(logp)
            grad_first_nV.scatter_(1, ids, torch.where(live_k, p_k * (r_k - loss_n[:, None]), torch.zeros_like(p_k)))
        else:
            # off S: -p * alpha, in logp's storage; on S: p * (r + 1 - c - alpha), written whole (as the kernel does)
            alpha_n1 = (loss_n + mass_n - c_n * mass_n)[:, None]
            grad_first_nV = logp.exp_().mul_(-alpha_n1)
            on_s = p_k * (r_k + 1 - c_n[:, None] - alpha_n1)
            grad_first_nV.scatter_(1, ids, torch.where(live_k, on_s, torch.zeros_like(p_k)))
    if grad_second:
        if renorm:
            grad_second_nV = torch.zeros_like(logq).scatter_(1, ids, logq_k.exp() - p_k)
        else:
            # off S: q * gamma, in logq's storage; on S: q * (gamma + beta) - p
            gamma_n1 = (mass_n - beta_n * q_mass_n)[:, None]
            grad_second_nV = logq.exp_().mul_(gamma_n1)
            grad_second_nV.scatter_(1, ids, logq_k.exp() * (gamma_n1 + beta_n[:, None]) - p_k)
    if tail:
        loss_n = loss_n + tail_loss_n
    return loss_n, stats_n3, grad_first_nV, grad_second_nV


class _TopkKL(torch.autograd.Function):
    """Chunked over rows: forward keeps no float32 [N, V] copy; backward recomputes each chunk's gradients."""

    @staticmethod
    def forward(ctx, first_NV, second_NV, k, renorm, chunk_rows, tail, entropy, union):
        N = first_NV.shape[0]
        loss_N = first_NV.new_empty(N, dtype=torch.float32)
        stats_N3 = first_NV.new_empty(N, 3, dtype=torch.float32)
        for s in range(0, N, chunk_rows):
            loss_N[s : s + chunk_rows], stats_N3[s : s + chunk_rows], _, _ = topk_kl_rows(
                first_NV[s : s + chunk_rows], second_NV[s : s + chunk_rows], k, renorm, tail=tail, entropy=entropy,
                union=union,
            )
        ctx.save_for_backward(first_NV, second_NV)
        ctx.k, ctx.renorm, ctx.chunk_rows, ctx.tail, ctx.union = k, renorm, chunk_rows, tail, union
        ctx.mark_non_differentiable(stats_N3)
        return loss_N, stats_N3

    @staticmethod
    def backward(ctx, grad_loss_N, _grad_stats):
        first_NV, second_NV = ctx.saved_tensors
        need_first, need_second = ctx.needs_input_grad[:2]
        grad_first_NV = torch.empty_like(first_NV) if need_first else None
        grad_second_NV = torch.empty_like(second_NV) if need_second else None
        rows = ctx.chunk_rows
        for s in range(0, first_NV.shape[0], rows):
            _, _, g_first, g_second = topk_kl_rows(
                first_NV[s : s + rows], second_NV[s : s + rows], ctx.k, ctx.renorm, need_first, need_second, ctx.tail,
                union=ctx.union,
            )
            upstream_n1 = grad_loss_N[s : s + rows, None]
            if need_first:
                grad_first_NV[s : s + rows] = g_first.mul_(upstream_n1)
            if need_second:
                grad_second_NV[s : s + rows] = g_second.mul_(upstream_n1)
        return grad_first_NV, grad_second_NV, None, None, None, None, None, None


def topk_kl_torch(
    first_logits, second_logits, k=256, mask=None, renorm=False, reduction="mean", chunk_size=None,
    return_topk_mass=False, tail=False, return_entropy=False, union=False,
):
    """Top-k KL_S(p || q) from logits, chunked over rows (see the module docstring for the maths).

    ``first_logits`` and ``second_logits``: [N, V], any float dtype, each differentiable if it requires grad;
    ``mask``: [N] bool, False excludes a token. ``reduction``: "mean" over unmasked tokens, "sum", or "none"
    (per-token, masked tokens 0). With ``return_topk_mass`` also returns the mean first-argument probability
    inside the top-k (unmasked tokens); with ``return_entropy`` then the pair of mean full-vocabulary entropies
    (first, second). ``tail``: the mass outside the top-k as one more bucket. ``union``: S is the union of both
    arguments' top-k (the mass reported is the first's on it).
    """
    check_logits(first_logits, second_logits, k, mask, reduction, renorm, tail)
    rows = rows_per_chunk(first_logits.shape[1], chunk_size, tensors=7 if return_entropy else 6)
    loss_N, stats_N3 = _TopkKL.apply(first_logits, second_logits, k, renorm, rows, tail, return_entropy, union)
    return topk_outputs(reduce_loss(loss_N, mask, reduction), stats_N3, mask, return_topk_mass, return_entropy)


class _FusedLinearTopkKL(torch.autograd.Function):
    """Logits made chunk by chunk from hidden states; gradients computed in the forward pass and scaled later.

    The matmuls run in the compute dtype (autocast's when it is on), as in ``linear.py``."""

    @staticmethod
    def forward(ctx, h1_NH, w1_VH, h2_NM, w2_VM, weight_N, k, renorm, chunk_rows, tail, entropy, union):
        N = h1_NH.shape[0]
        need = ctx.needs_input_grad[:4]
        dt1, dt2 = compute_dtype(h1_NH, w1_VH), compute_dtype(h2_NM, w2_VM)
        loss_N = h1_NH.new_zeros(N, dtype=torch.float32)
        stats_N3 = h1_NH.new_zeros(N, 3, dtype=torch.float32)
        grads = gradient_buffers((h1_NH, w1_VH, h2_NM, w2_VM), need)
        with autocast_off(h1_NH.device):
            w1, w2 = w1_VH.to(dt1), w2_VM.to(dt2)  # cast once per call
            for s in range(0, N, chunk_rows):
                e = min(N, s + chunk_rows)
                h1, h2 = h1_NH[s:e].to(dt1), h2_NM[s:e].to(dt2)
                loss_N[s:e], stats_N3[s:e], g_first, g_second = topk_kl_rows(
                    logits(h1, w1, dt1), logits(h2, w2, dt2), k, renorm, need[0] or need[1], need[2] or need[3], tail,
                    entropy, union,
                )
                sides = ((g_first, h1, w1, grads[0], grads[1]), (g_second, h2, w2, grads[2], grads[3]))
                for g_nV, h, w, grad_h, grad_w in sides:
                    if g_nV is not None:  # float32 gradient of the chunk's logits, weighted, in the compute dtype
                        g_nV = g_nV.mul_(weight_N[s:e, None]).to(w.dtype)
                        backprop_chunk(g_nV, h, w, None if grad_h is None else grad_h[s:e], grad_w)
        return finish_forward(ctx, grads, (h1_NH, w1_VH, h2_NM, w2_VM), loss_N, weight_N, stats_N3)

    @staticmethod
    def backward(ctx, grad_total, _grad_stats):
        return (*scale_saved_grads(ctx, grad_total), None, None, None, None, None, None, None)


def fused_linear_topk_kl_torch(
    first_hidden, first_weight, second_hidden, second_weight, k=256, mask=None, renorm=False,
    reduction="mean", chunk_size=None, return_topk_mass=False, tail=False, return_entropy=False, union=False,
):
    """Top-k KL_S(p || q) of ``p = softmax(first_hidden @ first_weight.T)``, ``q = softmax(second_hidden @
    second_weight.T)``, without materialising the logits for all tokens.

    ``first_hidden``: [N, H], ``first_weight``: [V, H]; ``second_hidden``: [N, M], ``second_weight``: [V, M].
    Each of the four that requires grad gets its gradient (weights accumulated in float32). ``reduction`` is
    "mean" (over unmasked tokens) or "sum"; ``return_topk_mass``, ``return_entropy`` and ``union`` as in
    ``topk_kl_torch``.
    """
    check_fused_linear(first_hidden, first_weight, second_hidden, second_weight, k, mask, reduction, renorm, tail)
    N, V = first_hidden.shape[0], first_weight.shape[0]
    weight_N = token_weights(mask, N, reduction, first_hidden.device)
    rows = rows_per_chunk(V, chunk_size, tensors=8 if return_entropy else 7)
    loss, stats_N3 = _FusedLinearTopkKL.apply(
        first_hidden, first_weight, second_hidden, second_weight, weight_N, k, renorm, rows, tail, return_entropy,
        union,
    )
    return topk_outputs(loss, stats_N3, mask, return_topk_mass, return_entropy)
