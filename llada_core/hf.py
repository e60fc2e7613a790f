"""Registration of LLaDA-MoE checkpoints with transformers' Auto classes (no remote code).

After ``import llada_core`` (which imports this module), a checkpoint directory in the
released layout loads with ``AutoConfig.from_pretrained(dir)``, ``AutoModel.from_pretrained(dir)``
or ``AutoModelForMaskedLM.from_pretrained(dir)``, for ``model_type`` "llada" and "lladamoe",
without ``trust_remote_code`` (a local registration wins over the released ``auto_map``).

Weights are read by :func:`llada_core.checkpoint.load_model` (our key conversion and checks),
not by transformers' loader: the HF class wraps the llada_core model and shares its modules,
so its state dict is the llada_core one and its logits are the same numbers.

This is the one module of llada_core that imports transformers.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from llada_core import checkpoint
from llada_core.config import LLaDAMoEConfig
from llada_core.model import LLaDAMoEModelLM as CoreModel

logger = logging.getLogger(__name__)

# Keys whose presence means a config describes a model (not a blank ``Config()``).
_DESCRIBING_KEYS = ("vocab_size", "hidden_size", "num_experts", "d_model", "n_layers")


class LLaDAMoEHFConfig(PreTrainedConfig):
    """The released config.json as a transformers config. Fields stay as they are in the file;
    they are checked like :func:`llada_core.checkpoint.load_config` checks them, so a dense
    LLaDA config or a non-plain released field fails at ``AutoConfig.from_pretrained``."""

    model_type = checkpoint.MODEL_TYPE

    def __post_init__(self, **kwargs: Any) -> None:
        if any(key in kwargs for key in _DESCRIBING_KEYS):
            directory = str(kwargs.get("name_or_path") or "")
            source = os.path.join(directory or "<config>", checkpoint.CONFIG_NAME)
            raw = {**kwargs, "model_type": self.model_type, "architectures": self.architectures}
            fields = checkpoint.check_config_dict(raw, source)
            if os.path.isdir(directory):  # the released config has no mask_token_id: the tokenizer has it
                for key, value in checkpoint.special_token_ids(directory).items():
                    if key not in fields:
                        kwargs[key] = raw[key] = value
            if all(kwargs.get(key) is not None for key in ("mask_token_id", "eos_token_id")):
                checkpoint.parse_config_dict(raw, source)  # the cross-field checks too
        # Checked above to mean "no scaling"; transformers 5 would warn about the legacy key.
        kwargs.pop("rope_scaling", None)
        super().__post_init__(**kwargs)

    def to_llada_config(self) -> LLaDAMoEConfig:
        """The validated llada_core config these fields describe."""
        raw = {key: value for key, value in self.to_dict().items() if key in LLaDAMoEConfig.model_fields}
        return checkpoint.parse_config_dict({**raw, "model_type": self.model_type}, "config")

    @classmethod
    def from_llada_config(cls, config: LLaDAMoEConfig, dtype: torch.dtype | None = None) -> "LLaDAMoEHFConfig":
        fields = checkpoint.config_to_dict(config, dtype or torch.float32)
        fields.pop("model_type")
        fields.pop("rope_scaling")
        return cls(**fields)


class LLaDAMoELegacyConfig(LLaDAMoEHFConfig):
    """The same config under the model_type some tools rewrite the released one to."""

    model_type = "lladamoe"


def _resolve_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None  # keep the stored dtype, like transformers 5's default "auto"
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype: expected a torch.dtype, its name or 'auto', got {dtype!r}")
    return dtype


def _resolve_device(device_map: Any) -> torch.device:
    if isinstance(device_map, dict) and set(device_map) == {""}:
        device_map = device_map[""]
    if device_map is None:
        return torch.device("cpu")
    if device_map == "auto":  # one device: the accelerator when there is one
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if isinstance(device_map, (str, int, torch.device)):
        return torch.device(device_map)
    raise ValueError(f"device_map: only one device is supported (e.g. 'cpu' or 'cuda:0'), got {device_map!r}")


# Arguments HF callers pass that do not change this model's output.
_IGNORED_FORWARD_ARGS = frozenset({"return_dict", "use_cache", "token_type_ids"})
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _size_in_bytes(size: int | str) -> int:
    """``max_shard_size`` as transformers writes it: an int, or e.g. "5GB" / "500MiB"."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for unit in sorted(_SIZE_UNITS, key=len, reverse=True):
        if text.endswith(unit) and text[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(text[: -len(unit)]) * _SIZE_UNITS[unit])
    raise ValueError(f"max_shard_size: expected bytes or a size such as '5GB', got {size!r}")


class LLaDAMoEModelLM(PreTrainedModel):
    """transformers face of :class:`llada_core.model.LLaDAMoEModelLM`: same modules, same
    state dict (stacked experts), same logits. ``from_pretrained`` / ``save_pretrained`` go
    through :mod:`llada_core.checkpoint`, i.e. the released per-expert layout on disk."""

    config_class = LLaDAMoEHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["DecoderLayer"]

    def __init__(self, config: LLaDAMoEHFConfig, llada_model: CoreModel | None = None) -> None:
        super().__init__(config)
        core = llada_model if llada_model is not None else CoreModel(config.to_llada_config())
        # Share the modules (not a copy): registering core's children here keeps the state-dict
        # keys those of the released layout; the core object itself is kept unregistered.
        self.model = core.model
        self.lm_head = core.lm_head
        self.__dict__["llada_model"] = core
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Weights come from the llada_core model (its own init, or the checkpoint)."""

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None, **kwargs: Any,
    ) -> MaskedLMOutput:
        """input_ids [B, L] -> MaskedLMOutput with logits [B, L, V] (no shift)."""
        unsupported = sorted(key for key, value in kwargs.items()
                             if not (value is None or value is False or key in _IGNORED_FORWARD_ARGS))
        if unsupported:
            raise ValueError(f"{type(self).__name__}.forward: unsupported arguments {unsupported}")
        out = self.llada_model(input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return MaskedLMOutput(logits=out.logits)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike[str], *model_args: Any,
        config: PreTrainedConfig | None = None, dtype: Any = None, torch_dtype: Any = None,
        device_map: Any = None, **kwargs: Any,
    ) -> "LLaDAMoEModelLM":
        """Load a local checkpoint directory with :func:`llada_core.checkpoint.load_model`."""
        directory = Path(pretrained_model_name_or_path)
        if kwargs.get("subfolder"):
            directory = directory / kwargs["subfolder"]
        if not directory.is_dir():
            raise checkpoint.CheckpointError(
                f"{directory}: not a local checkpoint directory (download it first; Hub ids are not resolved here)"
            )
        core = checkpoint.load_model(
            directory, dtype=_resolve_dtype(dtype if dtype is not None else torch_dtype),
            device=_resolve_device(device_map),
        )
        if not isinstance(config, LLaDAMoEHFConfig):
            config = AutoConfig.from_pretrained(directory)
        for key, value in core.config.model_dump().items():  # e.g. mask_token_id from the tokenizer
            setattr(config, key, value)
        config.dtype = core.dtype
        model = cls(config, llada_model=core)
        return model.eval()

    def save_pretrained(
        self, save_directory: str | os.PathLike[str], max_shard_size: int | str = "5GB", **kwargs: Any
    ) -> None:
        """Write the released layout with :func:`llada_core.checkpoint.save_model`."""
        if kwargs.get("push_to_hub"):
            raise NotImplementedError("push_to_hub: upload the saved directory yourself")
        if not kwargs.get("is_main_process", True):
            return
        checkpoint.save_model(self.llada_model, save_directory, max_shard_bytes=_size_in_bytes(max_shard_size))


class LLaDAMoELegacyModelLM(LLaDAMoEModelLM):
    """The same model for configs with model_type "lladamoe" (transformers keys models by config class)."""

    config_class = LLaDAMoELegacyConfig


def register() -> None:
    """Register both model types with AutoConfig / AutoModel / AutoModelForMaskedLM. Idempotent.

    transformers 5.23 has no "llada" or "lladamoe" of its own. If another registration holds the
    name (a later transformers, or a package such as dllm registering dense LLaDA), ours replaces
    it in this process, with a warning naming what was replaced: importing llada_core asks for
    this loader, and it rejects dense LLaDA configs with a clear error.
    """
    pairs = ((LLaDAMoEHFConfig, LLaDAMoEModelLM), (LLaDAMoELegacyConfig, LLaDAMoELegacyModelLM))
    for config_class, model_class in pairs:
        model_type = config_class.model_type
        if model_type in CONFIG_MAPPING:
            current = CONFIG_MAPPING[model_type]
            if current.__qualname__ != config_class.__qualname__ or current.__module__ != config_class.__module__:
                logger.warning("transformers model_type %r (%s.%s) is replaced by llada_core's LLaDA-MoE loader",
                               model_type, current.__module__, current.__qualname__)
        AutoConfig.register(model_type, config_class, exist_ok=True)
        AutoModel.register(config_class, model_class, exist_ok=True)
        AutoModelForMaskedLM.register(config_class, model_class, exist_ok=True)


register()
