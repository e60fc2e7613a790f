"""Request validation on the ingress: model name, sampling parameters (defaults, rounding,
caps), prompts (tokenisation, chat template, token-id checks). Plain functions, no Ray.

Every user mistake raises :class:`RequestError` with a 4xx status and a message that names
the field; the API turns it into OpenAI's error shape.
"""

from __future__ import annotations

import inspect
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from llada_core import sampling as core_sampling
from llada_core import tokens
from llada_core.sampling import generate
from serve.batching import SampleRequest, SamplingParams
from serve.config import ServeConfig
from serve.protocol import ChatCompletionRequest, CompletionRequest, DiffusionParameters

# Options of llada_core.generate added by the sampler-acceleration work (issue 7). Passed
# through only when the installed generate() accepts them; this tuple is the one place to edit.
EXTENSION_OPTIONS = ("threshold", "cache", "early_stop")
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


def sampler_extensions(generate_fn: Callable[..., Any] = generate) -> frozenset[str]:
    """Which of EXTENSION_OPTIONS the installed ``generate`` accepts."""
    parameters = inspect.signature(generate_fn).parameters
    return frozenset(name for name in EXTENSION_OPTIONS if name in parameters)


def check_extensions(values: dict[str, Any], extensions: frozenset[str]) -> None:
    """Sampler accelerations asked for must exist in this generate(); a cache mode must be one
    it knows (checked here so that a bad value never takes a place in a batch)."""
    for name, value in values.items():
        if value is not None and name not in extensions:
            raise RequestError(400, f"{name}: not supported by this server's sampler "
                               f"(llada_core.generate has no `{name}` argument)", param=name)
    modes = getattr(core_sampling, "CACHE_MODES", None)
    if values.get("cache") is not None and modes is not None and values["cache"] not in modes:
        raise RequestError(400, f"cache: {values['cache'][:32]!r} is not one of {list(modes)}", param="cache")


def check_model_name(requested: str, served: str) -> None:
    if requested != served:
        shown = requested[:100].encode("utf-8", "backslashreplace").decode()
        raise RequestError(404, f"model: {shown!r} does not exist; this server serves {served!r}",
                           param="model", code="model_not_found")


def resolve_sampling(body: DiffusionParameters, requested_max_tokens: int | None, config: ServeConfig,
                     extensions: frozenset[str], model: ModelInfo) -> tuple[int, SamplingParams]:
    """(max_tokens, SamplingParams) of a request: its fields, else the config's defaults.

    gen_length is max_tokens rounded up to a multiple of block_length; ``steps`` (total, as in
    the official generate) must split evenly over the blocks and be at most gen_length.
    """
    defaults, limits = config.sampling, config.limits
    max_tokens = requested_max_tokens if requested_max_tokens is not None else defaults.max_tokens
    if max_tokens > limits.max_tokens:
        raise RequestError(400, f"max_tokens: {max_tokens} exceeds this server's cap of {limits.max_tokens}",
                           param="max_tokens")
    block_length = body.block_length if body.block_length is not None else defaults.block_length
    if block_length > limits.max_tokens:
        raise RequestError(400, f"block_length: {block_length} exceeds this server's cap of {limits.max_tokens}",
                           param="block_length")
    num_blocks = math.ceil(max_tokens / block_length)
    gen_length = num_blocks * block_length
    if body.steps is None:
        per_block = block_length if defaults.steps_per_block is None else min(block_length, defaults.steps_per_block)
        steps = per_block * num_blocks
    else:
        steps = body.steps
        _check_steps(steps, num_blocks, gen_length, max_tokens, block_length, limits.max_steps)
    cfg_scale = body.cfg_scale if body.cfg_scale is not None else defaults.cfg_scale
    if cfg_scale > limits.max_cfg_scale:
        raise RequestError(400, f"cfg_scale: {cfg_scale} exceeds this server's cap of {limits.max_cfg_scale}",
                           param="cfg_scale")
    temperature = body.temperature if body.temperature is not None else defaults.temperature
    remasking = body.remasking if body.remasking is not None else defaults.remasking
    given = {name: getattr(body, name) if getattr(body, name) is not None else getattr(defaults, name)
             for name in EXTENSION_OPTIONS}
    check_extensions(given, extensions)
    params = SamplingParams(
        gen_length=gen_length, steps=steps, block_length=block_length, temperature=float(temperature),
        cfg_scale=float(cfg_scale), remasking=remasking, logits_eos_inf=body.logits_eos_inf,
        confidence_eos_eot_inf=body.confidence_eos_eot_inf, eot_id=model.eot_id,
        extensions=tuple(sorted((k, v) for k, v in given.items() if v is not None)),
        seed=None,
    )
    if params.stochastic and body.seed is not None:
        params = SamplingParams(**{**params.__dict__, "seed": body.seed})
    return max_tokens, params


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


def sample_requests(prompts: list[list[int]], max_tokens: int, params: SamplingParams, model: ModelInfo,
                    config: ServeConfig, field: str, stream: bool = True) -> list[SampleRequest]:
    """Checked SampleRequests, one per prompt, sharing one deadline."""
    deadline = time.time() + config.request_timeout_s
    requests = []
    for prompt_ids in prompts:
        check_prompt_ids(prompt_ids, field, model, params.gen_length, config.limits.max_prompt_tokens)
        requests.append(SampleRequest(request_id=uuid.uuid4().hex, prompt_ids=tuple(prompt_ids),
                                      max_tokens=max_tokens, params=params, deadline=deadline,
                                      stream_blocks=stream))
    return requests
