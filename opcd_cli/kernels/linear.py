"""The output layer around the fused losses: ``logits = hidden @ weight.T`` chunk by chunk, and back through it.

Both fused paths (PyTorch in ``torch_chunked.py``, Triton in ``fused_linear_triton.py``) make each chunk's logits,
turn them into that chunk's gradient, and push it back through the same two matmuls:

    dloss/dh[chunk] = g_nV @ W                 dloss/dW += g_nV.T @ h[chunk]   (float32 accumulator)

Precision follows the model's own output layer. Under ``torch.autocast`` (the trainer's mixed precision:
float32 master weights, bf16 compute) the matmuls run in the autocast dtype, as the model's ``lm_head`` would:
the weight is cast once per call, the hidden states chunk by chunk. The losses run their matmuls with autocast
switched off and these casts made explicitly, because autocast leaves ``out=`` and in-place matmuls alone
(they would run in float32, or fail on mixed dtypes). Outside autocast the matmuls run in the inputs' dtype.
Weight gradients are accumulated in float32 whatever the operands (on CUDA with bf16/fp16 operands, by
``addmm(..., out_dtype=torch.float32)`` where this torch has it).
"""

from __future__ import annotations

import torch

# Rows converted at a time when a float32 gradient is scaled into a lower-precision one.
SCALE_ROWS = 8192


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the matmuls run in: autocast's when it is on for this device, else the inputs' own."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def autocast_off(device: torch.device):
    """A context with autocast off for ``device`` (the casts are made explicitly)."""
    return torch.autocast(device.type, enabled=False)


def logits(h_nH: torch.Tensor, w_VH: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``h @ w.T`` in ``dtype`` (``w`` already cast: it is cast once per call, not per chunk)."""
    return h_nH.to(dtype) @ w_VH.T


_OUT_DTYPE_WORKS: dict[torch.device, bool] = {}


def _addmm_fp32_out(grad_VH: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
    """``grad_VH += a @ b`` with low-precision operands and a float32 sum, where this torch supports it."""
    if not a.is_cuda or _OUT_DTYPE_WORKS.get(a.device) is False:
        return False
    try:
        torch.addmm(grad_VH, a, b, out_dtype=torch.float32, out=grad_VH)
    except (TypeError, RuntimeError, NotImplementedError):  # an older torch, or a device without the kernel
        _OUT_DTYPE_WORKS[a.device] = False
        return False
    _OUT_DTYPE_WORKS[a.device] = True
    return True


def accumulate_weight_grad(grad_VH: torch.Tensor, g_nV: torch.Tensor, h_nH: torch.Tensor) -> None:
    """``grad_VH += g_nV.T @ h_nH`` into a float32 accumulator."""
    if g_nV.dtype == h_nH.dtype == torch.float32:
        grad_VH.addmm_(g_nV.T, h_nH)
    elif g_nV.dtype == h_nH.dtype and _addmm_fp32_out(grad_VH, g_nV.T, h_nH):
        return
    else:
        grad_VH.addmm_(g_nV.T.float(), h_nH.float())


def backprop_chunk(g_nV, h_nH, w_VH, grad_h_nH, grad_w_VH) -> None:
    """Through ``logits = h @ w.T`` for one chunk (``g_nV``, ``h_nH`` and ``w_VH`` in the compute dtype), into
    whichever of the two buffers is given: ``grad_h_nH = g @ w`` and ``grad_w_VH += g.T @ h`` (float32)."""
    if grad_h_nH is not None:
        if grad_h_nH.dtype == g_nV.dtype:
            torch.mm(g_nV, w_VH, out=grad_h_nH)
        else:
            grad_h_nH.copy_(g_nV @ w_VH)
    if grad_w_VH is not None:
        accumulate_weight_grad(grad_w_VH, g_nV, h_nH)


def scale_grad(g: torch.Tensor, grad_total: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``g * grad_total`` as ``dtype``, without a second full-size float32 temporary.

    ``g`` is a buffer the loss owns (made in its forward pass), so a same-dtype gradient is scaled in place;
    a float32 accumulator for a lower-precision weight is converted a slice of rows at a time.
    """
    if g.dtype == dtype:
        return g.mul_(grad_total)
    out = torch.empty(g.shape, dtype=dtype, device=g.device)
    for s in range(0, g.shape[0], SCALE_ROWS):
        out[s : s + SCALE_ROWS] = g[s : s + SCALE_ROWS] * grad_total
    return out


def gradient_buffers(tensors, needs_grad) -> list:
    """Buffers for the gradients a fused loss computes in its forward pass, for the (hidden, weight, hidden,
    weight) tensors that need one: hidden-state gradients in their own dtype, weight gradients in float32."""
    buffers = []
    for i, (x, need) in enumerate(zip(tensors, needs_grad)):
        if not need:
            buffers.append(None)
        elif i % 2 == 0:
            buffers.append(torch.empty_like(x, memory_format=torch.contiguous_format))
        else:
            buffers.append(torch.zeros(x.shape, dtype=torch.float32, device=x.device))
    return buffers


def finish_forward(ctx, grads: list, tensors, loss_N: torch.Tensor, weight_N: torch.Tensor, stats_N3: torch.Tensor):
    """Keep the gradients for ``backward`` (``scale_saved_grads``) and return (weighted loss, row statistics:
    top-k mass and the two entropies)."""
    ctx.save_for_backward(*grads)
    ctx.dtypes = [x.dtype for x in tensors]
    ctx.mark_non_differentiable(stats_N3)
    return (loss_N * weight_N).sum(), stats_N3


def scale_saved_grads(ctx, grad_total: torch.Tensor) -> list:
    """The gradients a fused loss computed in its forward pass, scaled by the upstream gradient (once only:
    they are scaled in place, so a second backward through the same graph is refused)."""
    if getattr(ctx, "grads_used", False):
        raise RuntimeError("the fused top-k KL loss supports one backward pass per forward (no retain_graph)")
    ctx.grads_used = True
    return [None if g is None else scale_grad(g, grad_total, dtype) for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
