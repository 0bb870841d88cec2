"""KL from a sparse fixed target: off-policy distillation from saved top-k ids and log-probabilities.

For each token n the target is given as k ids and their log-probabilities lq_i under the target's full
vocabulary (not renormalised over the k ids); q_i = exp(lq_i). With p = softmax(z) the trainable side's
distribution over the full vocabulary:

    loss_n = sum_{i = 1..k} q_i * (lq_i - log p_{id_i})

An entry with lq_i = -inf contributes nothing (0 log 0 = 0), which is how shorter lists are padded. The
target gets no gradient; with Q = sum_i q_i the gradient with respect to the logits is

    dloss_n / dz_j = p_j * Q - sum_{i : id_i = j} q_i

(the ids are normally distinct, so the sum is q of j where j is one of them). When the ids cover the whole
vocabulary, loss_n is KL(q || p) exactly; otherwise it is the part of that KL carried by the given ids.

Argument order everywhere: target first (``target_ids_Nk``, ``target_logprobs_Nk``), then the trainable side
(``logits_NV``, or ``hidden_NH`` and ``weight_VH`` whose product ``hidden @ weight.T`` is the logits).

The formula with autograd on full tensors is ``naive.naive_sparse_target_kl`` (the tests' reference).

With ``return_entropy`` both also return the mean full-vocabulary entropy of p (unmasked tokens), from the
log-sum-exp's pass.

* ``sparse_target_kl``: chunked over rows, analytic gradient recomputed in backward.
* ``fused_linear_sparse_target_kl``: logits made chunk by chunk from hidden states; no [N, V] tensor exists.
"""

from __future__ import annotations

import torch

from .arguments import check_targets, reduce_loss, token_weights
from .row_loss import fused_linear_row_loss
from .torch_chunked import entropy_rows, rows_per_chunk


def sparse_target_kl_rows(ids_nk, lq_nk, logits_nV, want_grad: bool, entropy_n=None):
    """Loss and (optionally) the unscaled gradient d loss_n / d logits for a chunk of rows, in float32; the rows'
    entropies of p into ``entropy_n`` when given."""
    z_nV = logits_nV.float()
    lse_n1 = torch.logsumexp(z_nV, dim=-1, keepdim=True)
    if entropy_n is not None:
        entropy_n.copy_(entropy_rows(z_nV - lse_n1))
    logp_nk = z_nV.gather(1, ids_nk) - lse_n1
    lq_nk = lq_nk.float()
    q_nk = lq_nk.exp()  # 0 for -inf entries, which then add nothing below
    loss_n = torch.where(q_nk > 0, q_nk * (lq_nk - logp_nk), torch.zeros_like(q_nk)).sum(-1)
    if not want_grad:
        return loss_n, None
    grad_nV = (z_nV - lse_n1).exp_().mul_(q_nk.sum(-1, keepdim=True))  # p * Q
    grad_nV.scatter_add_(1, ids_nk, -q_nk)
    return loss_n, grad_nV


class _SparseTargetKL(torch.autograd.Function):
    """Chunked over rows: forward keeps no float32 [N, V] copy; backward recomputes each chunk's gradient."""

    @staticmethod
    def forward(ctx, ids_Nk, lq_Nk, logits_NV, chunk_rows, entropy):
        N = logits_NV.shape[0]
        loss_N = logits_NV.new_empty(N, dtype=torch.float32)
        entropy_N = logits_NV.new_zeros(N, dtype=torch.float32)
        for s in range(0, N, chunk_rows):
            e = s + chunk_rows
            loss_N[s:e], _ = sparse_target_kl_rows(ids_Nk[s:e], lq_Nk[s:e], logits_NV[s:e], want_grad=False,
                                                   entropy_n=entropy_N[s:e] if entropy else None)
        ctx.save_for_backward(ids_Nk, lq_Nk, logits_NV)
        ctx.chunk_rows = chunk_rows
        ctx.mark_non_differentiable(entropy_N)
        return loss_N, entropy_N

    @staticmethod
    def backward(ctx, grad_loss_N, _grad_entropy_N):
        ids_Nk, lq_Nk, logits_NV = ctx.saved_tensors
        grad_NV = torch.empty_like(logits_NV)
        rows = ctx.chunk_rows
        for s in range(0, logits_NV.shape[0], rows):
            e = s + rows
            _, g_nV = sparse_target_kl_rows(ids_Nk[s:e], lq_Nk[s:e], logits_NV[s:e], want_grad=True)
            grad_NV[s:e] = g_nV.mul_(grad_loss_N[s:e, None])
        return None, None, grad_NV, None, None


def _outputs(loss, entropy_N, mask, return_entropy: bool):
    return (loss, reduce_loss(entropy_N, mask, "mean").detach()) if return_entropy else loss


def sparse_target_kl(target_ids_Nk, target_logprobs_Nk, logits_NV, mask=None, reduction="mean", chunk_size=None,
                     return_entropy=False):
    """sum_i q_i (log q_i - log p_{id_i}) per token (see the module docstring), differentiable in the logits.

    ``target_ids_Nk``: [N, k] integer ids; ``target_logprobs_Nk``: [N, k] full-vocabulary log-probabilities of
    the target at those ids (-inf for padding); ``logits_NV``: [N, V], any float dtype. ``mask``: [N] bool,
    False excludes a token. ``reduction``: "mean" over unmasked tokens, "sum", or "none" (per-token, masked
    tokens 0). ``chunk_size`` overrides the rows per chunk. ``return_entropy``: also the mean entropy of p.
    """
    if logits_NV.dim() != 2:
        raise ValueError(f"logits must be [N, V]; got {tuple(logits_NV.shape)}")
    check_targets(target_ids_Nk, target_logprobs_Nk, logits_NV.shape[0], mask, reduction)
    rows = rows_per_chunk(logits_NV.shape[1], chunk_size, tensors=4 if return_entropy else 3)
    loss_N, entropy_N = _SparseTargetKL.apply(target_ids_Nk.long(), target_logprobs_Nk, logits_NV, rows,
                                              return_entropy)
    return _outputs(reduce_loss(loss_N, mask, reduction), entropy_N, mask, return_entropy)


def weighted_rows(entropy: bool):
    """``sparse_target_kl_rows`` as a row function of ``row_loss.fused_linear_row_loss``: each row's loss and
    gradient times its token weight (side: ids, log-probabilities, weights), its entropy the one statistic."""
    def rows(z_nV, side, want_grad: bool):
        ids_nk, lq_nk, weight_n = side
        entropy_n = z_nV.new_zeros(z_nV.shape[0])
        loss_n, g_nV = sparse_target_kl_rows(ids_nk, lq_nk, z_nV, want_grad, entropy_n if entropy else None)
        return loss_n * weight_n, None if g_nV is None else g_nV.mul_(weight_n[:, None]), entropy_n[:, None]
    return rows


def fused_linear_sparse_target_kl(
    target_ids_Nk, target_logprobs_Nk, hidden_NH, weight_VH, mask=None, reduction="mean", chunk_size=None,
    return_entropy=False,
):
    """``sparse_target_kl`` of the logits ``hidden_NH @ weight_VH.T`` without materialising them for all tokens.

    ``hidden_NH``: [N, H], ``weight_VH``: [V, H] (the lm_head); gradients reach whichever requires grad (the
    weight's accumulated in float32). ``reduction`` is "mean" (over unmasked tokens) or "sum".
    ``return_entropy``: also the mean entropy of p.
    """
    N = hidden_NH.shape[0]  # the shapes' own check is the row loss's
    check_targets(target_ids_Nk, target_logprobs_Nk, N, mask, reduction, reductions=("mean", "sum"))
    weight_N = token_weights(mask, N, reduction, hidden_NH.device)
    side = (target_ids_Nk.long(), target_logprobs_Nk, weight_N)
    loss, stats_N1 = fused_linear_row_loss(weighted_rows(return_entropy), hidden_NH, weight_VH, side, 1,
                                           tensors=4 if return_entropy else 3, chunk_size=chunk_size)
    return _outputs(loss, stats_N1[:, 0], mask, return_entropy)
