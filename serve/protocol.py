"""OpenAI-compatible request bodies (with the diffusion parameters as extra fields) and
response bodies (``usage`` adds the model forwards an answer took, see :class:`Usage`).

Requests are strict: an unknown field, a wrong type or an OpenAI option the diffusion sampler
cannot honour (``n > 1``, ``top_p < 1``, penalties, logprobs, tools) is a 400 that names the
field (``error.param``), never silently ignored. Fields at their no-op value (``n: 1``,
``top_p: 1``) are accepted so that clients which always send them work, and so is what an
assistant message copied from an OpenAI response carries (``refusal``, ``annotations``).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

MAX_TEXT_CHARS = 1_000_000  # a backstop; the prompt-token cap is the real limit
MAX_STOP_SEQUENCES = 4

# (field, the only values accepted, why) for OpenAI options the sampler does not implement.
_NO_OP_VALUES: dict[str, tuple[tuple[Any, ...], str]] = {
    "n": ((None, 1), "only n=1 is supported (send several prompts instead)"),
    "best_of": ((None, 1), "only best_of=1 is supported"),
    "top_p": ((None, 1, 1.0), "nucleus sampling is not supported by the diffusion sampler; use temperature"),
    "frequency_penalty": ((None, 0, 0.0), "penalties are not supported by the diffusion sampler"),
    "presence_penalty": ((None, 0, 0.0), "penalties are not supported by the diffusion sampler"),
    "logit_bias": ((None, {}), "logit_bias is not supported"),
    "logprobs": ((None, False, 0), "logprobs are not supported"),
    "top_logprobs": ((None, 0), "logprobs are not supported"),
    "echo": ((None, False), "echo is not supported"),
    "suffix": ((None, ""), "suffix (infilling) is not supported"),
    "tools": ((None, []), "tool calling is not supported"),
    "tool_choice": ((None, "none"), "tool calling is not supported"),
    "functions": ((None, []), "function calling is not supported"),
    "function_call": ((None, "none"), "function calling is not supported"),
    "parallel_tool_calls": ((None, False, True), "tool calling is not supported"),
}


def _valid_text(value: str) -> str:
    """Reject lone surrogates: valid JSON escapes, but not text a tokenizer can encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise PydanticCustomError("invalid_text", "not valid Unicode text (lone surrogate at character "
                                  "{position})", {"position": error.start}) from None
    return value


Text = Annotated[str, AfterValidator(_valid_text)]
StopText = Annotated[Text, Field(min_length=1, max_length=256)]
# Types of OpenAI options accepted only at their no-op values: the schema says so (the fuzz
# run and clients see it), and _check_no_ops gives the friendly message first.
NoOpOne = Literal[1] | None
NoOpFalse = Literal[False] | None
NoOpEmptyList = Annotated[list[dict[str, Any]], Field(max_length=0)] | None


def _check_no_ops(values: Any) -> Any:
    if isinstance(values, dict):
        for name, (allowed, why) in _NO_OP_VALUES.items():
            value = values.get(name)
            # type() as well as ==, so that true is not taken for 1
            if not any(value == no_op and type(value) is type(no_op) for no_op in allowed):
                raise _field_error("unsupported", name, f"{name}: {why}")
    return values


def _field_error(kind: str, param: str, message: str) -> PydanticCustomError:
    """An error raised by a model-level validator, which pydantic locates at the model itself:
    ``param`` in its context tells the API which field to name in ``error.param``. (The message
    must not hold ``{param}``, which pydantic would fill in.)"""
    return PydanticCustomError(kind, message, {"param": param})


def _raise_text_error(error: ValidationError) -> None:
    """Inside a union, keep the precise "lone surrogate" message over the union's summary."""
    text_error = next((e for e in error.errors() if e["type"] == "invalid_text"), None)
    if text_error is not None:
        raise PydanticCustomError("invalid_text", text_error["msg"]) from None


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False
    include_obfuscation: bool | None = None


class DiffusionParameters(_Body):
    """Extra body fields (``extra_body=`` in the openai client); each one left out takes the serve
    config's ``sampling`` value (llada_core.options.SamplingOptions defines them; LLADA_SPEC 6).
    ``threshold`` and ``cache`` sent as null turn that option off."""

    max_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    steps: int | None = Field(None, ge=1, le=2**31 - 1, description="sampling steps in total (official LLaDA meaning)")
    block_length: int | None = Field(None, ge=1, le=2**31 - 1, description="tokens per semi-autoregressive block")
    remasking: Literal["low_confidence", "random"] | None = None
    cfg_scale: float | None = Field(None, ge=0.0, allow_inf_nan=False, description="classifier-free guidance")
    threshold: float | None = Field(None, gt=0.0, le=1.0, description="confidence-threshold parallel decoding; "
                                    "null turns it off (the fixed schedule of `steps`)")
    cache: str | None = Field(None, max_length=32, description="KV cache mode: prefix or dual; null turns it off")
    early_stop: bool | None = Field(None, description="stop once every answer has ended in EOS")
    logits_eos_inf: bool | None = Field(None, description="never predict EOS")
    confidence_eos_eot_inf: bool | None = Field(None, description="commit EOS / end of turn after every other token")
    ignore_eos: bool = Field(False, description="return all max_tokens tokens, EOS included")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = Field(None, max_length=256)
    # OpenAI options accepted only at their no-op values (checked in _check_no_ops).
    n: NoOpOne = None
    top_p: Annotated[float, Field(ge=1.0, le=1.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=0.0, le=0.0)] | None = None
    presence_penalty: Annotated[float, Field(ge=0.0, le=0.0)] | None = None
    logit_bias: Annotated[dict[str, float], Field(max_length=0)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_ops(cls, values: Any) -> Any:
        return _check_no_ops(values)

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> "DiffusionParameters":
        # As OpenAI: options of a stream that will not happen are a mistake, not a no-op.
        if self.stream_options is not None and not self.stream:
            raise _field_error("stream_options", "stream_options",
                               "stream_options: only allowed when stream is true")
        return self

    @field_validator("stop", mode="wrap")
    @classmethod
    def _stop(cls, value: Any, handler: Any) -> list[str] | None:
        try:
            stop = handler(value)
        except ValidationError as error:
            _raise_text_error(error)
            if isinstance(value, list) and len(value) > MAX_STOP_SEQUENCES:
                raise PydanticCustomError("stop", f"at most {MAX_STOP_SEQUENCES} stop sequences, "
                                          f"got {len(value)}") from None
            raise PydanticCustomError("stop", f"expected a string or a list of at most {MAX_STOP_SEQUENCES} "
                                      "strings, each of 1 to 256 characters") from None
        return [stop] if isinstance(stop, str) else stop

    def stop_sequences(self) -> list[str]:
        return list(self.stop or [])  # type: ignore[arg-type]


Prompt = Text | list[Text] | list[int] | list[list[int]]


class CompletionRequest(DiffusionParameters):
    """``POST /v1/completions``."""

    model: Text = Field(max_length=256)
    prompt: Prompt
    best_of: NoOpOne = None
    echo: NoOpFalse = None
    logprobs: Literal[0] | None = None
    suffix: Literal[""] | None = None

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt(cls, value: Any, handler: Any) -> Prompt:
        try:
            prompt = handler(value)
        except ValidationError as error:
            _raise_text_error(error)
            raise PydanticCustomError(
                "prompt", "expected a string, a list of strings, a list of token ids or a list of "
                "token-id lists") from None
        if isinstance(prompt, list) and not prompt:
            raise PydanticCustomError("prompt", "must not be an empty list")
        return prompt


class TextPart(_Body):
    type: Literal["text"]
    text: Text = Field(max_length=MAX_TEXT_CHARS)


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[Text, Field(max_length=MAX_TEXT_CHARS)] | list[TextPart]
    name: Text | None = Field(None, max_length=256)
    # What an assistant message copied from an OpenAI response carries besides its text
    # (``annotations: []``, a refusal): accepted there and ignored, as history.
    refusal: Text | None = Field(None, max_length=MAX_TEXT_CHARS, description="assistant messages only; ignored")
    annotations: list[dict[str, Any]] | None = Field(None, description="assistant messages only; ignored")

    @model_validator(mode="before")
    @classmethod
    def _drop_null_extras(cls, values: Any) -> Any:
        # Assistant messages copied from a response carry refusal/tool_calls/... = null.
        if isinstance(values, dict):
            return {k: v for k, v in values.items() if v is not None or k in ("role", "content")}
        return values

    @model_validator(mode="after")
    def _assistant_fields(self) -> "ChatMessage":
        for name in ("refusal", "annotations"):
            if getattr(self, name) is not None and self.role != "assistant":
                raise _field_error("assistant_only", name, f"only assistant messages carry {name}")
        return self

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ResponseFormat(_Body):
    type: Literal["text"]


class ChatCompletionRequest(DiffusionParameters):
    """``POST /v1/chat/completions``: messages rendered with the tokenizer's chat template."""

    model: Text = Field(max_length=256)
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    logprobs: NoOpFalse = None
    top_logprobs: Literal[0] | None = None
    response_format: ResponseFormat | None = None
    tools: NoOpEmptyList = None
    tool_choice: Literal["none"] | None = None
    parallel_tool_calls: bool | None = None
    functions: NoOpEmptyList = None
    function_call: Literal["none"] | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None

    @model_validator(mode="after")
    def _max_tokens(self) -> "ChatCompletionRequest":
        if self.max_completion_tokens is not None and self.max_tokens is not None \
                and self.max_completion_tokens != self.max_tokens:
            raise _field_error("max_tokens", "max_tokens", "max_tokens and max_completion_tokens disagree; send one")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---------------------------------------------------------------- responses
# The handlers build response bodies as plain dicts (a chunk per committed block, no model
# validation on that path); these models are what /openapi.json documents for them, and the
# schema run in tests/unit/test_serve_api.py holds every response to them.


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(_Response):
    message: str = Field(description="what is wrong, starting with the field at fault when one is")
    type: str = Field(description="invalid_request_error, authentication_error, server_error or timeout_error")
    param: str | None = Field(description="the request field at fault (dotted path), else null")
    code: str | None = Field(description="a machine-readable reason where there is one, e.g. model_not_found, "
                             "invalid_api_key, request_too_large, context_length_exceeded, overloaded, timeout")


class ErrorResponse(_Response):
    """OpenAI's error body, for every status other than 200."""

    error: ErrorDetail


class Usage(_Response):
    """OpenAI's token counts plus what a diffusion answer costs: a masked-diffusion model
    commits several answer tokens per forward, so the cost of an answer is its model forwards,
    not its tokens."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    model_forwards: int = Field(description="model forwards the answer needed, summed over its choices (the "
                                "batched forwards in which a choice's block still had masked positions: what it "
                                "takes alone)")
    tokens_per_forward: float = Field(description="completion_tokens / model_forwards, rounded to 2 decimals; "
                                      "0 when there were no forwards")


FinishReason = Literal["stop", "length"]


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: None
    finish_reason: FinishReason


class CompletionResponse(_Response):
    """``POST /v1/completions`` without ``stream``: one choice per prompt."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunkChoice(_Response):
    index: int
    text: str
    logprobs: None
    finish_reason: FinishReason | None = Field(description="null until the choice's last chunk")


class CompletionChunk(_Response):
    """One server-sent event of a streamed completion: new text of one choice, or (last, with
    ``stream_options.include_usage``) no choices and the usage."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = Field(None, description="only on the last chunk, with stream_options.include_usage")


class AssistantMessage(_Response):
    role: Literal["assistant"]
    content: str


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: FinishReason


class ChatCompletionResponse(_Response):
    """``POST /v1/chat/completions`` without ``stream``."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(_Response):
    role: Literal["assistant"] | None = Field(None, description="on the first chunk only")
    content: str | None = None


class ChatChunkChoice(_Response):
    index: int
    delta: ChatDelta
    logprobs: None
    finish_reason: FinishReason | None = Field(description="null until the last chunk")


class ChatCompletionChunk(_Response):
    """One server-sent event of a streamed chat completion: the role first, then new text, or
    (last, with ``stream_options.include_usage``) no choices and the usage."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = Field(None, description="only on the last chunk, with stream_options.include_usage")


class ModelCard(_Response):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(_Response):
    object: Literal["list"]
    data: list[ModelCard]


class Health(_Response):
    status: Literal["ok"]


class Ready(BaseModel):
    """A sampler replica answered; what it said about itself (device, load time, ...) follows."""

    model_config = ConfigDict(extra="allow")
    status: Literal["ready"]
    model: str


class NotReady(_Response):
    status: Literal["not ready"]
    reason: str = Field(description="why, e.g. no sampler replica is up yet")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape. The message is made safe to encode (no lone surrogates)."""
    safe = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"message": safe, "type": kind, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int, model_forwards: int) -> dict[str, Any]:
    """A :class:`Usage` body."""
    per_forward = round(completion_tokens / model_forwards, 2) if model_forwards else 0
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "model_forwards": model_forwards,
            "tokens_per_forward": per_forward}


def completion_body(response_id: str, model: str, choices: list[dict[str, Any]],
                    usage_body: dict[str, Any] | None, chunk: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"id": response_id, "object": "text_completion", "created": int(time.time()),
                            "model": model, "choices": choices}
    if usage_body is not None or not chunk:
        body["usage"] = usage_body
    return body


def chat_body(response_id: str, model: str, choices: list[dict[str, Any]],
              usage_body: dict[str, Any] | None, chunk: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"id": response_id, "object": "chat.completion.chunk" if chunk else "chat.completion",
                            "created": int(time.time()), "model": model, "choices": choices}
    if usage_body is not None or not chunk:
        body["usage"] = usage_body
    return body


def model_card(model_name: str, created: int) -> dict[str, Any]:
    return {"id": model_name, "object": "model", "created": created, "owned_by": "llada-platform"}
