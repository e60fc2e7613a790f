"""Getting a checkpoint (HF layout: config.json, safetensors, tokenizer files) onto the replica.

A local path (or file://) is read in place; an s3:// URI is downloaded to a temporary folder
that is removed once the model is in memory. The ingress needs only the small files (config
and tokenizer), so it never downloads the weights.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from llada_core.checkpoint import load_config
from pipelines import storage
from pipelines.tokenizer import load_tokenizer, special_token_ids
from serve.validation import ModelInfo

METADATA_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                  "chat_template.jinja")


class CheckpointNotFound(ValueError):
    """The checkpoint URI does not hold a checkpoint; the message says what is missing."""


@contextlib.contextmanager
def local_checkpoint(uri: str, s3: storage.S3Settings | None = None,
                     only: tuple[str, ...] | None = None) -> Iterator[str]:
    """A local folder with the checkpoint's files (``only`` these names, if given)."""
    with storage.local_copy(uri, s3, only=only, prefix="llada-serve-") as local:
        if not os.path.isfile(os.path.join(local, "config.json")):
            raise CheckpointNotFound(f"checkpoint {uri}: no config.json there; pass the folder of an exported "
                                     "(HF-layout) checkpoint")
        yield local


def load_metadata(uri: str, s3: storage.S3Settings | None = None) -> tuple[object, ModelInfo]:
    """The tokenizer and the model facts the ingress validates requests against."""
    with local_checkpoint(uri, s3, only=METADATA_FILES) as directory:
        config = load_config(directory)
        tokenizer = load_tokenizer(directory)
    ids = special_token_ids(tokenizer)
    if ids.mask != config.mask_token_id or ids.eos != config.eos_token_id:
        raise CheckpointNotFound(f"checkpoint {uri}: the tokenizer's mask/EOS ids ({ids.mask}/{ids.eos}) differ "
                                 f"from config.json's ({config.mask_token_id}/{config.eos_token_id})")
    info = ModelInfo(vocab_size=config.vocab_size, max_position_embeddings=config.max_position_embeddings,
                     mask_id=config.mask_token_id, eos_id=config.eos_token_id, eot_id=ids.role_end)
    return tokenizer, info


def checkpoint_label(uri: str) -> str:
    """How responses name the checkpoint that answered (``X-LLaDA-Checkpoint``): the run, stage
    and checkpoint folder for a platform checkpoint (``tiny-cpu/sft/checkpoint_000800``, from
    ``.../tiny-cpu/stages/sft/checkpoints/checkpoint_000800/hf``), else the folder and its
    parent. Not the storage URI: clients need not learn bucket names and paths."""
    parts = [part for part in storage.parse_uri(uri).path.strip("/").split("/") if part]
    if parts and parts[-1] == "hf":
        parts = parts[:-1]
    if "stages" in parts[:-1]:
        at = len(parts) - 1 - parts[::-1].index("stages")
        run = parts[at - 1:at]
        kept = [part for part in parts[at + 1:] if part not in ("checkpoints", "averages")]
        return "/".join(run + kept)
    return "/".join(parts[-2:]) or uri
