"""Request validation on the ingress: model name, sampling parameters (defaults, rounding,
caps), prompts (tokenisation, chat template, token-id checks). Plain functions, no Ray.

Every user mistake raises :class:`RequestError` with a 4xx status and a message that names
the field; the API turns it into OpenAI's error shape.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

from pydantic import ValidationError

from llada_core import tokens
from llada_core.options import SamplingOptions, describe_error
from serve.batching import SampleRequest
from serve.config import ServeConfig
from serve.protocol import ChatCompletionRequest, CompletionRequest, DiffusionParameters

# Request fields that are SamplingOptions fields of the same name: each falls back to the serve
# config's sampling default when the request leaves it out.
_OPTION_FIELDS = ("block_length", "temperature", "cfg_scale", "remasking", "threshold", "cache", "early_stop",
                  "logits_eos_inf", "confidence_eos_eot_inf")
# Options that are off when null: a request turns them off by sending null explicitly.
_NULL_MEANS_OFF = ("threshold", "cache")
# Characters per prompt token above which a prompt is refused before tokenising it (a guard
# against huge strings; the token cap is the real limit).
MAX_CHARS_PER_TOKEN = 64


class RequestError(Exception):
    """A request the server refuses; ``status`` is 4xx for client mistakes."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


@dataclass(frozen=True)
class ModelInfo:
    """What the ingress needs to know about the served model (from config.json + tokenizer)."""

    vocab_size: int
    max_position_embeddings: int
    mask_id: int
    eos_id: int
    eot_id: int | None


def check_model_name(requested: str, served: str) -> None:
    if requested != served:
        shown = requested[:100].encode("utf-8", "backslashreplace").decode()
        raise RequestError(404, f"model: {shown!r} does not exist; this server serves {served!r}",
                           param="model", code="model_not_found")


@dataclass(frozen=True)
class Sampling:
    """How a request is sampled: max_tokens, the SamplingOptions, and the seed (kept only when
    the options draw random numbers)."""

    max_tokens: int
    options: SamplingOptions
    seed: int | None = None


def resolve_sampling(body: DiffusionParameters, requested_max_tokens: int | None,
                     config: ServeConfig) -> Sampling:
    """A request's sampling: its fields, else the config's defaults, checked once by
    SamplingOptions (a bad value is a 400 naming the field).

    gen_length is max_tokens rounded up to a multiple of block_length; ``steps`` (total, as in
    the official generate) must split evenly over the blocks and be at most gen_length.
    """
    defaults, limits = config.sampling, config.limits
    max_tokens = requested_max_tokens if requested_max_tokens is not None else defaults.max_tokens
    if max_tokens > limits.max_tokens:
        raise RequestError(400, f"max_tokens: {max_tokens} exceeds this server's cap of {limits.max_tokens}",
                           param="max_tokens")
    values = {name: getattr(body, name) if _given(body, name) else getattr(defaults, name) for name in _OPTION_FIELDS}
    block_length = values["block_length"]
    if block_length > limits.max_tokens:
        raise RequestError(400, f"block_length: {block_length} exceeds this server's cap of {limits.max_tokens}",
                           param="block_length")
    if values["cfg_scale"] > limits.max_cfg_scale:
        raise RequestError(400, f"cfg_scale: {values['cfg_scale']} exceeds this server's cap of "
                           f"{limits.max_cfg_scale}", param="cfg_scale")
    num_blocks = math.ceil(max_tokens / block_length)
    gen_length = num_blocks * block_length
    if body.steps is None:
        per_block = block_length if defaults.steps_per_block is None else min(block_length, defaults.steps_per_block)
        steps = per_block * num_blocks
    else:
        steps = body.steps
        _check_steps(steps, num_blocks, gen_length, max_tokens, block_length, limits.max_steps)
    try:
        options = SamplingOptions(gen_length=gen_length, steps=steps, **values)
    except ValidationError as error:
        message = describe_error(error)
        raise RequestError(400, message, param=message.split(":", 1)[0]) from None
    return Sampling(max_tokens, options, body.seed if options.stochastic else None)


def _given(body: DiffusionParameters, name: str) -> bool:
    """Whether the request sets ``name``: a value, or null for an option that null turns off."""
    return getattr(body, name) is not None or (name in _NULL_MEANS_OFF and name in body.model_fields_set)


def _check_steps(steps: int, num_blocks: int, gen_length: int, max_tokens: int, block_length: int,
                 max_steps: int) -> None:
    if steps > max_steps:
        raise RequestError(400, f"steps: {steps} exceeds this server's cap of {max_steps}", param="steps")
    if steps % num_blocks:
        raise RequestError(400, f"steps: {steps} must be a multiple of the number of blocks, {num_blocks} "
                           f"(max_tokens {max_tokens} rounded up to whole blocks of block_length {block_length})",
                           param="steps")
    if steps > gen_length:
        raise RequestError(400, f"steps: {steps} exceeds the generated length {gen_length} (max_tokens rounded "
                           f"up to block_length); every step must commit at least one token", param="steps")


def check_prompt_ids(prompt_ids: Sequence[int], field: str, model: ModelInfo, gen_length: int,
                     max_prompt_tokens: int) -> None:
    """A prompt's token ids: within the vocabulary, no mask token, within the caps."""
    if len(prompt_ids) > max_prompt_tokens:
        raise RequestError(400, f"{field}: {len(prompt_ids)} tokens exceed this server's prompt cap of "
                           f"{max_prompt_tokens} tokens", param=field, code="context_length_exceeded")
    bad = next((t for t in prompt_ids if not 0 <= t < model.vocab_size), None)
    if bad is not None:
        raise RequestError(400, f"{field}: token id {bad} is outside the vocabulary [0, {model.vocab_size})",
                           param=field)
    if model.mask_id in prompt_ids:
        raise RequestError(400, f"{field}: contains the mask token {tokens.MASK_TOKEN} (id {model.mask_id}), "
                           "which a prompt may not hold", param=field)
    if len(prompt_ids) + gen_length > model.max_position_embeddings:
        raise RequestError(400, f"max_tokens: the prompt ({len(prompt_ids)} tokens) plus the generated length "
                           f"({gen_length}) exceed the model's context of {model.max_position_embeddings} tokens",
                           param="max_tokens", code="context_length_exceeded")


def _encode(tokenizer: Any, text: str, field: str, max_prompt_tokens: int) -> list[int]:
    if len(text) > max_prompt_tokens * MAX_CHARS_PER_TOKEN:
        raise RequestError(400, f"{field}: {len(text)} characters is far above this server's prompt cap of "
                           f"{max_prompt_tokens} tokens", param=field, code="context_length_exceeded")
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def completion_prompts(body: CompletionRequest, tokenizer: Any, config: ServeConfig) -> list[list[int]]:
    """Token ids of each prompt of a completion request (a string, strings, ids, or id lists)."""
    prompt, limits = body.prompt, config.limits
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif isinstance(prompt[0], int):
        items = [prompt]
    else:
        items = list(prompt)
    if len(items) > limits.max_prompts_per_request:
        raise RequestError(400, f"prompt: {len(items)} prompts exceed this server's cap of "
                           f"{limits.max_prompts_per_request} per request", param="prompt")
    return [_encode(tokenizer, item, "prompt", limits.max_prompt_tokens) if isinstance(item, str) else list(item)
            for item in items]


def chat_prompt(body: ChatCompletionRequest, tokenizer: Any, config: ServeConfig) -> list[int]:
    """Token ids of the messages rendered with the tokenizer's chat template (LLADA_SPEC 8)."""
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        text = tokens.format_chat(messages)
    return _encode(tokenizer, text, "messages", config.limits.max_prompt_tokens)


def sample_requests(prompts: list[list[int]], sampling: Sampling, model: ModelInfo, config: ServeConfig,
                    field: str, stream: bool = True) -> list[SampleRequest]:
    """Checked SampleRequests, one per prompt, sharing one deadline."""
    deadline = time.time() + config.request_timeout_s
    requests = []
    for prompt_ids in prompts:
        check_prompt_ids(prompt_ids, field, model, sampling.options.gen_length, config.limits.max_prompt_tokens)
        requests.append(SampleRequest(request_id=uuid.uuid4().hex, prompt_ids=tuple(prompt_ids),
                                      max_tokens=sampling.max_tokens, options=sampling.options, eot_id=model.eot_id,
                                      seed=sampling.seed, deadline=deadline, stream_blocks=stream))
    return requests
