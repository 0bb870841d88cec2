"""``opcd bench step``: one OPCD training step at a model's shape, phase by phase as ``metrics.jsonl`` reports them
(``teacher_forward``, ``student_forward``, ``loss``, ``backward``, ``optimizer``), with random weights built from
a config (nothing is downloaded): a local model folder's ``config.json``, or a shape preset (``MODEL_SHAPES``: the
paper's models as their published configs state them). The student keeps float32 master weights and the teacher
runs in bf16 under bf16 autocast on a GPU, as ``opcd distill`` does; on a CPU both are float32.

The step trains on random prompts and responses (``--prompts`` of ``--prompt-tokens``, ``--response-tokens``
each, the teacher reading ``--context-tokens`` more): the rollout is not timed here (``bench/bench_samplers.py``
times the samplers). ``--kernel`` picks the loss implementation; ``--micro-batch-tokens`` packs the sequences
into rows of at most that many positions, as ``opcd distill --micro-batch-tokens`` does. The gated ratios are
each phase over the student's forward pass in the same step (what a slower loss or step shows up as, on any
machine). Peak memory is CUDA's allocator's over the timed steps (not measured on a CPU, whose resident peak
depends on what the allocator kept from earlier work).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from ..errors import OpcdError
from .machine import machine_info, peak_memory

QWEN3 = "qwen3"
LLAMA = "llama"


def shape(arch: str, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, head_dim: int,
          tied: bool, vocab: int) -> dict:
    return dict(arch=arch, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, tie_word_embeddings=tied,
                vocab_size=vocab)


MODEL_SHAPES = {  # the published configs' shapes (config.json on the hub), random weights
    "qwen3-1.7b": shape(QWEN3, 2048, 6144, 28, 16, 8, 128, True, 151936),
    "qwen3-4b": shape(QWEN3, 2560, 9728, 36, 32, 8, 128, True, 151936),
    "qwen3-8b": shape(QWEN3, 4096, 12288, 36, 32, 8, 128, False, 151936),
    "llama-3.2-3b": shape(LLAMA, 3072, 8192, 28, 24, 8, 128, True, 128256),
    "tiny": shape(QWEN3, 64, 128, 2, 4, 2, 16, True, 1024),  # a CPU's: seconds a step
    "tiny-teacher": shape(QWEN3, 96, 192, 2, 4, 2, 24, False, 1024),
}
PHASES = ("teacher_forward", "student_forward", "loss", "backward", "optimizer")
GATED = {"slower": ["loss_over_forward", "step_over_forward"], "memory": ["peak_mb"], "values": ["first_loss"]}


def model_config(name: str):
    """A transformers config from a shape preset or a local model folder (its ``config.json``)."""
    from transformers import AutoConfig, LlamaConfig, Qwen3Config

    if name in MODEL_SHAPES:
        spec = dict(MODEL_SHAPES[name])
        cls = {QWEN3: Qwen3Config, LLAMA: LlamaConfig}[spec.pop("arch")]
        return cls(max_position_embeddings=40960, rope_theta=1e6 if cls is Qwen3Config else 5e5,
                   rms_norm_eps=1e-6 if cls is Qwen3Config else 1e-5, **spec)
    folder = Path(name).expanduser()
    if not (folder / "config.json").is_file():
        raise OpcdError(f"{name} is neither a shape preset ({', '.join(MODEL_SHAPES)}) nor a folder with a "
                        "config.json")
    try:
        return AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as e:  # a config transformers cannot read
        raise OpcdError(f"cannot read {folder / 'config.json'}: {type(e).__name__}: {e}") from None


def build(config, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config)
    return model.to(dtype)


def train_step(loss_fn, optimizer, student_in, teacher_in, n_tokens: int, timer, dev: str,
               ids_N: torch.Tensor | None = None, advantages_N: torch.Tensor | None = None) -> torch.Tensor:
    """One step as ``opcd distill`` takes it with ``loss_fn`` (a ``DistillLoss``: the student, the teacher and the
    objective), each phase in ``timer``: the summed loss, detached (under bf16 autocast on a GPU). With
    ``advantages_N`` the reward's term too (at ``loss_fn``'s reward weight)."""
    from ..forward import with_head

    student, teacher = loss_fn.student, loss_fn.teacher
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
        with timer.phase("teacher_forward"), torch.no_grad():
            teacher_side = with_head(teacher, teacher_in, loss_fn.fused, lambda head: loss_fn.teacher_side(head, ids_N))
        with timer.phase("student_forward"):  # the head as the loss reads it, but the loss timed apart
            student_head = with_head(student, student_in, loss_fn.fused, lambda head: head)
        with timer.phase("loss"):
            loss = loss_fn.objective_terms(student_head, teacher_side, ids_N, advantages_N)[0]
    with timer.phase("backward"):
        (loss / n_tokens).backward()
    with timer.phase("optimizer"):
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def bench_step(student: str, teacher: str, kernels: list[str], *, prompts: int = 4, prompt_tokens: int = 128,
               response_tokens: int = 256, context_tokens: int = 256, topk: int = 256, steps: int = 3,
               micro_batch_tokens: int = 0, objectives: tuple[str, ...] = ("topk-reverse-kl",), reward: bool = False,
               progress=None) -> dict:
    """One warm-up and ``steps`` timed steps per loss implementation and objective (with ``reward``, each also
    with the reward's term, on random advantages): one result row each, named ``KERNEL`` for the top-k reverse
    KL and ``KERNEL OBJECTIVE[ + reward]`` otherwise."""
    from ..micro_batches import into_rows, pack, pack_rows
    from ..timing import StepTimer

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    kernels = [k for k in kernels if k != "triton" or dev == "cuda"] or ["torch"]
    s_config, t_config = model_config(student), model_config(teacher)
    vocab = min(s_config.vocab_size, t_config.vocab_size)
    torch.manual_seed(0)
    s_model = build(s_config, torch.float32, dev).train()
    t_model = build(t_config, torch.bfloat16 if dev == "cuda" else torch.float32, dev).requires_grad_(False).eval()
    gen = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    context, user = ids(context_tokens), [ids(prompt_tokens) for _ in range(prompts)]
    responses = [ids(response_tokens) for _ in range(prompts)]
    if micro_batch_tokens:
        rows = [len(r) for r in into_rows([prompt_tokens + response_tokens] * prompts, micro_batch_tokens)]
        s_in, t_in = pack_rows(user, responses, rows, 0, dev), pack_rows([context + p for p in user], responses,
                                                                            rows, 0, dev)
    else:
        s_in, t_in = pack(user, responses, 0, dev), pack([context + p for p in user], responses, 0, dev)
    n_tokens = prompts * response_tokens
    optimizer = torch.optim.AdamW(s_model.parameters(), lr=1e-6, weight_decay=0.0)
    ids_N = torch.tensor([t for r in responses for t in r], device=dev)
    advantages_N = torch.randn(n_tokens, generator=gen).to(dev)
    variants = [(o, False) for o in objectives] + ([(o, True) for o in objectives] if reward else [])

    from ..loss import DistillLoss

    losses = {o: DistillLoss(s_model, t_model, vocab, topk, False, objective=o, reward_weight=1.0) for o in objectives}
    rows = []
    for kernel, (objective, rewarded) in [(k, v) for k in kernels for v in variants]:
        def one_step(timer: StepTimer) -> float:
            return float(train_step(losses[objective], optimizer, s_in, t_in, n_tokens, timer, dev, ids_N,
                                    advantages_N if rewarded else None)) / n_tokens

        import os

        previous = os.environ.get("OPCD_KERNEL")
        os.environ["OPCD_KERNEL"] = kernel
        try:
            timer = StepTimer(torch.device(dev))
            first_loss = one_step(timer)  # warm-up: compilation, the optimiser's state
            timer.seconds()
            timed = []
            with peak_memory(dev) as peak:
                for _ in range(steps):
                    start = time.perf_counter()
                    one_step(timer)
                    timed.append(dict(timer.seconds(), step_s=time.perf_counter() - start))
                    if progress:
                        progress()
        finally:
            if previous is None:
                os.environ.pop("OPCD_KERNEL", None)
            else:
                os.environ["OPCD_KERNEL"] = previous
        median = {key: statistics.median(t[key] for t in timed) for key in (*PHASES, "step_s")}
        forward = median["student_forward"]
        name = kernel if (objective, rewarded) == ("topk-reverse-kl", False) else (
            f"{kernel} {objective}{' + reward' if rewarded else ''}")
        rows.append({"name": name, "objective": objective, "reward": rewarded, "shape": f"{student} <- {teacher}", **median,
                     "loss_over_forward": median["loss"] / forward, "step_over_forward": median["step_s"] / forward,
                     "first_loss": first_loss, "peak_mb": peak["peak_mb"], "tokens": n_tokens})
    for row in rows:  # each objective's step over the top-k reverse KL's, the same kernel, in this run
        opcd = next((r for r in rows if r["name"] == row["name"].split()[0]), None)
        row["step_over_opcd"] = row["step_s"] / opcd["step_s"] if opcd else None
    return {"bench": "step", "student": student, "teacher": teacher, "kernels": kernels, "steps": steps,
            "prompts": prompts, "prompt_tokens": prompt_tokens, "response_tokens": response_tokens,
            "context_tokens": context_tokens, "topk": topk, "micro_batch_tokens": micro_batch_tokens,
            "objectives": list(objectives), "reward": reward,
            "student_params": sum(p.numel() for p in s_model.parameters()),
            "teacher_params": sum(p.numel() for p in t_model.parameters()), "machine": machine_info(dev),
            "rows": rows, "skipped": [], "gated": GATED}
