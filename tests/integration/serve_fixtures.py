"""Helpers for the serving integration tests: a tiny checkpoint (random model + a tokenizer
trained on a few lines) and a free port on 127.0.0.1."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Callable

import requests
import torch

from llada_core import LLaDAMoEModelLM, preset, save_model
from pipelines.tokenizer import save_tokenizer, train_bpe

MODEL_NAME = "tiny-llada"
API_KEY_ENV = "LLADA_SERVE_TEST_API_KEY"
API_KEY = "sk-test-5e2a"
TEXTS = ["the cat sat on the mat", "a dog ran in the park", "one two three four five six seven",
         "she sells sea shells by the sea shore", "HUMAN ASSISTANT SYSTEM"] * 10


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def build_tiny_checkpoint(directory: Path) -> str:
    """A random tiny LLaDA-MoE with sharpened logits (distinct confidences, so batching bugs show)
    and the demo-style tokenizer, in the exported HF layout. The embedding is padded past the
    tokenizer's vocabulary, as real checkpoints are."""
    tokenizer = train_bpe(TEXTS, vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    config = preset("tiny", vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4, expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                    max_position_embeddings=256)
    model = LLaDAMoEModelLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)
    save_model(model, directory)
    save_tokenizer(tokenizer, str(directory))
    return str(directory)


def wait_until_ready(base_url: str, timeout_s: float = 60.0) -> None:
    wait_for_200(f"{base_url}/ready", timeout_s)


def wait_for_200(url: str, timeout_s: float, alive: Callable[[], None] = lambda: None) -> None:
    """Poll ``url`` until it answers 200; ``alive()`` raises when the server has died meanwhile."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer 200 within {timeout_s} s")
        time.sleep(0.2)
