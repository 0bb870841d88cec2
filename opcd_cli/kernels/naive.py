"""The losses written straight from their definitions, with autograd on full tensors.

Short and obviously right, and memory-hungry (several [N, V] float32 tensors): the tests and benchmarks compare
every other implementation with these; the trainer never calls them.

For each token n, with first logits a and second logits b (rows of ``[N, V]``), p = softmax(a),
q = softmax(b), and S the k ids with the largest first logits (ties go to the lower id):

    top-k KL:           loss_n = KL_S(p || q) = sum_{i in S} p_i * (log p_i - log q_i)

with both softmaxes normalised over the full vocabulary; with ``renorm`` both distributions are first
renormalised within S, which makes loss_n a true KL divergence on S. With ``tail`` the mass outside S is one
more bucket of both distributions, P_t = 1 - sum_S p and Q_t = 1 - sum_S q, which also makes loss_n a true KL
divergence (on k + 1 buckets):

    top-k KL with tail: loss_n = sum_{i in S} p_i * (log p_i - log q_i) + P_t * (log P_t - log Q_t)

Each tail is computed as -expm1(log mass on S) with the log mass capped at ``TAIL_LOG_MASS_MAX`` (-1e-7), so
a tail is never below about 1e-7 and a capped one passes no gradient (k = V gives both tails 1e-7: 0 loss).
With ``union``, S is the union of the first's and the second's top-k ids (k to 2k ids), everything else the
same. In OPCD the first argument is the student (without the context) and the second the frozen teacher (with it).

    entropy:            H_n = -sum_{j = 1..V} p_j log p_j      (full vocabulary; what the losses can also report)

    sparse-target KL:   loss_n = sum_{i = 1..k} q_i * (lq_i - log p_{id_i})

for a fixed target given as k ids and their full-vocabulary log-probabilities lq_i (off-policy distillation
from a teacher's saved top-k), q_i = exp(lq_i), p = softmax(logits); an entry with lq_i = -inf contributes
nothing (0 log 0 = 0), which is how shorter lists are padded.
"""

from __future__ import annotations

import torch

from .arguments import check_logits, check_targets, reduce_loss

# The log of the mass on S is capped here before a tail 1 - mass is taken from it (a float32 mass that rounds to
# 1 would otherwise make a tail of 0 and an infinite or undefined log).
TAIL_LOG_MASS_MAX = -1e-7


def log_tail(log_mass: torch.Tensor) -> torch.Tensor:
    """log(1 - mass) from log(mass), the mass capped just under 1 (``TAIL_LOG_MASS_MAX``)."""
    return torch.log(-torch.expm1(log_mass.clamp(max=TAIL_LOG_MASS_MAX)))


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


def naive_topk_kl(first_logits, second_logits, k=256, mask=None, renorm=False, reduction="mean", tail=False,
                  union=False):
    """The top-k KL from its definition, with autograd to both arguments: S as a mask over the full vocabulary."""
    check_logits(first_logits, second_logits, k, mask, reduction, renorm, tail)
    logp = torch.log_softmax(first_logits.float(), dim=-1)
    logq = torch.log_softmax(second_logits.float(), dim=-1)
    in_s = torch.zeros(logp.shape, dtype=torch.bool, device=logp.device)
    in_s.scatter_(1, topk_ids(first_logits.detach().float(), k), True)
    if union:
        in_s.scatter_(1, topk_ids(second_logits.detach().float(), k), True)
    logp_s = logp.masked_fill(~in_s, float("-inf"))
    logq_s = logq.masked_fill(~in_s, float("-inf"))
    if renorm:
        logp_s = logp_s - torch.logsumexp(logp_s, -1, keepdim=True)
        logq_s = logq_s - torch.logsumexp(logq_s, -1, keepdim=True)
    p_s = logp_s.exp()  # 0 off S
    # the log ratio where it counts, 0 elsewhere (-inf - -inf off S; 0 log 0 = 0): taken before the product,
    # whose gradient would otherwise carry 0 * nan
    r_s = torch.where(in_s & (p_s > 0), logp_s - logq_s, torch.zeros_like(p_s))
    loss_N = (p_s * r_s).sum(-1)
    if tail:
        logp_t, logq_t = log_tail(torch.logsumexp(logp_s, -1)), log_tail(torch.logsumexp(logq_s, -1))
        loss_N = loss_N + logp_t.exp() * (logp_t - logq_t)
    return reduce_loss(loss_N, mask, reduction)


def naive_entropy(logits_NV: torch.Tensor) -> torch.Tensor:
    """The full-vocabulary entropy of softmax(logits) per row [N], from a full softmax (0 log 0 = 0)."""
    logp = torch.log_softmax(logits_NV.float(), dim=-1)
    return torch.special.entr(logp.exp()).sum(-1)


def naive_sparse_target_kl(target_ids_Nk, target_logprobs_Nk, logits_NV, mask=None, reduction="mean"):
    """The sparse-target KL from its definition, with autograd to the logits."""
    check_targets(target_ids_Nk, target_logprobs_Nk, logits_NV.shape[0], mask, reduction)
    logp_Nk = torch.log_softmax(logits_NV.float(), dim=-1).gather(1, target_ids_Nk.long())
    lq_Nk = target_logprobs_Nk.float()
    q_Nk = lq_Nk.exp()
    loss_N = torch.where(q_Nk > 0, q_Nk * (lq_Nk - logp_Nk), torch.zeros_like(q_Nk)).sum(-1)
    return reduce_loss(loss_N, mask, reduction)


def naive_sampled_token_loss(ids_N, logits_NV, teacher_logprobs_N=None, advantages_N=None, mask_N=None):
    """sum_n -c_n log p_n (``sampled_token.py``) with autograd on the full log-softmax: c_n = the advantage, less
    (log p_n - log q_n) without gradient when the teacher's log-probabilities are given."""
    logp_N = torch.log_softmax(logits_NV.float(), dim=-1).gather(1, ids_N.long()[:, None])[:, 0]
    coef_N = torch.zeros_like(logp_N)
    if advantages_N is not None:
        coef_N = coef_N + advantages_N.float()
    if teacher_logprobs_N is not None:
        coef_N = coef_N - (logp_N.detach() - teacher_logprobs_N.float())
    if mask_N is not None:
        coef_N = coef_N * mask_N.float()
    return -(coef_N * logp_N).sum()


def naive_jsd(student_logits_NV, teacher_logits_NV, beta=0.5, mask_N=None):
    """sum over tokens of the generalised JSD (``jsd.py``) as TRL's ``generalized_jsd_loss`` writes it: the
    forward KL at beta 0, the reverse KL at beta 1, the mixture in between."""
    x = torch.log_softmax(student_logits_NV.float(), dim=-1)
    y = torch.log_softmax(teacher_logits_NV.float(), dim=-1)
    if beta == 0:
        loss_N = (y.exp() * (y - x)).sum(-1)
    elif beta == 1:
        loss_N = (x.exp() * (x - y)).sum(-1)
    else:
        m = torch.logsumexp(torch.stack([x + torch.log(torch.tensor(1 - beta)), y + torch.log(torch.tensor(beta))]), 0)
        loss_N = beta * (y.exp() * (y - m)).sum(-1) + (1 - beta) * (x.exp() * (x - m)).sum(-1)
    return reduce_loss(loss_N, mask_N, "sum")
