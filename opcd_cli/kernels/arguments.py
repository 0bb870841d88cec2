"""Argument checks and reductions shared by every implementation of the losses."""

from __future__ import annotations

import torch

REDUCTIONS = ("mean", "sum", "none")


def check_support(renorm: bool, tail: bool) -> None:
    if renorm and tail:
        raise ValueError("renorm and tail exclude each other: each makes the top-k a whole distribution; choose one")


def check_logits(first_NV: torch.Tensor, second_NV: torch.Tensor, k: int, mask_N, reduction: str,
                 renorm: bool = False, tail: bool = False) -> None:
    check_support(renorm, tail)
    if first_NV.dim() != 2 or first_NV.shape != second_NV.shape:
        raise ValueError(f"both logits must be [N, V]; got {tuple(first_NV.shape)} and {tuple(second_NV.shape)}")
    if not 1 <= k <= first_NV.shape[1]:
        raise ValueError(f"k must be between 1 and the vocabulary size {first_NV.shape[1]}; got {k}")
    check_mask_and_reduction(mask_N, first_NV.shape[0], reduction)


def check_fused_linear(first_hidden, first_weight, second_hidden, second_weight, k, mask, reduction,
                       renorm: bool = False, tail: bool = False) -> None:
    check_support(renorm, tail)
    N, V = first_hidden.shape[0], first_weight.shape[0]
    if second_hidden.shape[0] != N or second_weight.shape[0] != V:
        raise ValueError(
            f"shapes do not line up: first hidden {tuple(first_hidden.shape)}, weight {tuple(first_weight.shape)}; "
            f"second hidden {tuple(second_hidden.shape)}, weight {tuple(second_weight.shape)}"
        )
    if not 1 <= k <= V:
        raise ValueError(f"k must be between 1 and the vocabulary size {V}; got {k}")
    check_mask_and_reduction(mask, N, reduction, reductions=("mean", "sum"))


def check_targets(target_ids_Nk, target_logprobs_Nk, N: int, mask_N, reduction: str, reductions=REDUCTIONS) -> None:
    if target_ids_Nk.dim() != 2 or target_ids_Nk.shape != target_logprobs_Nk.shape or target_ids_Nk.shape[0] != N:
        raise ValueError(
            f"target ids and log-probabilities must both be [N, k] with N = {N}; "
            f"got {tuple(target_ids_Nk.shape)} and {tuple(target_logprobs_Nk.shape)}"
        )
    if target_logprobs_Nk.requires_grad:
        raise ValueError("the target log-probabilities require grad; the target is fixed (detach it)")
    check_mask_and_reduction(mask_N, N, reduction, reductions)


def check_mask_and_reduction(mask_N, N: int, reduction: str, reductions=REDUCTIONS) -> None:
    if mask_N is not None and mask_N.shape != (N,):
        raise ValueError(f"mask must be [N] = [{N}]; got {tuple(mask_N.shape)}")
    if reduction not in reductions:
        raise ValueError(f"reduction must be one of {reductions}; got {reduction!r}")


def refuse_teacher_grad(*teacher_tensors: torch.Tensor) -> None:
    """The reverse-KL entry points train the student only: a teacher tensor that requires grad is an error."""
    if any(t.requires_grad for t in teacher_tensors):
        raise ValueError("the teacher requires grad; the loss trains the student only (detach the teacher)")


def reduce_loss(loss_N: torch.Tensor, mask_N: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """Per-token losses to "mean" (over unmasked tokens), "sum" or "none" (masked tokens 0)."""
    if mask_N is not None:  # `where`, not a product: a masked row's inf or nan must not leak into the total
        loss_N = torch.where(mask_N.bool(), loss_N, torch.zeros_like(loss_N))
    if reduction == "none":
        return loss_N
    total = loss_N.sum()
    if reduction == "sum":
        return total
    count = loss_N.new_tensor(loss_N.shape[0]) if mask_N is None else mask_N.sum()
    return total / count.clamp(min=1)


def topk_outputs(loss: torch.Tensor, row_stats_N3: torch.Tensor, mask_N: torch.Tensor | None,
                 return_topk_mass: bool, return_entropy: bool):
    """What a top-k KL entry point returns: the loss; then, as asked, the first argument's mean mass inside its
    top-k, and the pair (first's, second's) of mean full-vocabulary entropies. ``row_stats_N3`` holds those three
    per token; the means are over unmasked tokens, without gradient."""
    mean = lambda col: reduce_loss(row_stats_N3[:, col], mask_N, "mean").detach()  # noqa: E731
    out = [loss]
    if return_topk_mass:
        out.append(mean(0))
    if return_entropy:
        out.append((mean(1), mean(2)))
    return out[0] if len(out) == 1 else tuple(out)


def token_weights(mask_N: torch.Tensor | None, N: int, reduction: str, device) -> torch.Tensor:
    """Per-token weights that turn a sum of per-token losses into the requested reduction."""
    weight_N = torch.ones(N, device=device) if mask_N is None else mask_N.float()
    if reduction == "mean":
        weight_N = weight_N / weight_N.sum().clamp(min=1)
    return weight_N
