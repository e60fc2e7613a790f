"""LLaDA-MoE model math: config, model, losses, sampler, likelihood and checkpoint I/O.

Single-device code only: distribution (Ray, DeepSpeed) lives in ``jobs/``.
"""

from llada_core.config import PRESETS, LLaDAMoEConfig, count_parameters, preset
from llada_core.model import LLaDAMoEModelLM, ModelOutput

__all__ = [
    "PRESETS",
    "LLaDAMoEConfig",
    "LLaDAMoEModelLM",
    "ModelOutput",
    "count_parameters",
    "preset",
]
