"""Fused linear top-k KL on the Triton row kernel: no [N, V] tensor ever exists.

The loss is that of ``topk_kl_triton`` on logits a = h_1 @ W_1.T (first) and b = h_2 @ W_2.T (second),
reduced with per-token weights w_n (mask, and 1 / #unmasked for "mean"): loss = sum_n w_n * loss_n.

Tokens are taken in chunks of n rows. Per chunk: a_nV and b_nV come from torch matmuls (cuBLAS on a GPU,
float32 accumulation, stored in the compute dtype: autocast's if on, else the inputs'; see ``linear.py``);
the forward kernel writes g_nV = w_n * dloss_n/da over a_nV
and/or w_n * dloss_n/db over b_nV in place (for the sides that require grad); then, per such side,

    dloss/dh[chunk] = g_nV @ W                 dloss/dW += g_nV.T @ h[chunk]   (float32 accumulator)

The gradients are computed in the forward pass and scaled by the upstream gradient in the backward pass.
The chunk length comes from a memory budget in bytes for one chunk's logits and scratch.
"""

from __future__ import annotations

import torch

from .linear import autocast_off, backprop_chunk, compute_dtype, finish_forward, gradient_buffers, logits, scale_saved_grads
from .arguments import check_fused_linear, token_weights, topk_outputs
from .topk_kl_triton import row_stats, scratch_width, topk_kl_forward

# Bytes for one chunk's first and second logits plus its top-k id scratch.
TRITON_CHUNK_BYTES = 1 << 30


def chunk_rows(V: int, k: int, first_dtype, second_dtype, budget_bytes: int = TRITON_CHUNK_BYTES) -> int:
    """Tokens per chunk so that the chunk's [n, V] logits of both sides and [n, k] ids fit ``budget_bytes``."""
    itemsize = lambda dtype: torch.empty((), dtype=dtype).element_size()  # noqa: E731
    per_row = V * (itemsize(first_dtype) + itemsize(second_dtype))
    rows = max(1, budget_bytes // (per_row + 4 * k))
    return rows - rows % 64 if rows >= 128 else rows  # whole tiles for the matmuls


class FusedLinearTopkKLTriton(torch.autograd.Function):
    """Chunked over tokens; each chunk's logits buffers become its gradient buffers."""

    @staticmethod
    def forward(ctx, h1_NH, w1_VH, h2_NM, w2_VM, weight_N, k, renorm, rows, block_v, tail, entropy, union):
        N = h1_NH.shape[0]
        need = ctx.needs_input_grad[:4]
        grad_first, grad_second = need[0] or need[1], need[2] or need[3]
        dev = h1_NH.device
        dt1, dt2 = compute_dtype(h1_NH, w1_VH), compute_dtype(h2_NM, w2_VM)  # autocast's, as the lm_head's would be
        loss_N = torch.empty(N, dtype=torch.float32, device=dev)
        stats_N3 = torch.empty(N, 3, dtype=torch.float32, device=dev)
        grads = gradient_buffers((h1_NH, w1_VH, h2_NM, w2_VM), need)
        grad_h1, grad_w1, grad_h2, grad_w2 = grads
        ids_nc = torch.empty(min(rows, N), scratch_width(k, union), dtype=torch.int32, device=dev)
        with autocast_off(dev):
            w1, w2 = w1_VH.to(dt1), w2_VM.to(dt2)  # cast once per call
            for s in range(0, N, rows):
                e = min(N, s + rows)
                h1, h2 = h1_NH[s:e].to(dt1), h2_NM[s:e].to(dt2)
                a_nV, b_nV = logits(h1, w1, dt1), logits(h2, w2, dt2)
                loss_N[s:e], mass_n, stats_n8, _ = topk_kl_forward(
                    a_nV, b_nV, k, renorm, weight_N=weight_N[s:e] if grad_first or grad_second else None,
                    grad_first=grad_first, grad_second=grad_second, ids_Nc=ids_nc, block_v=block_v, tail=tail,
                    entropy=entropy, union=union,
                )
                stats_N3[s:e] = row_stats(mass_n, stats_n8)
                if grad_first:  # a_nV now holds the chunk's weighted gradient
                    backprop_chunk(a_nV, h1, w1, None if grad_h1 is None else grad_h1[s:e], grad_w1)
                if grad_second:
                    backprop_chunk(b_nV, h2, w2, None if grad_h2 is None else grad_h2[s:e], grad_w2)
                del a_nV, b_nV
        return finish_forward(ctx, grads, (h1_NH, w1_VH, h2_NM, w2_VM), loss_N, weight_N, stats_N3)

    @staticmethod
    def backward(ctx, grad_total, _grad_stats_N3):
        return (*scale_saved_grads(ctx, grad_total), None, None, None, None, None, None, None, None)


def fused_linear_topk_kl_triton(
    first_hidden, first_weight, second_hidden, second_weight, k=256, mask=None, renorm=False,
    reduction="mean", chunk_size=None, return_topk_mass=False, chunk_bytes=TRITON_CHUNK_BYTES, block_v=None,
    tail=False, return_entropy=False, union=False,
):
    """Top-k KL of ``hidden @ weight.T`` logits (same contract as ``fused_linear_topk_kl_torch``).

    ``first_hidden``: [N, H], ``first_weight``: [V, H]; ``second_hidden``: [N, M], ``second_weight``: [V, M];
    each that requires grad gets its gradient. ``chunk_size`` (tokens per chunk) overrides the chunk length
    derived from ``chunk_bytes``.
    """
    check_fused_linear(first_hidden, first_weight, second_hidden, second_weight, k, mask, reduction, renorm, tail)
    N, V = first_hidden.shape[0], first_weight.shape[0]
    weight_N = token_weights(mask, N, reduction, first_hidden.device)
    rows = chunk_size or chunk_rows(V, k, first_hidden.dtype, second_hidden.dtype, chunk_bytes)
    loss, stats_N3 = FusedLinearTopkKLTriton.apply(
        first_hidden, first_weight, second_hidden, second_weight, weight_N, k, renorm, max(1, rows), block_v, tail,
        return_entropy, union,
    )
    return topk_outputs(loss, stats_N3, mask, return_topk_mass, return_entropy)
