"""Triton kernels for the top-k KL (one program per token row).

For a row with first logits a and second logits b, p = softmax(a), q = softmax(b) over the full vocabulary,
and S the k ids with the largest a (ties go to the lower id):

    loss = sum_{i in S} p_i * r_i,        r_i = log p_i - log q_i,        P = sum_{i in S} p_i
    dloss/da_j = p_j * ([j in S] * (r_j + 1) - (loss + P))
    dloss/db_j = q_j * P - [j in S] * p_j

With ``renorm`` both distributions are renormalised within S (p~ = softmax(a_S), q~ = softmax(b_S)):

    loss = sum_{i in S} p~_i * (log p~_i - log q~_i)
    dloss/da_j = [j in S] * p~_j * (log p~_j - log q~_j - loss)
    dloss/db_j = [j in S] * (q~_j - p~_j)

So a row needs the two log-sum-exps, the set S, and the k pairs (a_i, b_i) on S. The forward kernel makes
these passes over the row, in blocks of ``BLOCK_V`` columns, holding nothing of size V:

1. log-sum-exp of a and of b (online max and rescaled sum), and a 256-bin histogram of the top 8 bits of
   an integer key that orders like a;
2. radix select: each further pass histograms the next 8 key bits among the elements that still match the
   chosen prefix. After the last pass the k-th largest key ``tau`` is known exactly, and ``need``, how many
   elements equal to ``tau`` belong to S. A bf16 logit has 16 significant key bits (2 passes in all),
   an fp16 logit 19 (3 passes), a float32 logit 32 (4 passes);
3. gather: every element with key > tau, and the first ``need`` elements with key == tau in id order
   (a running count plus a prefix sum within the block ranks the ties), are compacted into a [k] id
   buffer of the row;
4. the loss, the top-k mass P and the two log normalisers (full vocabulary, or over S with renorm) come
   from the k triples (id, a_id, b_id), reading a and b at the gathered ids;
5. when the upstream gradient of every row is known in advance (as in the fused linear loss), the dense
   gradients, scaled by a per-row weight, are written in place: dloss/da over the first logits with
   ``GRAD_FIRST``, dloss/db over the second logits with ``GRAD_SECOND``.

The backward kernel is pass 5 alone, into separate gradient buffers; it recomputes membership in S from the
saved ``tau`` and ``need``. ``GRAD_FIRST`` and ``GRAD_SECOND`` are compile-time switches of that pass only:
the passes are the same whichever gradients are wanted, and a side not asked for costs no store. Every load
is upcast to float32 straight away; the arithmetic is float32.

Cost per row with bf16 logits and one fused gradient: a is read 4 times and b twice, the gradient written
once, plus 2k scattered reads on S; the only scratch is the [N, k] int32 id buffer and [N, 6] row statistics.

Layers: ``@triton.jit`` kernels, the launch functions ``topk_kl_forward`` and ``topk_kl_backward``,
``TopkKLTriton`` (a ``torch.autograd.Function``), the functional ``topk_kl_triton``, and the OPCD entry point
``topk_reverse_kl_triton`` (the same with the teacher refused if it requires grad).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import _check, _reduce, refuse_teacher_grad

# Columns per block. 2048 at 8 warps compiles for sm_90 without spills to 78-86 registers with one gradient
# switch on and 104-110 with both (2 programs per SM either way); the tests pass smaller blocks to cover rows
# of several blocks.
DEFAULT_BLOCK_V = 2048
MAX_BLOCK_K = 1024


@triton.jit
def _ordered_key(x, KEY_BITS: tl.constexpr):
    """An int32 whose signed order is the order of the float32 values ``x``, keeping the top KEY_BITS bits.

    For x >= 0 the float bits already order as integers; for x < 0 the 31 magnitude bits are flipped so that
    larger magnitudes come lower. That maps -0.0 (and nothing else) to -1, which is set to the key of +0.0:
    the two are the same value and must tie.
    """
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    key = tl.where(key == -1, 0, key)
    if KEY_BITS < 32:
        key = key >> (32 - KEY_BITS)
    return key


@triton.jit
def _online_lse(m, d, x):
    """One block of an online log-sum-exp: running max ``m`` and sum ``d`` of exp(x - m)."""
    m_new = tl.maximum(m, tl.max(x, 0))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    d = d * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref), 0)
    return m_new, d


@triton.jit
def _choose_digit(hist, need):
    """The largest digit b with #(digit >= b) >= need, and ``need`` less the elements with digit > b."""
    bins = tl.arange(0, 256)
    at_least = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist
    digit = tl.max(tl.where(at_least >= need, bins, -1), 0)
    above = tl.sum(tl.where(bins > digit, hist, 0), 0)
    return digit, need - above


@triton.jit
def _grad_row(a_row, b_row, ga_row, gb_row, w, ref_a, ref_b, loss, mass, tau, need, V,
              RENORM: tl.constexpr, GRAD_FIRST: tl.constexpr, GRAD_SECOND: tl.constexpr,
              KEY_BITS: tl.constexpr, BLOCK_V: tl.constexpr):
    """Write ``w * dloss/da`` into ``ga_row`` (with GRAD_FIRST) and ``w * dloss/db`` into ``gb_row`` (with
    GRAD_SECOND). The outputs may be the inputs themselves: each block reads both rows, then writes.

    ``ref_a``/``ref_b`` are the log normalisers (full vocabulary, or over S with renorm), ``loss`` the row's
    loss and ``mass`` its top-k mass P = sum_S p (full-vocabulary p).
    """
    cols0 = tl.arange(0, BLOCK_V)
    ties_seen = 0
    for off in range(0, V, BLOCK_V):
        cols = off + cols0
        valid = cols < V
        a = tl.load(a_row + cols, mask=valid, other=0.0).to(tl.float32)
        b = tl.load(b_row + cols, mask=valid, other=0.0).to(tl.float32)
        key = _ordered_key(a, KEY_BITS)
        tied = (valid & (key == tau)).to(tl.int32)
        tie_rank = ties_seen + tl.cumsum(tied, 0) - 1
        in_s = (valid & (key > tau)) | ((tied > 0) & (tie_rank < need))
        ties_seen += tl.sum(tied, 0)
        logp = a - ref_a
        logq = b - ref_b
        p = tl.exp(logp)
        if GRAD_FIRST:
            r = logp - logq
            if RENORM:
                ga = tl.where(in_s & (p > 0), p * (r - loss), 0.0)
            else:
                ga = tl.where(p > 0, p * (tl.where(in_s, r + 1.0, 0.0) - (loss + mass)), 0.0)
            tl.store(ga_row + cols, (ga * w).to(ga_row.dtype.element_ty), mask=valid)
        if GRAD_SECOND:
            q = tl.exp(logq)
            if RENORM:
                gb = tl.where(in_s, q - p, 0.0)
            else:
                gb = q * mass - tl.where(in_s, p, 0.0)
            tl.store(gb_row + cols, (gb * w).to(gb_row.dtype.element_ty), mask=valid)


@triton.jit
def _topk_kl_fwd_kernel(
    a_ptr, a_stride, b_ptr, b_stride, ids_ptr, ids_stride, w_ptr, w_stride,
    loss_ptr, mass_ptr, stats_ptr, sel_ptr, V, K,
    RENORM: tl.constexpr, GRAD_FIRST: tl.constexpr, GRAD_SECOND: tl.constexpr, KEY_BITS: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    a_row = a_ptr + row * a_stride
    b_row = b_ptr + row * b_stride
    ids_row = ids_ptr + row * ids_stride
    cols0 = tl.arange(0, BLOCK_V)

    # Pass 1: both log-sum-exps and the histogram of the top key digit.
    m_a = float("-inf")
    d_a = 0.0
    m_b = float("-inf")
    d_b = 0.0
    hist = tl.zeros((256,), dtype=tl.int32)
    for off in range(0, V, BLOCK_V):
        cols = off + cols0
        valid = cols < V
        a = tl.load(a_row + cols, mask=valid, other=float("-inf")).to(tl.float32)
        b = tl.load(b_row + cols, mask=valid, other=float("-inf")).to(tl.float32)
        m_a, d_a = _online_lse(m_a, d_a, a)
        m_b, d_b = _online_lse(m_b, d_b, b)
        key = _ordered_key(a, KEY_BITS)
        hist += tl.histogram(((key >> (KEY_BITS - 8)) & 0xFF) ^ 0x80, 256, mask=valid)
    lse_a = m_a + tl.log(d_a)
    lse_b = m_b + tl.log(d_b)
    digit, need = _choose_digit(hist, K)
    prefix = digit - 128  # the top 8 key bits as a signed value, as key >> (KEY_BITS - 8) gives them

    # Pass 2: the remaining digits, each among the elements that match the prefix chosen so far.
    for d in tl.static_range(1, KEY_BITS // 8):
        hist = tl.zeros((256,), dtype=tl.int32)
        for off in range(0, V, BLOCK_V):
            cols = off + cols0
            valid = cols < V
            a = tl.load(a_row + cols, mask=valid, other=float("-inf")).to(tl.float32)
            key = _ordered_key(a, KEY_BITS)
            match = valid & ((key >> (KEY_BITS - 8 * d)) == prefix)
            hist += tl.histogram((key >> (KEY_BITS - 8 * (d + 1))) & 0xFF, 256, mask=match)
        digit, need = _choose_digit(hist, need)
        prefix = prefix * 256 + digit
    tau = prefix

    # Pass 3: compact the ids of S into the row's id buffer, in id order.
    taken = 0
    ties_seen = 0
    for off in range(0, V, BLOCK_V):
        cols = off + cols0
        valid = cols < V
        a = tl.load(a_row + cols, mask=valid, other=float("-inf")).to(tl.float32)
        key = _ordered_key(a, KEY_BITS)
        tied = (valid & (key == tau)).to(tl.int32)
        tie_rank = ties_seen + tl.cumsum(tied, 0) - 1
        take = ((valid & (key > tau)) | ((tied > 0) & (tie_rank < need))).to(tl.int32)
        slot = taken + tl.cumsum(take, 0) - 1
        tl.store(ids_row + slot, cols, mask=(take > 0) & (slot < K))
        taken += tl.sum(take, 0)
        ties_seen += tl.sum(tied, 0)
    tl.debug_barrier()  # the ids written by every thread are read back below

    # Pass 4: loss, top-k mass and log normalisers from the k triples (id, a_id, b_id).
    kk0 = tl.arange(0, BLOCK_K)
    mass = 0.0
    loss = 0.0
    m_q = float("-inf")
    d_q = 0.0
    for koff in range(0, K, BLOCK_K):
        kk = koff + kk0
        kv = kk < K
        ids = tl.load(ids_row + kk, mask=kv, other=0)
        a = tl.load(a_row + ids, mask=kv, other=0.0).to(tl.float32)
        b = tl.load(b_row + ids, mask=kv, other=0.0).to(tl.float32)
        logp = a - lse_a
        p = tl.where(kv, tl.exp(logp), 0.0)
        mass += tl.sum(p, 0)
        loss += tl.sum(tl.where(p > 0, p * (logp - (b - lse_b)), 0.0), 0)
        if RENORM:
            m_q, d_q = _online_lse(m_q, d_q, tl.where(kv, b, float("-inf")))
    if RENORM:
        ref_a = lse_a + tl.log(mass)
        ref_b = m_q + tl.log(d_q)
        loss = 0.0
        for koff in range(0, K, BLOCK_K):
            kk = koff + kk0
            kv = kk < K
            ids = tl.load(ids_row + kk, mask=kv, other=0)
            a = tl.load(a_row + ids, mask=kv, other=0.0).to(tl.float32)
            b = tl.load(b_row + ids, mask=kv, other=0.0).to(tl.float32)
            logp = a - ref_a
            p = tl.where(kv, tl.exp(logp), 0.0)
            loss += tl.sum(tl.where(p > 0, p * (logp - (b - ref_b)), 0.0), 0)
    else:
        ref_a = lse_a
        ref_b = lse_b

    tl.store(loss_ptr + row, loss)
    tl.store(mass_ptr + row, mass)
    tl.store(stats_ptr + row * 4 + 0, ref_a)
    tl.store(stats_ptr + row * 4 + 1, ref_b)
    tl.store(stats_ptr + row * 4 + 2, loss)
    tl.store(stats_ptr + row * 4 + 3, mass)
    tl.store(sel_ptr + row * 2 + 0, tau)
    tl.store(sel_ptr + row * 2 + 1, need)

    # Pass 5 (fused): the weighted gradients, in place of the logits.
    if GRAD_FIRST or GRAD_SECOND:
        w = tl.load(w_ptr + row * w_stride).to(tl.float32)
        _grad_row(a_row, b_row, a_row, b_row, w, ref_a, ref_b, loss, mass, tau, need, V,
                  RENORM, GRAD_FIRST, GRAD_SECOND, KEY_BITS, BLOCK_V)


@triton.jit
def _topk_kl_bwd_kernel(
    a_ptr, a_stride, b_ptr, b_stride, ga_ptr, ga_stride, gb_ptr, gb_stride, w_ptr, w_stride, stats_ptr, sel_ptr, V,
    RENORM: tl.constexpr, GRAD_FIRST: tl.constexpr, GRAD_SECOND: tl.constexpr, KEY_BITS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    w = tl.load(w_ptr + row * w_stride).to(tl.float32)
    ref_a = tl.load(stats_ptr + row * 4 + 0)
    ref_b = tl.load(stats_ptr + row * 4 + 1)
    loss = tl.load(stats_ptr + row * 4 + 2)
    mass = tl.load(stats_ptr + row * 4 + 3)
    tau = tl.load(sel_ptr + row * 2 + 0)
    need = tl.load(sel_ptr + row * 2 + 1)
    _grad_row(
        a_ptr + row * a_stride, b_ptr + row * b_stride, ga_ptr + row * ga_stride, gb_ptr + row * gb_stride,
        w, ref_a, ref_b, loss, mass, tau, need, V, RENORM, GRAD_FIRST, GRAD_SECOND, KEY_BITS, BLOCK_V,
    )


def key_bits(dtype: torch.dtype) -> int:
    """Significant bits of the float32 ordering key of a logit stored as ``dtype`` (a multiple of 8)."""
    return {torch.bfloat16: 16, torch.float16: 24}.get(dtype, 32)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _require_runnable(x: torch.Tensor) -> None:
    if x.is_cuda:
        return
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(_topk_kl_fwd_kernel, InterpretedFunction):
        raise RuntimeError(
            "the Triton top-k KL kernels got CPU tensors but were compiled for a GPU; to run them on a CPU through "
            "Triton's interpreter set TRITON_INTERPRET=1 before the first Triton call of the process (the kernels are "
            "built when opcd_cli.kernels.topk_kl_triton is imported), or use OPCD_KERNEL=torch"
        )


def _launch_config(V: int, k: int, block_v: int | None):
    block_v = block_v or min(DEFAULT_BLOCK_V, triton.next_power_of_2(V))
    block_k = min(MAX_BLOCK_K, triton.next_power_of_2(k))
    return block_v, block_k, (8 if block_v >= 2048 else 4)


def topk_kl_forward(first_NV, second_NV, k, renorm, weight_N=None, grad_first=True, grad_second=False,
                    ids_Nk=None, block_v=None):
    """Run the forward kernel on logits [N, V]; returns ``(loss_N, mass_N, stats_N4, sel_N2)`` (float32, int32).

    ``stats_N4`` holds (ref_a, ref_b, loss, top-k mass) and ``sel_N2`` holds (tau, need) per row, which is what
    ``topk_kl_backward`` needs. With ``weight_N`` given, ``weight_N[n] * dloss_n/da`` is written over
    ``first_NV`` in place if ``grad_first``, and ``weight_N[n] * dloss_n/db`` over ``second_NV`` if
    ``grad_second`` (a tensor written in place needs a contiguous last dimension). ``ids_Nk``: optional int32
    scratch of at least [N, k] for the top-k ids.
    """
    _require_runnable(first_NV)
    N, V = first_NV.shape
    write_first = weight_N is not None and grad_first
    write_second = weight_N is not None and grad_second
    for written, x in ((write_first, first_NV), (write_second, second_NV)):
        if written and x.stride(-1) != 1:
            raise ValueError("a gradient is written in place over its logits, which need a contiguous last dimension")
    first_NV, second_NV = _last_dim_contiguous(first_NV), _last_dim_contiguous(second_NV)
    dev = first_NV.device
    loss_N = torch.empty(N, dtype=torch.float32, device=dev)
    mass_N = torch.empty(N, dtype=torch.float32, device=dev)
    stats_N4 = torch.empty(N, 4, dtype=torch.float32, device=dev)
    sel_N2 = torch.empty(N, 2, dtype=torch.int32, device=dev)
    if ids_Nk is None:
        ids_Nk = torch.empty(N, k, dtype=torch.int32, device=dev)
    if N == 0:
        return loss_N, mass_N, stats_N4, sel_N2
    w_N = loss_N if weight_N is None else weight_N  # never read without a gradient to write
    block_v, block_k, warps = _launch_config(V, k, block_v)
    _topk_kl_fwd_kernel[(N,)](
        first_NV, first_NV.stride(0), second_NV, second_NV.stride(0), ids_Nk, ids_Nk.stride(0),
        w_N, w_N.stride(0), loss_N, mass_N, stats_N4, sel_N2, V, k,
        RENORM=bool(renorm), GRAD_FIRST=write_first, GRAD_SECOND=write_second, KEY_BITS=key_bits(first_NV.dtype),
        BLOCK_V=block_v, BLOCK_K=block_k, num_warps=warps,
    )
    return loss_N, mass_N, stats_N4, sel_N2


def topk_kl_backward(first_NV, second_NV, grad_loss_N, stats_N4, sel_N2, renorm, grad_first=True,
                     grad_second=False, block_v=None):
    """The dense gradients ``grad_loss_N[n] * dloss_n/da`` and ``grad_loss_N[n] * dloss_n/db`` as new [N, V]
    tensors of the dtypes of ``first_NV`` and ``second_NV``; returns ``(grad_first_NV, grad_second_NV)``, each
    None unless asked for."""
    _require_runnable(first_NV)
    N, V = first_NV.shape
    first_NV, second_NV = _last_dim_contiguous(first_NV), _last_dim_contiguous(second_NV)
    new = lambda x: torch.empty_like(x, memory_format=torch.contiguous_format)  # noqa: E731
    grad_first_NV = new(first_NV) if grad_first else None
    grad_second_NV = new(second_NV) if grad_second else None
    if N == 0 or not (grad_first or grad_second):
        return grad_first_NV, grad_second_NV
    ga_NV = first_NV if grad_first_NV is None else grad_first_NV  # an output not asked for is never written
    gb_NV = second_NV if grad_second_NV is None else grad_second_NV
    block_v, _, warps = _launch_config(V, 1, block_v)
    _topk_kl_bwd_kernel[(N,)](
        first_NV, first_NV.stride(0), second_NV, second_NV.stride(0), ga_NV, ga_NV.stride(0), gb_NV, gb_NV.stride(0),
        grad_loss_N, grad_loss_N.stride(0), stats_N4, sel_N2, V,
        RENORM=bool(renorm), GRAD_FIRST=bool(grad_first), GRAD_SECOND=bool(grad_second),
        KEY_BITS=key_bits(first_NV.dtype), BLOCK_V=block_v, num_warps=warps,
    )
    return grad_first_NV, grad_second_NV


class TopkKLTriton(torch.autograd.Function):
    """Per-token losses and top-k masses from logits; gradients reach whichever logits require grad."""

    @staticmethod
    def forward(ctx, first_NV, second_NV, k, renorm, block_v):
        loss_N, mass_N, stats_N4, sel_N2 = topk_kl_forward(first_NV, second_NV, k, renorm, block_v=block_v)
        ctx.save_for_backward(first_NV, second_NV, stats_N4, sel_N2)
        ctx.renorm, ctx.block_v = renorm, block_v
        ctx.mark_non_differentiable(mass_N)
        return loss_N, mass_N

    @staticmethod
    def backward(ctx, grad_loss_N, _grad_mass_N):
        first_NV, second_NV, stats_N4, sel_N2 = ctx.saved_tensors
        grad_first_NV, grad_second_NV = topk_kl_backward(
            first_NV, second_NV, grad_loss_N.float(), stats_N4, sel_N2, ctx.renorm,
            grad_first=ctx.needs_input_grad[0], grad_second=ctx.needs_input_grad[1], block_v=ctx.block_v,
        )
        return grad_first_NV, grad_second_NV, None, None, None


def topk_kl_triton(
    first_logits, second_logits, k=256, mask=None, renorm=False, reduction="mean", return_topk_mass=False,
    block_v=None,
):
    """Top-k KL_S(p || q) from logits [N, V] with the Triton kernels (same contract as ``topk_kl_torch``).

    ``block_v`` overrides the number of columns per block (the tests use small blocks to cover several).
    """
    _check(first_logits, second_logits, k, mask, reduction)
    loss_N, mass_N = TopkKLTriton.apply(first_logits, second_logits, k, renorm, block_v)
    mask_f = None if mask is None else mask.float()
    loss = _reduce(loss_N, mask_f, reduction)
    if return_topk_mass:
        return loss, _reduce(mass_N, mask_f, "mean").detach()
    return loss


def topk_reverse_kl_triton(
    student_logits, teacher_logits, k=256, mask=None, renorm=False, reduction="mean", return_topk_mass=False,
    block_v=None,
):
    """``topk_kl_triton`` with the student first and the teacher refused if it requires grad."""
    refuse_teacher_grad(teacher_logits)
    return topk_kl_triton(
        student_logits, teacher_logits, k=k, mask=mask, renorm=renorm, reduction=reduction,
        return_topk_mass=return_topk_mass, block_v=block_v,
    )
