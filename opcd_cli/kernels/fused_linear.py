"""Fused linear top-k KL on the Triton row kernel: no [N, V] tensor ever exists.

The loss is that of ``topk_kl_triton`` on logits a = h_1 @ W_1.T (first) and b = h_2 @ W_2.T (second),
reduced with per-token weights w_n (mask, and 1 / #unmasked for "mean"): loss = sum_n w_n * loss_n.

Tokens are taken in chunks of n rows. Per chunk: a_nV and b_nV come from torch matmuls (cuBLAS on a GPU,
float32 accumulation, stored in the input dtype); the forward kernel writes g_nV = w_n * dloss_n/da over a_nV
and/or w_n * dloss_n/db over b_nV in place (for the sides that require grad); then, per such side,

    dloss/dh[chunk] = g_nV @ W                 dloss/dW += g_nV.T @ h[chunk]   (float32 accumulator)

The gradients are computed in the forward pass and scaled by the upstream gradient in the backward pass.
The chunk length comes from a memory budget in bytes for one chunk's logits and scratch.
"""

from __future__ import annotations

import torch

from .reference import _reduce, check_fused_linear, refuse_teacher_grad, token_weights
from .topk_kl_triton import topk_kl_forward

# Bytes for one chunk's first and second logits plus its top-k id scratch.
DEFAULT_CHUNK_BYTES = 1 << 30


def chunk_rows(V: int, k: int, first_dtype, second_dtype, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Tokens per chunk so that the chunk's [n, V] logits of both sides and [n, k] ids fit ``budget_bytes``."""
    itemsize = lambda dtype: torch.empty((), dtype=dtype).element_size()  # noqa: E731
    per_row = V * (itemsize(first_dtype) + itemsize(second_dtype))
    rows = max(1, budget_bytes // (per_row + 4 * k))
    return rows - rows % 64 if rows >= 128 else rows  # whole tiles for the matmuls


# torch >= 2.8 has addmm(..., out_dtype=torch.float32) for fp16/bf16 operands on CUDA.
_TORCH_HAS_OUT_DTYPE = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 8)


def _addmm_out_dtype_supported(x: torch.Tensor) -> bool:
    return (
        _TORCH_HAS_OUT_DTYPE
        and x.is_cuda
        and x.dtype in (torch.float16, torch.bfloat16)
        and torch.cuda.get_device_capability(x.device)[0] >= 8
    )


def accumulate_weight_grad(grad_VH: torch.Tensor, g_nV: torch.Tensor, h_nH: torch.Tensor) -> None:
    """``grad_VH += g_nV.T @ h_nH`` into a float32 accumulator."""
    if g_nV.dtype == h_nH.dtype == torch.float32:
        grad_VH.addmm_(g_nV.T, h_nH)
    elif g_nV.dtype == h_nH.dtype and _addmm_out_dtype_supported(g_nV):
        torch.addmm(grad_VH, g_nV.T, h_nH, out_dtype=torch.float32, out=grad_VH)  # low-precision operands, fp32 sum
    else:
        grad_VH.addmm_(g_nV.T.float(), h_nH.float())


def _backprop_chunk(g_nV, h_nH, w_VH, grad_h_nH, grad_w_VH) -> None:
    """Through ``logits = h @ w.T`` for one chunk, into whichever of the two buffers is given."""
    if grad_h_nH is not None:
        torch.mm(g_nV, w_VH, out=grad_h_nH)
    if grad_w_VH is not None:
        accumulate_weight_grad(grad_w_VH, g_nV, h_nH)


class FusedLinearTopkKLTriton(torch.autograd.Function):
    """Chunked over tokens; each chunk's logits buffers become its gradient buffers."""

    @staticmethod
    def forward(ctx, h1_NH, w1_VH, h2_NM, w2_VM, weight_N, k, renorm, rows, block_v):
        N = h1_NH.shape[0]
        need = ctx.needs_input_grad[:4]
        grad_first, grad_second = need[0] or need[1], need[2] or need[3]
        dev = h1_NH.device
        loss_N = torch.empty(N, dtype=torch.float32, device=dev)
        mass_N = torch.empty(N, dtype=torch.float32, device=dev)
        grads = [  # hidden-state gradients in their own dtype, weight gradients accumulated in float32
            torch.empty_like(h1_NH, memory_format=torch.contiguous_format) if need[0] else None,
            torch.zeros(w1_VH.shape, dtype=torch.float32, device=dev) if need[1] else None,
            torch.empty_like(h2_NM, memory_format=torch.contiguous_format) if need[2] else None,
            torch.zeros(w2_VM.shape, dtype=torch.float32, device=dev) if need[3] else None,
        ]
        grad_h1, grad_w1, grad_h2, grad_w2 = grads
        ids_nk = torch.empty(min(rows, N), k, dtype=torch.int32, device=dev)
        for s in range(0, N, rows):
            e = min(N, s + rows)
            a_nV = h1_NH[s:e] @ w1_VH.T
            b_nV = h2_NM[s:e] @ w2_VM.T
            loss_N[s:e], mass_N[s:e], _, _ = topk_kl_forward(
                a_nV, b_nV, k, renorm, weight_N=weight_N[s:e] if grad_first or grad_second else None,
                grad_first=grad_first, grad_second=grad_second, ids_Nk=ids_nk, block_v=block_v,
            )
            if grad_first:
                _backprop_chunk(a_nV, h1_NH[s:e], w1_VH, None if grad_h1 is None else grad_h1[s:e], grad_w1)
            if grad_second:
                _backprop_chunk(b_nV, h2_NM[s:e], w2_VM, None if grad_h2 is None else grad_h2[s:e], grad_w2)
            del a_nV, b_nV
        ctx.save_for_backward(*grads)
        ctx.dtypes = [x.dtype for x in (h1_NH, w1_VH, h2_NM, w2_VM)]
        ctx.mark_non_differentiable(mass_N)
        return (loss_N * weight_N).sum(), mass_N

    @staticmethod
    def backward(ctx, grad_total, _grad_mass_N):
        grads = [
            None if g is None else (g * grad_total).to(dtype) for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)
        ]
        return (*grads, None, None, None, None, None)


def fused_linear_topk_kl_triton(
    first_hidden, first_weight, second_hidden, second_weight, k=256, mask=None, renorm=False,
    reduction="mean", chunk_size=None, return_topk_mass=False, chunk_bytes=DEFAULT_CHUNK_BYTES, block_v=None,
):
    """Top-k KL of ``hidden @ weight.T`` logits (same contract as ``fused_linear_topk_kl_torch``).

    ``first_hidden``: [N, H], ``first_weight``: [V, H]; ``second_hidden``: [N, M], ``second_weight``: [V, M];
    each that requires grad gets its gradient. ``chunk_size`` (tokens per chunk) overrides the chunk length
    derived from ``chunk_bytes``.
    """
    check_fused_linear(first_hidden, first_weight, second_hidden, second_weight, k, mask, reduction)
    N, V = first_hidden.shape[0], first_weight.shape[0]
    weight_N = token_weights(mask, N, reduction, first_hidden.device)
    rows = chunk_size or chunk_rows(V, k, first_hidden.dtype, second_hidden.dtype, chunk_bytes)
    loss, mass_N = FusedLinearTopkKLTriton.apply(
        first_hidden, first_weight, second_hidden, second_weight, weight_N, k, renorm, max(1, rows), block_v
    )
    if return_topk_mass:
        return loss, _reduce(mass_N, None if mask is None else mask.float(), "mean").detach()
    return loss


def fused_linear_topk_reverse_kl_triton(
    student_hidden, student_weight, teacher_hidden, teacher_weight, k=256, mask=None, renorm=False,
    reduction="mean", chunk_size=None, return_topk_mass=False, chunk_bytes=DEFAULT_CHUNK_BYTES, block_v=None,
):
    """``fused_linear_topk_kl_triton`` with the student first and the teacher refused if it requires grad."""
    refuse_teacher_grad(teacher_hidden, teacher_weight)
    return fused_linear_topk_kl_triton(
        student_hidden, student_weight, teacher_hidden, teacher_weight, k=k, mask=mask, renorm=renorm,
        reduction=reduction, chunk_size=chunk_size, return_topk_mass=return_topk_mass, chunk_bytes=chunk_bytes,
        block_v=block_v,
    )
