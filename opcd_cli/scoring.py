"""Running a model over prompt + response and reading out what it predicts for each response token.

The loss only needs the model's final hidden state at the positions that predict response tokens (and the
output layer's weight): ``fused_linear_topk_reverse_kl`` turns them into logits chunk by chunk. Models whose
logits are not a plain ``hidden @ weight.T`` (soft-capping, scaling) fall back to full logits at those
positions, checked once per model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .kernels import fused_linear_sparse_target_kl, fused_linear_topk_kl, sparse_target_kl, topk_kl


@dataclass(frozen=True)
class Packed:
    """A right-padded batch of prompt + response sequences and where its response tokens are predicted."""

    input_ids_BT: torch.Tensor
    attention_BT: torch.Tensor
    rows_N: torch.Tensor  # the sequence of each response token
    cols_N: torch.Tensor  # the position whose output predicts it
    first_col: int  # the earliest such position in the batch


def pack(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int, device) -> Packed:
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    rows, cols = [], []
    for b, (prompt, response) in enumerate(zip(prompts, responses)):
        ids = list(prompt) + list(response)
        input_ids[b, : len(ids)] = torch.tensor(ids)
        attention[b, : len(ids)] = 1
        rows += [b] * len(response)
        cols += range(len(prompt) - 1, len(prompt) - 1 + len(response))
    return Packed(
        input_ids.to(device), attention.to(device), torch.tensor(rows, device=device), torch.tensor(cols, device=device),
        min(cols) if cols else 0,
    )


def output_weight(model) -> torch.Tensor:
    return model.get_output_embeddings().weight


def final_hidden(model, packed: Packed) -> torch.Tensor:
    """[N, H] final hidden states (after the last norm) at the positions that predict response tokens."""
    base = getattr(model, model.base_model_prefix)
    hidden_BTH = base(input_ids=packed.input_ids_BT, attention_mask=packed.attention_BT).last_hidden_state
    return hidden_BTH[packed.rows_N, packed.cols_N]


def response_logits(model, packed: Packed) -> torch.Tensor:
    """[N, V] logits at the positions that predict response tokens (computed only from the first such one)."""
    keep = packed.input_ids_BT.shape[1] - packed.first_col
    logits_BKV = model(input_ids=packed.input_ids_BT, attention_mask=packed.attention_BT, logits_to_keep=keep).logits
    return logits_BKV[packed.rows_N, packed.cols_N - packed.first_col]


@torch.no_grad()
def logits_are_linear(model) -> bool:
    """True when the model's logits are exactly ``final_hidden @ output_weight.T`` (so the fused path applies)."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return False
    device = head.weight.device
    packed = pack([[0, 1, 2]], [[3]], pad_id=0, device=device)
    hidden = final_hidden(model, packed)
    logits = response_logits(model, packed)
    return torch.allclose(hidden.float() @ head.weight.float().T, logits.float(), rtol=1e-2, atol=1e-2)


@dataclass
class LossParts:
    """Sums over one micro-batch's response tokens (divide by the step's token count for the mean)."""

    total: torch.Tensor  # what is differentiated
    distill: torch.Tensor  # the distillation term
    consistency: torch.Tensor  # the context-removability term (already weighted), 0 when off
    topk_mass: torch.Tensor  # mean student probability inside its top-k (on-policy) or the teacher's (off-policy)


class DistillLoss:
    """The losses of one micro-batch, from final hidden states when the models allow it (else from logits).

    * on-policy: top-k reverse KL(student without context || teacher with context) over the student's top-k;
      with ``consistency_weight`` > 0, plus that weight times KL(stopgrad(student without context) || student
      with context) over the top-k of the no-context student: the same top-k KL, differentiated on its
      second side (one extra student forward pass with the context).
    * off-policy: KL(teacher || student) over the teacher's saved top-k, or the teacher tokens' cross-entropy
      (a saved distribution with all its mass on the token the teacher wrote).
    """

    def __init__(self, student, teacher, vocab: int, topk: int, renorm: bool, consistency_weight: float = 0.0):
        self.student, self.teacher = student, teacher
        self.vocab, self.topk, self.renorm = vocab, topk, renorm
        self.consistency_weight = consistency_weight
        self.fused = logits_are_linear(student) and (teacher is None or logits_are_linear(teacher))

    def _student_out(self, packed: Packed) -> torch.Tensor:
        return final_hidden(self.student, packed) if self.fused else response_logits(self.student, packed)[:, : self.vocab]

    def _topk_kl(self, first: torch.Tensor, first_model, second: torch.Tensor, second_model, first_frozen: bool = False):
        """Top-k KL(first || second) over the top-k of ``first``, from hidden states or logits."""
        if self.fused:
            first_weight = output_weight(first_model)[: self.vocab]
            return fused_linear_topk_kl(
                first.detach() if first_frozen else first, first_weight.detach() if first_frozen else first_weight,
                second, output_weight(second_model)[: self.vocab],
                k=self.topk, renorm=self.renorm, reduction="sum", return_topk_mass=True,
            )
        return topk_kl(first.detach() if first_frozen else first, second, k=self.topk, renorm=self.renorm,
                       reduction="sum", return_topk_mass=True)

    def on_policy(self, student_in: Packed, teacher_in: Packed, context_in: Packed | None = None) -> LossParts:
        with torch.no_grad():
            teacher_out = final_hidden(self.teacher, teacher_in) if self.fused else response_logits(self.teacher, teacher_in)[:, : self.vocab]
        student_out = self._student_out(student_in)
        distill, mass = self._topk_kl(student_out, self.student, teacher_out, self.teacher)
        consistency = torch.zeros((), device=distill.device)
        if context_in is not None and self.consistency_weight > 0:
            with_context = self._student_out(context_in)
            term, _ = self._topk_kl(student_out, self.student, with_context, self.student, first_frozen=True)
            consistency = self.consistency_weight * term
        return LossParts(distill + consistency, distill.detach(), consistency.detach(), mass)

    def off_policy(self, student_in: Packed, target_ids_Nk: torch.Tensor, target_logprobs_Nk: torch.Tensor) -> LossParts:
        student_out = self._student_out(student_in)
        if self.fused:
            loss = fused_linear_sparse_target_kl(target_ids_Nk, target_logprobs_Nk, student_out,
                                                 output_weight(self.student)[: self.vocab], reduction="sum")
        else:
            loss = sparse_target_kl(target_ids_Nk, target_logprobs_Nk, student_out, reduction="sum")
        with torch.no_grad():
            mass = target_logprobs_Nk.exp().sum(-1).mean()
        return LossParts(loss, loss.detach(), torch.zeros((), device=loss.device), mass)
