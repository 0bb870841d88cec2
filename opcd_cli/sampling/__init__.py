"""Generating responses: the ``Sampler`` interface, and ``make_sampler``, the one place samplers are made.

A sampler takes prompts as token ids (rendered by ``prompts.py``, so every sampler sees the same ids) and
returns the response ids, ending with a stop id when the model stopped by itself. Two kinds (``SAMPLERS``):

* ``hf`` (``hf.py``): the model's own ``generate``, on the live object, so a trained model's updates are seen
  at once;
* ``vllm`` (``vllm.py``): a vLLM engine in this process, loaded from the model's folder; a sampler that follows
  training receives the weights after every optimiser step and sleeps while the trainer computes.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

from ..config import SAMPLERS, ModelOptions, SamplingOptions


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

    def state(self) -> dict:
        """The sampler's own random state (beyond torch's), for a run that resumes."""
        ...

    def set_state(self, state: dict) -> None:
        ...


def stop_ids(generation_config, tokenizer) -> set[int]:
    """Every id that ends a response: the tokenizer's EOS and the generation config's EOS ids.

    ``generation_config`` may be a model (its ``generation_config`` is used) or None.
    """
    ids = {tokenizer.eos_token_id}
    config = getattr(generation_config, "generation_config", generation_config)
    configured = getattr(config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return {i for i in ids if i is not None}


def make_sampler(kind: str, *, tokenizer, model=None, source: str | None = None, batch_size: int = 64,
                 loading: ModelOptions = ModelOptions(), vllm_memory: float = 0.2, vllm_eager: bool = False,
                 seed: int = 0, follows_training: bool = False, vocab: int | None = None) -> Sampler:
    """A sampler of ``kind`` for ``model`` (in memory) or ``source`` (an id or folder).

    ``hf`` generates with ``model``, loaded from ``source`` when not given. ``vllm`` starts an engine from
    ``source`` (the model is not loaded twice); with ``follows_training`` it sleeps between batches on GPUs
    and expects ``update_weights`` after every optimiser step. ``loading`` says how models are loaded (dtype,
    remote code, pickled weights). ``vocab``: sample only ids below it (a teacher whose output layer is padded
    past the rows the student has).
    """
    from .. import models

    if kind not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}; got {kind!r}")
    if kind == "vllm":
        from .vllm import VLLMSampler, import_vllm

        import_vllm()  # a missing vLLM is reported before anything slow happens
        folder = models.resolve(source)
        generation = model if model is not None else models.generation_config(folder)
        models.check_weight_files(source, folder, loading.allow_bin_weights)
        return VLLMSampler(folder, stop_ids(generation, tokenizer), dtype=models.resolve_dtype(loading.dtype),
                           memory=vllm_memory, seed=seed, trust_remote_code=loading.trust_remote_code,
                           sleep_between_batches=follows_training,
                           load_format="auto" if loading.allow_bin_weights else "safetensors",
                           enforce_eager=vllm_eager, vocab=vocab)
    from .hf import HFSampler

    if model is None:
        model = models.load_model(source, loading.dtype, loading.trust_remote_code, loading.allow_bin_weights)
    return HFSampler(model, tokenizer, stop_ids(model, tokenizer), batch_size=batch_size, vocab=vocab)


__all__ = ["SAMPLERS", "Sampler", "make_sampler", "stop_ids"]
