"""The Hugging Face sampler: the model's own ``generate``."""

from __future__ import annotations

from typing import Sequence

import torch

from ..config import SamplingOptions
from ..distributed import is_sharded
from ..models import pad_id


class HFSampler:
    """Samples with ``model.generate`` from the live student (no weight copy: updates are seen at once)."""

    name = "hf"

    def __init__(self, model, tokenizer, stop: set[int], batch_size: int = 64, vocab: int | None = None):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        rows = model.get_output_embeddings().weight.shape[0]
        self.beyond = list(range(vocab, rows)) if vocab is not None and vocab < rows else None  # never sampled
        self.stop = set(stop)
        self.pad_id = pad_id(tokenizer)
        self.sharded = is_sharded(model)

    def update_weights(self, model) -> None:
        self.model = model

    def state(self) -> dict:
        return {}  # it samples from torch's own generator, whose state the trainer saves

    def set_state(self, state: dict) -> None:
        pass

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
            suppress_tokens=self.beyond,
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
        generated = self.model.generate(  # a sharded model: every rank steps until all are done
            input_ids=input_ids.to(device), attention_mask=attention.to(device), generation_config=config,
            synced_gpus=self.sharded,
        )[:, width:].tolist()
        return [self._cut(ids) for ids in generated]

    def _cut(self, ids: list[int]) -> list[int]:
        """Up to and including the first stop id (the rest is padding)."""
        for i, token in enumerate(ids):
            if token in self.stop:
                return ids[: i + 1]
        return ids
