"""What /openapi.json says about each operation of serve/api.py: every status it can answer
with and its body (OpenAI's error shape for all but 200), the headers that matter (Retry-After
on 503, WWW-Authenticate on 401), the server-sent-event alternative of the two POST endpoints,
and the Bearer scheme of /v1/*.

FastAPI derives the request schemas from serve/protocol.py by itself; the responses are
declared here because the handlers return ready-made responses that FastAPI cannot see. What
FastAPI would add on its own and this server never sends (422: a body that fails validation is
a 400 here) is taken out.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from serve.protocol import ChatCompletionChunk, CompletionChunk, ErrorResponse

BEARER_SCHEME = "bearer"
BEARER = {"security": [{BEARER_SCHEME: []}]}  # the openapi_extra of the /v1/* routes
_SCHEMAS = "#/components/schemas/"

_ERRORS = {
    400: "The request is malformed or asks for something this server does not do (an unknown field, an "
         "unsupported OpenAI option, a value past a cap, a prompt over the context). `error.param` names the "
         "field.",
    401: "Missing or wrong API key (`Authorization: Bearer <key>`). Sent only when the server is configured "
         "with a key (`api_key_env`).",
    404: "The model is not the one this server serves (`error.code` model_not_found).",
    413: "The request body is larger than the server's `limits.max_request_bytes`, declared or received.",
    500: "Internal error (e.g. the sampler failed on the batch).",
    503: "At capacity: the sampler queue is full or no sampler replica is up. Retry after `Retry-After` "
         "seconds.",
    504: "The answer did not finish within the server's `request_timeout_s`.",
}
_HEADERS = {
    401: {"WWW-Authenticate": {"description": "The scheme to authenticate with.", "required": True,
                               "schema": {"type": "string", "const": "Bearer"}}},
    503: {"Retry-After": {"description": "Seconds to wait before retrying.", "required": True,
                          "schema": {"type": "integer", "minimum": 0}}},
}
# On answers (the sampling operations' 200): which checkpoint and replica sampled it.
_ORIGIN_HEADERS = {
    "X-LLaDA-Checkpoint": {"description": "The checkpoint that sampled the answer, as run/stage/checkpoint "
                                          "(during a roll-out, old and new answer side by side; a request of "
                                          "several prompts may list both, comma-separated).",
                           "required": False, "schema": {"type": "string"}},
    "X-LLaDA-Replica": {"description": "The sampler replica that sampled it.", "required": False,
                        "schema": {"type": "string"}},
}
_SSE_DESCRIPTION = (
    "With `stream: true`: server-sent events. Each event is one line `data: {{chunk}}` (a {name} as JSON) "
    "followed by a blank line: the new text of a choice as soon as a block of it is committed, with "
    "`finish_reason` set on the choice's last chunk{role}. With `stream_options.include_usage` a last chunk "
    "with no choices carries `usage`. The stream ends with `data: [DONE]`. An error after the first "
    "chunk (a timeout, a sampler failure) arrives as one `data: {{\"error\": ...}}` event, which ends the "
    "stream (no `[DONE]` follows).")

# Statuses of each kind of operation (every request may also be refused 413 by the body cap
# and meet an internal error).
PUBLIC_ERRORS = (413, 500)
V1_READ_ERRORS = (401, 413, 500)
V1_MODEL_ERRORS = (401, 404, 413, 500)
V1_SAMPLE_ERRORS = (400, 401, 404, 413, 500, 503, 504)


def responses(ok: type[BaseModel], errors: tuple[int, ...], chunk: type[BaseModel] | None = None,
              ok_description: str = "Success.") -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of a route: ``ok`` for 200 (plus the SSE stream of ``chunk`` when the
    operation streams), the error body for each of ``errors``."""
    documented: dict[int | str, dict[str, Any]] = {200: {"model": ok, "description": ok_description}}
    if chunk is not None:
        documented[200]["headers"] = _ORIGIN_HEADERS
        role = ", after a first chunk whose delta is the role (and empty content)" if chunk is ChatCompletionChunk \
            else ""
        documented[200]["description"] = (
            f"{ok_description} Without `stream`: one JSON body. "
            + _SSE_DESCRIPTION.format(name=chunk.__name__, role=role))
        documented[200]["content"] = {"text/event-stream": {"schema": sse_event_schema(chunk)}}
    for status in errors:
        documented[status] = {"model": ErrorResponse, "description": _ERRORS[status]}
        if status in _HEADERS:
            documented[status]["headers"] = _HEADERS[status]
    return documented


def sse_event_schema(chunk: type[BaseModel]) -> dict[str, Any]:
    """One event of the stream, as OpenAPI 3.1 tools read ``schema`` under text/event-stream (a
    ``data`` string holding a chunk or an error as JSON, or ``[DONE]``)."""
    payload = {"anyOf": [{"$ref": _SCHEMAS + chunk.__name__}, {"$ref": _SCHEMAS + ErrorResponse.__name__}]}
    return {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"anyOf": [
            {"const": "[DONE]", "description": "the end of the stream"},
            {"type": "string", "contentMediaType": "application/json", "contentSchema": payload},
        ]}},
    }


def install(app: FastAPI) -> None:
    """Make ``app.openapi()`` FastAPI's document with the corrections of this module."""

    def document() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            app.openapi_schema = _corrected(schema)
        return app.openapi_schema

    app.openapi = document  # type: ignore[method-assign]


def _corrected(schema: dict[str, Any]) -> dict[str, Any]:
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            operation.get("responses", {}).pop("422", None)  # never sent: validation errors are 400
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    # The chunks are only named inside the SSE event schema, so FastAPI does not collect them.
    _, chunk_schemas = models_json_schema([(CompletionChunk, "serialization"), (ChatCompletionChunk, "serialization")],
                                          ref_template=_SCHEMAS + "{model}")
    for name, definition in chunk_schemas.get("$defs", {}).items():
        schemas.setdefault(name, definition)
    components["securitySchemes"] = {BEARER_SCHEME: {
        "type": "http", "scheme": "bearer",
        "description": "The API key as a Bearer token. Enforced on /v1/* only when the server is configured "
                       "with a key (`api_key_env` in the serve config, `--api-key-env`); otherwise ignored."}}
    return schema
