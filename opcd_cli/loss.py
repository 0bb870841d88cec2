"""The distillation losses of one micro-batch, on what the models predict at the response tokens (``forward.py``).

* on-policy: the top-k reverse KL(student without context || teacher with context) over the student's top-k,
  with the context-removability term and the in-context anchor beside it when asked for;
* off-policy: the forward KL from the teacher's saved top-k (or its tokens, SFT) to the student.

Each is a sum over the micro-batch's response tokens (``LossParts``); the step divides by its token count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .forward import Head, logits_are_linear, with_head
from .kernels import fused_linear_sparse_target_kl, fused_linear_topk_kl, sparse_target_kl, topk_kl
from .micro_batches import Packed
from .timing import NoTimer


def head_topk_kl(first: Head, second: Head, k: int, renorm: bool, vocab: int, backend: str = "auto",
                 tail: bool = False, entropy: bool = False, union: bool = False):
    """Sum over tokens of the top-k KL(first || second) over the first's top-k (``union``: and the second's),
    and the first's mean mass there; with ``entropy`` also the pair of mean full-vocabulary entropies
    (first's, second's)."""
    kw = dict(k=k, renorm=renorm, reduction="sum", return_topk_mass=True, backend=backend, tail=tail,
              return_entropy=entropy, union=union)
    if first.logits_NV is None:
        return fused_linear_topk_kl(first.hidden_NH, first.weight_VH[:vocab], second.hidden_NH,
                                    second.weight_VH[:vocab], **kw)
    return topk_kl(first.logits_NV[:, :vocab], second.logits_NV[:, :vocab], **kw)


def head_sparse_target_kl(target_ids_Nk: torch.Tensor, target_logprobs_Nk: torch.Tensor, head: Head, vocab: int):
    """Sum over tokens of the KL from a saved sparse target to the head's distribution, and the head's mean
    full-vocabulary entropy."""
    if head.logits_NV is None:
        return fused_linear_sparse_target_kl(target_ids_Nk, target_logprobs_Nk, head.hidden_NH,
                                             head.weight_VH[:vocab], reduction="sum", return_entropy=True)
    return sparse_target_kl(target_ids_Nk, target_logprobs_Nk, head.logits_NV[:, :vocab], reduction="sum",
                            return_entropy=True)


@dataclass
class LossParts:
    """Sums over one micro-batch's response tokens (divide by the step's token count for the mean)."""

    total: torch.Tensor  # what is differentiated
    distill: torch.Tensor  # the distillation term
    consistency: torch.Tensor  # the context-removability term (already weighted), 0 when off
    topk_mass: torch.Tensor  # mean student probability inside its top-k (on-policy) or the teacher's (off-policy)
    anchor: torch.Tensor | None = None  # the in-context anchor (already weighted), 0 when off
    # the mean full-vocabulary entropies of the student (without the context) and of the teacher (on-policy, with
    # it; None off-policy, where only saved top-k are known) at the response tokens, from the loss's own pass
    entropies: tuple[torch.Tensor, torch.Tensor | None] | None = None


class DistillLoss:
    """The losses of one micro-batch.

    * on-policy: top-k reverse KL(student without context || teacher with context) over the student's top-k
      (``renorm``: both renormalised on it; ``tail``: the mass outside it one more bucket of both);
      with ``consistency_weight`` > 0, plus that weight times KL(stopgrad(student without context) || student
      with context) over the top-k of the no-context student: the same top-k KL, differentiated on its
      second side (one extra student forward pass with the context); with ``anchor_weight`` > 0, plus that
      weight times the top-k reverse KL(student with context || teacher with context) over the with-context
      student's top-k: the student keeps behaving as the teacher does when the context is there (the same
      extra pass, shared with the regulariser). With ``union`` every one of these KLs is taken over the union
      of its two sides' top-k ids instead of the first side's.
    * off-policy: KL(teacher || student) over the teacher's saved top-k, or the teacher tokens' cross-entropy
      (a saved distribution with all its mass on the token the teacher wrote).
    """

    def __init__(self, student, teacher, vocab: int, topk: int, renorm: bool, consistency_weight: float = 0.0,
                 backend: str = "auto", tail: bool = False, anchor_weight: float = 0.0, union: bool = False):
        self.student, self.teacher = student, teacher
        self.vocab, self.topk, self.renorm, self.backend, self.tail = vocab, topk, renorm, backend, tail
        self.union = union
        self.consistency_weight, self.anchor_weight = consistency_weight, anchor_weight
        self.fused = logits_are_linear(student) and (teacher is None or logits_are_linear(teacher))

    @property
    def reads_context(self) -> bool:
        """Whether the on-policy loss has the student's pass with the context (the regulariser or the anchor on,
        at their weights of this step)."""
        return self.consistency_weight > 0 or self.anchor_weight > 0

    def _kl(self, first: Head, second: Head, entropy: bool = False):
        return head_topk_kl(first, second, self.topk, self.renorm, self.vocab, self.backend, self.tail, entropy,
                            self.union)

    def on_policy(self, student_in: Packed, teacher_in: Packed, context_in: Packed | None = None,
                  timer=NoTimer()) -> LossParts:
        with timer.phase("teacher_forward"), torch.no_grad():
            teacher = with_head(self.teacher, teacher_in, self.fused, lambda head: head)
        kept = []

        def distill(student: Head):
            kept.append(student.hidden_NH if self.fused else student.logits_NV)
            return self._kl(student, teacher, entropy=True)

        with timer.phase("student_forward"):  # the loss too: the fused kernels run inside the forward
            distill_sum, mass, entropies = with_head(self.student, student_in, self.fused, distill)
        consistency = anchor = torch.zeros((), device=distill_sum.device)
        if context_in is not None and self.reads_context:
            def regularise(with_context: Head):
                terms = [consistency, anchor]
                if self.consistency_weight > 0:  # towards the no-context output, held without gradient
                    no_context = (Head(kept[0].detach(), with_context.weight_VH.detach()) if self.fused
                                  else Head(logits_NV=kept[0].detach()))
                    terms[0] = self.consistency_weight * self._kl(no_context, with_context)[0]
                if self.anchor_weight > 0:  # towards the teacher, both with the context
                    terms[1] = self.anchor_weight * self._kl(with_context, teacher)[0]
                return terms

            with timer.phase("consistency_forward"):
                consistency, anchor = with_head(self.student, context_in, self.fused, regularise)
        return LossParts(distill_sum + consistency + anchor, distill_sum.detach(), consistency.detach(), mass,
                         anchor.detach(), entropies)

    @torch.no_grad()
    def teacher_targets(self, teacher_in: Packed, sft: bool, responses: Sequence[Sequence[int]]):
        """Off-policy targets read off the teacher now (games it just played): its top-k ids and log-probs
        (full-vocabulary, not renormalised) at the response tokens, or with ``sft`` the tokens themselves."""
        device = teacher_in.input_ids_BT.device
        if sft:
            ids = torch.tensor([t for r in responses for t in r], dtype=torch.int64, device=device)[:, None]
            return ids, torch.zeros(ids.shape, device=device)
        top = with_head(self.teacher, teacher_in, False,
                        lambda head: torch.log_softmax(head.logits_NV[:, : self.vocab].float(), dim=-1).topk(self.topk))
        return top.indices, top.values

    def off_policy(self, student_in: Packed, target_ids_Nk: torch.Tensor, target_logprobs_Nk: torch.Tensor,
                   timer=NoTimer()) -> LossParts:
        with timer.phase("student_forward"):
            loss, entropy = with_head(self.student, student_in, self.fused, lambda head: head_sparse_target_kl(
                target_ids_Nk, target_logprobs_Nk, head, self.vocab))
        with torch.no_grad():
            mass = target_logprobs_Nk.exp().sum(-1).mean()
        zero = torch.zeros((), device=loss.device)
        return LossParts(loss, loss.detach(), zero, mass, zero, (entropy, None))
