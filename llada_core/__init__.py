"""LLaDA-MoE model math: config, model, losses, sampler, likelihood and checkpoint I/O.

Single-device code only: distribution (Ray, DeepSpeed) lives in ``jobs/``.
"""

from llada_core import hf  # noqa: F401  (registers the transformers Auto classes)
from llada_core.averaging import average_checkpoints
from llada_core.checkpoint import CheckpointError, load_config, load_model, save_model
from llada_core.config import PRESETS, LLaDAMoEConfig, count_parameters, preset
from llada_core.likelihood import choose, elbo_nll, elbo_nll_batched, elbo_nll_choices
from llada_core.model import KVCache, LLaDAMoEModelLM, ModelOutput
from llada_core.options import FAST_OPTIONS, SamplingOptions
from llada_core.sampling import (
    DEFAULT_FAST_OPTIONS,
    BlockRow,
    CommittedBlocks,
    generate,
    left_pad,
    next_blocks,
    num_transfer_tokens,
)

__all__ = [
    "BlockRow",
    "CheckpointError",
    "CommittedBlocks",
    "DEFAULT_FAST_OPTIONS",
    "FAST_OPTIONS",
    "KVCache",
    "PRESETS",
    "average_checkpoints",
    "SamplingOptions",
    "choose",
    "elbo_nll",
    "elbo_nll_batched",
    "elbo_nll_choices",
    "generate",
    "left_pad",
    "next_blocks",
    "load_config",
    "load_model",
    "num_transfer_tokens",
    "LLaDAMoEConfig",
    "LLaDAMoEModelLM",
    "ModelOutput",
    "count_parameters",
    "preset",
    "save_model",
]
