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

With ``tail`` the mass outside S is one more bucket of both (P_t = 1 - P, Q_t = 1 - Q, Q = sum_{i in S} q_i):
loss gains P_t (log P_t - log Q_t), and with c = log(P_t / Q_t) + 1, beta = P_t / Q_t (0 where a tail is
capped, ``naive.TAIL_LOG_MASS_MAX``) the gradients take one form for every variant:

    dloss/da_j = p_j * ([j in S] * (r_j + 1 - c) - alpha)          alpha = loss_S + P - c P
    dloss/db_j = q_j * ([j in S] * beta + gamma) - [j in S] * p_j    gamma = P - beta Q

(plain: c = beta = 0; renorm, with p~ and q~ for p and q: alpha = loss, c = 1, gamma = 1, beta = 0, and
nothing off S). So a row needs the two log-sum-exps, the set S, and the k pairs (a_i, b_i) on S. The kernels stream the row
in blocks of ``BLOCK_V`` columns (``STREAM_V``, twice as wide, in passes 2 and 5) and keep every pass free of
work that synchronises the program's threads inside the loop (reductions, scans, histograms). An earlier
design ran a radix select over the whole row, with a histogram or a scan in every block; on an H200 it moved
data at 0.9 TB/s, against 1.7 TB/s now (``bench/RESULTS.md``). The passes:

1. **statistics** (reads a and b): per column position j of the block, a running max and a rescaled sum of
   both logits (one exp per element); they are reduced to the two log-sum-exps once, after the loop. With
   ``ENTROPY`` a third accumulator, the rescaled sum of exp(x - m) (x - m), gives each side's full-vocabulary
   entropy H = log D - sum_j e^(x_j - top) (x_j - top) / D (D the sum, top the max) in the same pass. The
   running maxima of a are also the maxima of the BLOCK_V strided slices of the row, and the k-th largest
   of them, ``t0``, is a lower bound of the row's k-th largest value (k distinct elements are >= it);
2. **candidates** (reads a): every element with a >= t0 is appended to the row's candidate buffer through an
   atomic counter. On random logits, Gaussian or with a few large outliers, there are only a few more than k
   (about 1.1 k at k = 256 and V = 151,936);
3. **select**: among the candidates, held in registers, a radix select (4 histogram rounds of 8 bits) finds
   the k-th largest value and how many of its ties belong to S, a second one the lowest ids among those
   ties, and S is compacted into the row's id buffer. When there are more candidates than the buffer holds
   (adversarial rows: thousands of equal values), or k exceeds what the first pass can bound, an exact radix
   select over the row runs instead (histogram passes over 8 key bits at a time, then a compaction that
   ranks ties in id order);
   With ``UNION`` (S the union of both top-k) passes 2-3 run again on b, from b's running maxima, into the
   slots after a's (its own candidate buffer and counter); then each of b's ids that a's already hold is set
   to -1 (64 x 64 tile comparisons), and S is the 2k slots, -1 skipped by every later pass;
4. **loss**: the loss, the top-k masses P and Q and the log normalisers (full vocabulary, or over S with
   renorm) come from the k triples (id, a_id, b_id), read at the gathered ids; then the tail bucket, and the
   row's gradient coefficients (alpha, c, gamma, beta);
5. **gradients**, when the upstream gradient of every row is known in advance (the fused linear loss): the
   part of each gradient that holds outside S (``-p_j alpha`` for a, ``q_j gamma`` for b, 0 with renorm) is
   written over the whole row in place, scaled by a per-row weight; then, after a barrier, the k entries on S
   are overwritten with their full values, from (a_i, b_i) saved in pass 4 (the dense pass has overwritten
   the logits by then). A side not asked for (``GRAD_FIRST``, ``GRAD_SECOND``) costs no load or store; with
   renorm the dense part is zero and needs no load at all.

The backward kernel is pass 5 alone, into separate gradient buffers, from the saved ids and row statistics.
Every load is upcast to float32 straight away; the arithmetic is float32.

Cost per row with bf16 logits and the first side's gradient fused: a is read 3 times and b once, the
gradient written once, plus a few k scattered accesses; the scratch is an int32 candidate buffer
[N, ``scratch_width(k)``], an int32 counter per row, [N, 2k] float32 pairs (only when a gradient is
written in place) and [N, 8] row statistics.

Layers: ``@triton.jit`` kernels, the launch functions ``topk_kl_forward`` and ``topk_kl_backward``,
``TopkKLTriton`` (a ``torch.autograd.Function``) and the functional ``topk_kl_triton``; the fused-linear
path over them is ``fused_linear_triton.py``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .arguments import check_logits, reduce_loss, topk_outputs
from .naive import TAIL_LOG_MASS_MAX

# Columns per block of the first pass (2048 at 8 warps was the fastest of the launch configurations measured on
# an H200 inside the fused loss), and the width of the streaming passes as a multiple of it (twice as many loads
# in flight per thread at the same 64 registers; four times needed 128, halving the programs per SM). The tests
# pass smaller blocks to cover rows of several blocks.
DEFAULT_BLOCK_V = 2048
STREAM_FACTOR = 2
MAX_BLOCK_K = 1024
# Candidate slots per row, as a multiple of the padded k (``candidate_slots``), at most MAX_CANDIDATES.
CANDIDATE_FACTOR = 4
MAX_CANDIDATES = 4096
# The first pass's running max starts at this finite floor rather than -inf (so that no -inf - -inf arises);
# a position still at the floor has seen no finite logit. _EMPTY_KEY is its ordering key (``_ordered_key``).
_EMPTY = tl.constexpr(-3.0e38)
_EMPTY_KEY = tl.constexpr(-2137108967)
_TAIL_LOG_MASS_MAX = tl.constexpr(TAIL_LOG_MASS_MAX)
# Per-row statistics: the log normalisers and the coefficients alpha, c, gamma, beta (for the gradients), then
# the two full-vocabulary entropies (with ENTROPY; else 0).
STATS = 8
_STATS = tl.constexpr(STATS)


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
    """One block of an online log-sum-exp: running max ``m`` and sum ``d`` of exp(x - m) (scalars)."""
    m_new = tl.maximum(m, tl.max(x, 0))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    d = d * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref), 0)
    return m_new, d


@triton.jit
def _lse_step(m, d, x):
    """Elementwise running max ``m`` (starting at the finite floor _EMPTY) and sum ``d`` of exp(x - m): one exp
    per element, no reduction. A -inf logit adds exp(-inf) = 0."""
    e = tl.exp(-tl.abs(x - m))
    d = tl.where(x > m, d * e + 1.0, d + e)
    return tl.maximum(m, x), d


@triton.jit
def _lse_entropy_step(m, d, s, x):
    """``_lse_step`` that also keeps ``s``, the sum of exp(x - m) (x - m) at the running max: when the max moves
    from m to m', s becomes e (s + d (m - m')) with e = exp(m - m')."""
    e = tl.exp(-tl.abs(x - m))
    up = x > m
    gap = tl.where(e > 0, x - m, 0.0)  # finite: a -inf logit (e = 0) adds nothing and makes no 0 * inf
    s = tl.where(up, e * (s - d * gap), s + e * gap)
    d = tl.where(up, d * e + 1.0, d + e)
    return tl.maximum(m, x), d, s


@triton.jit
def _entropy_finish(m, d, s):
    """-sum p log p of everything the accumulators ``m``, ``d``, ``s`` of ``_lse_entropy_step`` have seen:
    log D - E / D with D = sum exp(x - top) and E = sum exp(x - top) (x - top)."""
    top = tl.max(m, 0)
    w = tl.exp(m - top)
    total = tl.sum(d * w, 0)
    return tl.log(total) - tl.sum(w * (s + d * (m - top)), 0) / total


@triton.jit
def _lse_finish(m, d):
    """log sum exp of everything the per-position accumulators ``m``, ``d`` have seen."""
    top = tl.max(m, 0)
    return top + tl.log(tl.sum(d * tl.exp(m - top), 0))  # a row of -inf only: log(0) = -inf


@triton.jit
def _choose_digit(hist, need):
    """The largest digit b with #(digit >= b) >= need, and ``need`` less the elements with digit > b."""
    bins = tl.arange(0, 256)
    at_least = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist
    digit = tl.max(tl.where(at_least >= need, bins, -1), 0)
    above = tl.sum(tl.where(bins > digit, hist, 0), 0)
    return digit, need - above


@triton.jit
def _kth_largest(key, mask, need):
    """The ``need``-th largest of the int32 keys where ``mask`` (in registers: 4 histogram rounds of 8 bits), and
    how many elements equal to it are among the ``need`` largest."""
    prefix = 0
    for d in tl.static_range(0, 4):
        if d == 0:
            hist = tl.histogram(((key >> 24) & 0xFF) ^ 0x80, 256, mask=mask)
        else:
            match = mask & ((key >> (32 - 8 * d)) == prefix)
            hist = tl.histogram((key >> (24 - 8 * d)) & 0xFF, 256, mask=match)
        digit, need = _choose_digit(hist, need)
        if d == 0:
            prefix = digit - 128  # the top 8 bits as a signed value, as key >> 24 gives them
        else:
            prefix = prefix * 256 + digit
    return prefix, need


@triton.jit
def _radix_select(a_row, ids_row, V, K, KEY_BITS: tl.constexpr, BLOCK_V: tl.constexpr):
    """Exact selection by radix select: the ids of S into ``ids_row[0:K]`` (in id order).

    Each pass histograms the next 8 key bits among the elements that match the prefix chosen so far; then
    every element with key > tau, and the first ``need`` elements with key == tau in id order, are compacted.
    A bf16 logit has 16 significant key bits (2 histogram passes), fp16 24 (3), float32 32 (4).
    """
    cols0 = tl.arange(0, BLOCK_V)
    need = K
    prefix = 0
    for d in tl.static_range(0, KEY_BITS // 8):
        hist = tl.zeros((256,), dtype=tl.int32)
        for off in range(0, V, BLOCK_V):
            cols = off + cols0
            valid = cols < V
            a = tl.load(a_row + cols, mask=valid, other=float("-inf")).to(tl.float32)
            key = _ordered_key(a, KEY_BITS)
            if d == 0:
                hist += tl.histogram(((key >> (KEY_BITS - 8)) & 0xFF) ^ 0x80, 256, mask=valid)
            else:
                match = valid & ((key >> (KEY_BITS - 8 * d)) == prefix)
                hist += tl.histogram((key >> (KEY_BITS - 8 * (d + 1))) & 0xFF, 256, mask=match)
        digit, need = _choose_digit(hist, need)
        if d == 0:
            prefix = digit - 128  # the top 8 key bits as a signed value, as key >> (KEY_BITS - 8) gives them
        else:
            prefix = prefix * 256 + digit
    tau = prefix
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


@triton.jit
def _dense_grads(a_row, b_row, ga_row, gb_row, w, ref_a, ref_b, alpha, gamma, V,
                 RENORM: tl.constexpr, GRAD_FIRST: tl.constexpr, GRAD_SECOND: tl.constexpr, BLOCK_V: tl.constexpr):
    """The gradients as they are off S, times ``w``, over the whole row: -p_j alpha into ``ga_row`` and
    q_j gamma into ``gb_row`` (zero with renorm). The outputs may be the inputs: each block reads, then writes."""
    cols0 = tl.arange(0, BLOCK_V)
    for off in range(0, V, BLOCK_V):
        cols = off + cols0
        valid = cols < V
        if GRAD_FIRST:
            if RENORM:
                ga = tl.zeros((BLOCK_V,), dtype=tl.float32)
            else:
                p = tl.exp(tl.load(a_row + cols, mask=valid, other=float("-inf")).to(tl.float32) - ref_a)
                ga = tl.where(p > 0, -p * alpha, 0.0) * w
            tl.store(ga_row + cols, ga.to(ga_row.dtype.element_ty), mask=valid)
        if GRAD_SECOND:
            if RENORM:
                gb = tl.zeros((BLOCK_V,), dtype=tl.float32)
            else:
                q = tl.exp(tl.load(b_row + cols, mask=valid, other=float("-inf")).to(tl.float32) - ref_b)
                gb = q * gamma * w
            tl.store(gb_row + cols, gb.to(gb_row.dtype.element_ty), mask=valid)


@triton.jit
def _grads_on_s(ids, a, b, kv, ga_row, gb_row, w, ref_a, ref_b, alpha, c, gamma, beta,
                GRAD_FIRST: tl.constexpr, GRAD_SECOND: tl.constexpr):
    """The full gradients at the ids of S (given their logits ``a``, ``b``), times ``w``, over the dense values:
    p_j (r_j + 1 - c - alpha) and q_j (gamma + beta) - p_j."""
    logp = a - ref_a
    logq = b - ref_b
    p = tl.exp(logp)
    if GRAD_FIRST:
        ga = tl.where(p > 0, p * (logp - logq + 1.0 - c - alpha), 0.0)
        tl.store(ga_row + ids, (ga * w).to(ga_row.dtype.element_ty), mask=kv)
    if GRAD_SECOND:
        gb = tl.exp(logq) * (gamma + beta) - p
        tl.store(gb_row + ids, (gb * w).to(gb_row.dtype.element_ty), mask=kv)


@triton.jit
def _log_tail(log_mass):
    """log(1 - mass) from log(mass), the mass capped just under 1 (``TAIL_LOG_MASS_MAX``): 1 - exp(x) as a
    series near 0, where the subtraction would lose the digits."""
    x = tl.minimum(log_mass, _TAIL_LOG_MASS_MAX)
    series = -x * (1.0 + x / 2 * (1.0 + x / 3 * (1.0 + x / 4 * (1.0 + x / 5 * (1.0 + x / 6)))))
    return tl.log(tl.where(x > -0.1, series, 1.0 - tl.exp(x)))


@triton.jit
def _coefficients(loss, mass, q_mass, RENORM: tl.constexpr, TAIL: tl.constexpr):
    """(loss with the tail bucket, alpha, c, gamma, beta): the row's loss and its gradients' coefficients."""
    if RENORM:
        return loss, loss, 1.0, 1.0, 0.0
    if TAIL:
        log_p_mass = tl.log(mass)
        log_q_mass = tl.log(q_mass)
        logp_t = _log_tail(log_p_mass)
        logq_t = _log_tail(log_q_mass)
        c = tl.where(log_p_mass <= _TAIL_LOG_MASS_MAX, logp_t - logq_t + 1.0, 0.0)
        beta = tl.where(log_q_mass <= _TAIL_LOG_MASS_MAX, tl.exp(logp_t - logq_t), 0.0)
        return loss + tl.exp(logp_t) * (logp_t - logq_t), loss + mass - c * mass, c, mass - beta * q_mass, beta
    return loss, loss + mass, 0.0, mass, 0.0


@triton.jit
def _row_statistics(a_row, b_row, V, ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    """Pass 1: the log-sum-exps of both rows, their entropies (with ``ENTROPY``, else 0), and the per-position
    running maxima of a and b (from which lower bounds of the k-th largest logits come). The running sums are per
    position; they are reduced once, after the loop."""
    cols0 = tl.arange(0, BLOCK_V)
    m_a = tl.full((BLOCK_V,), _EMPTY, dtype=tl.float32)
    d_a = tl.zeros((BLOCK_V,), dtype=tl.float32)
    s_a = tl.zeros((BLOCK_V,), dtype=tl.float32)
    m_b = tl.full((BLOCK_V,), _EMPTY, dtype=tl.float32)
    d_b = tl.zeros((BLOCK_V,), dtype=tl.float32)
    s_b = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for off in range(0, V, BLOCK_V):
        cols = off + cols0
        valid = cols < V
        a = tl.load(a_row + cols, mask=valid, other=float("-inf")).to(tl.float32)
        b = tl.load(b_row + cols, mask=valid, other=float("-inf")).to(tl.float32)
        if ENTROPY:
            m_a, d_a, s_a = _lse_entropy_step(m_a, d_a, s_a, a)
            m_b, d_b, s_b = _lse_entropy_step(m_b, d_b, s_b, b)
        else:
            m_a, d_a = _lse_step(m_a, d_a, a)
            m_b, d_b = _lse_step(m_b, d_b, b)
    h_a = 0.0
    h_b = 0.0
    if ENTROPY:
        h_a = _entropy_finish(m_a, d_a, s_a)
        h_b = _entropy_finish(m_b, d_b, s_b)
    return _lse_finish(m_a, d_a), _lse_finish(m_b, d_b), m_a, m_b, h_a, h_b


@triton.jit
def _select_candidates(a_row, ids_row, cnt_ptr, row, m_a, V, K, KEY_BITS: tl.constexpr, BLOCK_V: tl.constexpr,
                       STREAM_V: tl.constexpr, BLOCK_C: tl.constexpr):
    """Passes 2-3: the ids of S into ``ids_row[0:K]`` through the candidates >= t0 (radix select on overflow)."""
    # t0: the K-th largest of the per-position maxima, a lower bound of the row's K-th largest value
    t0, _ = _kth_largest(_ordered_key(m_a, 32), tl.arange(0, BLOCK_V) >= 0, K)
    t0 = tl.where(t0 <= _EMPTY_KEY, -2147483647 - 1, t0)  # fewer than K finite positions: take everything
    cols1 = tl.arange(0, STREAM_V)
    cnt_row = cnt_ptr + row + tl.zeros((STREAM_V,), dtype=tl.int32)
    for off in range(0, V, STREAM_V):
        cols = off + cols1
        valid = cols < V
        a = tl.load(a_row + cols, mask=valid, other=float("-inf")).to(tl.float32)
        take = valid & (_ordered_key(a, 32) >= t0)
        slot = tl.atomic_add(cnt_row, 1, mask=take)
        tl.store(ids_row + slot, cols, mask=take & (slot < BLOCK_C))
    tl.debug_barrier()
    total = tl.atomic_add(cnt_ptr + row, 0)  # the final count, read where the atomics were made
    if total <= BLOCK_C:
        tl.debug_barrier()  # every candidate is stored before any thread reads them
        cc = tl.arange(0, BLOCK_C)
        cv = cc < total
        cid = tl.load(ids_row + cc, mask=cv, other=0)
        ckey = _ordered_key(tl.load(a_row + cid, mask=cv, other=float("-inf")).to(tl.float32), 32)
        tau, need = _kth_largest(ckey, cv, K)  # the K-th largest value, and how many of its ties are in S
        tied = cv & (ckey == tau)
        lower_first = 2147483647 - cid  # larger for lower ids: ties go to the lower ids
        tau_id, _ = _kth_largest(lower_first, tied, need)
        take = (cv & (ckey > tau)) | (tied & (lower_first >= tau_id))
        slot = tl.cumsum(take.to(tl.int32), 0) - 1
        tl.debug_barrier()  # every thread has read the candidates before they are overwritten
        tl.store(ids_row + slot, cid, mask=take)
    else:
        _radix_select(a_row, ids_row, V, K, KEY_BITS, BLOCK_V)


@triton.jit
def _pairs_at(ids_row, a_row, b_row, kk, K):
    """The ids of S at positions ``kk`` of the row's id buffer, and the two logits there (float32); an id of -1
    (the union's repeat of an id already held) is masked out."""
    ids = tl.load(ids_row + kk, mask=kk < K, other=-1)
    kv = ids >= 0
    ids = tl.where(kv, ids, 0)
    a = tl.load(a_row + ids, mask=kv, other=0.0).to(tl.float32)
    b = tl.load(b_row + ids, mask=kv, other=0.0).to(tl.float32)
    return ids, a, b, kv


@triton.jit
def _topk_loss(a_row, b_row, ids_row, pairs_row, lse_a, lse_b, K, RENORM: tl.constexpr, KEEP_PAIRS: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """Pass 4: (loss, top-k mass, the second's mass on S, ref_a, ref_b) from the k triples (id, a_id, b_id); ref_a
    and ref_b are the log normalisers (full vocabulary, or over S with renorm). With ``KEEP_PAIRS`` the pairs (a_id, b_id) are saved
    to ``pairs_row`` for the gradient pass, which overwrites the logits."""
    kk0 = tl.arange(0, BLOCK_K)
    mass = 0.0
    q_mass = 0.0
    loss = 0.0
    m_q = float("-inf")
    d_q = 0.0
    for koff in range(0, K, BLOCK_K):
        kk = koff + kk0
        ids, a, b, kv = _pairs_at(ids_row, a_row, b_row, kk, K)
        logp = a - lse_a
        p = tl.where(kv, tl.exp(logp), 0.0)
        mass += tl.sum(p, 0)
        q_mass += tl.sum(tl.where(kv, tl.exp(b - lse_b), 0.0), 0)
        loss += tl.sum(tl.where(p > 0, p * (logp - (b - lse_b)), 0.0), 0)
        if RENORM:
            m_q, d_q = _online_lse(m_q, d_q, tl.where(kv, b, float("-inf")))
        if KEEP_PAIRS:
            tl.store(pairs_row + kk, a, mask=kv)
            tl.store(pairs_row + K + kk, b, mask=kv)
    if RENORM:
        ref_a = lse_a + tl.log(mass)
        ref_b = m_q + tl.log(d_q)
        loss = 0.0
        for koff in range(0, K, BLOCK_K):
            ids, a, b, kv = _pairs_at(ids_row, a_row, b_row, koff + kk0, K)
            logp = a - ref_a
            p = tl.where(kv, tl.exp(logp), 0.0)
            loss += tl.sum(tl.where(p > 0, p * (logp - (b - ref_b)), 0.0), 0)
    else:
        ref_a = lse_a
        ref_b = lse_b
    return loss, mass, q_mass, ref_a, ref_b


@triton.jit
def _drop_repeats(ids_row, K, TILE: tl.constexpr):
    """With the union: each of the second's ids (``ids_row[K:2K]``) that is also one of the first's
    (``ids_row[0:K]``) becomes -1, so that S holds every id once. Tiles of TILE x TILE comparisons."""
    t = tl.arange(0, TILE)
    for boff in range(0, K, TILE):
        bk = boff + t
        idb = tl.load(ids_row + K + bk, mask=bk < K, other=-1)
        seen = tl.zeros((TILE,), dtype=tl.int32)
        for aoff in range(0, K, TILE):
            ak = aoff + t
            ida = tl.load(ids_row + ak, mask=ak < K, other=-2)
            seen = tl.maximum(seen, tl.max((idb[:, None] == ida[None, :]).to(tl.int32), 1))
        tl.store(ids_row + K + bk, tl.where(seen > 0, -1, idb), mask=bk < K)


@triton.jit
def _topk_kl_fwd_kernel(
    a_ptr, a_stride, b_ptr, b_stride, ids_ptr, ids_stride, cnt_ptr, pairs_ptr, pairs_stride, w_ptr, w_stride,
    loss_ptr, mass_ptr, stats_ptr, V, K,
    RENORM: tl.constexpr, TAIL: tl.constexpr, ENTROPY: tl.constexpr, UNION: tl.constexpr, GRAD_FIRST: tl.constexpr,
    GRAD_SECOND: tl.constexpr, KEY_BITS: tl.constexpr, KEY_BITS_B: tl.constexpr, FAST: tl.constexpr, BLOCK_V: tl.constexpr, STREAM_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    a_row = a_ptr + row * a_stride
    b_row = b_ptr + row * b_stride
    ids_row = ids_ptr + row * ids_stride
    lse_a, lse_b, m_a, m_b, h_a, h_b = _row_statistics(a_row, b_row, V, ENTROPY, BLOCK_V)
    if FAST:
        _select_candidates(a_row, ids_row, cnt_ptr, row, m_a, V, K, KEY_BITS, BLOCK_V, STREAM_V, BLOCK_C)
    else:
        _radix_select(a_row, ids_row, V, K, KEY_BITS, BLOCK_V)
    KS = K
    if UNION:  # the second's top-k after the first's (its own candidate buffer and counter), repeats dropped
        tl.debug_barrier()
        if FAST:
            _select_candidates(b_row, ids_row + K, cnt_ptr + tl.num_programs(0), row, m_b, V, K, KEY_BITS_B,
                               BLOCK_V, STREAM_V, BLOCK_C)
        else:
            _radix_select(b_row, ids_row + K, V, K, KEY_BITS_B, BLOCK_V)
        tl.debug_barrier()
        _drop_repeats(ids_row, K, 64)
        KS = 2 * K
    tl.debug_barrier()  # the ids written by every thread are read back below
    # the row's pairs pointer is made where it is used (kept alive across the passes it was spilled to the stack)
    loss, mass, q_mass, ref_a, ref_b = _topk_loss(a_row, b_row, ids_row, pairs_ptr + row * pairs_stride, lse_a,
                                                  lse_b, KS, RENORM, GRAD_FIRST or GRAD_SECOND, BLOCK_K)
    loss, alpha, c, gamma, beta = _coefficients(loss, mass, q_mass, RENORM, TAIL)
    tl.store(loss_ptr + row, loss)
    tl.store(mass_ptr + row, mass)
    tl.store(stats_ptr + row * _STATS + 0, ref_a)
    tl.store(stats_ptr + row * _STATS + 1, ref_b)
    tl.store(stats_ptr + row * _STATS + 2, alpha)
    tl.store(stats_ptr + row * _STATS + 3, c)
    tl.store(stats_ptr + row * _STATS + 4, gamma)
    tl.store(stats_ptr + row * _STATS + 5, beta)
    tl.store(stats_ptr + row * _STATS + 6, h_a)
    tl.store(stats_ptr + row * _STATS + 7, h_b)
    if GRAD_FIRST or GRAD_SECOND:  # pass 5, fused: the weighted gradients in place of the logits
        w = tl.load(w_ptr + row * w_stride).to(tl.float32)
        _dense_grads(a_row, b_row, a_row, b_row, w, ref_a, ref_b, alpha, gamma, V,
                     RENORM, GRAD_FIRST, GRAD_SECOND, STREAM_V)
        tl.debug_barrier()  # the dense values are written before S's are written over them
        pairs_row = pairs_ptr + row * pairs_stride
        kk0 = tl.arange(0, BLOCK_K)
        for koff in range(0, KS, BLOCK_K):
            kk = koff + kk0
            ids = tl.load(ids_row + kk, mask=kk < KS, other=-1)
            kv = ids >= 0
            a = tl.load(pairs_row + kk, mask=kv, other=0.0)
            b = tl.load(pairs_row + KS + kk, mask=kv, other=0.0)
            _grads_on_s(ids, a, b, kv, a_row, b_row, w, ref_a, ref_b, alpha, c, gamma, beta, GRAD_FIRST, GRAD_SECOND)


@triton.jit
def _topk_kl_bwd_kernel(
    a_ptr, a_stride, b_ptr, b_stride, ga_ptr, ga_stride, gb_ptr, gb_stride, w_ptr, w_stride, stats_ptr,
    ids_ptr, ids_stride, V, K,
    RENORM: tl.constexpr, GRAD_FIRST: tl.constexpr, GRAD_SECOND: tl.constexpr, STREAM_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    w = tl.load(w_ptr + row * w_stride).to(tl.float32)
    ref_a = tl.load(stats_ptr + row * _STATS + 0)
    ref_b = tl.load(stats_ptr + row * _STATS + 1)
    alpha = tl.load(stats_ptr + row * _STATS + 2)
    c = tl.load(stats_ptr + row * _STATS + 3)
    gamma = tl.load(stats_ptr + row * _STATS + 4)
    beta = tl.load(stats_ptr + row * _STATS + 5)
    a_row = a_ptr + row * a_stride
    b_row = b_ptr + row * b_stride
    ga_row = ga_ptr + row * ga_stride
    gb_row = gb_ptr + row * gb_stride
    _dense_grads(a_row, b_row, ga_row, gb_row, w, ref_a, ref_b, alpha, gamma, V, RENORM, GRAD_FIRST, GRAD_SECOND,
                 STREAM_V)
    tl.debug_barrier()  # the dense values are written before S's are written over them
    kk0 = tl.arange(0, BLOCK_K)
    for koff in range(0, K, BLOCK_K):
        ids, a, b, kv = _pairs_at(ids_ptr + row * ids_stride, a_row, b_row, koff + kk0, K)
        _grads_on_s(ids, a, b, kv, ga_row, gb_row, w, ref_a, ref_b, alpha, c, gamma, beta, GRAD_FIRST, GRAD_SECOND)


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


class LaunchConfig(NamedTuple):
    """How the kernels are launched for a vocabulary and a k."""

    block_v: int  # columns per block of the first pass
    stream_v: int  # of the two streaming passes (candidates, dense gradients): STREAM_FACTOR times wider
    block_k: int  # ids per block of the k-loops
    block_c: int  # candidate slots
    fast: bool  # whether the candidate filter applies (k no larger than the padded k and the block)
    warps: int  # warps per program


def _launch_config(V: int, k: int, block_v: int | None, num_warps: int | None = None) -> LaunchConfig:
    """The ``LaunchConfig`` for ``V`` columns and ``k`` (``block_v`` and ``num_warps`` when given)."""
    block_v = block_v or min(DEFAULT_BLOCK_V, triton.next_power_of_2(V))
    stream_v = max(block_v, min(block_v * STREAM_FACTOR, triton.next_power_of_2(V)))
    block_k = min(MAX_BLOCK_K, triton.next_power_of_2(k))
    fast = k <= block_k <= block_v
    return LaunchConfig(block_v, stream_v, block_k, candidate_slots(k), fast,
                        num_warps or (8 if block_v >= 2048 else 4))


def candidate_slots(k: int) -> int:
    """Candidates a row's buffer holds for ``k`` (a power of two, at least the padded k)."""
    return min(MAX_CANDIDATES, CANDIDATE_FACTOR * min(MAX_BLOCK_K, triton.next_power_of_2(k)))


def scratch_width(k: int, union: bool = False) -> int:
    """Columns of the int32 id scratch for ``k``: the candidate buffer, and room for k ids (with the union, the
    first's k ids, then the second's candidate buffer and its k ids)."""
    return max(k, candidate_slots(k)) + (k if union else 0)


def topk_kl_forward(first_NV, second_NV, k, renorm, weight_N=None, grad_first=True, grad_second=False,
                    ids_Nc=None, block_v=None, num_warps=None, tail=False, entropy=False, union=False):
    """Run the forward kernel on logits [N, V]; returns ``(loss_N, mass_N, stats_N8, ids_Nk)``.

    ``stats_N8`` (float32) holds (ref_a, ref_b, alpha, c, gamma, beta, H_a, H_b) per row (the module docstring;
    the entropies with ``entropy``, else 0) and ``ids_Nk`` (int32, a view of the
    id scratch) the ids of S per row, in no particular order: what ``topk_kl_backward`` needs. With
    ``weight_N`` given, ``weight_N[n] * dloss_n/da`` is written over ``first_NV`` in place if ``grad_first``,
    and ``weight_N[n] * dloss_n/db`` over ``second_NV`` if ``grad_second`` (a tensor written in place needs a
    contiguous last dimension). ``ids_Nc``: optional int32 scratch of at least [N, ``scratch_width(k)``].
    ``block_v`` and ``num_warps`` override the launch configuration (columns per block, warps per program).
    ``tail``: the mass outside S as one more bucket. ``union``: S is the union of both top-k; ``ids_Nk`` is then
    [N, 2k], the first's ids, then the second's with those already held as -1.
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
    block_v, stream_v, block_k, block_c, fast, warps = _launch_config(V, k, block_v, num_warps)
    loss_N = torch.empty(N, dtype=torch.float32, device=dev)
    mass_N = torch.empty(N, dtype=torch.float32, device=dev)
    stats_N8 = torch.empty(N, STATS, dtype=torch.float32, device=dev)
    ks = 2 * k if union else k  # the ids S is held in
    if ids_Nc is None or ids_Nc.shape[0] < N or ids_Nc.shape[1] < scratch_width(k, union):
        ids_Nc = torch.empty(N, scratch_width(k, union), dtype=torch.int32, device=dev)
    if N == 0:
        return loss_N, mass_N, stats_N8, ids_Nc[:N, :ks]
    count_N = torch.zeros(2 * N if union else N, dtype=torch.int32, device=dev)  # the second's after the first's
    pairs_N2k = torch.empty(N, 2 * ks if (write_first or write_second) else 1, dtype=torch.float32, device=dev)
    w_N = loss_N if weight_N is None else weight_N  # never read without a gradient to write
    _topk_kl_fwd_kernel[(N,)](
        first_NV, first_NV.stride(0), second_NV, second_NV.stride(0), ids_Nc, ids_Nc.stride(0), count_N,
        pairs_N2k, pairs_N2k.stride(0), w_N, w_N.stride(0), loss_N, mass_N, stats_N8, V, k,
        RENORM=bool(renorm), TAIL=bool(tail), ENTROPY=bool(entropy), UNION=bool(union), GRAD_FIRST=write_first,
        GRAD_SECOND=write_second, KEY_BITS=key_bits(first_NV.dtype), KEY_BITS_B=key_bits(second_NV.dtype), FAST=fast, BLOCK_V=block_v, STREAM_V=stream_v, BLOCK_K=block_k, BLOCK_C=block_c, num_warps=warps,
    )
    return loss_N, mass_N, stats_N8, ids_Nc[:N, :ks]


def row_stats(mass_N: torch.Tensor, stats_N8: torch.Tensor) -> torch.Tensor:
    """[N, 3]: the top-k mass and the two entropies of each row (what the entry points report)."""
    return torch.cat([mass_N[:, None], stats_N8[:, 6:8]], dim=1)


def topk_kl_backward(first_NV, second_NV, grad_loss_N, stats_N8, ids_Nk, renorm, grad_first=True,
                     grad_second=False, block_v=None):
    """The dense gradients ``grad_loss_N[n] * dloss_n/da`` and ``grad_loss_N[n] * dloss_n/db`` as new [N, V]
    tensors of the dtypes of ``first_NV`` and ``second_NV``, from the forward's statistics and ids; returns
    ``(grad_first_NV, grad_second_NV)``, each None unless asked for."""
    _require_runnable(first_NV)
    N, V = first_NV.shape
    k = ids_Nk.shape[1]
    first_NV, second_NV = _last_dim_contiguous(first_NV), _last_dim_contiguous(second_NV)
    new = lambda x: torch.empty_like(x, memory_format=torch.contiguous_format)  # noqa: E731
    grad_first_NV = new(first_NV) if grad_first else None
    grad_second_NV = new(second_NV) if grad_second else None
    if N == 0 or not (grad_first or grad_second):
        return grad_first_NV, grad_second_NV
    ga_NV = first_NV if grad_first_NV is None else grad_first_NV  # an output not asked for is never written
    gb_NV = second_NV if grad_second_NV is None else grad_second_NV
    launch = _launch_config(V, k, block_v)
    stream_v, block_k, warps = launch.stream_v, launch.block_k, launch.warps
    _topk_kl_bwd_kernel[(N,)](
        first_NV, first_NV.stride(0), second_NV, second_NV.stride(0), ga_NV, ga_NV.stride(0), gb_NV, gb_NV.stride(0),
        grad_loss_N, grad_loss_N.stride(0), stats_N8, ids_Nk, ids_Nk.stride(0), V, k,
        RENORM=bool(renorm), GRAD_FIRST=bool(grad_first), GRAD_SECOND=bool(grad_second), STREAM_V=stream_v,
        BLOCK_K=block_k, num_warps=warps,
    )
    return grad_first_NV, grad_second_NV


class TopkKLTriton(torch.autograd.Function):
    """Per-token losses and top-k masses from logits; gradients reach whichever logits require grad."""

    @staticmethod
    def forward(ctx, first_NV, second_NV, k, renorm, block_v, tail, entropy, union):
        loss_N, mass_N, stats_N8, ids_Nk = topk_kl_forward(first_NV, second_NV, k, renorm, block_v=block_v,
                                                           tail=tail, entropy=entropy, union=union)
        ctx.save_for_backward(first_NV, second_NV, stats_N8, ids_Nk)
        ctx.renorm, ctx.block_v = renorm, block_v
        stats_N3 = row_stats(mass_N, stats_N8)
        ctx.mark_non_differentiable(stats_N3)
        return loss_N, stats_N3

    @staticmethod
    def backward(ctx, grad_loss_N, _grad_stats_N3):
        first_NV, second_NV, stats_N8, ids_Nk = ctx.saved_tensors
        grad_first_NV, grad_second_NV = topk_kl_backward(
            first_NV, second_NV, grad_loss_N.float(), stats_N8, ids_Nk, ctx.renorm,
            grad_first=ctx.needs_input_grad[0], grad_second=ctx.needs_input_grad[1], block_v=ctx.block_v,
        )
        return grad_first_NV, grad_second_NV, None, None, None, None, None, None


def topk_kl_triton(
    first_logits, second_logits, k=256, mask=None, renorm=False, reduction="mean", return_topk_mass=False,
    block_v=None, tail=False, return_entropy=False, union=False,
):
    """Top-k KL_S(p || q) from logits [N, V] with the Triton kernels (same contract as ``topk_kl_torch``).

    ``block_v`` overrides the number of columns per block (the tests use small blocks to cover several).
    """
    check_logits(first_logits, second_logits, k, mask, reduction, renorm, tail)
    loss_N, stats_N3 = TopkKLTriton.apply(first_logits, second_logits, k, renorm, block_v, tail, return_entropy,
                                          union)
    return topk_outputs(reduce_loss(loss_N, mask, reduction), stats_N3, mask, return_topk_mass, return_entropy)
