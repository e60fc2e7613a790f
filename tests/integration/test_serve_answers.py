"""Answers that end mid-block reach the client through Ray Serve: the shipped laptop serve config
(threshold, dual cache and early stop on) in front of a tiny model trained to answer and stop
(tests/answering_model.py), asked over HTTP with the official openai client, plain and streamed,
chat and completions. Every text must equal what generate() gives for the same request, and the
model's answers must come back (they were empty when an early stop lost the answer's block).

The only changes to serve/configs/laptop.yaml: a free port, and 32 answer tokens in blocks of 16
in place of 64 in blocks of 32 (the trained model knows 32 answer positions); the shape is the
same: every answer ends inside the first of two blocks.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from answering_model import QUESTIONS, chat_prompt
from serve_fixtures import free_port, wait_until_ready

pytestmark = pytest.mark.integration

LAPTOP_CONFIG = Path(__file__).resolve().parents[2] / "serve" / "configs" / "laptop.yaml"
MODEL_NAME = "llada-moe"


@pytest.fixture(scope="module")
def served(ray_cluster, answering_checkpoint):  # type: ignore[no-untyped-def]
    from ray import serve

    from serve.app import run
    from serve.config import AppArgs, load_serve_config

    port = free_port()
    config = load_serve_config(str(LAPTOP_CONFIG), {"port": port})
    assert (config.sampling.threshold, config.sampling.cache, config.sampling.early_stop) == (0.9, "dual", True)
    config = config.model_copy(update={
        "sampling": config.sampling.model_copy(update={"max_tokens": 32, "block_length": 16}),
        "replica": config.replica.model_copy(update={"num_cpus": 0.5, "torch_threads": 1}),
        "ingress": config.ingress.model_copy(update={"num_cpus": 0.1})})
    try:
        run(AppArgs(checkpoint=answering_checkpoint, config=config))
        base_url = f"http://127.0.0.1:{port}"
        wait_until_ready(base_url)
        yield {"base_url": base_url, "config": config, "checkpoint": answering_checkpoint}
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def local(answering_checkpoint):  # type: ignore[no-untyped-def]
    from llada_core import load_model
    from pipelines.tokenizer import load_tokenizer, special_token_ids

    tokenizer = load_tokenizer(answering_checkpoint)
    return load_model(answering_checkpoint, dtype=torch.float32).eval(), tokenizer, special_token_ids(tokenizer)


def generate_text(local, question: str, max_tokens: int, block_length: int, fast: dict) -> str:  # type: ignore[no-untyped-def]
    """generate() alone on the question, cut at max_tokens and at the first EOS / end of turn."""
    from llada_core import generate

    model, tokenizer, ids = local
    prompt = torch.tensor([tokenizer.encode(chat_prompt(question), add_special_tokens=False)])
    gen_length = math.ceil(max_tokens / block_length) * block_length
    out = generate(model, prompt, steps=gen_length, gen_length=gen_length, block_length=block_length,
                   eot_id=ids.role_end, **fast)
    answer = out[0, prompt.shape[1]:prompt.shape[1] + max_tokens].tolist()
    stop = next((i for i, t in enumerate(answer) if t in (ids.eos, ids.role_end)), len(answer))
    return tokenizer.decode(answer[:stop], skip_special_tokens=True)


def openai_client(served):  # type: ignore[no-untyped-def]
    from openai import OpenAI

    return OpenAI(base_url=f"{served['base_url']}/v1", api_key="unused", max_retries=0, timeout=60)


def test_chat_answers_at_the_laptop_defaults_arrive_whole_plain_and_streamed(served, local):
    client, sampling = openai_client(served), served["config"].sampling
    fast = {"threshold": sampling.threshold, "cache": sampling.cache, "early_stop": sampling.early_stop}
    right = 0
    for question, answer in QUESTIONS.items():
        expected = generate_text(local, question, sampling.max_tokens, sampling.block_length, fast)
        messages = [{"role": "user", "content": question}]
        plain = client.chat.completions.create(model=MODEL_NAME, messages=messages)  # the config's defaults
        assert plain.choices[0].message.content == expected and plain.choices[0].finish_reason == "stop"
        chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=messages, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
        right += expected == answer
    assert right >= 5, "the trained model's answers must come back"


@pytest.mark.parametrize("block_length", [4, 8, 32])
def test_completions_of_every_question_with_1_to_8_blocks_plain_and_streamed(served, local, block_length):
    client, sampling = openai_client(served), served["config"].sampling
    fast = {"threshold": sampling.threshold, "cache": sampling.cache, "early_stop": sampling.early_stop}
    prompts = [chat_prompt(q) for q in QUESTIONS]
    expected = [generate_text(local, q, 32, block_length, fast) for q in QUESTIONS]
    extra = {"block_length": block_length}
    plain = client.completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=32, extra_body=extra)
    assert [c.text for c in sorted(plain.choices, key=lambda c: c.index)] == expected
    streamed = [""] * len(prompts)
    for chunk in client.completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=32, stream=True,
                                           extra_body=extra):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == expected
