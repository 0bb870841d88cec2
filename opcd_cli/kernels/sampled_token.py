"""The sampled-token objective and the reward term: policy-gradient surrogates on the tokens the student wrote.

For each response token n, with y_n the token the student sampled, log p_n = log softmax(z_n)[y_n] (the
student's full-vocabulary log-probability, differentiated) and a fixed coefficient c_n (no gradient):

    loss_n = -c_n * log p_n,        dloss_n / dz_n = c_n * (softmax(z_n) - onehot(y_n))

* sampled-token reverse KL (on-policy distillation as tinker-cookbook, slime and verl's k1 estimator write it):
  c_n = -(log p_n - log q_n) with q the teacher's log-probability of the same token: a per-token advantage.
  Its expectation over the student's own samples is the gradient of KL(p || q); the value reported is the
  k1 estimate sum_n (log p_n - log q_n) of that KL;
* the reward term (GRPO-style): c_n = the advantage of the sample token n belongs to (its reward less its
  group's mean, optionally over the group's standard deviation), times the reward weight.

Given both, the coefficients add. A token with ``mask`` False adds nothing. ``naive.naive_sampled_token_loss``
is the same written with autograd on full tensors.
"""

from __future__ import annotations

import torch

from .row_loss import fused_linear_row_loss, map_logit_rows, row_loss
from .torch_chunked import entropy_rows


def sampled_token_rows(z_nV, side, want_grad: bool):
    """Loss, gradient and statistics (log p of the sampled token, entropy) of a chunk of rows."""
    ids_n, teacher_logp_n, advantage_n, mask_n = side
    logp_nV = z_nV - torch.logsumexp(z_nV, dim=-1, keepdim=True)
    logp_n = logp_nV.gather(1, ids_n[:, None])[:, 0]
    stats = torch.stack([logp_n, entropy_rows(logp_nV)], 1)
    coef_n = torch.zeros_like(logp_n)
    if advantage_n is not None:
        coef_n += advantage_n.float()
    if teacher_logp_n is not None:
        coef_n -= logp_n - teacher_logp_n.float()
    if mask_n is not None:
        coef_n = torch.where(mask_n, coef_n, torch.zeros_like(coef_n))
    loss_n = -coef_n * logp_n
    if not want_grad:
        return loss_n, None, stats
    grad_nV = logp_nV.exp_().mul_(coef_n[:, None])  # c * p, then - c at the sampled token
    grad_nV.scatter_add_(1, ids_n[:, None], -coef_n[:, None])
    return loss_n, grad_nV, stats


def _check(ids_N, N: int, *per_token):
    if ids_N.dim() != 1 or ids_N.shape[0] != N:
        raise ValueError(f"sampled ids must be [N] = [{N}]; got {tuple(ids_N.shape)}")
    for t in per_token:
        if t is not None and (t.shape != (N,) or t.requires_grad):
            raise ValueError(f"per-token tensors must be [N] = [{N}] without gradient; got {tuple(t.shape)}")


def sampled_token_loss(ids_N, logits_NV=None, hidden_NH=None, weight_VH=None, teacher_logprobs_N=None,
                       advantages_N=None, mask_N=None, chunk_size=None):
    """sum_n -c_n log p_n (module docstring) from logits [N, V] or from ``hidden @ weight.T``; returns (that sum,
    differentiable; the student's log p_n of the sampled tokens [N]; its full-vocabulary entropies [N]), the last
    two without gradient."""
    N = (logits_NV if logits_NV is not None else hidden_NH).shape[0]
    _check(ids_N, N, teacher_logprobs_N, advantages_N, mask_N)
    side = (ids_N.long(), teacher_logprobs_N, advantages_N, None if mask_N is None else mask_N.bool())
    if logits_NV is not None:
        total, stats = row_loss(sampled_token_rows, logits_NV, side, 2, tensors=2, chunk_size=chunk_size)
    else:
        total, stats = fused_linear_row_loss(sampled_token_rows, hidden_NH, weight_VH, side, 2, tensors=2,
                                             chunk_size=chunk_size)
    return total, stats[:, 0], stats[:, 1]


def token_logprobs(ids_N, logits_NV=None, hidden_NH=None, weight_VH=None, chunk_size=None):
    """The full-vocabulary log-probabilities of ``ids_N`` [N] and the entropies [N], without gradient (the
    teacher's side of the sampled-token objective)."""
    def rows(z_nV, side):  # the statistics of the surrogate's own rows, without a coefficient or a gradient
        return sampled_token_rows(z_nV, (side[0], None, None, None), False)[2]

    stats = map_logit_rows(rows, (ids_N.long(),), logits_NV, hidden_NH, weight_VH, chunk_size)
    return stats[:, 0], stats[:, 1]
