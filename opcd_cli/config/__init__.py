"""Frozen run configurations, built from defaults, recipes and command-line flags, validated here.

This is the one place where bad values become clear errors, and where the accepted names of every choice
live (``DTYPES``, ``VERIFIERS``, ``SAMPLERS``, ``KERNELS``, ...). ``opcd distill``'s settings come in groups
(``distill.py``: games, loss, optim, evaluation, output, engine, LoRA, sampling, loading), each a small
frozen record checking its own fields (``options.py``), the rules that join groups in ``DistillConfig``;
flags and recipe keys stay flat (``--topk``, ``topk = 4``) and find their group by name (``layers.py``).
A recipe is a TOML file or the name of a packaged one (``toy-codes``; see ``sources.py``).
"""

from .checks import SEED_LIMIT, check_value
from .commands import EvalConfig, ExtractConfig
from .distill import FLAT_GROUPS, DistillConfig, flat_defaults, flat_settings
from .layers import (PERMISSIONS, RESUMABLE, Resumed, build_config, build_distill_config, build_extract_config,
                     flatten_settings, is_python_env, parse_json_object, read_recipe, resume_config)
from .options import (CONTEXT_AS, DISTILL_MODES, DTYPES, KERNELS, OBJECTIVES, OFF_POLICY_LOSSES, REPORT_TO, SAMPLERS, SCHEDULES,
                      TEACHER_KINDS, TEACHER_SHARDING, TOPK_SUPPORTS, VERIFIERS, EngineOptions, EvalOptions,
                      FieldOptions, GameOptions, LoraOptions, LossOptions, ModelOptions, OptimOptions, OutputOptions,
                      SamplingOptions, lora_target_names)

__all__ = [
    "SEED_LIMIT", "check_value", "EvalConfig", "ExtractConfig", "FLAT_GROUPS", "DistillConfig", "flat_defaults",
    "flat_settings", "PERMISSIONS", "RESUMABLE", "Resumed", "build_config", "build_distill_config",
    "build_extract_config", "flatten_settings", "is_python_env", "parse_json_object", "read_recipe", "resume_config",
    "CONTEXT_AS", "DISTILL_MODES", "DTYPES", "KERNELS", "OBJECTIVES", "OFF_POLICY_LOSSES", "REPORT_TO", "SAMPLERS", "SCHEDULES",
    "TEACHER_KINDS", "TEACHER_SHARDING", "TOPK_SUPPORTS", "VERIFIERS", "EngineOptions", "EvalOptions", "FieldOptions",
    "GameOptions", "LoraOptions", "LossOptions", "ModelOptions", "OptimOptions", "OutputOptions", "SamplingOptions",
    "lora_target_names",
]
