"""What a model predicts at the response positions: its forward over packed inputs, read at the output layer.

Running a model over a micro-batch's inputs (``micro_batches.pack``, ``pack_rows``) gives a ``Head``: its output at
the positions that predict response tokens, either final hidden states with the output layer's weight (the fused
path: the kernels make logits chunk by chunk and never hold [tokens x vocab]) or, for models whose logits are not
a plain ``hidden @ weight.T`` (soft-capping, scaling), logits.

The output layer is read inside the model's own forward (``with_head``): for that one call its forward is
replaced by a function that hands the kept hidden states and the layer's weight to the loss. A sharded
model (FSDP) gathers a layer's weight only for the duration of its module's forward, so that is where the
loss must see it; an unsharded model behaves the same either way.

The teacher reads the start every prompt shares (the rendered context) once per run: ``TeacherPrefix`` holds its
keys and values, which each micro-batch's forward reads from a cache without extending it. Which attention
implementations keep packed sequences apart, and after a prefix, is checked here too (``packing_is_exact``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence, TypeVar

import torch
from transformers.cache_utils import Cache, DynamicLayer

if TYPE_CHECKING:
    from .micro_batches import Packed

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
    from .micro_batches import pack, pack_rows

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
    from .micro_batches import pack

    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return False
    packed = pack([[0, 1, 2]], [[3]], pad_id=0, device=head.weight.device)
    fused = with_head(model, packed, True, lambda h: h.hidden_NH.float() @ h.weight_VH.float().T)
    plain = with_head(model, packed, False, lambda h: h.logits_NV.float())
    return torch.allclose(fused, plain, rtol=1e-2, atol=1e-2)
