"""Loading students and teachers, and the checks that they can be distilled into one another."""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path

import torch

from . import sources
from .errors import OpcdError, first_line


def quiet_transformers() -> None:
    """Keep transformers' own progress bars and advice off the terminal (opcd shows its own progress)."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(name: str) -> torch.dtype:
    """A dtype name of ``config.DTYPES`` as a torch dtype; ``auto`` is bfloat16 on a GPU and float32 on a CPU."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


def resolve(name: str) -> str:
    """A model name as a loadable id or folder (built-in names such as ``toy:small`` resolve to their folders)."""
    if sources.is_builtin(name):
        return sources.model_folder(name)
    return os.path.expanduser(name)


def _check_source(name: str) -> None:
    """Fail early, and fast, for names that cannot be loaded: missing folders, files, and hub ids that are not
    in the local cache when the hub cannot be reached."""
    path = Path(name)
    if path.exists():
        if not path.is_dir():
            raise OpcdError(f"model {name} is a file; give a model folder or a Hugging Face id (org/name)")
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise OpcdError(f"model folder {name} does not exist; give a model folder or a Hugging Face id (org/name)")
    _check_hub(name)


def _check_hub(repo_id: str) -> None:
    from huggingface_hub import constants, try_to_load_from_cache

    if any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in ("config.json", "tokenizer_config.json")):
        return  # in the cache: loading works offline
    if constants.HF_HUB_OFFLINE:
        raise OpcdError(f"{repo_id} is not a local folder nor in the Hugging Face cache, and HF_HUB_OFFLINE is set; "
                        "download it first, or give a local folder")
    if not hub_reachable(constants.ENDPOINT):
        raise OpcdError(f"{repo_id} is not a local folder nor in the Hugging Face cache, and {constants.ENDPOINT} "
                        "cannot be reached; download it where there is a network, or give a local folder")


def hub_reachable(endpoint: str, seconds: float = 4.0) -> bool:
    """Whether a TCP connection to the hub opens within ``seconds`` (name lookup included)."""
    import socket
    import threading
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    result = []

    def connect():
        try:
            socket.create_connection((url.hostname, url.port or 443), timeout=seconds).close()
            result.append(True)
        except OSError:
            result.append(False)

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(seconds)
    return bool(result and result[0])


def _load_error(what: str, name: str, e: Exception) -> OpcdError:
    message = first_line(e)
    if any(hint in message for hint in ("trust_remote_code", "trust-remote-code", "custom code")):
        return OpcdError(f"{name} needs its own Python code (the auto_map of its config.json) to load {what}; pass "
                         "--trust-remote-code only if you trust that code")
    return OpcdError(f"cannot load {what} of {name}: {message}")


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    quiet_transformers()
    source = resolve(name)
    _check_source(source)
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as e:  # OSError for missing files, ValueError for unknown classes, hub errors offline
        raise _load_error("the tokenizer", name, e) from None


def check_weight_files(name: str, source: str, allow_bin_weights: bool) -> None:
    """Weights load from safetensors only, unless ``allow_bin_weights``: a ``pytorch_model.bin`` is a pickle."""
    folder = Path(source)
    if allow_bin_weights or not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    if any(folder.glob("*.bin")):
        raise OpcdError(f"{name} has only pickled weights (*.bin), which opcd does not load by default; convert "
                        "them to safetensors, or pass --allow-bin-weights to load them with PyTorch's weights-only "
                        "unpickler (it refuses code, not tensors)")


def load_model(name: str, dtype: str = "auto", trust_remote_code: bool = False, allow_bin_weights: bool = False):
    """A causal LM on the default device, in eval mode (safetensors weights unless ``allow_bin_weights``)."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    source = resolve(name)
    _check_source(source)
    check_weight_files(name, source, allow_bin_weights)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code,
                                                     use_safetensors=None if allow_bin_weights else True)
    except Exception as e:
        raise _load_error("the model", name, e) from None
    return model.to(device()).eval()


def frozen(model):
    """``model`` with gradients off and in eval mode (the teacher)."""
    model.requires_grad_(False)
    return model.eval()


def frozen_copy(model):
    """A frozen copy of ``model``'s current weights: the paper's default teacher."""
    return frozen(copy.deepcopy(model))


def check_same_vocabulary(student_tokenizer, teacher_tokenizer, student: str, teacher: str) -> None:
    """Student and teacher must map the same strings to the same ids (padding of the embeddings may differ)."""
    s_vocab, t_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if s_vocab == t_vocab:
        return
    differing = sorted(k for k in s_vocab.keys() | t_vocab.keys() if s_vocab.get(k) != t_vocab.get(k))
    example = differing[0]
    raise OpcdError(
        f"the vocabularies of {student} and {teacher} differ in {len(differing)} tokens (e.g. {example!r}: "
        f"{s_vocab.get(example)} vs {t_vocab.get(example)}); the teacher must share the student's tokenizer"
    )


def output_rows(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def shared_vocab_size(student_model, teacher_model, tokenizer, student: str, teacher: str) -> int:
    """Rows of the two output layers to compare: the smaller padding, which must cover the tokenizer's base
    vocabulary. Added special tokens may lie beyond it (Llama-3's tokenizer lists ``<|image|>`` at 128,256, past
    the text models' 128,256 rows); no prompt may use one (``check_token_ids``)."""
    rows = min(output_rows(student_model), output_rows(teacher_model))
    base = getattr(tokenizer, "vocab_size", None) or len(tokenizer)
    for model, name in ((student_model, student), (teacher_model, teacher)):
        if output_rows(model) < base:
            raise OpcdError(f"{name} has {output_rows(model)} output rows but its tokenizer has {base} tokens")
    return rows


def check_token_ids(examples, views, vocab: int, tokenizer) -> None:
    """Every prompt id must have a row in both output layers: an error naming the row and the token if not."""
    for example, view in zip(examples, views):
        for ids in (view.student_ids, view.teacher_ids):
            beyond = [i for i in ids if i >= vocab]
            if beyond:
                raise OpcdError(f"row {example.row}: the prompt uses token {tokenizer.decode([beyond[0]])!r} (id "
                                f"{beyond[0]}), beyond the {vocab} output rows the models share; remove it from the "
                                "row or the context")


def pad_id(tokenizer) -> int:
    """The id that pads batches (for generation and for the loss): the tokenizer's pad, else its EOS, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


def generation_config(folder: str):
    """A model folder's generation config without loading the model (None when it has none)."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(folder)
    except OSError:  # no generation_config.json: the tokenizer's EOS alone ends responses
        return None


def context_window(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def autocast(dtype_name: str):
    """Mixed precision around forward passes when the compute dtype is not float32 (master weights stay float32)."""
    dtype = resolve_dtype(dtype_name)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device().type, dtype=dtype)
