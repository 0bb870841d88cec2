"""The generalised Jensen-Shannon divergence over the full vocabulary, as TRL's GKD and Liger-Kernel define it.

For each token, with the student's distribution Q = softmax(x) (trained) and the teacher's P = softmax(y)
(fixed), and beta in [0, 1]:

    M = beta * P + (1 - beta) * Q
    JSD_beta = beta * KL(P || M) + (1 - beta) * KL(Q || M)        (0 < beta < 1)
    JSD_0 = KL(P || Q)  (the forward KL),   JSD_1 = KL(Q || P)  (the reverse KL)

The endpoints are the two KLs themselves, as TRL writes them (the mixture formula itself goes to 0 there). The
gradient in the student's log-probabilities is g = (1 - beta) * Q * (log Q - log M) (-P at beta 0, Q (log Q -
log P) at beta 1), and in its logits g - Q * sum(g).

Two implementations: ``jsd`` and ``fused_linear_jsd`` here in PyTorch, chunk by chunk (``row_loss.py``), and on
the Triton backend Liger-Kernel's fused linear JSD (``LigerFusedLinearJSDFunction``), which computes the same on
``hidden @ weight.T``. Both also give the two full-vocabulary entropies per token. ``naive.naive_jsd`` is the
formula with autograd on full tensors.
"""

from __future__ import annotations

import logging
import math

import torch

from .linear import autocast_off, compute_dtype, logits
from .row_loss import fused_linear_row_loss, map_logit_rows, row_loss
from .torch_chunked import entropy_rows


def check_beta(beta: float) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1] (0: forward KL, 1: reverse KL); got {beta}")


def jsd_terms(x_nV: torch.Tensor, y_nV: torch.Tensor, beta: float):
    """Per-row JSD_beta and its gradient in the student's log-probabilities, from both log-probabilities."""
    q_nV = x_nV.exp()
    if beta == 0.0:
        p_nV = y_nV.exp()
        return (p_nV * (y_nV - x_nV)).sum(-1), -p_nV
    if beta == 1.0:
        g_nV = q_nV * (x_nV - y_nV)
        return g_nV.sum(-1), g_nV
    logm_nV = torch.logaddexp(x_nV + math.log1p(-beta), y_nV + math.log(beta))
    g_nV = (1 - beta) * q_nV * (x_nV - logm_nV)
    loss_n = beta * (y_nV.exp() * (y_nV - logm_nV)).sum(-1) + g_nV.sum(-1)
    return loss_n, g_nV


def jsd_rows(beta: float, teacher_logits):
    """The row function of ``row_loss``: side is (the teacher's rows, the mask); ``teacher_logits`` turns the
    teacher's rows into float32 logits."""
    def rows(z_nV, side, want_grad: bool):
        teacher_n, mask_n = side
        x_nV = torch.log_softmax(z_nV, dim=-1)
        y_nV = torch.log_softmax(teacher_logits(teacher_n), dim=-1)
        loss_n, g_nV = jsd_terms(x_nV, y_nV, beta)
        stats = torch.stack([entropy_rows(x_nV), entropy_rows(y_nV)], 1)
        if mask_n is not None:
            loss_n = torch.where(mask_n, loss_n, torch.zeros_like(loss_n))
            g_nV = g_nV * mask_n[:, None]
        if not want_grad:
            return loss_n, None, stats
        g_nV -= x_nV.exp_() * g_nV.sum(-1, keepdim=True)  # through the log-softmax
        return loss_n, g_nV, stats
    return rows


def jsd(student_logits_NV, teacher_logits_NV, beta=0.5, mask=None, chunk_size=None):
    """sum over tokens of JSD_beta from logits [N, V] (PyTorch, chunked); returns (the sum, the student's and the
    teacher's entropies [N, 2])."""
    check_beta(beta)
    if student_logits_NV.shape != teacher_logits_NV.shape or student_logits_NV.dim() != 2:
        raise ValueError(f"both logits must be [N, V]; got {tuple(student_logits_NV.shape)} and "
                         f"{tuple(teacher_logits_NV.shape)}")
    if teacher_logits_NV.requires_grad:
        raise ValueError("the teacher requires grad; the loss trains the student only (detach the teacher)")
    side = (teacher_logits_NV, None if mask is None else mask.bool())
    return row_loss(jsd_rows(beta, lambda t: t.float()), student_logits_NV, side, 2, tensors=6,
                    chunk_size=chunk_size)


def fused_linear_jsd(student_hidden, student_weight, teacher_hidden, teacher_weight, beta=0.5, mask=None,
                     chunk_size=None, backend="torch"):
    """``jsd`` of ``hidden @ weight.T`` logits; ``backend`` ``triton`` runs Liger-Kernel's fused linear JSD."""
    check_beta(beta)
    if teacher_hidden.requires_grad or teacher_weight.requires_grad:
        raise ValueError("the teacher requires grad; the loss trains the student only (detach the teacher)")
    if teacher_hidden.shape[0] != student_hidden.shape[0] or teacher_weight.shape[0] != student_weight.shape[0]:
        raise ValueError(f"shapes do not line up: student {tuple(student_hidden.shape)} x "
                         f"{tuple(student_weight.shape)}, teacher {tuple(teacher_hidden.shape)} x "
                         f"{tuple(teacher_weight.shape)}")
    if backend == "triton":
        return liger_fused_linear_jsd(student_hidden, student_weight, teacher_hidden, teacher_weight, beta, mask)
    dt = compute_dtype(teacher_hidden, teacher_weight)
    with autocast_off(teacher_hidden.device):
        tw = teacher_weight.to(dt)
    side = (teacher_hidden, None if mask is None else mask.bool())
    return fused_linear_row_loss(jsd_rows(beta, lambda h: logits(h, tw, dt).float()), student_hidden,
                                 student_weight, side, 2, tensors=6, chunk_size=chunk_size)


IGNORE = -100


def liger_fused_linear_jsd(student_hidden, student_weight, teacher_hidden, teacher_weight, beta, mask=None):
    """Liger-Kernel's fused linear JSD (its mean over tokens made a sum again), and the two entropies from one
    more pass without gradient."""
    for name in ("liger_kernel.backends.registry", "liger_kernel"):  # it tries GPU-vendor backends first and
        logging.getLogger(name).setLevel(logging.ERROR)  # logs each one this machine lacks
    from liger_kernel.ops.fused_linear_jsd import LigerFusedLinearJSDFunction

    N = student_hidden.shape[0]
    labels = None
    count = N
    if mask is not None:
        labels = torch.where(mask.bool(), torch.zeros(N, dtype=torch.long, device=mask.device), IGNORE)
        count = int(mask.sum())
    if count == 0:
        total = (student_hidden.sum() * 0.0).float()
    else:
        total = LigerFusedLinearJSDFunction.apply(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                                  labels, float(beta), IGNORE, 1.0) * count
    def entropies(hidden, weight):
        return map_logit_rows(lambda z, side: entropy_rows(torch.log_softmax(z, dim=-1))[:, None], (),
                              hidden_NH=hidden, weight_VH=weight)  # no gradient there

    return total, torch.cat([entropies(student_hidden, student_weight), entropies(teacher_hidden, teacher_weight)], 1)
