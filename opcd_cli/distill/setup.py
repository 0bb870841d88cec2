"""Everything that can fail on bad input, before anything is written: the rows and the context read, the
models loaded, every prompt rendered and checked against the windows; then the ``Run`` built (the loss, the
teacher's cached prefix, the packer)."""

from __future__ import annotations

import importlib.util
import os

import torch

from .. import distributed, lora, models, trackers
from ..config import DistillConfig
from ..data import Example, has_context, load_examples, read_context, require_answers
from ..errors import OpcdError
from ..games import TRAIN_GAME_SEEDS, GameSetup
from ..loss import DistillLoss
from ..outputs import RunDir
from ..prompts import PROBE_RESPONSE, ChatRenderer, Views, aligned_views, build_views
from ..sampling import stop_ids
from ..ui import UI
from .passes import make_packer, teacher_prefix
from .records import Models, Run
from .teacher_work import reusable_rollouts


def check_world(cfg: DistillConfig, world: distributed.World) -> None:
    """What several processes need of the settings: a global batch that splits evenly across them."""
    if world.active and cfg.per_step % world.size:
        optim = cfg.optim
        raise OpcdError(f"the global batch (batch_size {optim.batch_size} x grad_accum {optim.grad_accum} = "
                        f"{cfg.per_step} prompts a step) does not split across {world.size} processes; make it a multiple of "
                        f"{world.size}")


def prepare(cfg: DistillConfig, out: RunDir, ui: UI) -> Run:
    """Load and check everything; raises ``OpcdError`` on bad input and writes nothing."""
    check_engines(cfg)
    loss = cfg.loss
    if cfg.context_as == "user-prefix" and loss.user_prefix_consistency and loss.consistency_weight > 0:
        ui.info(f"the context is in the user's turn: the consistency regulariser is on (weight {loss.consistency_weight:g} "
                f"from step {loss.consistency_start}), which keeps the student right when the context is put back; "
                "--no-user-prefix-consistency turns it off")
    if cfg.plays_games:
        return prepare_games(cfg, out, ui)
    evaluation = cfg.evaluation
    read = dict(say=ui.info, fields=cfg.fields)
    examples, context = load_examples(cfg.data, **read), read_context(cfg.context)
    eval_examples = load_examples(evaluation.eval_data, what="eval data", role="eval", **read) if evaluation.eval_data else None
    ood_examples = load_examples(evaluation.ood_data, what="OOD data", role="eval", **read) if evaluation.ood_data else None
    for rows, path in ((eval_examples, cfg.evaluation.eval_data), (ood_examples, cfg.evaluation.ood_data)):
        if rows is not None:
            require_answers(rows, path)
    if cfg.loss.reward_weight > 0:
        require_answers(examples, cfg.data, "--reward-weight scores every sample with the verifier, which needs the "
                                            "answer of every row (map a column with --answer-field, or drop --reward-weight)")
    if not has_context(examples, context):
        raise OpcdError("nothing to distil: give --context FILE (or -) or rows with a `context` field")
    if cfg.per_step > len(examples):
        optim = cfg.optim
        raise OpcdError(f"--batch-size {optim.batch_size} x --grad-accum {optim.grad_accum} = {cfg.per_step} prompts a step "
                        f"is more than the {len(examples)} rows of {cfg.data}: a step would draw a prompt more than "
                        f"once; give at most {len(examples)} prompts a step (or more rows)")
    m = load_models(cfg, ui)
    check_context_lengths(examples, context, cfg.sampling.max_new_tokens, m.teacher_renderer, m.teacher,
                          m.teacher_name)  # before rendering every row around a context that cannot fit
    views = build_views(examples, context, cfg.context_as, m.student_renderer, m.teacher_renderer)
    check_rows(cfg, m, examples, views)
    return assemble(cfg, out, m, context, views, examples=examples, eval_examples=eval_examples,
                    ood_examples=ood_examples, rollouts=reusable_rollouts(cfg, context, examples, views, m.vocab))


def prepare_games(cfg: DistillConfig, out: RunDir, ui: UI) -> Run:
    """``prepare`` for ``--env``: the environment (and the one out of distribution) made and reset once, the
    context read, the models loaded; a probe of the first turn sets the teacher's cached prefix, the window a
    game may fill and the packing. Raises ``OpcdError`` on bad input and writes nothing."""
    from .. import envs

    if cfg.rollouts:
        raise OpcdError("--rollouts saves teacher rollouts of dataset rows; games are played anew every step, drop it")
    games = cfg.games
    make_env = envs.environment_factory(games.env, games.env_options)
    ood = None
    if games.ood_env_options is not None:
        ood = (envs.environment_factory(games.env, {**games.env_options, **games.ood_env_options}),
               read_context(games.ood_context))
    context = read_context(cfg.context)
    if not context:
        raise OpcdError("nothing to distil: give --context FILE (or -) for the games")
    probe_env = make_env()  # an environment that fails at once fails here, before anything is written
    observation = envs.reset(probe_env, TRAIN_GAME_SEEDS, cfg.games.env)
    envs.step(probe_env, PROBE_RESPONSE, cfg.games.env)
    # the first turn of a game, and a probe whose observation differs from its first character: the teacher's
    # prompts share what comes before the first observation (the cached prefix), and no more
    first = [(("user", observation),), (("user", "!" if observation.startswith("?") else "?"),)]
    m = load_models(cfg, ui)
    probes = [Example(row=TRAIN_GAME_SEEDS, messages=messages) for messages in first]
    check_context_lengths(probes[:1], context, cfg.sampling.max_new_tokens, m.teacher_renderer, m.teacher,
                          m.teacher_name)
    views = [aligned_views(messages, context, cfg.context_as, m.student_renderer, m.teacher_renderer, PROBE_RESPONSE,
                           f"game {TRAIN_GAME_SEEDS}, turn 1") for messages in first]
    check_rows(cfg, m, probes, views)
    windows = [w for w in (models.context_window(m.student), models.context_window(m.teacher)) if w is not None]
    extra = len(views[0].teacher_ids) - len(views[0].student_ids)  # what the context adds to every prompt
    window = min([w - max(0, extra) for w in windows]) if windows else None
    return assemble(cfg, out, m, context, views, examples=[],
                    games=GameSetup(cfg.games.env, make_env, cfg.games.max_turns, window, ood))


def assemble(cfg: DistillConfig, out: RunDir, m: Models, context: str | None, views: list[Views], **fields) -> Run:
    """The ``Run`` of checked models and prompts: the loss, the teacher's cached prefix, the packer; ``fields``
    the rest of the run (its rows, evaluation rows, saved rollouts or games)."""
    loss = DistillLoss(m.student, m.teacher, m.vocab, topk=cfg.loss.topk, renorm=cfg.loss.topk_renorm,
                       consistency_weight=cfg.loss.consistency_weight, backend=cfg.loss.kernel, tail=cfg.loss.topk_tail,
                       anchor_weight=cfg.loss.anchor_weight, union=cfg.loss.topk_support == "union",
                       objective=cfg.loss.objective, jsd_beta=cfg.loss.jsd_beta, reward_weight=cfg.loss.reward_weight)
    prefix = teacher_prefix(cfg, views, m.teacher)
    packer = make_packer(cfg, views, m.student, m.teacher, m.teacher_name, prefix, models.pad_id(m.tokenizer))
    torch.manual_seed(cfg.seed)
    return Run(cfg=cfg, out=out, views=views, context=context, student=m.student, teacher=m.teacher,
               tokenizer=m.tokenizer, student_renderer=m.student_renderer, teacher_renderer=m.teacher_renderer,
               loss=loss, stop_ids=stop_ids(m.student, m.tokenizer), packer=packer, teacher_prefix=prefix,
               trainable_parameters=sum(p.numel() for p in m.student.parameters() if p.requires_grad), **fields)


def check_engines(cfg: DistillConfig) -> None:
    """What the run's engines need is here: vLLM when asked for, a loss kernel that runs, the tracker."""
    if cfg.engine.sampler == "vllm":
        from ..sampling.vllm import import_vllm

        import_vllm()  # a missing vLLM is reported before any model is loaded
    check_kernel(cfg.loss.kernel, cfg.loss.objective)
    trackers.check_available(cfg.output.report_to)


def check_kernel(kernel: str, objective: str = "topk-reverse-kl") -> None:
    """The loss implementation asked for (``--kernel``, or ``OPCD_KERNEL`` for ``auto``) can run here."""
    from ..kernels import backend_for

    try:
        backend = backend_for(torch.zeros((), device=models.device()), kernel)
    except (ValueError, RuntimeError) as e:
        raise OpcdError(f"{e}; use --kernel torch") from None
    if backend == "triton" and models.device().type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise OpcdError("the triton kernels need a GPU, or Triton's interpreter on a CPU: set TRITON_INTERPRET=1 "
                        "before starting opcd, or use --kernel torch")
    if backend == "triton" and objective == "jsd" and importlib.util.find_spec("liger_kernel") is None:
        raise OpcdError("--objective jsd runs Liger-Kernel's fused linear JSD on the Triton backend, and liger-kernel "
                        "is not installed: pip install liger-kernel, or use --kernel torch")


def load_models(cfg: DistillConfig, ui: UI) -> Models:
    """The student in float32 master weights, the teacher frozen in the compute dtype (a copy of the student's
    initial weights by default), their renderers and the vocabulary they share."""
    load = cfg.loading
    with ui.status(f"loading student {cfg.student}"):
        tokenizer = models.load_tokenizer(cfg.student, load.trust_remote_code)
        if cfg.lora.lora_rank is None:
            student = models.load_model(cfg.student, "float32", load.trust_remote_code, load.allow_bin_weights)
        else:  # a frozen base in the compute dtype; PEFT keeps the adapters in float32
            torch.manual_seed(cfg.seed)  # the adapters' random initialisation is the run's own
            student = lora.add_adapters(models.frozen(models.load_model(cfg.student, load.dtype, load.trust_remote_code,
                                                                        load.allow_bin_weights)),
                                        cfg.lora.lora_rank, cfg.lora.lora_alpha, cfg.lora.lora_dropout,
                                        cfg.lora.lora_targets)
    teacher, teacher_tokenizer, teacher_name = load_teacher(cfg, ui, student, tokenizer)
    vocab = models.shared_vocab_size(student, teacher, tokenizer, cfg.student, teacher_name)
    if cfg.loss.topk > vocab:
        raise OpcdError(f"topk {cfg.loss.topk} is larger than the vocabulary ({vocab} tokens); choose at most {vocab}")
    student_renderer = ChatRenderer(tokenizer, cfg.student, load.chat_template_kwargs)
    teacher_renderer = (student_renderer if teacher_tokenizer is tokenizer
                        else ChatRenderer(teacher_tokenizer, teacher_name, load.chat_template_kwargs))
    return Models(student, teacher, tokenizer, teacher_name, vocab, student_renderer, teacher_renderer)


def load_teacher(cfg: DistillConfig, ui: UI, student, tokenizer):
    """(the teacher, its tokenizer, its name): ``--teacher``, or made from the student (``--teacher-kind``)."""
    load = cfg.loading
    if cfg.teacher_kind == "live":  # self-distillation: the student itself reads the context
        return student, tokenizer, cfg.student
    if cfg.teacher_kind == "ema":  # starts at the student's initial weights, follows it (float32, as the student)
        return models.frozen(models.frozen_copy(student)), tokenizer, cfg.student
    if cfg.teacher is None:  # the paper's default: the student's initial weights
        if lora.is_lora(student):
            return lora.AdaptersOff(student), tokenizer, cfg.student  # free: no second copy
        return models.frozen(models.frozen_copy(student).to(models.resolve_dtype(load.dtype))), tokenizer, cfg.student
    with ui.status(f"loading teacher {cfg.teacher}"):
        teacher_tokenizer = models.load_tokenizer(cfg.teacher, load.trust_remote_code)
        models.check_same_vocabulary(tokenizer, teacher_tokenizer, cfg.student, cfg.teacher)
        teacher = models.frozen(models.load_model(cfg.teacher, load.dtype, load.trust_remote_code,
                                                  load.allow_bin_weights))
    return teacher, teacher_tokenizer, cfg.teacher


def check_rows(cfg: DistillConfig, m: Models, rows: list[Example], views: list[Views]) -> None:
    """Every rendered prompt fits both windows with its response, and holds only ids both models have."""
    check_windows(rows, views, cfg.sampling.max_new_tokens, m.student, m.teacher, cfg.student, m.teacher_name)
    models.check_token_ids(rows, views, m.vocab, m.tokenizer)


def check_context_lengths(examples, context, max_new_tokens, renderer: ChatRenderer, teacher, teacher_name) -> None:
    """A context longer than the teacher's window (with room for a response) is an error at once: each distinct
    context is tokenized once, before any row is rendered around it."""
    window = models.context_window(teacher)
    if window is None:
        return
    contexts = {e.context or context: e.row for e in examples}
    for text, row in contexts.items():
        if text is None:
            continue
        tokens = len(renderer.controls.as_text(text))  # as the prompts will hold it
        if tokens + max_new_tokens > window:
            where = f"the context of row {row}" if text != context else "the context"
            raise OpcdError(f"{where} is {tokens} tokens; with {max_new_tokens} new tokens it exceeds {teacher_name}'s "
                            f"window of {window}; shorten it or lower --max-new-tokens (contexts are never truncated)")


def check_windows(examples, views, max_new_tokens, student, teacher, student_name, teacher_name) -> None:
    """Contexts are never truncated: a prompt that cannot fit with its response is an error naming the row."""
    for model, name, pick in ((student, student_name, "student_ids"), (teacher, teacher_name, "teacher_ids")):
        window = models.context_window(model)
        if window is None:
            continue
        for example, view in zip(examples, views):
            need = len(getattr(view, pick)) + max_new_tokens
            if need > window:
                raise OpcdError(
                    f"row {example.row}: the {'teacher' if pick == 'teacher_ids' else 'student'} prompt is "
                    f"{len(getattr(view, pick))} tokens, plus {max_new_tokens} new tokens exceeds {name}'s window of "
                    f"{window}; shorten the context or lower --max-new-tokens (contexts are never truncated)"
                )
