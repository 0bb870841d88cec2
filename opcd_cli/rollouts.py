"""Teacher rollouts for off-policy context distillation, the paper's baseline.

The teacher, reading the context, answers every training prompt once; at each response token its top-k ids
and log-probabilities (full-vocabulary, not renormalised) are kept. The student then trains on these
responses without the context. Rollouts are saved (``rollouts.safetensors`` and ``rollouts.json``) so a
later run can reuse them with ``--rollouts FOLDER``; the metadata says what they were made from, and a folder
made from other inputs is refused rather than silently reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import OpcdError
from .outputs import DIR_MODE
from .sampling import Sampler
from .forward import with_head
from .micro_batches import pack

TENSORS, META = "rollouts.safetensors", "rollouts.json"


@dataclass
class Rollouts:
    responses: list[list[int]]  # one teacher response per training example
    topk_ids: list[torch.Tensor]  # per example [R, k] int64
    topk_logprobs: list[torch.Tensor]  # per example [R, k] float32
    meta: dict

    def targets(self, indices, loss: str, device) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, k] ids and log-probs of the target distribution at the response tokens of ``indices``, in order.

        ``forward-kl``: the teacher's saved top-k. ``sft``: all mass on the token the teacher wrote (log-prob 0),
        which turns the same loss into the token cross-entropy.
        """
        if loss == "sft":
            ids = torch.tensor([t for i in indices for t in self.responses[i]], dtype=torch.int64)[:, None]
            return ids.to(device), torch.zeros(ids.shape, device=device)
        return (torch.cat([self.topk_ids[i] for i in indices]).to(device),
                torch.cat([self.topk_logprobs[i] for i in indices]).to(device))


def fingerprint(teacher: str, context: str | None, examples, teacher_prompts, k: int, sampling, seed: int) -> dict:
    """What the rollouts depend on; two runs with the same fingerprint can share rollouts."""
    digest = hashlib.sha256()
    for prompt in teacher_prompts:
        digest.update(json.dumps(list(prompt)).encode())
    return {
        "teacher": teacher,
        "prompts_sha256": digest.hexdigest(),  # the teacher's view: data, context and chat template together
        "examples": len(examples),
        "topk": k,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_new_tokens": sampling.max_new_tokens,
        "seed": seed,
    }


@torch.no_grad()
def generate(teacher, sampler: Sampler, teacher_prompts, sampling, k: int, vocab: int, pad_id: int, batch_size: int,
             meta: dict, advance=None) -> Rollouts:
    """The teacher's responses with the context, and its top-k ids and log-probs at every response token, over
    the first ``vocab`` output rows (those the student shares: a larger teacher may pad its rows further)."""
    responses = sampler.generate(teacher_prompts, sampling)
    device = teacher.get_output_embeddings().weight.device
    ids, logprobs = [], []
    for lo in range(0, len(responses), batch_size):
        prompts, answers = teacher_prompts[lo : lo + batch_size], responses[lo : lo + batch_size]
        logits_NV = with_head(teacher, pack(prompts, answers, pad_id, device), False, lambda head: head.logits_NV)
        top = torch.log_softmax(logits_NV[:, :vocab].float(), dim=-1).topk(k, dim=-1)
        for part_ids, part_logprobs in zip(top.indices.split([len(a) for a in answers]),
                                           top.values.split([len(a) for a in answers])):
            ids.append(part_ids.cpu())
            logprobs.append(part_logprobs.cpu())
        if advance:
            advance(len(answers))
    return Rollouts(responses, ids, logprobs, meta)


def save(folder: Path, rollouts: Rollouts) -> None:
    """Write the rollouts to ``folder`` atomically (a temporary folder renamed into place)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        os.chmod(tmp, DIR_MODE)
        lengths = torch.tensor([len(r) for r in rollouts.responses])
        save_file({
            "response_ids": torch.tensor([t for r in rollouts.responses for t in r], dtype=torch.int64),
            "lengths": lengths,
            "topk_ids": torch.cat(rollouts.topk_ids).contiguous(),
            "topk_logprobs": torch.cat(rollouts.topk_logprobs).contiguous(),
        }, str(tmp / TENSORS))
        (tmp / META).write_text(json.dumps(rollouts.meta, indent=2) + "\n")
        if folder.exists():  # only ever an empty folder or earlier rollouts (checked before the run started)
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load(folder: Path, expected: dict, vocab: int) -> Rollouts:
    """Rollouts saved in ``folder``, refused if they were made from other inputs than ``expected`` describes or
    hold token ids at or past ``vocab`` (the output rows the student has)."""
    try:
        meta = json.loads((folder / META).read_text())
        tensors = load_file(str(folder / TENSORS))
    except (OSError, ValueError) as e:
        raise OpcdError(f"{folder} does not hold readable rollouts ({e}); remove it or choose another --rollouts folder") from None
    differing = sorted(key for key in expected if meta.get(key) != expected[key])
    if differing:
        raise OpcdError(f"the rollouts in {folder} were made from other inputs (they differ in {', '.join(differing)}); "
                        "remove the folder or choose another --rollouts folder")
    beyond = max(int(tensors[name].max()) if tensors[name].numel() else -1 for name in ("response_ids", "topk_ids"))
    if beyond >= vocab:
        raise OpcdError(f"the rollouts in {folder} hold token id {beyond}, past the student's {vocab} output rows "
                        "(a teacher with more rows made them); remove the folder to make them again")
    lengths = tensors["lengths"].tolist()
    return Rollouts(
        [r.tolist() for r in tensors["response_ids"].split(lengths)],
        list(tensors["topk_ids"].split(lengths)),
        list(tensors["topk_logprobs"].split(lengths)),
        meta,
    )
