"""Loading students and teachers, and the checks that they can be distilled into one another."""

from __future__ import annotations

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
    """Fail early, without touching the network, for paths that cannot be a model."""
    path = Path(name)
    if path.exists():
        if not path.is_dir():
            raise OpcdError(f"model {name} is a file; give a model folder or a Hugging Face id (org/name)")
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise OpcdError(f"model folder {name} does not exist; give a model folder or a Hugging Face id (org/name)")


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    source = resolve(name)
    _check_source(source)
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as e:  # OSError for missing files, ValueError for unknown classes, hub errors offline
        raise OpcdError(f"cannot load the tokenizer of {name}: {first_line(e)}") from None


def load_model(name: str, dtype: str = "auto", trust_remote_code: bool = False):
    """A causal LM on the default device, in eval mode."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    source = resolve(name)
    _check_source(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code)
    except Exception as e:
        raise OpcdError(f"cannot load model {name}: {first_line(e)}") from None
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
    """Rows of the two output layers to compare: the smaller padding, which must cover every real token."""
    rows = min(output_rows(student_model), output_rows(teacher_model))
    for model, name in ((student_model, student), (teacher_model, teacher)):
        if output_rows(model) < len(tokenizer):
            raise OpcdError(f"{name} has {output_rows(model)} output rows but its tokenizer has {len(tokenizer)} tokens")
    return rows


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
