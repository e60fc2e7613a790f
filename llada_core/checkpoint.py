"""Checkpoint I/O in the released HF layout of LLaDA-MoE (LLADA_SPEC section 3).

On disk: ``config.json`` with the released field names, and safetensors with the released
per-expert keys (``model.layers.{n}.mlp.experts.{e}.gate_proj.weight`` [F, D]), either one
``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` shards with
``model.safetensors.index.json``. In memory the experts are stacked ([E, F, D] / [E, D, F])
for grouped matmuls; this module converts between the two.

Legend: E experts, F expert FFN, D hidden, V vocab.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from llada_core.config import LLaDAMoEConfig
from llada_core.model import LLaDAMoEModelLM
from llada_core.tokens import EOS_TOKEN, MASK_TOKEN

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
ARCHITECTURE = "LLaDAMoEModelLM"
MODEL_TYPE = "llada"
MODEL_TYPES = ("llada", "lladamoe")  # the released string, and the one some tools rewrite it to
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
_SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")

_STACKED_EXPERTS = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")
_RELEASED_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be read as LLaDA-MoE; the message names it."""


# --------------------------------------------------------------------------- key conversion


def released_key(stacked_name: str, expert: int) -> str:
    """``model.layers.3.mlp.experts.up_proj``, 5 -> ``model.layers.3.mlp.experts.5.up_proj.weight``."""
    match = _STACKED_EXPERTS.match(stacked_name)
    assert match, stacked_name
    return f"{match.group(1)}.{expert}.{match.group(2)}.weight"


def released_shapes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """The key -> shape map a checkpoint of this (stacked) state dict has on disk."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, tensor in state_dict.items():
        if _STACKED_EXPERTS.match(name):
            for expert in range(tensor.shape[0]):
                shapes[released_key(name, expert)] = tuple(tensor.shape[1:])
        else:
            shapes[name] = tuple(tensor.shape)
    return shapes


def iter_released(state_dict: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(released key, tensor) pairs; stacked experts come out one expert at a time (views)."""
    for name, tensor in state_dict.items():
        if _STACKED_EXPERTS.match(name):
            for expert in range(tensor.shape[0]):
                yield released_key(name, expert), tensor[expert]
        else:
            yield name, tensor


# --------------------------------------------------------------------------- config.json

# Keys of the released config.json (and of HF configs in general) that do not affect the math.
# dense_intermediate_size sizes dense FFN layers, which LLaDA-MoE does not have (every layer MoE,
# checked through moe_layer_freq below).
_IGNORED_KEYS = frozenset({
    "architectures", "model_type", "auto_map", "transformers_version", "torch_dtype", "dtype",
    "use_cache", "output_router_logits", "bos_token_id", "dense_intermediate_size", "_name_or_path",
    "name_or_path", "return_dict", "output_hidden_states", "output_attentions", "chunk_size_feed_forward",
    "is_encoder_decoder", "id2label", "label2id", "problem_type", "tokenizer_class",
})
_DENSE_LLADA_KEYS = (
    "d_model", "n_layers", "n_heads", "mlp_ratio", "mlp_hidden_size", "block_type", "intermediate_size",
)


def _is_none_or(*allowed: Any) -> Callable[[Any], bool]:
    return lambda value: value is None or (not isinstance(value, bool) and value in allowed)


def _is_none_or_at_most(limit: int) -> Callable[[Any], bool]:
    def check(value: Any) -> bool:
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return value is None or (is_number and value <= limit)

    return check


def _is_default_rope(value: Any) -> bool:
    return not value or (isinstance(value, dict) and value.get("rope_type", value.get("type", "default")) == "default")


# Released fields for variants this model does not implement: (is plain, what another value
# would mean, the plain values). A plain value is accepted and ignored; any other value would
# change the math, so it is rejected.
_PLAIN_VALUES: dict[str, tuple[Callable[[Any], bool], str, str]] = {
    "shared_expert_intermediate_size": (_is_none_or_at_most(0), "a shared expert", "null"),
    "partial_rotary_factor": (_is_none_or(1), "RoPE over only part of head_dim", "1 or null"),
    "rope_scaling": (_is_default_rope, "scaled RoPE", "null"),
    "clip_qkv": (_is_none_or(), "clipped q/k/v", "null"),
    "moe_router_enable_expert_bias": (lambda v: v in (None, False), "a router expert bias", "false or null"),
    "moe_router_score_function": (_is_none_or("softmax"), "a router score other than softmax", "'softmax' or null"),
    "routed_scaling_factor": (_is_none_or(1), "scaled expert outputs", "1 or null"),
    "router_num_group": (_is_none_or_at_most(1), "group-limited routing", "null"),
    "router_topk_group": (_is_none_or_at_most(1), "group-limited routing", "null"),
    "attention_dropout": (_is_none_or(0), "attention dropout", "0 or null"),
}
# Our fields that the released config may write as null: null means this value.
_NULL_MEANS = {"norm_topk_prob": False, "qk_layernorm": False}


def _reject_dense(raw: Mapping[str, Any], source: str) -> None:
    if "num_experts" in raw and "expert_intermediate_size" in raw:
        return
    dense_keys = [key for key in _DENSE_LLADA_KEYS if key in raw]
    if dense_keys or "LLaDAModelLM" in (raw.get("architectures") or []):
        raise CheckpointError(
            f"{source}: this is a dense LLaDA checkpoint, not LLaDA-MoE (it has {dense_keys or 'LLaDAModelLM'} "
            "and no num_experts / expert_intermediate_size); llada_core only loads LLaDA-MoE"
        )
    missing = [key for key in ("num_experts", "expert_intermediate_size") if key not in raw]
    raise CheckpointError(f"{source}: not a LLaDA-MoE config: missing {missing}")


def _check_moe_layer_freq(value: Any, num_layers: Any, source: str) -> None:
    if value is None or value == 1:
        return
    if not isinstance(value, list) or len(value) != num_layers:
        raise CheckpointError(
            f"{source}: moe_layer_freq: expected a list of {num_layers} ones (every layer MoE), got {value!r}"
        )
    dense_layers = [index for index, flag in enumerate(value) if not flag]
    if dense_layers:
        raise CheckpointError(
            f"{source}: moe_layer_freq: layers {dense_layers} are dense FFN layers; LLaDA-MoE has MoE in every layer"
        )


def _rope_theta(raw: Mapping[str, Any], source: str) -> Any:
    """rope_theta, also from a transformers-5 style ``rope_parameters`` dict."""
    params = raw.get("rope_parameters")
    if not params:
        return raw.get("rope_theta")
    if not _is_default_rope(params):
        raise CheckpointError(f"{source}: rope_parameters: only default RoPE is supported, got {params!r}")
    theta = raw.get("rope_theta", params.get("rope_theta"))
    if params.get("rope_theta", theta) != theta:
        raise CheckpointError(f"{source}: rope_theta {theta} disagrees with rope_parameters {params!r}")
    return theta


def check_config_dict(raw: Mapping[str, Any], source: str = CONFIG_NAME) -> dict[str, Any]:
    """The structural part of reading a released-style config.json: reject other model types,
    dense LLaDA and non-plain values of released fields; return the LLaDAMoEConfig fields
    present (special token ids may still be missing). Raises CheckpointError naming the field."""
    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"{source}: model_type {model_type!r} is not one of {list(MODEL_TYPES)}")
    _reject_dense(raw, source)
    for name, (is_plain, meaning, plain) in _PLAIN_VALUES.items():
        if name in raw and not is_plain(raw[name]):
            raise CheckpointError(
                f"{source}: {name}={raw[name]!r} means {meaning}, which LLaDA-MoE does not have; expected {plain}"
            )
    _check_moe_layer_freq(raw.get("moe_layer_freq"), raw.get("num_hidden_layers"), source)
    fields = {key: raw[key] for key in LLaDAMoEConfig.model_fields if key in raw}
    fields["rope_theta"] = _rope_theta(raw, source)
    for key, null_value in _NULL_MEANS.items():
        if key in fields and fields[key] is None:
            fields[key] = null_value
    if fields.get("num_key_value_heads") is None:
        fields["num_key_value_heads"] = raw.get("num_attention_heads")
    for key in ("eos_token_id", "pad_token_id", "mask_token_id"):
        if isinstance(fields.get(key), list):
            if len(fields[key]) != 1:
                raise CheckpointError(f"{source}: {key}: expected one id, got {fields[key]!r}")
            fields[key] = fields[key][0]
    if "head_dim" in raw and raw["head_dim"] is not None:
        heads, hidden = raw.get("num_attention_heads"), raw.get("hidden_size")
        if not heads or raw["head_dim"] * heads != hidden:
            raise CheckpointError(f"{source}: head_dim {raw['head_dim']} != hidden_size / num_attention_heads")
    if fields.get("norm_topk_prob"):
        # The released modeling code never renormalises, whatever this field says (LLADA_SPEC 2).
        logger.warning("%s: norm_topk_prob=true renormalises the top-k weights, unlike LLaDA-MoE's "
                       "reference routing; set it to false to match the released model", source)
    handled = set(fields) | set(_PLAIN_VALUES) | _IGNORED_KEYS | {"moe_layer_freq", "rope_parameters", "head_dim"}
    unknown = sorted(set(raw) - handled)
    if unknown:
        # HF configs carry tool-specific keys; any that changed the architecture would also change
        # weight names or shapes, which the loader checks strictly.
        logger.info("%s: ignoring keys LLaDA-MoE does not use: %s", source, unknown)
    return {key: value for key, value in fields.items() if value is not None}


def parse_config_dict(
    raw: Mapping[str, Any], source: str = CONFIG_NAME, token_ids: Mapping[str, int] | None = None
) -> LLaDAMoEConfig:
    """A released-style config.json dict -> validated LLaDAMoEConfig. ``token_ids`` fills
    special token ids the dict lacks (the released config has no mask_token_id)."""
    return _validated(check_config_dict(raw, source), source, token_ids or {})


def _validated(fields: dict[str, Any], source: str, token_ids: Mapping[str, int]) -> LLaDAMoEConfig:
    fields = {**token_ids, **fields}
    if "pad_token_id" not in fields and "eos_token_id" in fields:
        fields["pad_token_id"] = fields["eos_token_id"]  # LLaDA-MoE pads with EOS (LLADA_SPEC 1)
    try:
        return LLaDAMoEConfig.model_validate(fields)
    except ValueError as err:
        raise CheckpointError(f"{source}: invalid LLaDA-MoE config: {err}") from None


def config_to_dict(config: LLaDAMoEConfig, dtype: torch.dtype) -> dict[str, Any]:
    """config.json content: our fields under the released names, plus the released fields at
    the values that mean plain LLaDA-MoE, so that tools reading the released config agree."""
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        **config.model_dump(),
        "shared_expert_intermediate_size": None,
        "moe_layer_freq": [1] * config.num_hidden_layers,
        "partial_rotary_factor": 1.0,
        "rope_scaling": None,
        "clip_qkv": None,
        "moe_router_enable_expert_bias": False,
        "moe_router_score_function": "softmax",
        "routed_scaling_factor": 1.0,
        "attention_dropout": 0.0,
        "use_cache": False,
        "output_router_logits": False,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
    }


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing {what}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: corrupt {what}: {err}") from None


def special_token_ids(directory: str | os.PathLike[str]) -> dict[str, int]:
    """mask/eos ids from the tokenizer files beside a config, looked up by token string."""
    directory = Path(directory)
    by_content: dict[str, int] = {}
    tokenizer_config, tokenizer = directory / "tokenizer_config.json", directory / "tokenizer.json"
    if tokenizer_config.is_file():
        content = _read_json(tokenizer_config, "tokenizer config")
        decoder = content.get("added_tokens_decoder", {}) if isinstance(content, dict) else {}
        by_content.update({token.get("content"): int(token_id) for token_id, token in decoder.items()})
    if tokenizer.is_file():
        content = _read_json(tokenizer, "tokenizer")
        added = content.get("added_tokens", []) if isinstance(content, dict) else []
        by_content.update({token.get("content"): int(token["id"]) for token in added})
    names = {"mask_token_id": MASK_TOKEN, "eos_token_id": EOS_TOKEN}
    return {key: by_content[token] for key, token in names.items() if token in by_content}


def load_config(directory: str | os.PathLike[str]) -> LLaDAMoEConfig:
    """Read ``directory/config.json`` (model_type "llada" or "lladamoe"). Special token ids the
    config lacks come from the tokenizer files in the same directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    path = directory / CONFIG_NAME
    raw = _read_json(path, CONFIG_NAME)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: corrupt {CONFIG_NAME}: expected a JSON object")
    fields = check_config_dict(raw, str(path))
    missing_ids = [key for key in ("mask_token_id", "eos_token_id") if key not in fields]
    token_ids = special_token_ids(directory) if missing_ids else {}
    for key in missing_ids:
        if key not in token_ids:
            raise CheckpointError(
                f"{path}: {key} is missing and no tokenizer file in {directory} defines its token; "
                f"add {key} to {CONFIG_NAME}"
            )
    return _validated(fields, str(path), token_ids)


# --------------------------------------------------------------------------- save


def _plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Greedy packing of keys, in order, into shards of at most max_shard_bytes (a tensor larger
    than that gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes:
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, content: Any) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    _fsync(path)


def _write_weights(
    state_dict: Mapping[str, torch.Tensor], directory: Path, dtype: torch.dtype | None, max_shard_bytes: int
) -> None:
    """Safetensors under the released names, one file or shards + index, written shard by shard
    so that at most one shard's worth of converted tensors is in memory."""
    def converted(tensor: torch.Tensor) -> torch.Tensor:
        # clone: the per-expert views share one storage, which safetensors refuses to write.
        return tensor.detach().to("cpu", dtype or tensor.dtype).clone().contiguous()

    tensors = dict(iter_released(state_dict))
    sizes = [(name, t.numel() * (dtype or t.dtype).itemsize) for name, t in tensors.items()]
    shards = _plan_shards(sizes, max_shard_bytes)
    if len(shards) == 1:
        save_file({name: converted(tensors[name]) for name in shards[0]}, directory / WEIGHTS_NAME, {"format": "pt"})
        _fsync(directory / WEIGHTS_NAME)
        return
    weight_map = {}
    for number, names in enumerate(shards, start=1):
        filename = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file({name: converted(tensors[name]) for name in names}, directory / filename, {"format": "pt"})
        _fsync(directory / filename)
        weight_map.update(dict.fromkeys(names, filename))
    index = {"metadata": {"total_size": sum(size for _, size in sizes)}, "weight_map": weight_map}
    _write_json(directory / INDEX_NAME, index)


def _is_checkpoint_file(name: str) -> bool:
    return name in (CONFIG_NAME, WEIGHTS_NAME, INDEX_NAME) or bool(_SHARD_NAME.match(name))


def _keep_other_files(old: Path, new: Path) -> None:
    """Files in an existing target that save_model does not write (tokenizer files, records)
    are carried into the new directory: hard links where possible, else copies."""
    def link_or_copy(source: str, destination: str) -> None:
        try:
            os.link(source, destination)
        except OSError:
            shutil.copy2(source, destination)

    for entry in old.iterdir():
        if _is_checkpoint_file(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=link_or_copy)
        else:
            link_or_copy(str(entry), str(new / entry.name))


def _swap_into_place(staged: Path, target: Path) -> None:
    """Rename the fully written ``staged`` directory onto ``target``. An existing target is
    moved aside first and deleted only after the new one is in place (restored on failure)."""
    if not target.exists():
        os.rename(staged, target)
        return
    backup = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
    backup.rmdir()
    os.rename(target, backup)
    try:
        os.rename(staged, target)
    except BaseException:
        os.rename(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def save_model(
    model: LLaDAMoEModelLM,
    directory: str | os.PathLike[str],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    dtype: torch.dtype | None = None,
    extra_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` to ``directory`` in the released HF layout; returns the directory.

    config.json + ``model.safetensors`` (or shards of at most ``max_shard_bytes`` + index),
    tensors cast to ``dtype`` (default: as they are). ``extra_config`` adds keys to
    config.json; it may not change the model's config. The checkpoint is written into a
    temporary directory beside the target and renamed into place, so the target is never
    half-written; an existing target is replaced as a whole, keeping files this function does
    not write (e.g. tokenizer files).
    """
    if not isinstance(getattr(model, "config", None), LLaDAMoEConfig):
        raise TypeError(f"model: expected a llada_core LLaDAMoEModelLM, got {type(model).__name__}")
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes: must be > 0, got {max_shard_bytes}")
    target = Path(directory).absolute()
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target}: exists and is not a directory")
    state_dict = model.state_dict()
    config_dict = {**config_to_dict(model.config, dtype or model.dtype), **(extra_config or {})}
    if parse_config_dict(config_dict, "extra_config") != model.config:
        raise ValueError("extra_config: must not change the model's config; change model.config instead")
    with _staged(target) as staged:
        _write_weights(state_dict, staged, dtype, max_shard_bytes)
        _write_json(staged / CONFIG_NAME, config_dict)
        if target.is_dir():
            _keep_other_files(target, staged)
    return target


@contextlib.contextmanager
def _staged(target: Path) -> Iterator[Path]:
    """A temporary folder beside ``target`` to write into: swapped into place when the block ends
    without error, removed when it raises, so ``target`` is never half-written."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield staged
        _fsync(staged)
        _swap_into_place(staged, target)
        _fsync(target.parent)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- load


def _weight_files(directory: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a checkpoint, and the index's weight map when sharded."""
    if (directory / WEIGHTS_NAME).is_file():
        return [directory / WEIGHTS_NAME], None
    index_path = directory / INDEX_NAME
    if not index_path.is_file():
        raise CheckpointError(f"{directory}: no weights: neither {WEIGHTS_NAME} nor {INDEX_NAME}")
    index = _read_json(index_path, "safetensors index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: corrupt safetensors index: no weight_map")
    files = [directory / name for name in dict.fromkeys(weight_map.values())]
    missing = [str(path) for path in files if not path.is_file()]
    if missing:
        raise CheckpointError(f"{index_path}: lists weight files that do not exist: {missing}")
    return files, weight_map


def _read_headers(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...], str]]:
    """key -> (file, shape, safetensors dtype), from the headers only; a corrupt or truncated
    file fails here, before any tensor is read."""
    found: dict[str, tuple[Path, tuple[int, ...], str]] = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as handle:
                for key in handle.keys():
                    view = handle.get_slice(key)
                    if key in found:
                        raise CheckpointError(f"{path}: key {key} is also in {found[key][0]}")
                    found[key] = (path, tuple(view.get_shape()), view.get_dtype())
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file: {err}") from None
    return found


def _check_keys(
    found: Mapping[str, tuple[Path, tuple[int, ...], str]],
    expected: Mapping[str, tuple[int, ...]],
    weight_map: Mapping[str, str] | None,
    directory: Path,
) -> None:
    """One error listing every missing, unexpected and mis-shaped key."""
    problems = []
    missing = [f"{key} {list(shape)}" for key, shape in expected.items() if key not in found]
    unexpected = [f"{key} {list(found[key][1])}" for key in found if key not in expected]
    wrong = [
        f"{key}: expected {list(shape)}, found {list(found[key][1])} in {found[key][0].name}"
        for key, shape in expected.items() if key in found and found[key][1] != shape
    ]
    if weight_map is not None:
        misplaced = [f"{key} (index says {name})" for key, name in weight_map.items()
                     if key not in found or found[key][0].name != name]
        if misplaced:
            problems.append(f"index entries that do not match the files: {misplaced}")
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
        if items:
            problems.append(f"{label}: " + "; ".join(items))
    if problems:
        raise CheckpointError(f"{directory}: weights do not match the config:\n  " + "\n  ".join(problems))


def _read_tensors(
    found: Mapping[str, tuple[Path, tuple[int, ...], str]],
    meta_state: Mapping[str, torch.Tensor],
    dtype: torch.dtype | None,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Read file by file into the model's (stacked) layout: stacked experts are allocated once
    on ``device`` and filled one expert at a time, so peak memory is the model plus one tensor."""
    state: dict[str, torch.Tensor] = {}
    for name, meta in meta_state.items():
        if _STACKED_EXPERTS.match(name):
            stored_dtype = _ST_DTYPES.get(found[released_key(name, 0)][2], torch.float32)
            state[name] = torch.empty(meta.shape, dtype=dtype or stored_dtype, device=device)
    for path in dict.fromkeys(entry[0] for entry in found.values()):
        try:
            with safe_open(path, framework="pt") as handle:
                for key in handle.keys():
                    tensor = handle.get_tensor(key)
                    expert = _RELEASED_EXPERT.match(key)
                    if expert:
                        stacked = f"{expert.group(1)}.{expert.group(3)}"
                        state[stacked][int(expert.group(2))].copy_(tensor)
                    else:
                        state[key] = tensor.to(device=device, dtype=dtype or tensor.dtype)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}: cannot read tensors: {err}") from None
    return state


def load_model(
    directory: str | os.PathLike[str], dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> LLaDAMoEModelLM:
    """Load a checkpoint in the released layout (single file or sharded with index) into a
    ``LLaDAMoEModelLM`` on ``device``; ``dtype=None`` keeps the stored dtype.

    Keys and shapes are checked against the config before any tensor is read; every missing,
    unexpected or mis-shaped key is listed in one CheckpointError. The model is built on the
    meta device and the loaded tensors are assigned, so the weights are in memory once.
    """
    directory = Path(directory)
    config = load_config(directory)
    device = torch.device(device)
    files, weight_map = _weight_files(directory)
    found = _read_headers(files)
    with torch.device("meta"):
        model = LLaDAMoEModelLM(config)
    meta_state = model.state_dict()
    _check_keys(found, released_shapes(meta_state), weight_map, directory)
    state = _read_tensors(found, meta_state, dtype, device)
    model.load_state_dict(state, strict=True, assign=True)
    return model
