"""Plain-PyTorch top-k KL: the specification of the loss, and the CPU implementation.

For each token n, with first logits a and second logits b (rows of ``[N, V]``), p = softmax(a),
q = softmax(b), and S the k ids with the largest first logits (ties go to the lower id):

    loss_n = KL_S(p || q) = sum_{i in S} p_i * (log p_i - log q_i)

The normaliser of both softmaxes is the full vocabulary. With ``renorm=True`` both distributions are first
renormalised within S (p~ = softmax(a_S), q~ = softmax(b_S)), which makes loss_n a true KL divergence on S.

Gradients, with r_i = log p_i - log q_i and P = sum_S p_i (S is piecewise constant in a: it has none):

    dloss_n / da_j = p_j * ([j in S] * (r_j + 1) - (loss_n + P))                       (renorm=False)
    dloss_n / da_j = [j in S] * p~_j * (log p~_j - log q~_j - loss_n)                    (renorm=True)
    dloss_n / db_j = q_j * P - [j in S] * p_j                                            (renorm=False)
    dloss_n / db_j = [j in S] * (q~_j - p~_j)                                            (renorm=True)

Each argument gets its gradient when it requires grad. In OPCD the first argument is the student and the
second the frozen teacher (``topk_reverse_kl`` refuses a teacher that requires grad); a regulariser of the form
KL_S(stopgrad(p_without_context) || p_with_context) trains the second argument instead.

Three layers live here:

* ``naive_topk_kl``: the formula written with autograd on full tensors. Short and obviously right; the tests
  compare everything else with it. Holds several ``[N, V]`` float32 tensors.
* ``topk_kl_torch``: the same loss as a ``torch.autograd.Function`` that works on chunks of rows and writes
  the analytic gradients, so only one chunk of float32 temporaries is alive at a time.
* ``fused_linear_topk_kl_torch``: the same again with ``logits = hidden @ weight.T`` computed chunk by chunk,
  so no ``[N, V]`` tensor ever exists; gradients go to whichever hidden states and weights require grad.

The ``*_reverse_kl*`` functions are the OPCD entry points: the general ones with the second argument (the
teacher) refused if it requires grad.
"""

from __future__ import annotations

import torch

REDUCTIONS = ("mean", "sum", "none")
# Rows per chunk are chosen so that one chunk's float32 temporaries stay near this many bytes.
DEFAULT_CHUNK_BYTES = 256 * 2**20


def topk_ids(logits_NV: torch.Tensor, k: int) -> torch.Tensor:
    """The k ids with the largest logits per row, ties broken towards the lower id, in ascending id order.

    ``torch.topk`` does not promise which of several equal values it returns, and bf16 logits tie often,
    so the last place is filled explicitly: every id above the k-th value, then the lowest ids equal to it.
    """
    kth_N1 = torch.topk(logits_NV, k, dim=-1, sorted=True).values[:, -1:]
    above_NV = logits_NV > kth_N1
    tied_NV = logits_NV == kth_N1
    wanted_N1 = k - above_NV.sum(-1, keepdim=True)
    take_NV = above_NV | (tied_NV & (tied_NV.cumsum(-1) <= wanted_N1))
    return take_NV.nonzero()[:, 1].view(logits_NV.shape[0], k)


def _check(first_NV: torch.Tensor, second_NV: torch.Tensor, k: int, mask_N, reduction: str) -> None:
    if first_NV.dim() != 2 or first_NV.shape != second_NV.shape:
        raise ValueError(f"both logits must be [N, V]; got {tuple(first_NV.shape)} and {tuple(second_NV.shape)}")
    if not 1 <= k <= first_NV.shape[1]:
        raise ValueError(f"k must be between 1 and the vocabulary size {first_NV.shape[1]}; got {k}")
    if mask_N is not None and mask_N.shape != first_NV.shape[:1]:
        raise ValueError(f"mask must be [N] = [{first_NV.shape[0]}]; got {tuple(mask_N.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")


def refuse_teacher_grad(*teacher_tensors: torch.Tensor) -> None:
    """The reverse-KL entry points train the student only: a teacher tensor that requires grad is an error."""
    if any(t.requires_grad for t in teacher_tensors):
        raise ValueError("the teacher requires grad; the loss trains the student only (detach the teacher)")


def _reduce(loss_N: torch.Tensor, mask_N: torch.Tensor | None, reduction: str) -> torch.Tensor:
    if mask_N is not None:  # `where`, not a product: a masked row's inf or nan must not leak into the total
        loss_N = torch.where(mask_N.bool(), loss_N, torch.zeros_like(loss_N))
    if reduction == "none":
        return loss_N
    total = loss_N.sum()
    if reduction == "sum":
        return total
    count = loss_N.new_tensor(loss_N.shape[0]) if mask_N is None else mask_N.sum()
    return total / count.clamp(min=1)


def naive_topk_kl(first_logits, second_logits, k=256, mask=None, renorm=False, reduction="mean"):
    """The loss straight from its definition, with autograd to both arguments (the reference the tests trust)."""
    _check(first_logits, second_logits, k, mask, reduction)
    logp = torch.log_softmax(first_logits.float(), dim=-1)
    logq = torch.log_softmax(second_logits.float(), dim=-1)
    ids = topk_ids(first_logits.detach().float(), k)
    logp_k, logq_k = logp.gather(1, ids), logq.gather(1, ids)
    if renorm:
        logp_k = torch.log_softmax(logp_k, dim=-1)
        logq_k = torch.log_softmax(logq_k, dim=-1)
    p_k = logp_k.exp()
    loss_N = torch.where(p_k > 0, p_k * (logp_k - logq_k), torch.zeros_like(p_k)).sum(-1)  # 0 log 0 = 0
    return _reduce(loss_N, mask, reduction)


def naive_topk_reverse_kl(student_logits, teacher_logits, k=256, mask=None, renorm=False, reduction="mean"):
    """``naive_topk_kl`` with the teacher refused if it requires grad."""
    refuse_teacher_grad(teacher_logits)
    return naive_topk_kl(student_logits, teacher_logits, k=k, mask=mask, renorm=renorm, reduction=reduction)


def _rows_per_chunk(V: int, chunk_size: int | None, tensors: int = 6) -> int:
    """Rows per chunk: ``chunk_size`` if given, else what fits ``DEFAULT_CHUNK_BYTES`` with ``tensors`` float32
    [rows, V] temporaries (log-softmaxes, the gradients, and top-k's masks and int64 running count)."""
    if chunk_size is not None:
        return max(1, chunk_size)
    return max(1, DEFAULT_CHUNK_BYTES // (tensors * 4 * V))


def topk_kl_rows(first_nV: torch.Tensor, second_nV: torch.Tensor, k: int, renorm: bool,
                 grad_first: bool = False, grad_second: bool = False):
    """Loss, top-k mass and the requested gradients for a chunk of rows, all in float32.

    Returns ``(loss_n, mass_n, grad_first_nV or None, grad_second_nV or None)``, the gradients unscaled
    (d loss_n / d row). This is the row computation every torch path shares.
    """
    a = first_nV.float()
    logp = torch.log_softmax(a, dim=-1)
    logq = torch.log_softmax(second_nV.float(), dim=-1)
    ids = topk_ids(a, k)
    logp_k, logq_k = logp.gather(1, ids), logq.gather(1, ids)
    mass_n = logp_k.exp().sum(-1)
    if renorm:
        logp_k = logp_k - torch.logsumexp(logp_k, dim=-1, keepdim=True)
        logq_k = logq_k - torch.logsumexp(logq_k, dim=-1, keepdim=True)
    p_k = logp_k.exp()
    r_k = logp_k - logq_k
    live_k = p_k > 0  # 0 * log 0 is 0: ids with zero first probability (from -inf logits) contribute nothing
    loss_n = torch.where(live_k, p_k * r_k, torch.zeros_like(p_k)).sum(-1)
    grad_first_nV = grad_second_nV = None
    if grad_first:
        if renorm:
            grad_first_nV = torch.zeros_like(logp)
            grad_first_nV.scatter_(1, ids, torch.where(live_k, p_k * (r_k - loss_n[:, None]), torch.zeros_like(p_k)))
        else:
            # off S: p * -(L + P), in logp's storage; on S: p * (r + 1 - (L + P)), written whole (as the kernel does)
            grad_first_nV = logp.exp_().mul_(-(loss_n + mass_n)[:, None])
            on_s = p_k * (r_k + 1 - (loss_n + mass_n)[:, None])
            grad_first_nV.scatter_(1, ids, torch.where(live_k, on_s, torch.zeros_like(p_k)))
    if grad_second:
        if renorm:
            grad_second_nV = torch.zeros_like(logq).scatter_(1, ids, logq_k.exp() - p_k)
        else:
            # off S: q * P, in logq's storage; on S: q * P - p
            grad_second_nV = logq.exp_().mul_(mass_n[:, None])
            grad_second_nV.scatter_(1, ids, logq_k.exp() * mass_n[:, None] - p_k)
    return loss_n, mass_n, grad_first_nV, grad_second_nV


class _TopkKL(torch.autograd.Function):
    """Chunked over rows: forward keeps no float32 [N, V] copy; backward recomputes each chunk's gradients."""

    @staticmethod
    def forward(ctx, first_NV, second_NV, k, renorm, chunk_rows):
        N = first_NV.shape[0]
        loss_N = first_NV.new_empty(N, dtype=torch.float32)
        mass_N = first_NV.new_empty(N, dtype=torch.float32)
        for s in range(0, N, chunk_rows):
            loss_N[s : s + chunk_rows], mass_N[s : s + chunk_rows], _, _ = topk_kl_rows(
                first_NV[s : s + chunk_rows], second_NV[s : s + chunk_rows], k, renorm
            )
        ctx.save_for_backward(first_NV, second_NV)
        ctx.k, ctx.renorm, ctx.chunk_rows = k, renorm, chunk_rows
        ctx.mark_non_differentiable(mass_N)
        return loss_N, mass_N

    @staticmethod
    def backward(ctx, grad_loss_N, _grad_mass):
        first_NV, second_NV = ctx.saved_tensors
        need_first, need_second = ctx.needs_input_grad[:2]
        grad_first_NV = torch.empty_like(first_NV) if need_first else None
        grad_second_NV = torch.empty_like(second_NV) if need_second else None
        rows = ctx.chunk_rows
        for s in range(0, first_NV.shape[0], rows):
            _, _, g_first, g_second = topk_kl_rows(
                first_NV[s : s + rows], second_NV[s : s + rows], ctx.k, ctx.renorm, need_first, need_second
            )
            upstream_n1 = grad_loss_N[s : s + rows, None]
            if need_first:
                grad_first_NV[s : s + rows] = g_first.mul_(upstream_n1)
            if need_second:
                grad_second_NV[s : s + rows] = g_second.mul_(upstream_n1)
        return grad_first_NV, grad_second_NV, None, None, None


def topk_kl_torch(
    first_logits, second_logits, k=256, mask=None, renorm=False, reduction="mean", chunk_size=None,
    return_topk_mass=False,
):
    """Top-k KL_S(p || q) from logits, chunked over rows (see the module docstring for the maths).

    ``first_logits`` and ``second_logits``: [N, V], any float dtype, each differentiable if it requires grad;
    ``mask``: [N] bool, False excludes a token. ``reduction``: "mean" over unmasked tokens, "sum", or "none"
    (per-token, masked tokens 0). With ``return_topk_mass`` also returns the mean first-argument probability
    inside the top-k (unmasked tokens).
    """
    _check(first_logits, second_logits, k, mask, reduction)
    rows = _rows_per_chunk(first_logits.shape[1], chunk_size)
    loss_N, mass_N = _TopkKL.apply(first_logits, second_logits, k, renorm, rows)
    loss = _reduce(loss_N, mask, reduction)
    if return_topk_mass:
        return loss, _reduce(mass_N, mask, "mean").detach()
    return loss


def topk_reverse_kl_torch(
    student_logits, teacher_logits, k=256, mask=None, renorm=False, reduction="mean", chunk_size=None,
    return_topk_mass=False,
):
    """``topk_kl_torch`` with the student first and the teacher refused if it requires grad."""
    refuse_teacher_grad(teacher_logits)
    return topk_kl_torch(
        student_logits, teacher_logits, k=k, mask=mask, renorm=renorm, reduction=reduction, chunk_size=chunk_size,
        return_topk_mass=return_topk_mass,
    )


def token_weights(mask_N: torch.Tensor | None, N: int, reduction: str, device) -> torch.Tensor:
    """Per-token weights that turn a sum of per-token losses into the requested reduction."""
    weight_N = torch.ones(N, device=device) if mask_N is None else mask_N.float()
    if reduction == "mean":
        weight_N = weight_N / weight_N.sum().clamp(min=1)
    return weight_N


def check_fused_linear(first_hidden, first_weight, second_hidden, second_weight, k, mask, reduction) -> None:
    """Argument checks shared by the fused-linear top-k KL paths."""
    N, V = first_hidden.shape[0], first_weight.shape[0]
    if second_hidden.shape[0] != N or second_weight.shape[0] != V:
        raise ValueError(
            f"shapes do not line up: first hidden {tuple(first_hidden.shape)}, weight {tuple(first_weight.shape)}; "
            f"second hidden {tuple(second_hidden.shape)}, weight {tuple(second_weight.shape)}"
        )
    if reduction not in ("mean", "sum"):
        raise ValueError(f"the fused-linear loss supports reduction 'mean' or 'sum'; got {reduction!r}")
    if not 1 <= k <= V:
        raise ValueError(f"k must be between 1 and the vocabulary size {V}; got {k}")
    if mask is not None and mask.shape != (N,):
        raise ValueError(f"mask must be [N] = [{N}]; got {tuple(mask.shape)}")


class _FusedLinearTopkKL(torch.autograd.Function):
    """Logits made chunk by chunk from hidden states; gradients computed in the forward pass and scaled later.

    The matmuls run in the compute dtype (autocast's when it is on), as in ``linear.py``."""

    @staticmethod
    def forward(ctx, h1_NH, w1_VH, h2_NM, w2_VM, weight_N, k, renorm, chunk_rows):
        from .linear import autocast_off, backprop_chunk, compute_dtype, logits

        N = h1_NH.shape[0]
        need = ctx.needs_input_grad[:4]
        dt1, dt2 = compute_dtype(h1_NH, w1_VH), compute_dtype(h2_NM, w2_VM)
        loss_N = h1_NH.new_zeros(N, dtype=torch.float32)
        mass_N = h1_NH.new_zeros(N, dtype=torch.float32)
        f32 = dict(dtype=torch.float32, device=w1_VH.device)
        grads = [  # hidden-state gradients in their own dtype, weight gradients accumulated in float32
            torch.empty_like(h1_NH) if need[0] else None,
            torch.zeros(w1_VH.shape, **f32) if need[1] else None,
            torch.empty_like(h2_NM) if need[2] else None,
            torch.zeros(w2_VM.shape, **f32) if need[3] else None,
        ]
        with autocast_off(h1_NH.device):
            w1, w2 = w1_VH.to(dt1), w2_VM.to(dt2)  # cast once per call
            for s in range(0, N, chunk_rows):
                e = min(N, s + chunk_rows)
                h1, h2 = h1_NH[s:e].to(dt1), h2_NM[s:e].to(dt2)
                loss_N[s:e], mass_N[s:e], g_first, g_second = topk_kl_rows(
                    logits(h1, w1, dt1), logits(h2, w2, dt2), k, renorm, need[0] or need[1], need[2] or need[3]
                )
                sides = ((g_first, h1, w1, grads[0], grads[1]), (g_second, h2, w2, grads[2], grads[3]))
                for g_nV, h, w, grad_h, grad_w in sides:
                    if g_nV is not None:  # float32 gradient of the chunk's logits, weighted, in the compute dtype
                        g_nV = g_nV.mul_(weight_N[s:e, None]).to(w.dtype)
                        backprop_chunk(g_nV, h, w, None if grad_h is None else grad_h[s:e], grad_w)
        ctx.save_for_backward(*grads)
        ctx.dtypes = [x.dtype for x in (h1_NH, w1_VH, h2_NM, w2_VM)]
        ctx.mark_non_differentiable(mass_N)
        return (loss_N * weight_N).sum(), mass_N

    @staticmethod
    def backward(ctx, grad_total, _grad_mass):
        from .linear import scale_saved_grads

        return (*scale_saved_grads(ctx, grad_total), None, None, None, None)


def fused_linear_topk_kl_torch(
    first_hidden, first_weight, second_hidden, second_weight, k=256, mask=None, renorm=False,
    reduction="mean", chunk_size=None, return_topk_mass=False,
):
    """Top-k KL_S(p || q) of ``p = softmax(first_hidden @ first_weight.T)``, ``q = softmax(second_hidden @
    second_weight.T)``, without materialising the logits for all tokens.

    ``first_hidden``: [N, H], ``first_weight``: [V, H]; ``second_hidden``: [N, M], ``second_weight``: [V, M].
    Each of the four that requires grad gets its gradient (weights accumulated in float32). ``reduction`` is
    "mean" (over unmasked tokens) or "sum".
    """
    check_fused_linear(first_hidden, first_weight, second_hidden, second_weight, k, mask, reduction)
    N, V = first_hidden.shape[0], first_weight.shape[0]
    weight_N = token_weights(mask, N, reduction, first_hidden.device)
    rows = _rows_per_chunk(V, chunk_size, tensors=7)
    loss, mass_N = _FusedLinearTopkKL.apply(
        first_hidden, first_weight, second_hidden, second_weight, weight_N, k, renorm, rows
    )
    if return_topk_mass:
        return loss, _reduce(mass_N, mask, "mean").detach()
    return loss


def fused_linear_topk_reverse_kl_torch(
    student_hidden, student_weight, teacher_hidden, teacher_weight, k=256, mask=None, renorm=False,
    reduction="mean", chunk_size=None, return_topk_mass=False,
):
    """``fused_linear_topk_kl_torch`` with the student first and the teacher refused if it requires grad."""
    refuse_teacher_grad(teacher_hidden, teacher_weight)
    return fused_linear_topk_kl_torch(
        student_hidden, student_weight, teacher_hidden, teacher_weight, k=k, mask=mask, renorm=renorm,
        reduction=reduction, chunk_size=chunk_size, return_topk_mass=return_topk_mass,
    )
