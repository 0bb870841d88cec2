"""How a step's sequences are grouped into micro-batches, and how each micro-batch is made into model inputs.

A micro-batch of prompt + response sequences is made into model inputs (``Packed``): a right-padded row each
(``pack``), or several end to end in a row with positions restarting at each (``pack_rows``, padding only at a
row's end: attention stays within each sequence), after the teacher's cached prefix when it has one.

A micro-batch is a list of rows, each a list of sequence indices. By default a micro-batch is ``--batch-size``
prompts in a row of their own each, every pass (student, teacher, consistency) reading them right-padded to
the longest. With ``--micro-batch-tokens N`` (verl's dynamic batch size, TRL's padding-free batches), a
micro-batch is one row of sequences end to end, at most N positions long in every pass, without padding:
first fit over the sequences, longest first. Attention where it is not variable-length (SDPA and eager
attention with a mask) reads a whole row, so its cost grows with the square of N: a budget of one to two
times the longest sequence keeps it at that of padded rows. The loss is a sum over response tokens divided by
the step's count, so the grouping changes the order of additions, not the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    from .forward import TeacherPrefix

MicroBatch = list[list[int]]  # rows of sequence indices


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


def by_prompts(n: int, batch_size: int) -> list[MicroBatch]:
    """``batch_size`` sequences in a row per micro-batch (the last may hold fewer), each in a row of its own."""
    return [[[i] for i in range(lo, min(lo + batch_size, n))] for lo in range(0, n, batch_size)]


def into_rows(costs: Sequence[int], width: int) -> list[list[int]]:
    """Sequence indices packed into rows whose costs add up to at most ``width`` (a sequence that alone exceeds
    it is a row of its own): first fit over the sequences longest first. Each row lists its indices in order;
    the rows come in the order they were opened, so the packing depends on the costs alone."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        fit = next((r for r, left in enumerate(room) if costs[i] <= left), None)
        if fit is None:
            rows.append([i])
            room.append(width - costs[i])
        else:
            rows[fit].append(i)
            room[fit] -= costs[i]
    return [sorted(row) for row in rows]


def by_token_budget(costs: Sequence[int], budget: int) -> list[MicroBatch]:
    """One row of at most ``budget`` positions per micro-batch."""
    return [[row] for row in into_rows(costs, budget)]


def split_to(batches: list[MicroBatch], count: int, costs: Sequence[int]) -> list[MicroBatch]:
    """``batches`` split until there are ``count`` of them (at most one per sequence): the costliest one that
    can be split is halved by cost, its rows or, when it is one row, that row's sequences. Sharded ranks must
    run the same number of forward passes in a step, so each splits to the largest number any rank formed."""
    batches = [[list(row) for row in batch] for batch in batches]
    total = sum(len(row) for batch in batches for row in batch)
    if count > total:
        raise ValueError(f"cannot make {count} micro-batches of {total} sequences")
    cost = lambda items: sum(costs[i] for i in items)  # noqa: E731
    while len(batches) < count:
        b = max((b for b, batch in enumerate(batches) if len(batch) > 1 or len(batch[0]) > 1),
                key=lambda b: (sum(cost(row) for row in batches[b]), -b))
        if len(batches[b]) > 1:
            first, second = halves(batches[b], [cost(row) for row in batches[b]])
        else:
            row = batches[b][0]
            first, second = ([part] for part in halves(row, [costs[i] for i in row]))
        batches[b : b + 1] = [first, second]
    return batches


def halves(items: list, costs: list[int]) -> tuple[list, list]:
    """``items`` (at least two) cut in order where the first part reaches half the cost, neither part empty."""
    cut, running, total = 1, costs[0], sum(costs)
    while cut < len(items) - 1 and 2 * running < total:
        running += costs[cut]
        cut += 1
    return items[:cut], items[cut:]


def sequence_cost(prompt_lengths: Sequence[int], response_length: int) -> int:
    """The positions a sequence takes in a row: the longest of its prompts (one per pass) plus its response."""
    return max(prompt_lengths) + response_length


@dataclass(frozen=True)
class Packer:
    """Makes a micro-batch's sequences into one pass's model inputs: a padded row each, or with ``packed`` its
    rows of sequences end to end. ``packed_after_prefix``: the teacher's rows after its cached prefix may be
    packed too (its attention takes the 4-D mask that needs); when not, that pass reads padded rows."""

    pad_id: int
    device: torch.device
    packed: bool = False
    packed_after_prefix: bool = False

    def __call__(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], rows: Sequence[int],
                 prefix: TeacherPrefix | None = None) -> Packed:
        """``rows``: how many of the sequences, in order, each row holds."""
        if self.packed and (prefix is None or self.packed_after_prefix):
            return pack_rows(prompts, responses, rows, self.pad_id, self.device, prefix)
        return pack(prompts, responses, self.pad_id, self.device, prefix)
