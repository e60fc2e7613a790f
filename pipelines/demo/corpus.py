"""The built-in demo corpus: deterministic from a seed, no download.

Splits and where they are written (under the corpus URI):

| split | files | record |
|---|---|---|
| pretraining domains text, math, code | ``pretrain/{domain}/part-NNNNN.jsonl`` | ``{"id", "text"}`` |
| annealing subset (curated: no noisy text, worked examples) | ``anneal/anneal/part-NNNNN.jsonl`` | ``{"id", "text"}`` |
| SFT chats, single and multi-turn | ``sft/chat/part-NNNNN.jsonl`` | ``{"id", "messages"}`` |
| eval: exact-match generation, multiple choice, held-out text | ``eval/{task}.jsonl`` | see :mod:`pipelines.demo.eval_sets` |
| eval: lm-evaluation-harness tasks over the same held-out items | ``eval/lm_eval/{task}.yaml`` + ``.jsonl`` | see :func:`pipelines.demo.eval_sets.lm_eval_files` |
| description (spec, counts, files) written last | ``corpus.json`` | |

Evaluation uses only held-out keys (``demo_world.is_heldout``) and training only the others, so
no eval item (prompt + answer, or held-out text) occurs in any training document.
"""

from __future__ import annotations

import json
import random
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field

from pipelines.demo import world
from pipelines import storage
from pipelines.demo.eval_sets import DEMO_LM_EVAL_FOLDER, build_eval_sets, lm_eval_files

PRETRAIN_DOMAINS = ("text", "math", "code")
SYSTEM_PROMPT = "you are a helpful assistant."


class CorpusSpec(BaseModel):
    """Size and seed of the demo corpus. The defaults give roughly 0.6 M pretraining tokens with
    the demo tokenizer: enough for the tiny preset to show learning within a few CPU minutes."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    seed: int = 0
    num_text_docs: int = Field(4000, ge=1)
    num_math_docs: int = Field(3000, ge=1)
    num_code_docs: int = Field(2000, ge=1)
    num_anneal_docs: int = Field(1500, ge=1)
    num_sft_chats: int = Field(2000, ge=1)
    num_eval_items: int = Field(200, ge=1, description="items per eval task")
    sft_reading_fraction: float = Field(0.5, ge=0.0, le=1.0, description=(
        "share of chat turns that are reading questions (the held-out generation task the demo's "
        "SFT checkpoint is judged on); the rest split evenly over arithmetic, counting, code and "
        "sequences"))
    files_per_split: int = Field(4, ge=1)
    noisy_text_fraction: float = Field(0.15, ge=0.0, le=1.0)


def _train_item(rng: random.Random, draw: Callable[[random.Random], tuple]) -> tuple:
    """Draw until the item is a training item: neither its own key nor the arithmetic fact it
    uses is held out (about 1 in 10 draws is rejected per key)."""
    while True:
        item = draw(rng)
        keys = [item[0]]
        if len(item) > 2 and "arith" in item[2]:
            keys.append(item[2]["arith"])
        if not any(world.is_heldout(key) for key in keys):
            return item


def _train_equation(rng: random.Random) -> str:
    while True:
        op, a, b = world.draw_arithmetic(rng)
        if not world.is_heldout(world.arithmetic_key(op, a, b)):
            return world.equation(op, a, b)


def _train_sequence(rng: random.Random) -> tuple[int, int]:
    while True:
        key, start, step = world.draw_sequence(rng)
        if not world.is_heldout(key):
            return start, step


def text_document(rng: random.Random, noisy_fraction: float) -> str:
    if rng.random() < noisy_fraction:
        return " ".join(world.noisy_text(rng)[1] for _ in range(rng.randint(1, 3)))
    sentences = []
    for _ in range(rng.randint(2, 5)):
        if rng.random() < 0.4:
            sentences.append(_train_item(rng, world.counting_story)[1])
        else:
            sentences.append(_train_item(rng, rng.choice(world.TEXT_GENERATORS))[1])
    return " ".join(sentences)


def math_document(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(4, 10)):
        if rng.random() < 0.2:
            start, step = _train_sequence(rng)
            lines.append(world.sequence_line(start, step, rng.randint(5, 8)))
        else:
            lines.append(_train_equation(rng))
    return "\n".join(lines)


def code_document(rng: random.Random) -> str:
    return "\n".join(_train_item(rng, world.code_snippet)[1] for _ in range(rng.randint(1, 3)))


def anneal_document(rng: random.Random) -> str:
    """Curated mix: clean stories, a worked reading question, an equation block and a program,
    no noisy text."""
    story = _train_item(rng, world.counting_story)[1]
    scene = _train_item(rng, rng.choice(world.TEXT_GENERATORS))[1]
    reading = _train_item(rng, world.reading_question)[1]
    equations = "\n".join(_train_equation(rng) for _ in range(rng.randint(3, 6)))
    program = _train_item(rng, world.code_snippet)[1]
    return f"{story} {scene} {reading}\n{equations}\n{program}".rstrip("\n")


def _chat_turn(rng: random.Random, reading_fraction: float) -> tuple[str, str, str]:
    """One (kind, question, answer) exchange from the training keys."""
    if rng.random() < reading_fraction:
        parts = _train_item(rng, world.reading_question)[2]
        return "reading", f"{parts['passage']} {parts['question']}", parts["answer"]
    kind = rng.choice(("arith", "count", "code", "sequence"))
    if kind == "arith":
        while True:
            op, a, b = world.draw_arithmetic(rng)
            if not world.is_heldout(world.arithmetic_key(op, a, b)):
                return kind, f"what is {a}{op}{b}?", world.equation(op, a, b)
    if kind == "count":
        key, text, parts = _train_item(rng, world.counting_story)
        return kind, world.count_question(key, parts["prompt"]), text.split(" now ")[-1]
    if kind == "code":
        _, text, parts = _train_item(rng, world.code_snippet)
        return kind, f"what does this print?\n{parts['prompt'].split('# output:')[0].rstrip()}", parts["answer"]
    start, step = _train_sequence(rng)
    return (kind, f"continue the sequence: {world.sequence_line(start, step, 3)}",
            world.sequence_line(start + 3 * step, step, 3))


def chat_conversation(rng: random.Random, reading_fraction: float = 0.5) -> list[dict[str, str]]:
    """A single-turn chat, or (for 40% of arithmetic questions) a multi-turn one whose follow-ups
    build on the previous answer (``and plus 4?``). Short on purpose: an SFT batch is as long as
    its longest row (LLADA_SPEC section 4), so a few long chats would set the cost of most steps."""
    messages: list[dict[str, str]] = []
    if rng.random() < 0.2:
        messages.append({"role": "system", "content": SYSTEM_PROMPT})
    kind, question, answer = _chat_turn(rng, reading_fraction)
    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if kind != "arith" or rng.random() >= 0.4:
        return messages
    result = int(answer.rsplit("=", 1)[1])
    for _ in range(rng.randint(1, 2)):
        extra = rng.randint(1, 9)
        if result > world.ADD_MAX or world.is_heldout(world.arithmetic_key("+", result, extra)):
            break
        messages += [{"role": "user", "content": f"and plus {extra}?"},
                     {"role": "assistant", "content": world.equation("+", result, extra)}]
        result += extra
    return messages


def generate_split(spec: CorpusSpec, split: str) -> list[dict[str, Any]]:
    """The records of one split (``text``, ``math``, ``code``, ``anneal``, ``chat``)."""
    rng = random.Random(f"llada-demo:{spec.seed}:{split}")
    makers: dict[str, tuple[int, Callable[[], Any]]] = {
        "text": (spec.num_text_docs, lambda: text_document(rng, spec.noisy_text_fraction)),
        "math": (spec.num_math_docs, lambda: math_document(rng)),
        "code": (spec.num_code_docs, lambda: code_document(rng)),
        "anneal": (spec.num_anneal_docs, lambda: anneal_document(rng)),
        "chat": (spec.num_sft_chats, lambda: chat_conversation(rng, spec.sft_reading_fraction)),
    }
    if split not in makers:
        raise ValueError(f"split: unknown demo split {split!r}; choose one of {sorted(makers)}")
    count, make = makers[split]
    field = "messages" if split == "chat" else "text"
    return [{"id": f"{split}-{index:06d}", field: make()} for index in range(count)]


def _write_jsonl(uri: str, records: list[dict[str, Any]], s3: storage.S3Settings | None) -> None:
    storage.write_text(uri, "".join(json.dumps(record, sort_keys=True) + "\n" for record in records), s3)


def _write_lm_eval_files(uri: str, eval_sets: dict[str, list[dict[str, Any]]], s3: storage.S3Settings | None,
                         only_missing: bool = False) -> list[str]:
    """The demo's lm-eval task YAMLs and their JSONL files under ``eval/lm_eval/``."""
    folder = storage.join(uri, "eval", DEMO_LM_EVAL_FOLDER)
    local_folder = None if storage.is_remote(folder) else storage.parse_uri(folder).path
    written = []
    for name, text in lm_eval_files(eval_sets, local_folder).items():
        file_uri = storage.join(folder, name)
        if not (only_missing and storage.exists(file_uri, s3)):
            storage.write_text(file_uri, text, s3)
        written.append(file_uri)
    return written


def write_demo_corpus(uri: str, spec: CorpusSpec | None = None, s3: storage.S3Settings | None = None,
                      overwrite: bool = False) -> dict[str, Any]:
    """Generate the corpus into ``uri`` and return its description (also saved as corpus.json,
    written last). A corpus already there with the same spec is reused, not rewritten."""
    spec = spec or CorpusSpec()
    description_uri = storage.join(uri, "corpus.json")
    if storage.exists(description_uri, s3) and not overwrite:
        existing = storage.read_json(description_uri, s3)
        if existing.get("spec") == spec.model_dump():
            # A corpus written before the lm-eval tasks existed gets them (derived, deterministic).
            _write_lm_eval_files(uri, build_eval_sets(spec.seed, spec.num_eval_items), s3, only_missing=True)
            return {**existing, "reused": True}
        raise storage.StorageError(
            f"{uri} already holds a demo corpus with another spec; choose another output or overwrite it")
    files: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    for split, folder in [(d, f"pretrain/{d}") for d in PRETRAIN_DOMAINS] + [("anneal", "anneal/anneal"),
                                                                           ("chat", "sft/chat")]:
        records = generate_split(spec, split)
        counts[split] = len(records)
        parts = min(spec.files_per_split, len(records))
        files[split] = []
        for part in range(parts):
            part_uri = storage.join(uri, folder, f"part-{part:05d}.jsonl")
            _write_jsonl(part_uri, records[part::parts], s3)
            files[split].append(part_uri)
    eval_sets = build_eval_sets(spec.seed, spec.num_eval_items)
    for task, items in eval_sets.items():
        task_uri = storage.join(uri, "eval", f"{task}.jsonl")
        _write_jsonl(task_uri, items, s3)
        files[f"eval/{task}"] = [task_uri]
        counts[f"eval/{task}"] = len(items)
    files[f"eval/{DEMO_LM_EVAL_FOLDER}"] = _write_lm_eval_files(uri, eval_sets, s3)
    description = {"spec": spec.model_dump(), "counts": counts, "files": files,
                   "pretrain_sources": {d: storage.join(uri, f"pretrain/{d}/*.jsonl") for d in PRETRAIN_DOMAINS},
                   "anneal_sources": {"anneal": storage.join(uri, "anneal/anneal/*.jsonl")},
                   "sft_sources": {"chat": storage.join(uri, "sft/chat/*.jsonl")}}
    storage.write_json(description_uri, description, s3)
    return {**description, "reused": False}
