"""Know before you launch: the memory a distillation run needs on each device (``opcd distill --dry-run``).

The models' configs are read, never their weights: each model is built on PyTorch's ``meta`` device, so the
parameter counts are exact (LoRA adapters included). The plan, per device, for the world size ``torchrun``
gives (``WORLD_SIZE``) or ``--world-size`` asks for, is:

* student weights: float32 master weights (a LoRA student: the frozen base in the compute dtype and float32
  adapters), sharded across the world by FSDP2;
* gradients (float32) and AdamW's two moments (float32) of what trains, sharded the same way, and the float32
  temporaries of AdamW's (foreach) step, one more copy of what trains;
* gathered by FSDP2: the root group (embeddings, final norm, output layer) whole for the length of the step,
  and one decoder layer at a time, with the next prefetched, in the compute dtype;
* teacher: its weights in the compute dtype, whole on each device or sharded (``--teacher-sharding``); none
  for a LoRA student's default teacher (the base with the adapters off);
* vLLM: the share of the device the engine reserves (``--vllm-memory``, weights and KV cache), in bytes when
  this machine has the GPU, else stated as a share beside the totals;
* activations kept for the backward pass per 1,000 tokens of a micro-batch (prompt and response): each
  decoder layer keeps its inputs, its attention's queries, keys, values and output and its MLP's
  intermediates; with ``--gradient-checkpointing`` only each layer's input, plus one layer's worth while it is
  recomputed;
* loss working memory: the fused loss computes the output layer's float32 weight gradient in its forward
  pass and keeps it for the backward, beside one chunk of float32 temporaries over the vocabulary (its
  budget, ``TORCH_CHUNK_BYTES``); with tied embeddings the input embedding's dense gradient joins it before
  the two are summed. The logits over the whole vocabulary are never held.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .config import DistillConfig
from .errors import OpcdError, first_line

GIB = 1024**3


@dataclass(frozen=True)
class Shape:
    """What the plan needs of a model: parameter counts and the sizes of a decoder layer."""

    parameters: int
    trainable: int
    largest_layer: int  # parameters of one decoder layer
    outside_layers: int  # parameters outside them (embeddings, final norm, output layer): FSDP2's root group
    layers: int
    hidden: int
    intermediate: int
    attention_width: int  # query heads x head size
    kv_width: int  # key-value heads x head size
    output_rows: int  # rows of the output layer (the vocabulary, maybe padded)
    output_trains: bool  # whether the output layer trains (not with LoRA)
    tied: bool  # the output layer is the input embedding matrix


def model_shape(name: str, lora_rank: int | None = None, lora_alpha=None, lora_targets: str = "all-linear",
                trust_remote_code: bool = False) -> Shape:
    """The shape of model ``name`` from its config alone (built on the meta device: no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from . import distributed, lora, models

    models.quiet_transformers()
    source = models.resolve(name)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise OpcdError(f"cannot read the config of {name}: {first_line(e)}") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    parameters = sum(p.numel() for p in model.parameters())
    layers = distributed.decoder_layers(model)
    sizes = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    largest = max(sizes, default=parameters)
    trainable, output_rows = parameters, model.get_output_embeddings().weight.shape[0]
    if lora_rank is not None:
        model = lora.add_adapters(model, lora_rank, lora_alpha, 0.0, lora_targets)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    text = getattr(config, "text_config", config)
    heads = getattr(text, "num_attention_heads", 1)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return Shape(parameters, trainable, largest, parameters - sum(sizes), len(layers) or 1, text.hidden_size,
                 getattr(text, "intermediate_size", 4 * text.hidden_size), heads * head_dim, kv_heads * head_dim,
                 output_rows, lora_rank is None,
                 model.get_output_embeddings().weight is model.get_input_embeddings().weight)


def activation_elements_per_token(shape: Shape, checkpointing: bool) -> float:
    """Values a decoder stack keeps per token for the backward pass (see the module's notes)."""
    h, i, q, kv = shape.hidden, shape.intermediate, shape.attention_width, shape.kv_width
    # two norms (input, its float32 copy, the normalised output), q/k norms, q, k, v before and after rotary,
    # the attention output and its projection's input, and the MLP's gate, up, activation and product
    per_layer = 6 * h + 4 * q + 4 * kv + 2 * q + 4 * i
    if checkpointing:
        return shape.layers * h + per_layer
    return shape.layers * per_layer


def estimate(student: Shape, teacher: Shape | None, *, world: int, compute, lora: bool, teacher_sharding: str,
             checkpointing: bool, consistency: bool = False, vllm_bytes: float | None = None) -> tuple[dict, float]:
    """(bytes per device by part, activation bytes per 1,000 tokens of a micro-batch). ``teacher`` None: the
    default teacher (a frozen copy of the student, or the LoRA student's base with the adapters off)."""
    import torch

    compute_bytes = torch.finfo(compute).bits // 8
    shards = world  # FSDP2 splits the student's weights, gradients and optimiser state across every rank
    rows = {}
    if lora:  # the frozen base in the compute dtype, the adapters in float32
        rows["student weights"] = (student.parameters * compute_bytes + student.trainable * 4) / shards
    else:
        rows["student weights"] = student.parameters * 4 / shards
    rows["gradients"] = student.trainable * 4 / shards
    rows["optimizer (AdamW)"] = student.trainable * 8 / shards
    rows["optimizer step temporaries"] = student.trainable * 4 / shards  # AdamW's foreach step: one float32 copy
    # FSDP2 holds the root group (embeddings, output layer) whole through the forward and backward, and one
    # decoder layer at a time with the next prefetched
    rows["gathered by FSDP2"] = (2 * student.largest_layer + student.outside_layers) * compute_bytes if world > 1 else 0
    split = world if teacher_sharding == "shard" else 1
    if teacher is not None:
        rows["teacher"] = teacher.parameters * compute_bytes / split
    else:  # a frozen copy of the student's initial weights; none for LoRA (the base with its adapters off)
        rows["teacher"] = 0 if lora else student.parameters * compute_bytes / split
    # the fused loss makes the output layer's float32 weight gradient in its forward and keeps it until the
    # backward, beside one chunk of float32 temporaries over the vocabulary; a tied matrix also gets the input
    # embedding's dense gradient before the two are summed
    from .kernels.torch_chunked import TORCH_CHUNK_BYTES

    matrix = student.output_rows * student.hidden * 4 if student.output_trains else 0
    rows["loss working memory"] = matrix * (2 if student.tied else 1) + TORCH_CHUNK_BYTES
    if vllm_bytes is not None:
        rows["vLLM engine"] = vllm_bytes
    per_1k = 1000 * activation_elements_per_token(student, checkpointing) * 4  # float32 on CPUs
    if compute != torch.float32:  # the compute dtype's copies on GPUs, with norms kept in float32
        per_1k = per_1k * (compute_bytes + 4) / 8
    if consistency:
        per_1k *= 2  # a second student pass, with the context, is differentiated too
    return rows, per_1k


def plan_for(cfg: DistillConfig, world_size: int | None = None) -> dict:
    """The memory plan of ``cfg`` per device, in GiB, for ``world_size`` processes (default: ``WORLD_SIZE``)."""
    from .models import resolve_dtype

    world = world_size or int(os.environ.get("WORLD_SIZE", "1") or 1)
    compute, load, lora = resolve_dtype(cfg.loading.dtype), cfg.loading, cfg.lora.lora_rank is not None
    student = model_shape(cfg.student, cfg.lora.lora_rank, cfg.lora.lora_alpha, cfg.lora.lora_targets,
                          load.trust_remote_code)
    teacher = None if cfg.teacher is None else model_shape(cfg.teacher, trust_remote_code=load.trust_remote_code)
    rows, per_1k = estimate(student, teacher, world=world, compute=compute, lora=lora,
                            teacher_sharding=cfg.engine.teacher_sharding,
                            checkpointing=cfg.engine.gradient_checkpointing, consistency=cfg.loss.context_pass,
                            vllm_bytes=vllm_bytes(cfg))
    fixed = sum(rows.values())
    prompt = longest_prompt(cfg)
    rows_per_micro_batch = min(cfg.optim.batch_size, cfg.per_step // world)
    # a token budget bounds what any pass reads at once; else the longest prompts with the longest responses
    tokens = cfg.optim.micro_batch_tokens or rows_per_micro_batch * (prompt + cfg.sampling.max_new_tokens)
    return {
        "world_size": world,
        "compute_dtype": str(compute).removeprefix("torch."),
        "student": cfg.student,
        "student_parameters": student.parameters,
        "trainable_parameters": student.trainable,
        "teacher": cfg.teacher or ("the student with its adapters off" if lora else "a frozen copy of the student"),
        "teacher_sharding": cfg.engine.teacher_sharding,
        "gradient_checkpointing": cfg.engine.gradient_checkpointing,
        "gib": {k: v / GIB for k, v in rows.items()},
        "vllm_share": cfg.engine.vllm_memory if cfg.engine.sampler == "vllm" else None,
        "fixed_gib": fixed / GIB,
        "activations_gib_per_1k_tokens": per_1k / GIB,
        "longest_prompt_tokens": prompt,
        "micro_batch_tokens_at_most": tokens,
        "micro_batch_tokens_from": "--micro-batch-tokens" if cfg.optim.micro_batch_tokens else "batch_size rows, padded",
        "total_gib_at_longest_micro_batch": (fixed + per_1k * tokens / 1000) / GIB,
    }


def longest_prompt(cfg: DistillConfig) -> int:
    """The longest student prompt of the training rows, rendered with the student's chat template (the
    tokenizer and the data are read; no model); for games, an estimate of the last turn's."""
    from . import models
    from .data import load_examples, read_context
    from .prompts import ChatRenderer, build_views

    tokenizer = models.load_tokenizer(cfg.student, cfg.loading.trust_remote_code)
    renderer = ChatRenderer(tokenizer, cfg.student, cfg.loading.chat_template_kwargs)
    if cfg.plays_games:  # games: a reply at the last turn reads every turn before it; the observations are
        from . import envs  # taken to be as long as the first game's first prompt, the replies as long as allowed

        observation = envs.reset(envs.environment_factory(cfg.games.env, cfg.games.env_options)(), 0, cfg.games.env)
        first = len(renderer.prompt_ids([{"role": "user", "content": observation}]))
        return first * cfg.games.max_turns + (cfg.games.max_turns - 1) * cfg.sampling.max_new_tokens
    examples, context = load_examples(cfg.data, fields=cfg.fields), read_context(cfg.context)
    views = build_views(examples, context, cfg.context_as, renderer, renderer)
    return max(len(v.student_ids) for v in views)


def vllm_bytes(cfg: DistillConfig) -> float | None:
    """What the vLLM engine reserves on this machine's first GPU (``--vllm-memory`` of it); None without vLLM or
    without a GPU here (a plan made on a laptop for a cluster states the share instead)."""
    import torch

    if cfg.engine.sampler != "vllm" or not torch.cuda.is_available():
        return None
    return cfg.engine.vllm_memory * torch.cuda.get_device_properties(0).total_memory


def size(gib: float | None) -> str:
    """A size for people: MiB below one GiB."""
    if gib is None:
        return "-"
    return f"{gib:.2f} GiB" if gib >= 1 else f"{gib * 1024:.1f} MiB"


def show_plan(ui, plan: dict) -> None:
    rows = [[name, size(gib)] for name, gib in plan["gib"].items()]
    rows.append(["fixed, in all", size(plan["fixed_gib"])])
    rows.append(["activations per 1k tokens of a micro-batch", size(plan["activations_gib_per_1k_tokens"])])
    bound = ("--micro-batch-tokens" if plan["micro_batch_tokens_from"] == "--micro-batch-tokens" else
             f"prompts up to {plan['longest_prompt_tokens']:,}, responses up to max_new_tokens")
    rows.append([f"total at the longest micro-batch ({plan['micro_batch_tokens_at_most']:,} tokens: {bound})",
                 size(plan["total_gib_at_longest_micro_batch"])])
    if plan["vllm_share"] is not None and "vLLM engine" not in plan["gib"]:
        rows.append(["vLLM engine (not in the totals: no GPU here)", f"{100 * plan['vllm_share']:.0f}% of each GPU"])
    ui.table(f"memory per device: {plan['world_size']} process(es), {plan['compute_dtype']} compute, "
             f"{plan['trainable_parameters']:,} of {plan['student_parameters']:,} student parameters train",
             ["", "memory"], rows)
