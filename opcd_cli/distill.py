"""Context distillation: the training loop.

    opcd distill --student Qwen/Qwen3-1.7B --teacher Qwen/Qwen3-8B --context exp.txt --data train.jsonl

Each step (on-policy, the default): the student answers a batch of prompts WITHOUT the context; the frozen
teacher scores the same tokens WITH the context in front; the student descends the mean over response tokens
of the top-k reverse KL(student || teacher), plus, with ``--consistency-weight``, the context-removability
term; the sampler follows the new weights. Off-policy (the paper's baseline), the responses are the
teacher's own, written once with the context, and the loss a forward KL over the teacher's saved top-k (or
the tokens' cross-entropy). ``prepare`` does everything that can fail on bad input before anything is
written; ``distill`` is the loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import models
from . import rollouts as rollout_store
from .config import DistillConfig, SamplingOptions
from .data import Example, examples_from_records, load_examples, read_context
from .errors import OpcdError
from .evaluate import context_harm, has_context, require_answers, score, strip_contexts
from .outputs import RUN_MARKER, RunDir, write_json_atomic
from .prompts import ChatRenderer, Views, build_views
from .sampling import HFSampler, Sampler, stop_ids
from .scoring import DistillLoss, pack
from .ui import UI


@dataclass
class Run:
    """Everything a distillation run needs, loaded and checked."""

    cfg: DistillConfig
    out: RunDir
    examples: list[Example]
    views: list[Views]
    context: str | None
    student: torch.nn.Module
    teacher: torch.nn.Module
    tokenizer: object
    student_renderer: ChatRenderer
    teacher_renderer: ChatRenderer
    loss: DistillLoss
    sampler: Sampler | None  # None off-policy: the teacher's saved responses replace sampling
    stop_ids: set[int]
    eval_examples: list[Example] | None
    ood_examples: list[Example] | None
    rollouts: rollout_store.Rollouts | None  # off-policy: saved teacher rollouts, when --rollouts holds them
    files: dict[str, str] = field(default_factory=dict)  # extra files to write into the run (toy data)


def distill(cfg: DistillConfig, ui: UI) -> dict:
    """Run context distillation and return the summary (also written to ``summary.json``)."""
    started = time.time()
    run = prepare(cfg, ui)
    try:
        return train(run, ui, started)
    finally:
        if run.sampler is not None:
            run.sampler.close()  # a vLLM engine holds its share of memory until closed


def train(run: Run, ui: UI, started: float) -> dict:
    """The distillation loop on a prepared run, then the final model, evaluation and summary."""
    cfg, student, sampler = run.cfg, run.student, run.sampler
    out = run.out.begin()
    write_json_atomic(out / RUN_MARKER, cfg.to_dict())
    for name, text in run.files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text, encoding="utf-8")
    device, pad_id = models.device(), models.pad_id(run.tokenizer)
    compute = autocast(cfg.loading.dtype)
    before = evaluate_checkpoint(run, ui, "before") if cfg.eval_before else {}
    rollouts = run.rollouts or (make_rollouts(run, ui, out) if cfg.mode == "off-policy" else None)

    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    order = prompt_order(len(run.examples), cfg.seed)
    per_step = cfg.batch_size * cfg.grad_accum
    train_start, last = time.time(), {}
    student.train()
    with ui.progress(), (out / "metrics.jsonl").open("w") as metrics:
        advance = ui.task(f"distill ({cfg.mode})", cfg.steps)
        for step in range(1, cfg.steps + 1):
            step_start = time.time()
            batch = [next(order) for _ in range(per_step)]
            views = [run.views[i] for i in batch]
            # 1. responses: the student's own, sampled without the context (or, off-policy, the teacher's saved ones)
            if rollouts is None:
                with compute:
                    responses = sampler.generate([v.student_ids for v in views], cfg.sampling)
            else:
                responses = [rollouts.responses[i] for i in batch]
            n_tokens = sum(map(len, responses))
            # 2-3. score the same tokens and take the loss, micro-batch by micro-batch (mean over the step's tokens)
            sums = torch.zeros(4, device=device)  # loss, distillation term, consistency term, top-k mass (token sums)
            for lo in range(0, per_step, cfg.batch_size):
                part, answers = slice(lo, lo + cfg.batch_size), responses[lo : lo + cfg.batch_size]
                student_in = pack([v.student_ids for v in views[part]], answers, pad_id, device)
                with compute:
                    if rollouts is None:  # the teacher reads the context; optionally the student does too
                        teacher_in = pack([v.teacher_ids for v in views[part]], answers, pad_id, device)
                        context_in = (pack([v.student_context_ids for v in views[part]], answers, pad_id, device)
                                      if cfg.consistency_weight > 0 else None)
                        parts = run.loss.on_policy(student_in, teacher_in, context_in)
                    else:
                        ids_Nk, logprobs_Nk = rollouts.targets(batch[part], cfg.off_policy_loss, device)
                        parts = run.loss.off_policy(student_in, ids_Nk, logprobs_Nk)
                (parts.total / n_tokens).backward()
                sums += torch.stack([parts.total.detach(), parts.distill, parts.consistency,
                                     parts.topk_mass * sum(map(len, answers))])
            # 4. one optimiser step; the sampler follows the new weights
            grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if rollouts is None:
                sampler.update_weights(student)
            # 5. log and checkpoint
            loss, distill_loss, consistency_loss, mass = (sums / n_tokens).tolist()  # the step's one host sync
            last = {
                "step": step,
                "loss": loss,
                "distill_loss": distill_loss,
                "consistency_loss": consistency_loss,
                "topk_mass": mass,
                "response_tokens": n_tokens / len(responses),
                "truncated": sum(not finished(r, run.stop_ids) for r in responses) / len(responses),
                "lr": schedule.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "tokens_per_s": n_tokens / (time.time() - step_start),
                "seconds": round(time.time() - train_start, 3),
            }
            metrics.write(json.dumps(last) + "\n")
            metrics.flush()
            advance(1, status=f"loss {last['loss']:.4f} top-k mass {last['topk_mass']:.3f}")
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                save_model(student, run.tokenizer, out / "checkpoints" / f"step-{step:06d}", cfg)
    train_seconds = time.time() - train_start

    student.eval()
    save_model(student, run.tokenizer, out, cfg)
    after = evaluate_checkpoint(run, ui, "after")
    summary = {
        "output_dir": str(run.out.final),
        "mode": cfg.mode,
        "student": cfg.student,
        "teacher": cfg.teacher or f"frozen copy of {cfg.student}",
        "steps": cfg.steps,
        "seconds": round(time.time() - started, 1),
        "train_seconds": round(train_seconds, 1),
        "final_loss": last.get("loss"),
        "final_topk_mass": last.get("topk_mass"),
        "sampler": "teacher rollouts" if rollouts is not None else sampler.name,
        "kernel": "fused-linear" if run.loss.fused else "logits",
        "consistency_weight": cfg.consistency_weight,
        "context_file": cfg.context,
        "test_data": cfg.eval_data,
        "ood_data": cfg.ood_data,
        "student_no_context_before": before.get("no_context"),
        "student_no_context_after": after.get("no_context"),
        "teacher_with_context": before.get("teacher_with_context"),
        "student_with_context_before": before.get("with_context"),
        "student_with_context_after": after.get("with_context"),
        "context_harm_before": before.get("context_harm"),
        "context_harm_after": after.get("context_harm"),
        "ood_before": before.get("ood"),
        "ood_after": after.get("ood"),
        "mean_response_tokens_before": before.get("mean_response_tokens"),
        "mean_response_tokens_after": after.get("mean_response_tokens"),
        "mean_response_tokens_with_context_before": before.get("mean_response_tokens_with_context"),
        "mean_response_tokens_with_context_after": after.get("mean_response_tokens_with_context"),
    }
    write_json_atomic(out / "summary.json", summary)
    run.out.finish()
    return summary


def rollouts_fingerprint(cfg: DistillConfig, context, examples, views) -> dict:
    return rollout_store.fingerprint(cfg.teacher or cfg.student, context, examples, [v.teacher_ids for v in views],
                                     cfg.topk, cfg.sampling, cfg.seed)


def make_rollouts(run: Run, ui: UI, out: Path) -> rollout_store.Rollouts:
    """Off-policy: the teacher answers every prompt with the context; saved to ``--rollouts`` (or the run) for reuse."""
    cfg = run.cfg
    prompts = [v.teacher_ids for v in run.views]
    torch.manual_seed(cfg.seed)
    sampler = HFSampler(run.teacher, run.teacher_renderer.tokenizer, batch_size=cfg.batch_size * cfg.grad_accum)
    with ui.progress(), autocast(cfg.loading.dtype):
        advance = ui.task("teacher rollouts", len(prompts))
        made = rollout_store.generate(run.teacher, sampler, prompts, cfg.sampling, cfg.topk, models.pad_id(run.tokenizer),
                                      cfg.batch_size, rollouts_fingerprint(cfg, run.context, run.examples, run.views), advance)
    rollout_store.save(Path(cfg.rollouts) if cfg.rollouts else out / "rollouts", made)
    return made


def prepare(cfg: DistillConfig, ui: UI) -> Run:
    """Load and check everything; raises ``OpcdError`` on bad input and writes nothing."""
    if cfg.kernel != "auto":  # the loss functions read their backend from the environment
        os.environ["OPCD_KERNEL"] = cfg.kernel
    if cfg.sampler == "vllm" and cfg.mode == "on-policy":
        from .sampling_vllm import import_vllm

        import_vllm()  # a missing vLLM is reported before any model is loaded
    if cfg.is_toy:
        cfg, files = toy_config(cfg)
    else:
        files = {}
    out = RunDir(cfg.output_dir or cfg.default_output_dir(), cfg.overwrite)
    cfg = dataclasses.replace(cfg, output_dir=str(out.final))
    if files:
        examples = examples_from_records(_rows(files["data/train.jsonl"]), cfg.data)
        eval_examples = examples_from_records(_rows(files["data/test.jsonl"]), cfg.eval_data)
        ood_examples = examples_from_records(_rows(files["data/ood.jsonl"]), cfg.ood_data)
        context = files["data/context.txt"].strip("\n") if "data/context.txt" in files else read_context(cfg.context)
    else:
        examples = load_examples(cfg.data)
        context = read_context(cfg.context)
        eval_examples = load_examples(cfg.eval_data, what="eval data") if cfg.eval_data else None
        ood_examples = load_examples(cfg.ood_data, what="OOD data") if cfg.ood_data else None
    for rows, path in ((eval_examples, cfg.eval_data), (ood_examples, cfg.ood_data)):
        if rows is not None:
            require_answers(rows, path)
    if not has_context(examples, context):
        raise OpcdError("nothing to distil: give --context FILE (or -) or rows with a `context` field")

    load = cfg.loading
    with ui.status(f"loading student {cfg.student}"):
        tokenizer = models.load_tokenizer(cfg.student, load.trust_remote_code)
        student = models.load_model(cfg.student, "float32", load.trust_remote_code)  # float32 master weights
    if cfg.teacher is None:
        teacher = models.frozen(models.frozen_copy(student).to(models.resolve_dtype(load.dtype)))
        teacher_tokenizer, teacher_name = tokenizer, cfg.student
    else:
        with ui.status(f"loading teacher {cfg.teacher}"):
            teacher_tokenizer = models.load_tokenizer(cfg.teacher, load.trust_remote_code)
            models.check_same_vocabulary(tokenizer, teacher_tokenizer, cfg.student, cfg.teacher)
            teacher = models.frozen(models.load_model(cfg.teacher, load.dtype, load.trust_remote_code))
        teacher_name = cfg.teacher
    vocab = models.shared_vocab_size(student, teacher, tokenizer, cfg.student, teacher_name)
    if cfg.topk > vocab:
        raise OpcdError(f"topk {cfg.topk} is larger than the vocabulary ({vocab} tokens); choose at most {vocab}")

    student_renderer = ChatRenderer(tokenizer, cfg.student, load.chat_template_kwargs)
    teacher_renderer = (student_renderer if teacher_tokenizer is tokenizer
                        else ChatRenderer(teacher_tokenizer, teacher_name, load.chat_template_kwargs))
    views = build_views(examples, context, cfg.context_as, student_renderer, teacher_renderer)
    check_windows(examples, views, cfg.sampling.max_new_tokens, student, teacher, cfg.student, teacher_name)
    loss = DistillLoss(student, teacher, vocab, cfg.topk, cfg.topk_renorm, cfg.consistency_weight)
    saved = None
    if cfg.mode == "off-policy" and cfg.rollouts:
        folder = Path(cfg.rollouts)
        if (folder / rollout_store.META).is_file():
            saved = rollout_store.load(folder, rollouts_fingerprint(cfg, context, examples, views))
        elif folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise OpcdError(f"--rollouts {folder} exists and holds no rollouts; give an empty or new folder")
    sampler = make_sampler(cfg, student, tokenizer) if cfg.mode == "on-policy" else None
    torch.manual_seed(cfg.seed)
    return Run(cfg, out, examples, views, context, student, teacher, tokenizer, student_renderer, teacher_renderer,
               loss, sampler, stop_ids(student, tokenizer), eval_examples, ood_examples, saved, files)


def make_sampler(cfg: DistillConfig, student, tokenizer) -> Sampler:
    if cfg.sampler == "vllm":  # an engine in this process, loaded from the student's folder, fed each update
        from .sampling_vllm import VLLMSampler

        return VLLMSampler(models.resolve(cfg.student), stop_ids(student, tokenizer),
                           dtype=models.resolve_dtype(cfg.loading.dtype), memory=cfg.vllm_memory, seed=cfg.seed,
                           trust_remote_code=cfg.loading.trust_remote_code, sleep_between_batches=True)
    return HFSampler(student, tokenizer, batch_size=cfg.batch_size * cfg.grad_accum)


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


def evaluate_checkpoint(run: Run, ui: UI, when: str) -> dict:
    """Greedy scores of the student on the eval split without and with the context (and the context harm:
    the share of rows solved without it but failed with it), of the teacher with it (before training), and of
    the student on the OOD split with each row's own context."""
    cfg, result = run.cfg, {}
    greedy = SamplingOptions(temperature=0.0, max_new_tokens=cfg.eval_max_new_tokens or cfg.sampling.max_new_tokens)
    jobs = []
    if run.eval_examples:
        jobs.append(("no_context", run.student, run.student_renderer, strip_contexts(run.eval_examples), None))
        jobs.append(("with_context", run.student, run.student_renderer, run.eval_examples, run.context))
        if when == "before" and run.cfg.teacher is not None:
            jobs.append(("teacher_with_context", run.teacher, run.teacher_renderer, run.eval_examples, run.context))
    if run.ood_examples:
        jobs.append(("ood", run.student, run.student_renderer, run.ood_examples, None))
    scores = {}
    with ui.progress(), autocast(cfg.loading.dtype):
        for key, model, renderer, rows, context in jobs:
            torch.manual_seed(cfg.seed)
            sampler = HFSampler(model, renderer.tokenizer, batch_size=cfg.eval_batch_size)
            advance = ui.task(f"eval {when}: {key.replace('_', ' ')}", len(rows))
            scores[key] = score(sampler, renderer, rows, context=context, context_as=cfg.context_as, sampling=greedy,
                                verifier=cfg.verifier, advance=advance)
            result[key] = scores[key].accuracy
    if "no_context" in scores:
        result["mean_response_tokens"] = scores["no_context"].mean_response_tokens
        result["mean_response_tokens_with_context"] = scores["with_context"].mean_response_tokens
        result["context_harm"] = context_harm(scores["no_context"], scores["with_context"])
        if "teacher_with_context" not in result:  # the teacher is the student's frozen initial weights
            result["teacher_with_context"] = result["with_context"] if when == "before" else None
    return result


def save_model(student, tokenizer, folder: Path, cfg: DistillConfig) -> None:
    """The student in Hugging Face format (safetensors, config, tokenizer, chat template)."""
    dtype = models.resolve_dtype(cfg.loading.dtype)
    state = {k: v.detach().to(dtype) for k, v in student.state_dict().items()}
    student.save_pretrained(folder, state_dict=state, safe_serialization=True)
    if hasattr(student.config, "dtype"):
        config = json.loads((folder / "config.json").read_text())
        config["dtype"] = str(dtype).removeprefix("torch.")
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save_pretrained(folder)


def finished(response: list[int], stop: set[int]) -> bool:
    return bool(response) and response[-1] in stop


def prompt_order(n: int, seed: int):
    """Prompt indices forever: a fresh shuffle each epoch."""
    rng = random.Random(seed)
    while True:
        order = list(range(n))
        rng.shuffle(order)
        yield from order


def lr_lambda(cfg: DistillConfig):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if cfg.lr_schedule == "linear":
            return 1 - progress
        return 1.0

    return factor


def autocast(dtype_name: str):
    """Mixed precision around forward passes when the compute dtype is not float32 (master weights stay float32)."""
    dtype = models.resolve_dtype(dtype_name)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(models.device().type, dtype=dtype)


def _rows(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def toy_config(cfg: DistillConfig) -> tuple[DistillConfig, dict[str, str]]:
    """The toy world's settings and data files for a run with no student given.

    The task's own context is used unless ``--context`` gives another (an experience file from ``opcd extract``).
    """
    from .toy import world

    splits = world.splits(cfg.toy_task)
    out = cfg.output_dir or cfg.default_output_dir()
    data = Path(out) / "data"
    files = {
        "data/train.jsonl": splits.train,
        "data/val.jsonl": splits.val,
        "data/test.jsonl": splits.test,
        "data/ood.jsonl": splits.ood,
    }
    files = {name: "".join(json.dumps(r) + "\n" for r in rows) for name, rows in files.items()}
    if cfg.context is None:
        files["data/context.txt"] = splits.context + "\n"
    cfg = dataclasses.replace(
        cfg,
        student=str(world.model_path("small")),
        data=str(data / "train.jsonl"),
        context=cfg.context or str(data / "context.txt"),
        eval_data=str(data / "test.jsonl"),
        ood_data=str(data / "ood.jsonl"),
        output_dir=out,
    )
    return cfg, files
