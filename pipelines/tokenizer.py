"""Tokenizers as HF tokenizer directories (tokenizer.json + tokenizer_config.json).

- :func:`train_demo_tokenizer`: a byte-level BPE trained on the demo corpus with the LLaDA-MoE
  special tokens at ids 0..4 (in ``llada_core.tokens.SPECIAL_TOKENS`` order: EOS = pad = 0,
  mask = 1) and a chat template of the released shape (LLADA_SPEC section 8). Digits are split
  one per token, so arithmetic is learnable digit by digit.
- :func:`load_tokenizer`: any HF tokenizer directory with a tokenizer.json (ours, or the released
  LLaDA-MoE one), local or on S3, through ``PreTrainedTokenizerFast``.
- :func:`special_token_ids`: mask, EOS, pad and end-of-turn ids, always read from the tokenizer.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Iterable

from pydantic import BaseModel, ConfigDict
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from llada_core import tokens
from llada_core.config import LLaDAMoEConfig
from pipelines import storage


class TokenizerError(ValueError):
    """A tokenizer directory is missing, unreadable, or lacks a token the platform needs."""


def chat_template() -> str:
    """Jinja template that renders exactly what ``llada_core.tokens.format_chat`` renders."""
    names = tokens.ROLE_NAMES
    return (
        "{%- for message in messages -%}"
        f"{{%- if message['role'] == 'system' -%}}{{%- set name = '{names['system']}' -%}}"
        f"{{%- elif message['role'] == 'user' -%}}{{%- set name = '{names['user']}' -%}}"
        f"{{%- elif message['role'] == 'assistant' -%}}{{%- set name = '{names['assistant']}' -%}}"
        "{%- else -%}{{ raise_exception('unknown role: ' + message['role']) }}{%- endif -%}"
        f"{tokens.ROLE_START}{{{{ name }}}}{tokens.ROLE_CLOSE}{{{{ message['content'] }}}}{tokens.ROLE_END}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{tokens.ROLE_START}{names['assistant']}{tokens.ROLE_CLOSE}{{%- endif -%}}"
    )


def wrap_tokenizer(backend: Tokenizer) -> PreTrainedTokenizerFast:
    """The HF wrapper with the special-token roles and the chat template set."""
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=tokens.EOS_TOKEN,
        pad_token=tokens.EOS_TOKEN,
        mask_token=tokens.MASK_TOKEN,
        extra_special_tokens=[tokens.ROLE_START, tokens.ROLE_CLOSE, tokens.ROLE_END],
        chat_template=chat_template(),
        clean_up_tokenization_spaces=False,
        model_max_length=1_000_000,
    )


def train_bpe(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Byte-level BPE with the special tokens at ids 0..len(SPECIAL_TOKENS)-1. The result has at
    most ``vocab_size`` entries (fewer when the corpus runs out of pairs to merge)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(tokens.SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = wrap_tokenizer(backend)
    for expected_id, token in enumerate(tokens.SPECIAL_TOKENS):
        assert tokenizer.convert_tokens_to_ids(token) == expected_id, token
    return tokenizer


def corpus_texts(corpus_uri: str, s3: storage.S3Settings | None = None) -> Iterable[str]:
    """Training text for the tokenizer: every pretraining/anneal document, every SFT message and
    role name on its own (as each follows ``<role>``/``</role>`` in a chat); the special-token strings
    themselves are never BPE-merged."""
    import json

    description = storage.read_json(storage.join(corpus_uri, "corpus.json"), s3)
    for split, uris in description["files"].items():
        if split.startswith("eval/"):
            continue  # the tokenizer must not be fitted on held-out data either
        for uri in uris:
            for line in storage.read_text(uri, s3).splitlines():
                record = json.loads(line)
                if "messages" in record:
                    for message in record["messages"]:
                        yield tokens.ROLE_NAMES[message["role"]]
                        yield message["content"]
                else:
                    yield record["text"]


def train_demo_tokenizer(corpus_uri: str, output_uri: str, vocab_size: int = 4096,
                         s3: storage.S3Settings | None = None) -> PreTrainedTokenizerFast:
    """Fit the demo BPE on a corpus written by ``write_demo_corpus`` and save it to ``output_uri``."""
    tokenizer = train_bpe(corpus_texts(corpus_uri, s3), vocab_size=vocab_size)
    save_tokenizer(tokenizer, output_uri, s3)
    return tokenizer


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, uri: str, s3: storage.S3Settings | None = None) -> None:
    """Save as an HF directory; the chat template goes into tokenizer_config.json (like the
    released model's), not a separate .jinja file."""
    with tempfile.TemporaryDirectory(prefix="llada-tokenizer-") as local:
        tokenizer.save_pretrained(local, save_jinja_files=False)
        storage.upload_dir(local, uri, s3)


def load_tokenizer(uri: str, s3: storage.S3Settings | None = None) -> PreTrainedTokenizerFast:
    """Load any HF tokenizer directory that has a tokenizer.json, local or on S3. Nothing is
    downloaded from the Hub (``local_files_only``)."""
    with storage.local_copy(uri, s3, prefix="llada-tokenizer-") as local:
        return _load_local(local, display=uri)


def _load_local(path: str, display: str) -> PreTrainedTokenizerFast:
    if not os.path.isdir(path):
        raise TokenizerError(f"tokenizer {display}: no such directory")
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise TokenizerError(f"tokenizer {display}: no tokenizer.json in the directory "
                             f"(found {sorted(os.listdir(path))}); only fast (tokenizer.json) tokenizers load")
    try:
        return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    except Exception as error:  # transformers raises many types for a broken directory
        raise TokenizerError(f"tokenizer {display}: cannot load ({type(error).__name__}: {error})") from error


class SpecialTokenIds(BaseModel):
    """Ids the model and the samplers need, read from a tokenizer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    eos: int
    pad: int
    mask: int
    role_start: int
    role_close: int
    role_end: int


def _lookup(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    token_id = tokenizer.get_vocab().get(token)
    if token_id is None:
        raise TokenizerError(f"tokenizer {tokenizer.name_or_path!r} has no {token!r} token; "
                             f"LLaDA-MoE needs all of {list(tokens.SPECIAL_TOKENS)}")
    return token_id


def special_token_ids(tokenizer: PreTrainedTokenizerFast) -> SpecialTokenIds:
    """EOS/mask follow the tokenizer's declared roles when set; the role markers by string."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else _lookup(tokenizer, tokens.EOS_TOKEN)
    mask = tokenizer.mask_token_id if tokenizer.mask_token_id is not None else _lookup(tokenizer, tokens.MASK_TOKEN)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return SpecialTokenIds(eos=eos, pad=pad, mask=mask, role_start=_lookup(tokenizer, tokens.ROLE_START),
                           role_close=_lookup(tokenizer, tokens.ROLE_CLOSE), role_end=_lookup(tokenizer, tokens.ROLE_END))


def check_matches_config(tokenizer: PreTrainedTokenizerFast, config: LLaDAMoEConfig) -> SpecialTokenIds:
    """Fail with a clear message when a tokenizer cannot feed a model config."""
    ids = special_token_ids(tokenizer)
    if len(tokenizer) > config.vocab_size:
        raise TokenizerError(f"vocab_size: the tokenizer has {len(tokenizer)} tokens but the model config "
                             f"has vocab_size={config.vocab_size}")
    for field, value in (("mask_token_id", ids.mask), ("eos_token_id", ids.eos), ("pad_token_id", ids.pad)):
        if getattr(config, field) != value:
            raise TokenizerError(f"{field}: the model config says {getattr(config, field)} but the tokenizer "
                                 f"gives {value}")
    return ids


def tokenizer_hash(tokenizer: PreTrainedTokenizerFast) -> str:
    """sha256 of the serialised tokenizer (vocab, merges, pre-tokenizer, special tokens)."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()
