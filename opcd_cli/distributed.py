"""Several processes, one run: what ``torchrun`` gives each process, and what they agree on.

``opcd distill`` notices ``torchrun`` by itself (``WORLD_SIZE`` above 1 in the environment) and starts a
process group: NCCL on GPUs, gloo on CPUs. As a single process nothing here does anything.

* ``World``: this process's rank among ``size`` and whether it is rank 0, the one that prints and writes;
* ``session``: the process group for the length of a run;
* ``agree``: bad input seen by any rank becomes the same one-line error on every rank (no rank is left
  waiting in a collective for one that has already stopped);
* ``shard``: a model sharded with FSDP2 (``fully_shard``), each decoder layer and then the root;
* ``full_state_dict`` / ``whole``: sharded parameters gathered back, for saving and for samplers;
* ``SplitAcrossRanks``: a sampler whose prompts are split across the ranks and whose responses are gathered,
  so that evaluation reads the same rows, in the same order, as one process does.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, TypeVar

import torch

from .errors import OpcdError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def environment() -> World:
    """The world ``torchrun`` describes in the environment (one process when it is not there)."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise OpcdError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (torchrun sets them); unset them to run "
                        "as one process") from None
    return World(rank, size, local) if size > 1 else World()


_WORLD = World()


def world() -> World:
    """The world of the run in progress (one process outside ``session``)."""
    return _WORLD


@contextlib.contextmanager
def session(timeout_minutes: float = 120.0) -> Iterator[World]:
    """The process group of a run launched by ``torchrun``; as one process, nothing is started. A collective
    waits up to ``timeout_minutes`` for the slowest rank (long rollouts on one rank keep the others waiting; a
    rank that fails ends the others at once, through torchrun)."""
    global _WORLD
    current = environment()
    if not current.active or torch.distributed.is_initialized():
        _WORLD = current
        try:
            yield current
        finally:
            _WORLD = World()
        return
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(current.local_rank)
    torch.distributed.init_process_group("nccl" if cuda else "gloo",
                                         timeout=datetime.timedelta(minutes=timeout_minutes))
    _WORLD = current
    try:
        yield current
        # every rank's collectives finished (gloo runs them on worker threads, FSDP2 some asynchronously) before
        # any rank tears its connections down: a rank torn down while a peer's work is still in flight can abort
        # in gloo's teardown ("terminate called without an active exception")
        torch.distributed.barrier()
    finally:
        _WORLD = World()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def agree(step: Callable[[], T]) -> T:
    """Run ``step`` on every rank; if it fails with bad input on any of them, every rank raises that error (the
    lowest failing rank's message)."""
    if not _WORLD.active:
        return step()
    error, result = None, None
    try:
        result = step()
    except OpcdError as e:
        error = str(e)
    errors = gather_objects(error)
    failed = [(rank, message) for rank, message in enumerate(errors) if message is not None]
    if failed:
        raise OpcdError(failed[0][1])  # the same line on every rank
    return result


def gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not _WORLD.active:
        return [obj]
    out = [None] * _WORLD.size
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if not _WORLD.active:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks (in place); a single process returns ``tensor`` as it is."""
    if _WORLD.active:
        torch.distributed.all_reduce(tensor)
    return tensor


def any_rank(flag: bool, device) -> bool:
    """Whether ``flag`` is true on some rank (every rank gets the same answer)."""
    return all_max(int(flag), device) > 0


def all_max(value: int, device) -> int:
    """The largest ``value`` over ranks (every rank gets it); a single process returns ``value``."""
    if not _WORLD.active:
        return value
    box = torch.tensor([float(value)], device=device)
    torch.distributed.all_reduce(box, op=torch.distributed.ReduceOp.MAX)
    return int(box.item())


def all_max_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise largest over ranks (in place); a single process returns ``tensor`` as it is."""
    if _WORLD.active:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return tensor


def barrier() -> None:
    if _WORLD.active:
        torch.distributed.barrier()


def local_share(items: Sequence[T], world: World | None = None) -> list[T]:
    """This rank's contiguous share of ``items`` (whose number the world's size divides)."""
    world = world or _WORLD
    per = len(items) // world.size
    return list(items[world.rank * per : (world.rank + 1) * per])


# --- sharding ------------------------------------------------------------------------------------------------


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks of a Hugging Face model (its ``_no_split_modules`` classes), in order."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    inner = getattr(model, "get_base_model", None)
    if not names and inner is not None:  # a PEFT model: the base model's
        names = set(getattr(inner(), "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def shard(model, compute_dtype: torch.dtype) -> None:
    """Shard ``model`` in place with FSDP2 across the world: each decoder layer, then the root (which holds the
    embeddings, the final norm and the output layer, gathered for the length of the root's forward, where the
    loss reads the output layer). Master weights stay as loaded; with a lower ``compute_dtype`` the forward and
    backward run in it and gradients are reduced in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    layers = decoder_layers(model)
    if not layers:
        raise OpcdError(f"cannot shard {type(model).__name__}: its decoder layers are unknown (no _no_split_modules); "
                        "run it as one process")
    policy = MixedPrecisionPolicy()
    params = {p.dtype for p in model.parameters()}
    if compute_dtype != torch.float32 and params == {torch.float32}:
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    # the root is the transformers model itself (inside a PEFT wrapper), whose forward every path calls:
    # PEFT's generate goes to the inner model's generate, past the wrapper's own forward
    inner = getattr(model, "get_base_model", None)
    fully_shard(inner() if inner is not None else model, mp_policy=policy)


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    for candidate in (model, getattr(model, "peft_model", None)):  # AdaptersOff views a PEFT model
        inner = getattr(candidate, "get_base_model", None)
        if isinstance(candidate, FSDPModule) or (inner is not None and isinstance(inner(), FSDPModule)):
            return True
    return False


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded tensor gathered whole on every rank (a plain tensor as it is)."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's whole state dict on rank 0 (in host memory; other ranks get an empty dict); a model that is
    not sharded gives its own."""
    if not is_sharded(model):
        return {k: v.detach() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    first = {name for name, _ in model.named_parameters()}  # a tied matrix under its first name only
    every = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return {k: v for k, v in state.items() if k in first or k not in every}


def plain_class_name(model) -> str:
    """The model's own class name (not the FSDP wrapper class ``fully_shard`` gives it)."""
    from torch.distributed.fsdp import FSDPModule

    for cls in type(model).__mro__:
        if not issubclass(cls, FSDPModule):
            return cls.__name__
    return type(model).__name__


# --- samplers ------------------------------------------------------------------------------------------------


class SplitAcrossRanks:
    """A sampler over the whole world: each rank generates for its share of the prompts (padded to the same
    number, so that sharded models run the same number of forward passes), and every rank gets every response,
    in the prompts' order."""

    def __init__(self, sampler, world: World):
        self.sampler, self.world = sampler, world
        self.name = sampler.name

    def generate(self, prompts, options):
        if not self.world.active or not prompts:
            return self.sampler.generate(prompts, options)
        per = -(-len(prompts) // self.world.size)
        mine = list(prompts[self.world.rank * per : (self.world.rank + 1) * per])
        real = len(mine)
        mine += [prompts[-1]] * (per - real)  # padding, dropped below
        responses = self.sampler.generate(mine, options)[: real * options.n]
        return [r for part in gather_objects(responses) for r in part]

    def __getattr__(self, name):
        return getattr(self.sampler, name)
