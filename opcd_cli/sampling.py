"""Generating responses: the ``Sampler`` interface and its Hugging Face ``generate`` implementation.

A sampler takes prompts as token ids (rendered by ``prompts.py``, so every sampler sees the same ids) and
returns the response ids, ending with an end-of-sequence id when the model stopped by itself.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

from .config import SamplingOptions


class Sampler(Protocol):
    name: str

    def generate(self, prompts: Sequence[Sequence[int]], options: SamplingOptions) -> list[list[int]]:
        """``options.n`` responses per prompt, prompt-major (all of prompt 0's, then prompt 1's, ...)."""
        ...

    def update_weights(self, model: torch.nn.Module) -> None:
        """Make the next ``generate`` sample from ``model``'s current weights."""
        ...

    def close(self) -> None:
        """Free what the sampler holds (an engine, its memory)."""
        ...


def stop_ids(model, tokenizer) -> set[int]:
    """Every id that ends a response: the tokenizer's EOS and the model's generation-config EOS ids.

    ``model`` may also be a ``GenerationConfig`` (or None), for samplers that never load the model here.
    """
    ids = {tokenizer.eos_token_id}
    config = getattr(model, "generation_config", model)
    configured = getattr(config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return {i for i in ids if i is not None}


def open_sampler(kind: str, source: str, tokenizer, *, batch_size: int, dtype: str = "auto",
                 trust_remote_code: bool = False, vllm_memory: float = 0.2, seed: int = 0) -> Sampler:
    """A sampler for a model that is only generated from (``opcd eval``, ``opcd extract``).

    ``hf`` loads the model here; ``vllm`` only starts an engine (the model is not loaded twice).
    """
    from . import models

    if kind == "vllm":
        from transformers import GenerationConfig

        from .sampling_vllm import VLLMSampler, import_vllm

        import_vllm()  # a missing vLLM is reported before anything slow happens
        folder = models.resolve(source)
        try:
            generation = GenerationConfig.from_pretrained(folder)
        except OSError:  # no generation_config.json: the tokenizer's EOS alone ends responses
            generation = None
        return VLLMSampler(folder, stop_ids(generation, tokenizer), dtype=models.resolve_dtype(dtype),
                           memory=vllm_memory, seed=seed, trust_remote_code=trust_remote_code)
    model = models.load_model(source, dtype, trust_remote_code)
    return HFSampler(model, tokenizer, batch_size=batch_size)


class HFSampler:
    """Samples with ``model.generate`` from the live student (no weight copy: updates are seen at once)."""

    name = "hf"

    def __init__(self, model, tokenizer, batch_size: int = 64):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.stop = stop_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.stop)

    def update_weights(self, model) -> None:
        self.model = model

    def close(self) -> None:
        self.model = None

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], options: SamplingOptions) -> list[list[int]]:
        from transformers import GenerationConfig

        repeated = [list(p) for p in prompts for _ in range(options.n)]
        config = GenerationConfig(
            max_new_tokens=options.max_new_tokens,
            do_sample=options.temperature > 0,
            temperature=options.temperature if options.temperature > 0 else None,
            top_p=options.top_p if options.temperature > 0 else None,
            top_k=0 if options.temperature > 0 else None,  # no hidden top-k from the model's own defaults
            eos_token_id=sorted(self.stop),
            pad_token_id=self.pad_id,
        )
        was_training = self.model.training
        self.model.eval()
        try:
            out = []
            for start in range(0, len(repeated), self.batch_size):
                out.extend(self._generate_batch(repeated[start : start + self.batch_size], config))
        finally:
            self.model.train(was_training)
        return out

    def _generate_batch(self, prompts: list[list[int]], config) -> list[list[int]]:
        device = self.model.device
        width = max(map(len, prompts))
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):  # left padding, so every prompt ends where generation starts
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention[row, width - len(ids) :] = 1
        generated = self.model.generate(
            input_ids=input_ids.to(device), attention_mask=attention.to(device), generation_config=config
        )[:, width:].tolist()
        return [self._cut(ids) for ids in generated]

    def _cut(self, ids: list[int]) -> list[int]:
        """Up to and including the first stop id (the rest is padding)."""
        for i, token in enumerate(ids):
            if token in self.stop:
                return ids[: i + 1]
        return ids
