"""Every committed token reaches the client. Answers that ended inside a block were lost when an
early stop made generate() name only the last block; random test models never stop mid-block, so
nothing noticed. Here a tiny model trained to answer and stop (tests/answering_model.py) is
sampled with 1 to 8 blocks and with each fast option, and what generate() hands to ``on_block``,
what the batch runner streams and the text of the API's answers (completions and chat, JSON and
SSE) must all equal generate()'s own output for the same request.

Legend: B batch, P prompt width, G gen_length, K block_length.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from answering_model import QUESTIONS, chat_prompt
from starlette.testclient import TestClient

from llada_core import generate, load_model
from pipelines.tokenizer import load_tokenizer, special_token_ids
from serve.api import OpenAIServer, create_app
from serve.batching import ContinuousBatcher, SampleRequest
from serve.config import ServeConfig
from serve.validation import ModelInfo

MODEL_NAME = "answering-llada"
GEN_LENGTH = 32
BLOCK_LENGTHS = (32, 16, 8, 4)  # 1, 2, 4 and 8 blocks
FAST_OPTIONS = {
    "reference": {},
    "threshold": {"threshold": 0.9},
    "prefix-cache": {"cache": "prefix"},
    "dual-cache": {"cache": "dual"},
    "early-stop": {"early_stop": True},
    "all-fast": {"threshold": 0.9, "cache": "dual", "early_stop": True},
}
SAMPLERS = [pytest.param(k, name, id=f"K{k}-{name}") for k in BLOCK_LENGTHS for name in FAST_OPTIONS]
# One request per question is slow on 2 cores; these three end in block 0, 1 and 3 at K 8 (5, 15
# and 25 tokens with the end of turn). The batched completions test asks all six questions.
CHAT_QUESTIONS = ("who sells shells?", "count to five.", "what does the dog do?")


class InProcessBackend:
    """The sampler in this process, through the same continuous batcher a replica uses."""

    def __init__(self, model) -> None:  # type: ignore[no-untyped-def]
        self.batcher = ContinuousBatcher(model, max_batch_size=8)

    def stream(self, request: SampleRequest):  # type: ignore[no-untyped-def]
        return self.batcher.stream(request)

    async def ready(self) -> dict:
        return {"device": "cpu"}


@pytest.fixture(scope="module")
def answering(answering_checkpoint):  # type: ignore[no-untyped-def]
    model = load_model(answering_checkpoint, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(answering_checkpoint)
    return model, tokenizer, special_token_ids(tokenizer)


@pytest.fixture(scope="module")
def client(answering) -> TestClient:  # type: ignore[no-untyped-def]
    model, tokenizer, ids = answering
    info = ModelInfo(vocab_size=model.config.vocab_size, max_position_embeddings=model.config.max_position_embeddings,
                     mask_id=ids.mask, eos_id=ids.eos, eot_id=ids.role_end)
    # No fast option in the config: each request asks for its own (an early_stop request on a
    # server without it lost its answer too).
    config = ServeConfig.model_validate({"model_name": MODEL_NAME, "limits": {"max_tokens": 64}, "sampling": {
        "max_tokens": GEN_LENGTH, "block_length": 16, "threshold": None, "cache": None, "early_stop": False}})
    return TestClient(create_app(OpenAIServer(InProcessBackend(model), tokenizer, info, config)))


def prompt_ids(tokenizer, question: str) -> list[int]:  # type: ignore[no-untyped-def]
    return tokenizer.encode(chat_prompt(question), add_special_tokens=False)


def sample(model, ids, prompts: list[list[int]], block_length: int, fast: dict, gen_length: int = GEN_LENGTH,
           on_block=None) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """generate() on LEFT-padded prompts, steps = gen_length -> each row's answer ids."""
    width = max(len(p) for p in prompts)
    prompt_BP = torch.tensor([[ids.eos] * (width - len(p)) + p for p in prompts])
    mask_BP = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    padded = any(len(p) < width for p in prompts)
    out_BL = generate(model, prompt_BP, attention_mask=mask_BP if padded else None, steps=gen_length,
                      gen_length=gen_length, block_length=block_length, eot_id=ids.role_end, on_block=on_block,
                      **fast)
    return out_BL[:, width:].tolist()


class References:
    """generate()'s answer for one question alone, per sampler setting (computed once)."""

    def __init__(self, answering) -> None:  # type: ignore[no-untyped-def]
        self.model, self.tokenizer, self.ids = answering
        self._answers: dict[tuple, tuple[int, ...]] = {}

    def answer(self, question: str, block_length: int, fast_name: str, max_tokens: int) -> tuple[int, ...]:
        key = (question, block_length, fast_name, max_tokens)
        if key not in self._answers:
            gen_length = math.ceil(max_tokens / block_length) * block_length
            [answer] = sample(self.model, self.ids, [prompt_ids(self.tokenizer, question)], block_length,
                              FAST_OPTIONS[fast_name], gen_length)
            self._answers[key] = tuple(answer)
        return self._answers[key]


@pytest.fixture(scope="module")
def references(answering) -> References:  # type: ignore[no-untyped-def]
    return References(answering)


def expected_text(tokenizer, ids, answer: tuple[int, ...], max_tokens: int,
                  stops: tuple[str, ...] = ()) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    """What the API documents: the answer cut at max_tokens, at the first EOS or end of turn, and
    at the first stop string -> (text, finish_reason). Written out here, not taken from serve/."""
    kept = list(answer[:max_tokens])
    stop_at = next((i for i, t in enumerate(kept) if t in (ids.eos, ids.role_end)), None)
    text = tokenizer.decode(kept if stop_at is None else kept[:stop_at], skip_special_tokens=True)
    hits = [text.find(s) for s in stops if s in text]
    if hits:
        return text[:min(hits)], "stop"
    return text, "length" if stop_at is None else "stop"


def sse_choices(client: TestClient, path: str, body: dict) -> dict[int, tuple[str, str | None]]:
    """Streamed text and finish_reason per choice index."""
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    choices: dict[int, tuple[str, str | None]] = {}
    for line in lines[:-1]:
        for choice in json.loads(line[len("data: "):])["choices"]:
            text, _ = choices.get(choice["index"], ("", None))
            piece = choice["delta"].get("content") if "delta" in choice else choice["text"]
            choices[choice["index"]] = (text + (piece or ""), choice["finish_reason"])
    return choices


def test_the_model_answers_and_stops_inside_blocks_and_after_block_boundaries(answering):
    """The fixture does what the other tests need: right answers that end mid-block, some of them
    after a block boundary, and an early stop that leaves blocks uncomputed."""
    model, tokenizer, ids = answering
    prompts = [prompt_ids(tokenizer, q) for q in QUESTIONS]
    answers = sample(model, ids, prompts, block_length=4, fast={})
    texts = [expected_text(tokenizer, ids, tuple(a), GEN_LENGTH)[0] for a in answers]
    assert sum(t == a for t, a in zip(texts, QUESTIONS.values())) >= 5, texts
    ends = [a.index(ids.role_end) for a in answers if ids.role_end in a]
    assert any(end % 4 != 3 for end in ends), "no answer ends inside a block"
    assert any(end >= 4 for end in ends), "no answer crosses a block boundary"

    calls = []
    short = prompt_ids(tokenizer, "who sells shells?")
    [answer] = sample(model, ids, [short], block_length=16, fast={"early_stop": True}, on_block=calls.append)
    assert expected_text(tokenizer, ids, tuple(answer), GEN_LENGTH)[0] == "she does."
    assert [c.blocks for c in calls] == [range(0, 2)], "the answer ends in block 0: one call hands out both"


@pytest.mark.parametrize("block_length,fast_name", SAMPLERS)
def test_on_block_hands_out_every_answer_token_once_in_order(answering, block_length, fast_name):
    model, tokenizer, ids = answering
    calls = []
    prompts = [prompt_ids(tokenizer, q) for q in QUESTIONS]
    answers = sample(model, ids, prompts, block_length, FAST_OPTIONS[fast_name], on_block=calls.append)
    num_blocks = GEN_LENGTH // block_length
    assert calls[0].blocks.start == 0 and calls[-1].blocks.stop == num_blocks
    assert all(a.blocks.stop == b.blocks.start for a, b in zip(calls, calls[1:])), "a gap or an overlap"
    assert [c.final for c in calls] == [False] * (len(calls) - 1) + [True]
    assert all(c.answer_start == c.blocks.start * block_length for c in calls)
    assert torch.cat([c.tokens_BT for c in calls], dim=1).tolist() == answers


@pytest.mark.parametrize("block_length,fast_name", SAMPLERS)
def test_chat_answers_json_and_streamed_equal_generate(answering, client, references, block_length, fast_name):
    _, tokenizer, ids = answering
    for question in CHAT_QUESTIONS:
        expected = expected_text(tokenizer, ids, references.answer(question, block_length, fast_name, GEN_LENGTH),
                                 GEN_LENGTH)
        body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": question}],
                "max_tokens": GEN_LENGTH, "block_length": block_length, **FAST_OPTIONS[fast_name]}
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        [choice] = response.json()["choices"]
        assert (choice["message"]["content"], choice["finish_reason"]) == expected, question
        assert sse_choices(client, "/v1/chat/completions", body) == {0: expected}, question


@pytest.mark.parametrize("block_length,fast_name", SAMPLERS)
def test_completions_of_several_prompts_json_and_streamed_equal_generate(answering, client, references,
                                                                          block_length, fast_name):
    _, tokenizer, ids = answering
    expected = {i: expected_text(tokenizer, ids, references.answer(q, block_length, fast_name, GEN_LENGTH), GEN_LENGTH)
                for i, q in enumerate(QUESTIONS)}
    body = {"model": MODEL_NAME, "prompt": [chat_prompt(q) for q in QUESTIONS], "max_tokens": GEN_LENGTH,
            "block_length": block_length, **FAST_OPTIONS[fast_name]}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert {c["index"]: (c["text"], c["finish_reason"]) for c in response.json()["choices"]} == expected
    assert sse_choices(client, "/v1/completions", body) == expected


@pytest.mark.parametrize("fast_name", ["reference", "all-fast"])
@pytest.mark.parametrize("max_tokens,stops", [(13, ()), (GEN_LENGTH, ("barn", "three", "ll"))])
def test_answers_cut_at_max_tokens_and_stop_strings_equal_generate(answering, client, references, fast_name,
                                                                    max_tokens, stops):
    """max_tokens inside a block (13 of 16 generated) and stop strings, which end an answer
    before its EOS, JSON and streamed."""
    _, tokenizer, ids = answering
    for question in CHAT_QUESTIONS:
        answer = references.answer(question, 4, fast_name, max_tokens)
        expected = expected_text(tokenizer, ids, answer, max_tokens, stops)
        body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
                "block_length": 4, "stop": list(stops) or None, **FAST_OPTIONS[fast_name]}
        [choice] = client.post("/v1/chat/completions", json=body).json()["choices"]
        assert (choice["message"]["content"], choice["finish_reason"]) == expected, question
        assert sse_choices(client, "/v1/chat/completions", body) == {0: expected}, question
