"""What a model predicts for each response token, and the distillation losses on it.

A micro-batch of prompt + response sequences is made into model inputs: a right-padded row each (``pack``), or
several end to end in a row with positions restarting at each (``pack_rows``, padding only at a row's end:
attention stays within each sequence). Running a model over it gives a ``Head``:
its output at the positions that predict response tokens, either final hidden states with the output layer's
weight (the fused path: the kernels make logits chunk by chunk and never hold [tokens x vocab]) or, for
models whose logits are not a plain ``hidden @ weight.T`` (soft-capping, scaling), logits.

The output layer is read inside the model's own forward (``with_head``): for that one call its forward is
replaced by a function that hands the kept hidden states and the layer's weight to the loss. A sharded
model (FSDP) gathers a layer's weight only for the duration of its module's forward, so that is where the
loss must see it; an unsharded model behaves the same either way.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence, TypeVar

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .kernels import fused_linear_sparse_target_kl, fused_linear_topk_kl, sparse_target_kl, topk_kl
from .timing import NoTimer

T = TypeVar("T")


class TeacherPrefix:
    """The tokens every teacher prompt starts with (the rendered context, when one context serves every row),
    and the frozen teacher's keys and values over them, computed once and reused by every micro-batch: the
    teacher then reads only the rest of each sequence. Exact: the same attention over the same keys."""

    def __init__(self, ids: Sequence[int]):
        self.ids = list(ids)
        self._kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def forget(self) -> None:
        """Drop the cached keys and values (a teacher that moves: they are made again on next use)."""
        self._kv = None

    @torch.no_grad()
    def past(self, model, batch: int):
        """A cache holding the prefix's keys and values for ``batch`` rows (views, not copies), which the
        forward reads but never extends: nothing of a micro-batch stays in it."""
        if self._kv is None:
            device = model.get_input_embeddings().weight.device
            out = model(input_ids=torch.tensor([self.ids], device=device), use_cache=True, logits_to_keep=1)
            self._kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        return Cache(layers=[_PrefixLayer(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1))
                             for k, v in self._kv])


class _PrefixLayer(DynamicLayer):
    """A cache layer that holds the prefix's keys and values and returns them with each new token's, without
    keeping the new ones."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.dtype, self.device = keys.dtype, keys.device
        self.keys, self.values, self.is_initialized = keys, values, True

    def update(self, key_states, value_states, *args, **kwargs):
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


def common_prefix(prompts: Sequence[Sequence[int]]) -> list[int]:
    """The longest run of tokens every prompt starts with, leaving each prompt at least its last token (whose
    output predicts the first response token)."""
    if not prompts:
        return []
    limit = min(len(p) for p in prompts) - 1
    first = prompts[0]
    n = 0
    while n < limit and all(p[n] == first[n] for p in prompts):
        n += 1
    return list(first[:n])


def can_reuse_prefix(model) -> bool:
    """Whether the teacher's attention is full over every earlier token in every layer (no sliding windows),
    so that a cached prefix gives the same outputs."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", config)
    layer_types = getattr(config, "layer_types", None) or []
    if any(kind != "full_attention" for kind in layer_types):
        return False
    return not (getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None))


@dataclass(frozen=True)
class Packed:
    """Prompt + response sequences as model inputs, and where their response tokens are predicted: one
    right-padded row each, or (``position_ids_BT`` set) several end to end in a row. With a ``prefix``, the
    sequences after it (the model reads the prefix from its cache)."""

    input_ids_BT: torch.Tensor
    attention_BT: torch.Tensor | None  # 1 on real tokens, 0 on padding; None when packed
    rows_N: torch.Tensor  # the row of each response token
    cols_N: torch.Tensor  # the position whose output predicts it
    first_col: int  # the earliest such position in the batch
    prefix: TeacherPrefix | None = field(default=None, compare=False)
    position_ids_BT: torch.Tensor | None = None  # packed: each sequence's positions, from 0 (or the prefix's end)
    sequence_BT: torch.Tensor | None = None  # packed: which sequence each position belongs to
    padding: int = 0  # padding positions the model reads

    @property
    def tokens(self) -> int:
        return self.rows_N.shape[0]

    @property
    def positions(self) -> int:
        """The positions the model reads (padding included, the cached prefix not)."""
        return self.input_ids_BT.numel()


def pack(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int, device,
         prefix: TeacherPrefix | None = None) -> Packed:
    """Right-padded rows, one sequence each."""
    if prefix is not None:  # every prompt starts with it (``common_prefix``): keep what follows
        prompts = [p[len(prefix):] for p in prompts]
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
    padding = len(prompts) * width - sum(len(p) + len(r) for p, r in zip(prompts, responses))
    return Packed(
        input_ids.to(device), attention.to(device), torch.tensor(rows, device=device), torch.tensor(cols, device=device),
        min(cols) if cols else 0, prefix, padding=padding,
    )


def pack_rows(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], rows: Sequence[int], pad_id: int,
              device, prefix: TeacherPrefix | None = None) -> Packed:
    """Sequences end to end in rows, without padding between them: row r holds the next ``rows[r]`` sequences
    and is padded only at its end, up to the longest row. Each sequence's positions start at 0 (after a
    ``prefix``, at its length), so attention stays within it; the padding at a row's end is a sequence of its
    own. The response tokens come in the order ``pack`` gives them."""
    if prefix is not None:
        prompts = [p[len(prefix):] for p in prompts]
    if sum(rows) != len(prompts) or min(rows, default=1) < 1:
        raise ValueError(f"rows {list(rows)} do not hold the {len(prompts)} sequences")
    start = len(prefix) if prefix is not None else 0
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    ends = [sum(rows[: r + 1]) for r in range(len(rows))]
    width = max(sum(lengths[end - n : end]) for n, end in zip(rows, ends))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    sequence = torch.zeros((len(rows), width), dtype=torch.long)
    row_of, cols, s = [], [], 0
    for r, n in enumerate(rows):
        offset = 0
        for _ in range(n):
            prompt, response = prompts[s], responses[s]
            input_ids[r, offset : offset + lengths[s]] = torch.tensor(list(prompt) + list(response))
            positions[r, offset : offset + lengths[s]] = torch.arange(start, start + lengths[s])
            sequence[r, offset : offset + lengths[s]] = s
            row_of += [r] * len(response)
            cols += range(offset + len(prompt) - 1, offset + len(prompt) - 1 + len(response))
            offset, s = offset + lengths[s], s + 1
        positions[r, offset:] = torch.arange(start, start + width - offset)  # the padding: a sequence of its own
        sequence[r, offset:] = -1 - r
    return Packed(input_ids.to(device), None, torch.tensor(row_of, device=device), torch.tensor(cols, device=device),
                  min(cols) if cols else 0, prefix, positions.to(device), sequence.to(device),
                  padding=len(rows) * width - sum(lengths))


def attention_kind(model) -> str:
    """The attention implementation transformers runs for ``model`` (``sdpa``, ``eager``, ``flash_attention_2``...)."""
    config = getattr(model, "config", None)
    return getattr(getattr(config, "text_config", config), "_attn_implementation", None) or "eager"


PREFIX_MASK_KINDS = ("sdpa", "eager")  # the attention implementations that take a packed row's 4-D mask


def prefix_row_mask(packed: Packed, model) -> torch.Tensor:
    """The 4-D mask of packed rows read after a cached prefix: every position sees the whole prefix and its own
    sequence up to itself. Boolean for SDPA; for eager attention, added to the scores (0 or the lowest value of
    the model's dtype)."""
    sequence = packed.sequence_BT
    batch, n = sequence.shape
    order = torch.arange(n, device=sequence.device)
    own = (sequence[:, :, None] == sequence[:, None, :]) & (order[None, :] <= order[:, None])[None]
    allowed = torch.cat([own.new_ones((batch, n, len(packed.prefix))), own], dim=2)[:, None]
    if attention_kind(model) == "sdpa":
        return allowed
    dtype = model.get_input_embeddings().weight.dtype
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


@dataclass(frozen=True)
class Head:
    """A model's output at the response positions: hidden states [N, H] and the output weight [V', H], or
    logits [N, V']. V' may exceed the shared vocabulary (padded output layers); losses keep its first rows."""

    hidden_NH: torch.Tensor | None = None
    weight_VH: torch.Tensor | None = None
    logits_NV: torch.Tensor | None = None

    def detach(self) -> "Head":
        detach = lambda x: None if x is None else x.detach()  # noqa: E731
        return Head(detach(self.hidden_NH), detach(self.weight_VH), detach(self.logits_NV))


def _run(model, packed: Packed, past=None):
    keep = packed.input_ids_BT.shape[1] - packed.first_col
    if past is None:
        # packed rows: transformers confines attention to each sequence by its restarting positions
        return model(input_ids=packed.input_ids_BT, attention_mask=packed.attention_BT,
                     position_ids=packed.position_ids_BT, logits_to_keep=keep, use_cache=False)
    if packed.position_ids_BT is None:
        batch = packed.input_ids_BT.shape[0]
        attention = torch.cat([packed.attention_BT.new_ones((batch, len(packed.prefix))), packed.attention_BT], dim=1)
    else:
        attention = prefix_row_mask(packed, model)
    with warnings.catch_warnings():  # newer transformers also call it `cache` and warn about this name, which
        warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)  # every version takes
        return model(input_ids=packed.input_ids_BT, attention_mask=attention, position_ids=packed.position_ids_BT,
                     logits_to_keep=keep, past_key_values=past, use_cache=True)


def with_head(model, packed: Packed, fused: bool, use: Callable[[Head], T]) -> T:
    """Run ``model`` over ``packed`` and return ``use(head)``, called inside the model's forward when ``fused``
    (where a sharded output layer is whole), else on the logits the forward returns."""
    # a shared prefix's keys and values, made (once) before the output layer is taken over
    past = None if packed.prefix is None else packed.prefix.past(model, packed.input_ids_BT.shape[0])
    if not fused:
        logits_BKV = _run(model, packed, past).logits
        return use(Head(logits_NV=logits_BKV[packed.rows_N, packed.cols_N - packed.first_col]))
    layer = model.get_output_embeddings()
    result = []

    def forward(hidden_BKH):  # the model hands its output layer the hidden states of the kept positions
        hidden_NH = hidden_BKH[packed.rows_N, packed.cols_N - packed.first_col]
        result.append(use(Head(hidden_NH, layer.weight)))
        return hidden_BKH.new_zeros(())  # stands in for the logits, which nothing reads

    layer.forward = forward
    try:
        _run(model, packed, past)
    finally:
        del layer.forward
    return result[0]


@torch.no_grad()
def packing_is_exact(model, after_prefix: bool = False) -> bool:
    """True when ``model`` reads sequences packed in a row (``pack_rows``) as it reads them one by one (its
    attention keeps them apart); ``after_prefix``: the same after a cached prefix (a 4-D mask, which only some
    attention implementations take)."""
    if after_prefix and attention_kind(model) not in PREFIX_MASK_KINDS:
        return False
    device = model.get_input_embeddings().weight.device
    prefix = TeacherPrefix([3, 1, 4, 1]) if after_prefix else None
    start = list(prefix.ids) if prefix else []
    prompts, responses = [start + [5, 9, 2], start + [6, 5], start + [7]], [[3, 5], [8, 9, 7], [2]]
    logits = lambda packed: with_head(model, packed, False, lambda head: head.logits_NV.float())  # noqa: E731
    flat = logits(pack_rows(prompts, responses, [2, 1], 0, device, prefix))  # the second row ends in padding
    one_by_one = torch.cat([logits(pack([p], [r], 0, device, prefix)) for p, r in zip(prompts, responses)])
    return torch.allclose(flat, one_by_one, rtol=1e-2, atol=1e-2)


@torch.no_grad()
def logits_are_linear(model) -> bool:
    """True when the model's logits are exactly ``final hidden @ output weight.T`` (so the fused path applies)."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return False
    packed = pack([[0, 1, 2]], [[3]], pad_id=0, device=head.weight.device)
    fused = with_head(model, packed, True, lambda h: h.hidden_NH.float() @ h.weight_VH.float().T)
    plain = with_head(model, packed, False, lambda h: h.logits_NV.float())
    return torch.allclose(fused, plain, rtol=1e-2, atol=1e-2)


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
