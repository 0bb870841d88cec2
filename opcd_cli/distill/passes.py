"""How a step's sequences become model passes: the teacher's cached prefix, the packer, the micro-batches.

A micro-batch is rows of sequences; each pass (the student's, the teacher's with the context, the student's
with the context for the regulariser) reads every sequence of it, in padded rows (``--batch-size`` a row
each) or packed into one row (``--micro-batch-tokens``). The teacher reads what every prompt shares (the
rendered context) once per run, from its cached prefix.
"""

from __future__ import annotations

from .. import distributed, models
from ..config import DistillConfig
from ..errors import OpcdError
from ..forward import TeacherPrefix, attention_kind, can_reuse_prefix, common_prefix, packing_is_exact
from ..micro_batches import MicroBatch, Packer, by_prompts, by_token_budget, sequence_cost, split_to
from ..prompts import Views

MIN_PREFIX_TOKENS = 16  # a shorter shared start is not worth a cache


def teacher_prefix(cfg: DistillConfig, views: list[Views], teacher) -> TeacherPrefix | None:
    """On-policy, the start every teacher prompt shares (the rendered context when one serves every row), for
    the teacher to read once per run; None when the rows' contexts differ, the teacher's attention has sliding
    windows, or ``--no-teacher-prefix-cache``."""
    if not cfg.engine.teacher_prefix_cache or not cfg.on_policy or not can_reuse_prefix(teacher):
        return None
    ids = common_prefix([v.teacher_ids for v in views])
    return TeacherPrefix(ids) if len(ids) >= MIN_PREFIX_TOKENS else None


def teacher_reads(cfg: DistillConfig) -> bool:
    """Whether the teacher has a pass in every micro-batch: on-policy it scores the student's tokens; with
    games off-policy, it scores the replies it has just played."""
    return cfg.on_policy or cfg.plays_games


def pass_prompt_lengths(cfg: DistillConfig, view: Views, prefix: TeacherPrefix | None) -> list[int]:
    """The prompt positions each pass reads for a row: the student's; the teacher's after its cached prefix,
    when it reads; with the regulariser or the anchor, the student's with the context."""
    lengths = [len(view.student_ids)]
    if teacher_reads(cfg):
        lengths.append(len(view.teacher_ids) - (len(prefix) if prefix is not None else 0))
        if cfg.loss.context_pass:
            lengths.append(len(view.student_context_ids))
    return lengths


def make_packer(cfg: DistillConfig, views: list[Views], student, teacher, teacher_name: str,
                prefix: TeacherPrefix | None, pad_id: int) -> Packer:
    """A padded row per sequence by default; with ``--micro-batch-tokens``, sequences packed into one row per
    micro-batch, once the models are seen to keep packed sequences apart and the budget holds the longest
    sequence a step can have."""
    device = models.device()
    if not cfg.optim.micro_batch_tokens:
        return Packer(pad_id, device)
    for model, name in [(student, cfg.student)] + ([(teacher, teacher_name)] if teacher_reads(cfg) else []):
        if not packing_is_exact(model):
            raise OpcdError(f"--micro-batch-tokens packs sequences into one row, and {name} (attention: "
                            f"{attention_kind(model)}) does not keep them apart there; leave out --micro-batch-tokens")
    longest = max(sequence_cost(pass_prompt_lengths(cfg, v, prefix), cfg.sampling.max_new_tokens) for v in views)
    if (budget := cfg.optim.micro_batch_tokens) < longest:
        raise OpcdError(f"--micro-batch-tokens {budget} cannot hold the longest sequence a micro-batch "
                        f"may get ({longest} positions: its prompt and --max-new-tokens "
                        f"{cfg.sampling.max_new_tokens}); give at least {longest} or leave it out")
    return Packer(pad_id, device, True, prefix is not None and packing_is_exact(teacher, after_prefix=True))


def micro_batches(run, views: list[Views], responses: list[list[int]]) -> list[tuple[MicroBatch, int]]:
    """This rank's sequences (indices into ``views``) in micro-batches of rows, each with its weight (1):
    ``--batch-size`` a row each, or one row packed to the token budget (``--micro-batch-tokens``). Sharded ranks
    run their passes together, so every rank runs as many: it splits its micro-batches, and when it has too
    few sequences (games differ in turns), repeats its first with weight 0. ``run`` gives ``cfg``,
    ``teacher_prefix`` and ``packer``."""
    cfg = run.cfg
    costs = [sequence_cost(pass_prompt_lengths(cfg, v, run.teacher_prefix), len(r)) for v, r in zip(views, responses)]
    batches = (by_token_budget(costs, cfg.optim.micro_batch_tokens) if run.packer.packed
               else by_prompts(len(views), cfg.optim.batch_size))
    if not distributed.world().active or (not cfg.plays_games and not run.packer.packed):
        return [(batch, 1) for batch in batches]  # dataset rows: every rank has as many, in as many batches
    count = distributed.all_max(len(batches), models.device())
    batches = split_to(batches, min(count, len(views)), costs)
    return [(batch, 1) for batch in batches] + [([[0]], 0)] * (count - len(batches))
