"""A per-token loss on the student's logits, chunk by chunk, with its gradient made in the forward pass.

The sampled-token and JSD objectives (``sampled_token.py``, ``jsd.py``) are each a function of one chunk of the
student's logits (float32) and of that chunk's rows of fixed tensors (the teacher's side, per-token weights):
``rows(z_nV, side, want_grad) -> (loss_n, grad_nV or None, stats_nS)``. This module runs such a function over
the rows a chunk at a time, in the two forms every loss here has:

* on logits [N, V] (``row_loss``): no float32 [N, V] copy; the gradient, computed with the loss, is kept in the
  logits' dtype and scaled by the upstream gradient in the backward pass;
* on ``hidden @ weight.T`` (``fused_linear_row_loss``): each chunk's logits made, turned into the loss and its
  gradient, and pushed back through the output layer at once (``linear.py``), so no [N, V] tensor exists.

Both return the sum of the per-token losses, then the per-token statistics [N, S] (no gradient).
"""

from __future__ import annotations

from typing import Callable

import torch

from .linear import autocast_off, backprop_chunk, compute_dtype, logits, scale_saved_grads
from .torch_chunked import rows_per_chunk

Rows = Callable[[torch.Tensor, tuple, bool], tuple]


def _chunk(side: tuple, s: int, e: int) -> tuple:
    return tuple(None if t is None else t[s:e] for t in side)


class _RowLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_NV, rows, side, chunk_rows, n_stats):
        N = logits_NV.shape[0]
        want = ctx.needs_input_grad[0]
        loss_N = logits_NV.new_zeros(N, dtype=torch.float32)
        stats_NS = logits_NV.new_zeros((N, n_stats), dtype=torch.float32)
        grad_NV = torch.empty_like(logits_NV) if want else None
        for s in range(0, N, chunk_rows):
            e = min(N, s + chunk_rows)
            loss_N[s:e], g_nV, stats_NS[s:e] = rows(logits_NV[s:e].float(), _chunk(side, s, e), want)
            if want:
                grad_NV[s:e] = g_nV
        ctx.save_for_backward(grad_NV)
        ctx.dtypes = [logits_NV.dtype]
        ctx.mark_non_differentiable(stats_NS)
        return loss_N.sum(), stats_NS

    @staticmethod
    def backward(ctx, grad_total, _grad_stats):
        (grad_NV,) = scale_saved_grads(ctx, grad_total)
        return grad_NV, None, None, None, None


class _FusedRowLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, rows, side, chunk_rows, n_stats):
        N = hidden_NH.shape[0]
        need_h, need_w = ctx.needs_input_grad[:2]
        dt = compute_dtype(hidden_NH, weight_VH)
        loss_N = hidden_NH.new_zeros(N, dtype=torch.float32)
        stats_NS = hidden_NH.new_zeros((N, n_stats), dtype=torch.float32)
        grad_h = torch.empty_like(hidden_NH) if need_h else None
        grad_w = torch.zeros(weight_VH.shape, dtype=torch.float32, device=weight_VH.device) if need_w else None
        with autocast_off(hidden_NH.device):
            w = weight_VH.to(dt)  # cast once per call
            for s in range(0, N, chunk_rows):
                e = min(N, s + chunk_rows)
                h = hidden_NH[s:e].to(dt)
                loss_N[s:e], g_nV, stats_NS[s:e] = rows(logits(h, w, dt).float(), _chunk(side, s, e),
                                                        need_h or need_w)
                if g_nV is not None:
                    backprop_chunk(g_nV.to(dt), h, w, None if grad_h is None else grad_h[s:e], grad_w)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = [hidden_NH.dtype, weight_VH.dtype]
        ctx.mark_non_differentiable(stats_NS)
        return loss_N.sum(), stats_NS

    @staticmethod
    def backward(ctx, grad_total, _grad_stats):
        grad_h, grad_w = scale_saved_grads(ctx, grad_total)
        return grad_h, grad_w, None, None, None, None


def row_loss(rows: Rows, logits_NV: torch.Tensor, side: tuple, n_stats: int, tensors: int = 4,
             chunk_size: int | None = None):
    """sum_n loss_n over logits [N, V] and the statistics [N, ``n_stats``]; ``tensors``: float32 [rows, V]
    temporaries ``rows`` makes (for the chunk size)."""
    chunk = rows_per_chunk(logits_NV.shape[1], chunk_size, tensors)
    return _RowLoss.apply(logits_NV, rows, side, chunk, n_stats)


def fused_linear_row_loss(rows: Rows, hidden_NH: torch.Tensor, weight_VH: torch.Tensor, side: tuple, n_stats: int,
                          tensors: int = 4, chunk_size: int | None = None):
    """``row_loss`` on the logits ``hidden_NH @ weight_VH.T``, made chunk by chunk."""
    if hidden_NH.dim() != 2 or weight_VH.dim() != 2 or hidden_NH.shape[1] != weight_VH.shape[1]:
        raise ValueError(f"hidden [N, H] and weight [V, H] do not line up: {tuple(hidden_NH.shape)}, "
                         f"{tuple(weight_VH.shape)}")
    chunk = rows_per_chunk(weight_VH.shape[0], chunk_size, tensors)
    return _FusedRowLoss.apply(hidden_NH, weight_VH, rows, side, chunk, n_stats)


@torch.no_grad()
def map_logit_rows(fn: Callable[[torch.Tensor, tuple], torch.Tensor], side: tuple, logits_NV=None, hidden_NH=None,
                   weight_VH=None, chunk_size: int | None = None, tensors: int = 3) -> torch.Tensor:
    """``fn(z_nV, side chunk)`` over the rows of float32 logits, chunk by chunk, without gradient: from logits
    [N, V], or made from ``hidden @ weight.T``; the chunks' results concatenated."""
    N, V = logits_NV.shape if logits_NV is not None else (hidden_NH.shape[0], weight_VH.shape[0])
    chunk = rows_per_chunk(V, chunk_size, tensors)
    out = []
    if logits_NV is not None:
        for s in range(0, N, chunk):
            out.append(fn(logits_NV[s:s + chunk].float(), _chunk(side, s, s + chunk)))
    else:
        dt = compute_dtype(hidden_NH, weight_VH)
        with autocast_off(hidden_NH.device):
            w = weight_VH.to(dt)
            for s in range(0, N, chunk):
                out.append(fn(logits(hidden_NH[s:s + chunk], w, dt).float(), _chunk(side, s, s + chunk)))
    if not out:
        return fn(torch.zeros((0, V), device=(logits_NV if logits_NV is not None else hidden_NH).device), side)
    return torch.cat(out) if isinstance(out[0], torch.Tensor) else tuple(torch.cat(x) for x in zip(*out))
