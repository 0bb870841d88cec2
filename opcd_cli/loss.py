"""The distillation losses of one micro-batch, on what the models predict at the response tokens (``forward.py``).

* on-policy: the objective (``--objective``) between the student without the context and the teacher with it,
  on the student's own tokens: the top-k reverse KL over the student's top-k (the paper's), the reverse KL on
  the sampled tokens only (a policy-gradient step), the forward KL over the teacher's top-k, or the generalised
  JSD over the full vocabulary; with the verifier's reward as a policy-gradient term, the context-removability
  term and the in-context anchor beside it when asked for;
* off-policy: the forward KL from the teacher's saved top-k (or its tokens, SFT) to the student.

Each is a sum over the micro-batch's response tokens (``LossParts``); the step divides by its token count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .forward import Head, logits_are_linear, with_head
from .kernels import backend_for, fused_linear_sparse_target_kl, fused_linear_topk_kl, sparse_target_kl, topk_kl
from .kernels.jsd import fused_linear_jsd, jsd
from .kernels.row_loss import map_logit_rows
from .kernels.sampled_token import sampled_token_loss, token_logprobs
from .kernels.torch_chunked import entropy_rows
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


def head_token_logprobs(ids_N: torch.Tensor, head: Head, vocab: int):
    """The head's full-vocabulary log-probabilities of ``ids_N`` and its entropies [N], without gradient."""
    return token_logprobs(ids_N, *_head_args(head, vocab))


def head_sampled_token_loss(ids_N, head: Head, vocab: int, teacher_logprobs_N=None, advantages_N=None, mask_N=None):
    """The sampled-token surrogate sum (``kernels/sampled_token.py``), the head's log p of the ids and its
    entropies."""
    logits_NV, hidden_NH, weight_VH = _head_args(head, vocab)
    return sampled_token_loss(ids_N, logits_NV, hidden_NH, weight_VH, teacher_logprobs_N, advantages_N, mask_N)


@torch.no_grad()
def head_topk_logprobs(head: Head, k: int, vocab: int):
    """The head's top-k ids and their full-vocabulary log-probabilities [N, k], and its entropies [N]."""
    def rows(z_nV, side):
        logp_nV = torch.log_softmax(z_nV, dim=-1)
        top = logp_nV.topk(k, dim=-1)
        return top.indices.float(), top.values, entropy_rows(logp_nV)[:, None]

    ids, values, entropy = map_logit_rows(rows, (), *_head_args(head, vocab))
    return ids.long(), values, entropy[:, 0]


def head_jsd(student: Head, teacher: Head, beta: float, vocab: int, backend: str):
    """Sum over tokens of the generalised JSD, and the two entropies [N, 2] (Liger-Kernel's fused kernel on the
    Triton backend)."""
    if student.logits_NV is None:
        return fused_linear_jsd(student.hidden_NH, student.weight_VH[:vocab], teacher.hidden_NH,
                                teacher.weight_VH[:vocab], beta, backend=backend_for(student.hidden_NH, backend))
    return jsd(student.logits_NV[:, :vocab], teacher.logits_NV[:, :vocab], beta)


def _head_args(head: Head, vocab: int):
    """(logits, hidden, weight) of a head, the output layer cut to the shared vocabulary."""
    if head.logits_NV is not None:
        return head.logits_NV[:, :vocab], None, None
    return None, head.hidden_NH, head.weight_VH[:vocab]


@dataclass
class LossParts:
    """Sums over one micro-batch's response tokens (divide by the step's token count for the mean)."""

    total: torch.Tensor  # what is differentiated
    distill: torch.Tensor  # the distillation term
    consistency: torch.Tensor  # the context-removability term (already weighted), 0 when off
    # the mean probability inside the top-k the loss reads: the student's own (top-k reverse KL) or the teacher's
    # (top-k forward KL, off-policy); None for the objectives without one (sampled-token, jsd)
    topk_mass: torch.Tensor | None
    anchor: torch.Tensor | None = None  # the in-context anchor (already weighted), 0 when off
    reward: torch.Tensor | None = None  # the reward's policy-gradient term (already weighted), 0 when off
    # the mean full-vocabulary entropies of the student (without the context) and of the teacher (on-policy, with
    # it; None off-policy, where only saved top-k are known) at the response tokens, from the loss's own pass
    entropies: tuple[torch.Tensor, torch.Tensor | None] | None = None


class DistillLoss:
    """The losses of one micro-batch.

    * on-policy: the ``objective`` between the student without the context and the teacher with it: by default
      the top-k reverse KL(student without context || teacher with context) over the student's top-k
      (``renorm``: both renormalised on it; ``tail``: the mass outside it one more bucket of both); or
      ``sampled-token`` (-(log p - log q) of each sampled token as its advantage in a policy-gradient step),
      ``topk-forward-kl`` (KL(teacher || student) over the teacher's top-k) or ``jsd`` (the generalised JSD with
      ``jsd_beta``); with per-token ``advantages`` (the reward), plus the policy-gradient term
      -``reward_weight`` x advantage x log p of each sampled token;
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
                 backend: str = "auto", tail: bool = False, anchor_weight: float = 0.0, union: bool = False,
                 objective: str = "topk-reverse-kl", jsd_beta: float = 0.5, reward_weight: float = 0.0):
        self.student, self.teacher = student, teacher
        self.objective, self.jsd_beta, self.reward_weight = objective, jsd_beta, reward_weight
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

    def teacher_side(self, head: Head, ids_N: torch.Tensor):
        """What the objective reads of the teacher, taken inside its forward: its head (the top-k reverse KL and
        the JSD read it whole, the anchor too), with its log-probabilities of the sampled tokens or its top-k,
        and its entropies, for the objectives that read only those."""
        if self.objective == "sampled-token":
            return head, head_token_logprobs(self.sampled_ids(ids_N)[0], head, self.vocab)
        if self.objective == "topk-forward-kl":
            return head, head_topk_logprobs(head, self.topk, self.vocab)
        return head, None

    def sampled_ids(self, ids_N: torch.Tensor | None):
        """(the sampled ids inside the shared vocabulary, which of them were there): an id past it has no
        probability here, and is read as the last one and masked out."""
        return (None, None) if ids_N is None else (ids_N.clamp(max=self.vocab - 1), ids_N < self.vocab)

    def objective_terms(self, student: Head, teacher_side, ids_N, advantages_N):
        """(the differentiated sum, the distillation term's value, the reward term's value or None, the top-k
        mass or None, the pair of mean entropies); ``ids_N``: the sampled tokens as sampled (``sampled_ids``)."""
        mean = lambda x: x.mean() if x.numel() else x.new_zeros(())  # noqa: E731
        teacher, read = teacher_side
        ids_N, valid_N = self.sampled_ids(ids_N)
        reward_N = None if advantages_N is None else self.reward_weight * advantages_N
        if self.objective == "sampled-token":  # the reward's advantage and the KL's add in one pass
            teacher_logp_N, teacher_h_N = read
            total, logp_N, entropy_N = head_sampled_token_loss(ids_N, student, self.vocab, teacher_logp_N, reward_N,
                                                               valid_N)
            kl = torch.where(valid_N, logp_N - teacher_logp_N, torch.zeros_like(logp_N)).sum()
            reward = None if reward_N is None else -(reward_N * logp_N * valid_N).sum()
            return total, kl, reward, None, (mean(entropy_N), mean(teacher_h_N))
        if self.objective == "topk-forward-kl":
            target_ids, target_logp, teacher_h_N = read
            total, student_h = head_sparse_target_kl(target_ids, target_logp, student, self.vocab)
            mass, entropies = target_logp.exp().sum(-1).mean(), (student_h, mean(teacher_h_N))
        elif self.objective == "jsd":
            total, stats_N2 = head_jsd(student, teacher, self.jsd_beta, self.vocab, self.backend)
            mass, entropies = None, (mean(stats_N2[:, 0]), mean(stats_N2[:, 1]))
        else:
            total, mass, entropies = self._kl(student, teacher, entropy=True)
        distill = total.detach()
        reward = None
        if reward_N is not None:
            reward, _, _ = head_sampled_token_loss(ids_N, student, self.vocab, advantages_N=reward_N, mask_N=valid_N)
            total = total + reward
        return total, distill, reward, mass, entropies

    def on_policy(self, student_in: Packed, teacher_in: Packed, context_in: Packed | None = None,
                  timer=NoTimer(), ids_N: torch.Tensor | None = None,
                  advantages_N: torch.Tensor | None = None) -> LossParts:
        """The micro-batch's on-policy losses; ``ids_N``: its response tokens in order (the sampled-token
        objective and the reward read them), ``advantages_N``: each token's advantage (the reward term)."""
        with timer.phase("teacher_forward"), torch.no_grad():
            teacher = with_head(self.teacher, teacher_in, self.fused, lambda head: self.teacher_side(head, ids_N))
        kept = []

        def distill(student: Head):
            kept.append(student.hidden_NH if self.fused else student.logits_NV)
            return self.objective_terms(student, teacher, ids_N, advantages_N)

        with timer.phase("student_forward"):  # the loss too: the fused kernels run inside the forward
            total, distill_sum, reward, mass, entropies = with_head(self.student, student_in, self.fused, distill)
        consistency = anchor = torch.zeros((), device=total.device)
        if context_in is not None and self.reads_context:
            def regularise(with_context: Head):
                terms = [consistency, anchor]
                if self.consistency_weight > 0:  # towards the no-context output, held without gradient
                    no_context = (Head(kept[0].detach(), with_context.weight_VH.detach()) if self.fused
                                  else Head(logits_NV=kept[0].detach()))
                    terms[0] = self.consistency_weight * self._kl(no_context, with_context)[0]
                if self.anchor_weight > 0:  # towards the teacher, both with the context
                    terms[1] = self.anchor_weight * self._kl(with_context, teacher[0])[0]
                return terms

            with timer.phase("consistency_forward"):
                consistency, anchor = with_head(self.student, context_in, self.fused, regularise)
        zero = torch.zeros((), device=total.device)
        return LossParts(total + consistency + anchor, distill_sum, consistency.detach(), mass, anchor=anchor.detach(),
                         reward=zero if reward is None else reward.detach(), entropies=entropies)

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
        return LossParts(loss, loss.detach(), zero, mass, anchor=zero, entropies=(entropy, None))
