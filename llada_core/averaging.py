"""Checkpoint weight averaging in the released HF layout (the ``average_top_k`` selection rule of
jobs/evaluation uses it): the element-wise mean of several checkpoints' weights, streamed one
weight file at a time."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from llada_core.checkpoint import _ST_DTYPES, CheckpointError, _read_headers, _staged, _weight_files, load_config


def average_checkpoints(directories: list[str | os.PathLike[str]], directory: str | os.PathLike[str]) -> Path:
    """Write the element-wise mean of the weights of ``directories`` (HF-layout checkpoints of
    one architecture) to ``directory``, in the same layout: the same weight files, keys, shapes
    and dtypes, and every other file (config, tokenizer) from the first checkpoint.

    Checked before any tensor is read: the configs must be equal and the weight files must hold
    the same keys with the same shapes and dtypes; a mismatch raises CheckpointError naming it.
    Memory is one weight file's tensors (a shard of at most 5 GB in the released layout) plus
    one float64 accumulator for the tensor being summed, whatever the number of checkpoints. Written into a
    temporary directory beside the target and renamed into place, like :func:`save_model`.
    """
    sources = [Path(path) for path in directories]
    if len(sources) < 2:
        raise ValueError(f"directories: averaging needs at least 2 checkpoints, got {len(sources)}")
    configs = [load_config(path) for path in sources]
    for path, config in zip(sources[1:], configs[1:]):
        if config != configs[0]:
            fields = [name for name in type(configs[0]).model_fields
                      if getattr(config, name) != getattr(configs[0], name)]
            raise CheckpointError(
                f"{path}: another architecture than {sources[0]}: config field(s) "
                + ", ".join(f"{name} ({getattr(configs[0], name)!r} vs {getattr(config, name)!r})" for name in fields))
    layouts = []
    for path in sources:
        files, _ = _weight_files(path)
        headers = _read_headers(files)
        layouts.append({key: (file.name, shape, dtype) for key, (file, shape, dtype) in headers.items()})
    for path, layout in zip(sources[1:], layouts[1:]):
        if layout != layouts[0]:
            differing = sorted(set(layout) ^ set(layouts[0])) or sorted(
                key for key in layout if layout[key] != layouts[0][key])
            raise CheckpointError(f"{path}: its weights differ from {sources[0]}'s in layout (keys, files, shapes "
                                  f"or dtypes), e.g. {differing[:3]}")
    target = Path(directory).absolute()
    with _staged(target) as staged:
        for item in sources[0].iterdir():
            if item.is_file() and not item.name.endswith(".safetensors"):
                shutil.copy2(item, staged / item.name)
        for file_name in dict.fromkeys(name for name, _, _ in layouts[0].values()):
            keys = [key for key, (name, _, _) in layouts[0].items() if name == file_name]
            averaged = {}
            with contextlib.ExitStack() as handles_open:
                handles = [handles_open.enter_context(safe_open(path / file_name, framework="pt")) for path in sources]
                for key in keys:
                    dtype = _ST_DTYPES.get(layouts[0][key][2])
                    if dtype is None or not dtype.is_floating_point:
                        raise CheckpointError(f"{sources[0] / file_name}: {key} is {layouts[0][key][2]}, not a "
                                              "floating-point tensor; it cannot be averaged")
                    # float64: exact for up to millions of float32 addends, so identical inputs average to themselves
                    total = handles[0].get_tensor(key).double()
                    for handle in handles[1:]:
                        total.add_(handle.get_tensor(key).double())
                    averaged[key] = total.div_(len(sources)).to(dtype).contiguous()
            save_file(averaged, str(staged / file_name), metadata={"format": "pt"})
            del averaged
    return target
