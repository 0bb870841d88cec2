"""LoRA students through PEFT: adapters on a frozen base, the base itself as the free default teacher, and the
weights in plain Hugging Face form (merged) for vLLM and for the saved model.

* ``add_adapters``: the student wrapped by ``peft.get_peft_model``; only the adapters train, the output layer
  stays frozen (``all-linear`` leaves it out), so the loss reads it as for a full-weight student.
* ``AdaptersOff``: the same model seen with its adapters disabled: exactly the base model's outputs, no second
  copy of the weights. It is the teacher when no ``--teacher`` is given.
* ``plain_weights``: ``(name, tensor)`` pairs under the base model's own names, each adapted matrix merged
  (``W + scale * B @ A``) without touching the live model: what a weight push to vLLM needs during training
  (the final save merges in place, with PEFT's ``merge_and_unload``, once training is over).
* ``save_adapter`` / ``load_for_eval``: PEFT's own folder format (``PeftModel.from_pretrained`` loads it), and
  an adapter folder turned back into a plain model for ``opcd eval``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch

from .config import lora_target_names
from .errors import OpcdError, first_line
from .outputs import replaced_folder

ADAPTER_CONFIG = "adapter_config.json"


def is_lora(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def add_adapters(model, rank: int, alpha: float | None, dropout: float, targets: str):
    """``model`` with fresh LoRA adapters (B = 0, so it starts as the base); its base weights frozen."""
    from peft import LoraConfig, get_peft_model

    from peft.tuners.lora import LoraLayer

    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=dropout,
                        target_modules=lora_target_names(targets), bias="none", task_type="CAUSAL_LM")
    output, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    tied = output is not None and embeddings is not None and output.weight is embeddings.weight
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:  # no module matches the targets
        names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear)})
        raise OpcdError(f"--lora-targets {targets}: {first_line(e)}; this model's linear layers are "
                        f"{', '.join(names)} (or use all-linear)") from None
    adapted = {name: module for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)}
    if tied and any(isinstance(layer, LoraLayer) for layer in (peft_model.get_output_embeddings(),
                                                               peft_model.get_input_embeddings())):
        raise OpcdError(f"--lora-targets {targets}: this model's output layer is its input embeddings (tied "
                        "weights), so an adapter on either would be merged into both and the saved model would "
                        "differ from the trained one; leave the output layer and the embeddings out of --lora-targets")
    narrowest = min(adapted.items(), key=lambda item: min(item[1].in_features, item[1].out_features))
    width = min(narrowest[1].in_features, narrowest[1].out_features)
    if rank > width:
        raise OpcdError(f"--lora-rank {rank} is above the width of {narrowest[0].rsplit('.', 1)[-1]} ({width}): an "
                        f"adapter's rank is at most its layer's smaller side; give at most {width}")
    return peft_model


class AdaptersOff(torch.nn.Module):
    """A view of a PEFT model with its adapters disabled: the frozen base, for the teacher's forward passes and
    generation. It owns no parameters (the weights are the student's), so nothing is copied."""

    def __init__(self, peft_model):
        super().__init__()
        object.__setattr__(self, "peft_model", peft_model)  # not a submodule: no second set of parameters
        self.config = peft_model.config
        self.train(False)

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self._as_base("__call__", *args, **kwargs)

    def generate(self, *args, **kwargs):
        return self._as_base("generate", *args, **kwargs)

    def _as_base(self, method: str, *args, **kwargs):
        """Call the PEFT model with its adapters off and in eval mode (as a frozen copy would be), then restore
        the student's own mode."""
        was_training = self.peft_model.training
        self.peft_model.eval()
        try:
            with self.peft_model.disable_adapter():
                return getattr(self.peft_model, method)(*args, **kwargs)
        finally:
            self.peft_model.train(was_training)

    def get_output_embeddings(self):
        return self.peft_model.get_output_embeddings()

    def get_input_embeddings(self):
        return self.peft_model.get_input_embeddings()

    @property
    def device(self) -> torch.device:
        return self.peft_model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.get_output_embeddings().weight.dtype

    def train(self, mode: bool = True):  # the teacher is always in eval mode; the student's mode is its own
        object.__setattr__(self, "training", False)
        return self


def plain_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter under the base model's own names (tied tensors under each name), one at a time (gathered
    whole when the model is sharded); an
    adapted matrix is merged (``W + scale * B @ A``, summed in float32) without changing the live model."""
    if not is_lora(model):
        from .distributed import whole

        for name, p in model.named_parameters(remove_duplicate=False):
            yield name, whole(p.detach())  # a sharded parameter gathered, one at a time
        return
    from peft.tuners.lora import LoraLayer

    from .distributed import whole

    base = model.get_base_model()
    adapted = {f"{name}.base_layer.weight": module for name, module in base.named_modules()
               if isinstance(module, LoraLayer)}
    for name, p in base.named_parameters(remove_duplicate=False):
        if ".lora_" in name:
            continue
        plain = name.replace(".base_layer.", ".")
        module = adapted.get(name)
        if module is None:
            yield plain, whole(p.detach())
            continue
        with torch.no_grad():
            merged = whole(p.detach()).float()
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    merged = merged + delta_weight(module, adapter)
        yield plain, merged


def delta_weight(module, adapter: str) -> torch.Tensor:
    """What adapter ``adapter`` adds to a linear layer's weight, in float32: PEFT's own ``get_delta_weight``, or
    the same product of the gathered factors when the model is sharded."""
    from .distributed import is_sharded, whole

    factors = module.lora_A[adapter].weight, module.lora_B[adapter].weight
    if not any(isinstance(t, torch.distributed.tensor.DTensor) for t in factors) and not is_sharded(module):
        return module.get_delta_weight(adapter).float()
    a, b = (whole(t.detach()).float() for t in factors)
    delta = b @ a
    return (delta.T if module.fan_in_fan_out else delta) * module.scaling[adapter]


def save_adapter(model, tokenizer, folder: Path, base_source: str) -> None:
    """The adapters in PEFT's format at ``folder`` (float32, as trained), with the tokenizer and the base model's
    location; the folder appears whole or not at all. A sharded model's adapters are gathered (one at a time)
    and rank 0 writes them."""
    from .distributed import is_sharded, whole, world

    state = None
    if is_sharded(model):
        state = {name: whole(p.detach()).cpu() for name, p in model.named_parameters() if p.requires_grad}
        if not world().main:
            return
    with replaced_folder(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, **({} if state is None else {"state_dict": state}))
        config = json.loads((tmp / ADAPTER_CONFIG).read_text())
        config["base_model_name_or_path"] = base_source  # a folder or hub id that loads without opcd
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        tokenizer.save_pretrained(tmp)


def adapter_of(target) -> Path | None:
    """The LoRA adapter folder a model name stands for: the folder itself, or a run saved with ``--no-merge``
    (no model beside its ``adapter/``); None for a plain model or a hub id."""
    folder = Path(target)
    if (folder / ADAPTER_CONFIG).is_file():
        return folder
    if (folder / "adapter" / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file():
        return folder / "adapter"
    return None


def adapter_base(folder: str) -> str:
    """The base model an adapter folder was trained on."""
    try:
        config = json.loads((Path(folder) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise OpcdError(f"cannot read {Path(folder) / ADAPTER_CONFIG}: {first_line(e)}") from None
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not isinstance(base, str) or not base:
        raise OpcdError(f"{Path(folder) / ADAPTER_CONFIG} names no base model (base_model_name_or_path)")
    return base


def load_merged(folder: str, base):
    """The base model with the adapters of ``folder`` merged in: a plain model, as fast as the base."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base, folder).merge_and_unload()
    except Exception as e:
        raise OpcdError(f"cannot load the adapter {folder} onto {adapter_base(folder)}: {first_line(e)}") from None
