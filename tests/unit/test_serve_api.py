"""The OpenAI-compatible API (serve/api.py) in process, without Ray: a tiny model behind the
FastAPI app through an in-process backend. Response shapes, SSE streaming, usage (model
forwards), error statuses, API key, body cap, timeout and backpressure answers, and a schema
run that must find no 5xx and no response that /openapi.json does not document."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from starlette.testclient import TestClient

from llada_core import LLaDAMoEModelLM, preset
from llada_core.sampling import CommittedBlocks, generate
from pipelines.tokenizer import special_token_ids, train_bpe
from serve.api import OpenAIServer, Overloaded, create_app
from serve.batching import BlockUpdate, SampleRequest
from serve.config import ServeConfig
from serve.validation import ModelInfo
from schema_checks import conformance_checks

MODEL_NAME = "tiny-llada"
TEXTS = ["the cat sat on the mat", "a dog ran in the park", "one two three four five six",
         "HUMAN ASSISTANT SYSTEM"] * 10
_END = object()


def sample_alone(model: LLaDAMoEModelLM, request: SampleRequest, on_block=None) -> list[int]:
    """generate() on one request, as the sampler serves it alone -> its answer tokens."""
    prompt_1P = torch.tensor([request.prompt_ids])
    x_1L = generate(model, prompt_1P, options=request.options, eot_id=request.eot_id, on_block=on_block)
    return x_1L[0, prompt_1P.shape[1]:][:request.max_tokens].tolist()


class InProcessBackend:
    """The sampler in this process: generate() on one request at a time, each committed block
    streamed as it lands, with the model forwards counted (a forward hook) since the previous
    block."""

    def __init__(self, model: LLaDAMoEModelLM) -> None:
        self.model = model
        self.lock = threading.Lock()  # one request at a time, so that every forward counted is its own

    async def stream(self, request: SampleRequest):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        done = loop.run_in_executor(None, self._sample, request, lambda item: loop.call_soon_threadsafe(
            queue.put_nowait, item))
        while (item := await queue.get()) is not _END:
            yield item
        await done  # re-raises what generate() raised

    def _sample(self, request: SampleRequest, put) -> None:  # on a worker thread
        forwards = reported = 0

        def count(*_) -> None:
            nonlocal forwards
            forwards += 1

        def on_block(committed: CommittedBlocks) -> None:
            nonlocal reported
            keep = max(0, request.max_tokens - committed.answer_start)
            tokens = tuple(committed.tokens_BT[0, :keep].tolist())
            put(BlockUpdate(committed.blocks.stop, committed.num_blocks, tokens, forwards - reported))
            reported = forwards

        with self.lock:
            hook = self.model.register_forward_hook(count)
            try:
                sample_alone(self.model, request, on_block)
            finally:
                hook.remove()
                put(_END)

    async def ready(self) -> dict:
        return {"device": "cpu"}


class SlowBackend:
    async def stream(self, request: SampleRequest):
        await asyncio.sleep(5)
        yield None

    async def ready(self) -> dict:
        await asyncio.sleep(60)
        return {}


class FullBackend:
    async def stream(self, request: SampleRequest):
        raise Overloaded("queue full")
        yield None

    async def ready(self) -> dict:
        return {}


class NoReplicaBackend(FullBackend):
    async def ready(self) -> dict:
        raise RuntimeError("no sampler replica is up")


@pytest.fixture(scope="module")
def parts():
    tokenizer = train_bpe(TEXTS, vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    config = preset("tiny", vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4, expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                    max_position_embeddings=128)
    model = LLaDAMoEModelLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)
    ids = special_token_ids(tokenizer)
    info = ModelInfo(vocab_size=config.vocab_size, max_position_embeddings=128, mask_id=ids.mask,
                     eos_id=ids.eos, eot_id=ids.role_end)
    serve_config = ServeConfig.model_validate({
        "model_name": MODEL_NAME, "sampling": {"max_tokens": 8, "block_length": 4, "threshold": None, "cache": None, "early_stop": False},
        "limits": {"max_tokens": 16, "max_prompt_tokens": 48, "max_request_bytes": 4096},
        "request_timeout_s": 60.0})
    return tokenizer, model, info, serve_config


def client_for(parts, backend=None, api_key=None, timeout_s: float | None = None) -> TestClient:
    tokenizer, model, info, config = parts
    if timeout_s is not None:
        config = config.model_copy(update={"request_timeout_s": timeout_s})
    server = OpenAIServer(backend or InProcessBackend(model), tokenizer, info, config, api_key=api_key)
    return TestClient(create_app(server))


@pytest.fixture(scope="module")
def client(parts):
    return client_for(parts)


def completion(client, **fields):
    return client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "the cat", **fields})


def sse_events(client, path: str, body: dict) -> list:
    with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


def test_completion_text_is_the_decoded_answer_of_the_sampler(client, parts):
    tokenizer, model, info, _ = parts
    response = completion(client, max_tokens=6, ignore_eos=True)
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "text_completion" and body["model"] == MODEL_NAME
    [choice] = body["choices"]
    prompt_ids = tuple(tokenizer("the cat", add_special_tokens=False)["input_ids"])
    from llada_core import SamplingOptions
    options = SamplingOptions(gen_length=8, steps=8, block_length=4)
    request = SampleRequest("x", prompt_ids, 6, options, eot_id=info.eot_id)
    expected = tokenizer.decode([t for t in sample_alone(model, request) if t < len(tokenizer)],
                                skip_special_tokens=True)
    assert choice["text"] == expected and choice["finish_reason"] == "length"
    # The reference schedule takes one forward per sampling step: 8 for 6 tokens.
    assert body["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": 6,
                             "total_tokens": len(prompt_ids) + 6, "model_forwards": 8, "tokens_per_forward": 0.75}


def test_usage_counts_the_model_forwards_of_every_choice(client):
    """Fewer steps than tokens: each forward commits several tokens, which usage shows."""
    body = completion(client, prompt=["the cat", "a dog"], max_tokens=8, steps=4, ignore_eos=True).json()
    usage = body["usage"]
    assert (usage["completion_tokens"], usage["model_forwards"], usage["tokens_per_forward"]) == (16, 8, 2.0)


def test_usage_sums_the_forwards_the_sampler_reports_and_streams_them_too(parts):
    blocks = [[7] * 4, [7] * 4, [7] * 4]
    client = client_for(parts, backend=ScriptedBackend(blocks, forwards=[3, 2, 2]))
    body = {"model": MODEL_NAME, "prompt": "x", "max_tokens": 12, "block_length": 4, "ignore_eos": True}
    usage = client.post("/v1/completions", json=body).json()["usage"]
    assert (usage["completion_tokens"], usage["model_forwards"], usage["tokens_per_forward"]) == (12, 7, 1.71)
    events = sse_events(client, "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert events[-1]["usage"] == usage
    silent = client_for(parts, backend=ScriptedBackend(blocks))  # a sampler that reports no forwards
    assert silent.post("/v1/completions", json=body).json()["usage"]["tokens_per_forward"] == 0


def test_several_prompts_give_one_choice_each(client):
    body = completion(client, prompt=["the cat", "a", "a dog"], max_tokens=4).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    body = completion(client, prompt=[[7, 8, 9], [10]], max_tokens=4).json()
    assert [c["index"] for c in body["choices"]] == [0, 1]


def test_streamed_completion_adds_up_to_the_plain_answer(client):
    fields = {"prompt": ["the cat", "a dog ran"], "max_tokens": 12, "ignore_eos": True}
    plain = completion(client, **fields).json()
    events = sse_events(client, "/v1/completions", {"model": MODEL_NAME, **fields, "stream": True,
                                                    "stream_options": {"include_usage": True}})
    texts, finish = ["", ""], [None, None]
    for event in events[:-1]:
        [choice] = event["choices"]
        texts[choice["index"]] += choice["text"]
        finish[choice["index"]] = choice["finish_reason"] or finish[choice["index"]]
    assert texts == [c["text"] for c in plain["choices"]]
    assert finish == ["length", "length"]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == plain["usage"]
    assert plain["usage"]["model_forwards"] == 2 * 12  # two prompts, one forward per step


class ScriptedBackend:
    """Blocks of known tokens: each block's text is known, so each must arrive as one chunk.
    ``origins``: the (checkpoint, replica) that signs each request's blocks, in call order."""

    def __init__(self, blocks: list[list[int]], forwards: list[int] | None = None,
                 origins: list[tuple[str, str]] | None = None) -> None:
        self.blocks = blocks
        self.forwards = forwards or [0] * len(blocks)
        self.origins = list(origins or [])

    async def stream(self, request: SampleRequest):
        checkpoint, replica = self.origins.pop(0) if self.origins else (None, None)
        for index, (block, forwards) in enumerate(zip(self.blocks, self.forwards, strict=True)):
            yield BlockUpdate(index + 1, len(self.blocks), tuple(block), forwards, checkpoint, replica)

    async def ready(self) -> dict:
        return {}


def test_each_committed_block_is_one_sse_chunk_and_the_stream_stops_at_eos(parts):
    tokenizer, _, info, _ = parts
    words = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in ("the", " cat", " sat", " on")]
    blocks = [words[0] + words[1], words[2] + words[3], [info.eos_id] * 4]
    client = client_for(parts, backend=ScriptedBackend(blocks))
    events = sse_events(client, "/v1/completions", {"model": MODEL_NAME, "prompt": "x", "max_tokens": 12,
                                                    "block_length": 4, "stream": True})
    assert [e["choices"][0]["text"] for e in events] == ["the cat", " sat on", ""]
    assert [e["choices"][0]["finish_reason"] for e in events] == [None, None, "stop"]


def test_answers_name_the_checkpoint_and_replica_that_sampled_them(parts):
    body = {"model": MODEL_NAME, "prompt": "x", "max_tokens": 4, "block_length": 4}
    origins = [("run/sft/checkpoint_000002", "r1"), ("run/sft/checkpoint_000004", "r2"),
               ("run/sft/checkpoint_000002", "r1"), ("run/sft/checkpoint_000004", "r2")]
    client = client_for(parts, backend=ScriptedBackend([[7] * 4], origins=origins))
    plain = client.post("/v1/completions", json=body)
    assert (plain.headers["X-LLaDA-Checkpoint"], plain.headers["X-LLaDA-Replica"]) == ("run/sft/checkpoint_000002", "r1")
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as streamed:
        assert streamed.headers["X-LLaDA-Checkpoint"] == "run/sft/checkpoint_000004"
        streamed.read()
    # two prompts answered by both sides of a roll-out: both named, in order
    both = client.post("/v1/completions", json={**body, "prompt": ["x", "y"]})
    assert both.headers["X-LLaDA-Checkpoint"] == "run/sft/checkpoint_000002, run/sft/checkpoint_000004"
    assert client_for(parts, backend=ScriptedBackend([[7] * 4])).post(
        "/v1/completions", json=body).headers.get("X-LLaDA-Checkpoint") is None  # a backend that does not say


def test_chat_completion_and_its_stream(client):
    body = {"model": MODEL_NAME, "messages": [{"role": "system", "content": "short"},
                                              {"role": "user", "content": "the cat"}],
            "max_completion_tokens": 8, "ignore_eos": True}
    plain = client.post("/v1/chat/completions", json=body).json()
    assert plain["object"] == "chat.completion"
    message = plain["choices"][0]["message"]
    assert message["role"] == "assistant" and isinstance(message["content"], str)
    events = sse_events(client, "/v1/chat/completions", {**body, "stream": True})
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events[1:])
    assert streamed == message["content"]
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_models_health_and_readiness(client):
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL_NAME]
    assert client.get(f"/v1/models/{MODEL_NAME}").json()["id"] == MODEL_NAME
    assert client.get("/v1/models/other").status_code == 404
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json()["status"] == "ready"


@pytest.mark.parametrize("fields,status,needle", [
    (dict(model="gpt-4"), 404, "model: 'gpt-4' does not exist"),
    (dict(max_tokens=17), 400, "max_tokens: 17 exceeds"),
    (dict(steps=3, max_tokens=8), 400, "steps: 3 must be a multiple"),
    (dict(n=3), 400, "n: only n=1"),
    (dict(temperature=-0.1), 400, "temperature:"),
    (dict(bogus=True), 400, "bogus: unknown field"),
    (dict(prompt="<|mask|> hi"), 400, "mask token"),
    (dict(prompt=[5, 4000]), 400, "token id 4000"),
    (dict(prompt="the cat " * 40), 400, "prompt cap"),
    (dict(prompt="x" * 5000), 413, "request body"),
])
def test_client_mistakes_are_4xx_in_openai_shape_naming_the_problem(client, fields, status, needle):
    response = completion(client, **fields)
    assert response.status_code == status
    error = response.json()["error"]
    assert needle in error["message"] and error["type"]


def test_malformed_bodies_are_400(client):
    for content in (b"{nope", b"[1, 2]", b"null", b'"text"'):
        response = client.post("/v1/completions", content=content, headers={"content-type": "application/json"})
        assert response.status_code == 400, content
        assert "request body" in response.json()["error"]["message"]
    assert client.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": []}).status_code == 400
    assert client.get("/v1/completions").status_code == 405


def test_a_chunked_body_is_held_to_the_cap_as_it_arrives(client):
    """Without a Content-Length (chunked transfer encoding) the cap is checked on the bytes
    received: over it, 413; under it, the request goes through."""
    def chunked(prompt: str) -> object:
        payload = json.dumps({"model": MODEL_NAME, "prompt": prompt, "max_tokens": 4}).encode()
        return (payload[i:i + 512] for i in range(0, len(payload), 512))

    request = client.build_request("POST", "/v1/completions", content=chunked("x" * 5000),
                                   headers={"content-type": "application/json"})
    assert "content-length" not in request.headers and request.headers["transfer-encoding"] == "chunked"
    response = client.send(request)
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["code"] == "request_too_large" and "4096" in error["message"]
    small = client.build_request("POST", "/v1/completions", content=chunked("the cat"),
                                 headers={"content-type": "application/json"})
    assert client.send(small).status_code == 200


def test_openai_options_this_server_does_not_support_are_named_in_param(client):
    for fields, param in ((dict(n=2), "n"), (dict(top_p=0.5), "top_p"), (dict(echo=True), "echo"),
                          (dict(stream_options={"include_usage": True}), "stream_options")):
        response = completion(client, **fields)
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["param"] == param and error["message"].startswith(f"{param}:"), error


def test_an_assistant_message_copied_from_an_openai_response_is_accepted(client):
    history = [{"role": "user", "content": "the cat"},
               {"role": "assistant", "content": "sat", "refusal": None, "annotations": []},
               {"role": "user", "content": "on"}]
    body = {"model": MODEL_NAME, "messages": history, "max_tokens": 4}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    history[0]["annotations"] = []
    error = client.post("/v1/chat/completions", json=body).json()["error"]
    assert error["param"] == "messages.0.annotations" and "only assistant messages" in error["message"]


def test_api_key_is_required_on_v1_only(parts):
    secured = client_for(parts, api_key="s3cret")
    assert secured.get("/v1/models").status_code == 401
    response = secured.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "x"},
                            headers={"Authorization": "Bearer wrong"})
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert secured.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert secured.get("/health").status_code == 200


def test_a_request_past_the_timeout_is_504_and_a_full_queue_is_503(parts):
    slow = client_for(parts, backend=SlowBackend(), timeout_s=0.5)
    response = completion(slow)
    assert response.status_code == 504 and "request timeout" in response.json()["error"]["message"]
    assert completion(slow, stream=True).status_code == 504
    full = client_for(parts, backend=FullBackend())
    response = completion(full)
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert completion(full, stream=True).status_code == 503


class CheckingBackend:
    """Fast stand-in for the sampler in the fuzz run: asserts that every request it is sent is
    one generate() accepts, and answers with blocks of a plain token."""

    async def stream(self, request: SampleRequest):
        from serve.batching import BlockUpdate

        options = request.options  # a SamplingOptions checked itself when the ingress built it
        assert type(options).model_validate(options.model_dump()) == options
        assert 1 <= request.max_tokens <= options.gen_length
        for index in range(options.num_blocks):
            start = index * options.block_length
            size = max(0, min(options.block_length, request.max_tokens - start))
            yield BlockUpdate(index + 1, options.num_blocks, (7,) * size)

    async def ready(self) -> dict:
        return {}


def served_model(case, model_name: str) -> None:
    """Point a generated case at the served model, so that the fuzz reaches the sampler."""
    if isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = model_name
    if case.path_parameters and "model_id" in case.path_parameters:
        case.path_parameters["model_id"] = model_name


def api_schema(app):
    import schemathesis

    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_schema_fuzz_finds_no_server_error_and_no_undocumented_response(parts):
    """Property-based run over the OpenAPI schema: positive and negative cases of every
    operation, half of them aimed at the served model; any 5xx fails, and so does any response
    whose status, content type, body or headers /openapi.json does not document."""
    app = client_for(parts, backend=CheckingBackend()).app
    operations = [result.ok() for result in api_schema(app).get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/models"}
    statuses: list[int] = []
    with TestClient(app) as fuzz_client:  # one event loop for the whole run
        fuzz(operations, fuzz_client, statuses)
    assert statuses.count(200) >= 5 and sum(400 <= s < 500 for s in statuses) >= 50, "the fuzz run went nowhere"


def test_the_schema_documents_every_status_the_server_sends_and_no_422(parts):
    """The statuses a fuzz run seldom or never meets (401, 413, 503, 504, streamed 200s), each
    sent once and held to /openapi.json by the same checks."""
    app = client_for(parts, backend=CheckingBackend()).app
    schema = api_schema(app)
    document = app.openapi()
    assert all("422" not in op["responses"] for item in document["paths"].values() for op in item.values())
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    post = schema["/v1/completions"]["POST"]
    body = {"model": MODEL_NAME, "prompt": "the cat", "max_tokens": 4}
    cases = [  # (app, case, expected status)
        (app, post.Case(body={**body, "stream": True, "stream_options": {"include_usage": True}}), 200),
        (app, schema["/v1/chat/completions"]["POST"].Case(body={
            "model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "stream": True}), 200),
        (app, post.Case(body={**body, "n": 2}), 400),
        (app, post.Case(body={**body, "prompt": "x" * 5000}), 413),
        (app, post.Case(body={**body, "model": "other"}), 404),
        (client_for(parts, api_key="s3cret").app, post.Case(body=body), 401),
        (client_for(parts, backend=FullBackend()).app, post.Case(body=body), 503),
        (client_for(parts, backend=SlowBackend(), timeout_s=0.2).app, post.Case(body=body), 504),
        (client_for(parts, backend=NoReplicaBackend()).app, schema["/ready"]["GET"].Case(), 503),
    ]
    for served, case, status in cases:
        with TestClient(served) as http:
            kwargs = case.as_transport_kwargs()
            response = http.request(kwargs["method"], case.formatted_path, json=kwargs.get("json"))
        assert response.status_code == status, response.text[:300]
        checks = [check for check in conformance_checks() if status < 500 or check.__name__ != "not_a_server_error"]
        case.validate_response(response, checks=checks)


def fuzz(operations, fuzz_client: TestClient, statuses: list[int]) -> None:
    from schemathesis import GenerationMode

    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz_operation(operation, mode, fuzz_client, statuses)


def fuzz_operation(operation, mode, fuzz_client: TestClient, statuses: list[int]) -> None:
    from schemathesis import GenerationMode

    @settings(max_examples=25, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode), aim=st.booleans())
    def run(case, aim: bool) -> None:
        if aim:
            served_model(case, MODEL_NAME)
        kwargs = case.as_transport_kwargs()
        response = fuzz_client.request(kwargs["method"], case.formatted_path, headers=kwargs.get("headers"),
                                       json=kwargs.get("json"), params=kwargs.get("params"))
        statuses.append(response.status_code)
        assert response.status_code < 500, (operation.path, case.body, response.text[:300])
        case.validate_response(response, checks=conformance_checks(), headers=kwargs.get("headers"))

    try:
        run()
    except Unsatisfiable:
        assert mode == GenerationMode.NEGATIVE  # an operation without inputs has no invalid ones


class HeldBackend:
    """Answers one-token blocks once ``release`` is set; counts the prompts it holds."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.holding = 0

    async def stream(self, request: SampleRequest):
        self.holding += 1
        await self.release.wait()
        yield BlockUpdate(1, 1, (7,) * request.max_tokens, 1)

    async def ready(self) -> dict:
        return {}


def test_the_ingress_admits_whole_requests_up_to_its_limit_and_refuses_the_rest_before_parsing(parts):
    """max_in_flight 3: a 2-prompt request is held; another 2-prompt one would pass the limit
    and gets 503 with Retry-After (all or none, never half answered); a 1-prompt one fits; once
    full, even a body that is not JSON gets 503, not 400: it was refused before being read."""
    import httpx

    tokenizer, _, info, config = parts
    backend = HeldBackend()
    app = create_app(OpenAIServer(backend, tokenizer, info, config, max_in_flight=3))

    async def scenario() -> list:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            def completion(prompts: list[str]):
                return client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": prompts, "max_tokens": 2})

            async def until_holding(count: int) -> None:
                while backend.holding < count:
                    await asyncio.sleep(0.01)

            held = asyncio.create_task(completion(["the cat", "a dog"]))
            await until_holding(2)
            too_many = await completion(["one", "two"])
            fits = asyncio.create_task(completion(["the mat"]))
            await until_holding(3)
            not_read = await client.post("/v1/completions", content=b"{not json",
                                         headers={"Content-Type": "application/json"})
            backend.release.set()
            return [too_many, not_read, await held, await fits]

    too_many, not_read, held, fits = asyncio.run(scenario())
    for refused in (too_many, not_read):
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "overloaded"
    assert "2 more asked for" in too_many.json()["error"]["message"]
    assert held.status_code == 200 and len(held.json()["choices"]) == 2
    assert fits.status_code == 200 and backend.holding == 3
