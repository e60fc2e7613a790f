"""Eval tasks: the suite's config, its data files, and how each task kind is scored.

Four kinds (DESIGN.md, "Selection by eval averages"):

| kind | item (one JSON object per line) | raw metric | normalised score in [0, 1] |
|---|---|---|---|
| ``generation`` | ``prompt``, ``answer``, optional ``stop``; for ``chat: true`` also ``messages``, ``chat_answer`` | exact match (fraction) | the same |
| ``choice`` | ``prompt``, ``choices``, ``answer_index`` | accuracy, lowest Monte Carlo ELBO wins | the same |
| ``elbo`` | ``text`` (or ``prompt`` + ``answer``) | bits per token of the ELBO bound (lower is better) | ``2 ** -bits_per_token`` |
| ``lm_eval`` | an lm-evaluation-harness task (its own data, or ``data_files``) | the task's metric named by ``metric`` | fractions as they are; perplexity ``1 / ppl``; bits per byte ``2 ** -bpb`` (:func:`lm_eval_score`) |

``2 ** -bits_per_token`` is the geometric mean, over the task's tokens, of the per-token
probability bound that the ELBO gives (LLADA_SPEC section 7): a model that puts all its mass on
the right tokens scores 1, a uniform model over V tokens scores 1/V. It keeps every task in
[0, 1] with higher = better, so the suite's average is a plain unweighted mean of task scores.

Exact match (:func:`normalise_answer`): the generated tokens are cut at the first EOS or
end-of-turn token, decoded (special tokens kept, ids past the tokenizer's vocabulary shown as
U+FFFD, so neither can pass as a right answer), cut at the first of the item's ``stop`` strings
(raw prompts only), and stripped of surrounding whitespace; the reference answer is stripped too.
The comparison is then exact: case, inner spaces and punctuation count.

The demo corpus (``pipelines.demo.eval_sets``) writes its held-out sets as
``<corpus>/eval/<task>.jsonl``; a task names one as ``source: "demo:<task>"``, resolved against
the corpus URI given at evaluation time. Any other source is a JSONL URI (path, file://, s3://).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Sequence, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from llada_core import choose, elbo_nll, generate, left_pad
from llada_core.options import SamplingOptions
from llada_core.tokens import format_chat
from pipelines import storage
from pipelines.demo.eval_sets import DEMO_LM_EVAL_FOLDER, EVAL_TASKS
from pipelines.tokenizer import SpecialTokenIds

DEMO_PREFIX = "demo:"
# The config kind each demo eval set fits, by its name's prefix.
_DEMO_KIND_BY_PREFIX = {"gen_": "generation", "choice_": "choice", "heldout_": "elbo"}
REPLACEMENT_CHAR = "\ufffd"
NUM_EXAMPLES = 3  # generation predictions kept in the score record, for reading


class EvalError(ValueError):
    """A user's eval input is unusable (a missing source, a malformed item); the message names it."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class _TaskBase(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                      description="unique within the suite; the key of this task's scores")
    max_items: int | None = Field(None, ge=1, description="use the first N items of the source (all when unset)")

    def paths(self) -> list[str]:
        """Every file or folder URI this task reads, as written (``demo:`` ones unresolved)."""
        return []

    def demo_paths(self) -> list[str]:
        """The ``demo:`` references this task reads (they need a demo corpus)."""
        return [path for path in self.paths() if path.startswith(DEMO_PREFIX)]


class _SourcedTask(_TaskBase):
    source: str = Field(min_length=1, description="a JSONL URI, or 'demo:<task>' for a demo corpus eval set")

    def paths(self) -> list[str]:
        return [self.source]

    @model_validator(mode="after")
    def _check_demo_source(self) -> "_SourcedTask":
        if not self.source.startswith(DEMO_PREFIX):
            return self
        demo_task = self.source[len(DEMO_PREFIX):]
        if demo_task not in EVAL_TASKS:
            raise ValueError(f"source: unknown demo eval set {demo_task!r}; choose one of {list(EVAL_TASKS)}")
        fits = next(kind for prefix, kind in _DEMO_KIND_BY_PREFIX.items() if demo_task.startswith(prefix))
        if fits != self.kind:  # type: ignore[attr-defined]
            raise ValueError(f"source: demo eval set {demo_task!r} holds {fits} items, "
                             f"not {self.kind!r} ones")  # type: ignore[attr-defined]
        return self


class GenerationTask(_SourcedTask):
    """Sample an answer for each prompt (llada_core.generate) and score it by exact match."""

    kind: Literal["generation"]
    sampling: SamplingOptions = Field(
        default_factory=SamplingOptions.fast,
        description="how to sample (llada_core.options.SamplingOptions); fields left out take the fast "
                    "options (FAST_OPTIONS) and steps = gen_length")
    chat: bool = Field(False, description="wrap each prompt in the chat template (item 'messages' when present, "
                                          "else the prompt as one user turn) and compare with 'chat_answer' when present")
    batch_size: int = Field(16, ge=1, description="prompts per generate() call (left-padded)")

    @field_validator("sampling", mode="before")
    @classmethod
    def _fast_by_default(cls, value: Any) -> Any:
        return SamplingOptions.fast(**value) if isinstance(value, dict) else value


class _MonteCarloTask(_SourcedTask):
    num_mc_samples: int = Field(ge=1, description="Monte Carlo samples of the ELBO per answer (paper: 128)")
    mc_batch_size: int | None = Field(None, ge=1, description="samples per forward; default num_mc_samples")

    @model_validator(mode="after")
    def _check_batches(self) -> "_MonteCarloTask":
        if self.num_mc_samples % self.samples_per_forward:
            raise ValueError(f"num_mc_samples: {self.num_mc_samples} must be a multiple of "
                             f"mc_batch_size={self.samples_per_forward}")
        return self

    @property
    def samples_per_forward(self) -> int:
        return self.mc_batch_size or self.num_mc_samples


class ChoiceTask(_MonteCarloTask):
    """Multiple choice: the choice with the lowest Monte Carlo ELBO (llada_core.choose) is the answer."""

    kind: Literal["choice"]


class ElboTask(_MonteCarloTask):
    """Held-out text: the Monte Carlo ELBO bound in bits per token."""

    kind: Literal["elbo"]


class LmEvalTask(_TaskBase):
    """A task of EleutherAI's lm-evaluation-harness, scored by our model's lm-eval adapter
    (jobs/evaluation/lm_eval_model.py) and normalised to [0, 1] (:func:`lm_eval_score`).

    Offline clusters: lm-eval reads a task's dataset from the Hugging Face hub or its cache
    (``HF_DATASETS_CACHE``); ``data_files`` points the task at files in storage instead.
    """

    kind: Literal["lm_eval"]
    task: str = Field(min_length=1, description="an lm-eval task or group name (`llada lm-eval ls tasks`); a group "
                                                "(mmlu, bbh) is scored by its aggregate metric")
    metric: str | None = Field(None, min_length=1,
                               description="the metric to average as lm-eval reports it, with its filter when that "
                                           "is not 'none': 'acc', 'acc_norm', 'exact_match,strict-match'; left out, "
                                           "the first metric the task reports")
    include_path: str | None = Field(None, description="a folder of task YAMLs (path, file:// or s3://), or "
                                                       "'demo:lm_eval' for the demo corpus's")
    data_files: dict[str, str] | None = Field(
        None, description="split -> data file (JSONL, JSON, CSV or Parquet URI, or 'demo:lm_eval/<file>'): the task "
                          "reads these instead of its dataset")
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples (the task's own default when unset)")
    chat: bool = Field(False, description="apply the chat template to the task's prompts")
    num_mc_samples: int = Field(32, ge=1, description="Monte Carlo samples of the ELBO per loglikelihood request")
    mc_batch_size: int | None = Field(None, ge=1, description="samples per draw; default num_mc_samples")
    gen_length: int | None = Field(None, ge=1, description="answer tokens of generate_until requests (default: the "
                                                           "task's max_gen_toks, rounded up to whole blocks)")
    block_length: int = Field(32, ge=1, description="sampler block length for generate_until")
    fast: bool = Field(True, description="the fast sampler options (threshold 0.9, dual cache, early stop); false "
                                         "runs the reference loop")
    batch_size: int = Field(16, ge=1, description="prompts per generate call")
    allow_code_execution: bool = Field(False, description="run the model's code to score it (humaneval, mbpp: "
                                                          "lm-eval's confirm_run_unsafe_code); only in a sandbox")

    def paths(self) -> list[str]:
        return ([self.include_path] if self.include_path else []) + list((self.data_files or {}).values())

    @model_validator(mode="after")
    def _check_lm_eval(self) -> "LmEvalTask":
        if self.num_mc_samples % (self.mc_batch_size or self.num_mc_samples):
            raise ValueError(f"num_mc_samples: {self.num_mc_samples} must be a multiple of "
                             f"mc_batch_size={self.mc_batch_size}")
        for path in self.demo_paths():
            if not path[len(DEMO_PREFIX):].startswith(DEMO_LM_EVAL_FOLDER):
                raise ValueError(f"{path!r}: the demo corpus's lm-eval files are under 'demo:{DEMO_LM_EVAL_FOLDER}'")
        for split, uri in (self.data_files or {}).items():
            if not split or not uri:
                raise ValueError(f"data_files: expected split -> file URI, got {split!r}: {uri!r}")
        return self


EvalTask = Annotated[Union[GenerationTask, ChoiceTask, ElboTask, LmEvalTask], Field(discriminator="kind")]


class EvalSuiteConfig(_Strict):
    """The eval suite run on every checkpoint; its average selects checkpoints."""

    tasks: list[EvalTask] = Field(min_length=1, description="scored in this order; the average weighs them equally")
    seed: int = Field(0, description="seeds every task's sampling and Monte Carlo draws (per task, by its name)")

    @model_validator(mode="after")
    def _check_names(self) -> "EvalSuiteConfig":
        first: dict[str, int] = {}
        for index, task in enumerate(self.tasks):
            if task.name in first:
                raise ValueError(f"tasks[{index}].name: {task.name!r} is already the name of tasks[{first[task.name]}]")
            first[task.name] = index
        return self


# --------------------------------------------------------------------------- sources and items


def resolve_source(source: str, corpus_uri: str | None) -> str:
    """``demo:<task>`` -> ``<corpus_uri>/eval/<task>.jsonl``; anything else is already a URI."""
    if not source.startswith(DEMO_PREFIX):
        return source
    return resolve_demo_path(source, corpus_uri) + ".jsonl"


def resolve_demo_path(path: str, corpus_uri: str | None) -> str:
    """``demo:<path>`` -> ``<corpus_uri>/eval/<path>``; anything else is already a URI."""
    if not path.startswith(DEMO_PREFIX):
        return path
    if not corpus_uri:
        raise EvalError(f"source {path!r}: a demo eval set needs the corpus URI (corpus_uri=...) it was written to")
    return storage.join(corpus_uri, "eval", path[len(DEMO_PREFIX):])


def task_sources(task: "GenerationTask | ChoiceTask | ElboTask | LmEvalTask", corpus_uri: str | None) -> Any:
    """What a task reads, resolved (JSON): its source URI, or an lm-eval task's name, include
    path and data files."""
    if isinstance(task, LmEvalTask):
        return {"lm_eval_task": task.task,
                "include_path": resolve_demo_path(task.include_path, corpus_uri) if task.include_path else None,
                "data_files": {split: resolve_demo_path(uri, corpus_uri)
                               for split, uri in sorted((task.data_files or {}).items())}}
    return resolve_source(task.source, corpus_uri)


def holds_task_yaml(folder_uri: str, s3: storage.S3Settings | None = None) -> bool:
    """Whether a folder (local or s3://) has an lm-eval task YAML in it."""
    return any(uri.endswith((".yaml", ".yml")) for uri in storage.list_files(folder_uri, s3))


def missing_paths(task: "GenerationTask | ChoiceTask | ElboTask | LmEvalTask",
                  s3: storage.S3Settings | None = None) -> list[str]:
    """The task's own (not ``demo:``) files that do not exist; an lm-eval include path must hold
    at least one task YAML."""
    missing = []
    for path in task.paths():
        if path.startswith(DEMO_PREFIX):
            continue
        if isinstance(task, LmEvalTask) and path == task.include_path:
            if not holds_task_yaml(path, s3):
                missing.append(f"{path} (no task YAML in it)")
        elif not storage.exists(path, s3):
            missing.append(path)
    return missing


@dataclass(frozen=True)
class GenerationItem:
    prompt: str  # the text fed to the model (chat-wrapped when the task says so)
    answer: str
    stops: tuple[str, ...]


@dataclass(frozen=True)
class ChoiceItem:
    prompt: str
    choices: tuple[str, ...]
    answer_index: int


@dataclass(frozen=True)
class ElboItem:
    prompt: str  # empty for plain held-out text
    answer: str


Item = Union[GenerationItem, ChoiceItem, ElboItem]


def load_items(task: GenerationTask | ChoiceTask | ElboTask, uri: str,
               s3: storage.S3Settings | None = None) -> list[Item]:
    """The first ``max_items`` items of a JSONL source, checked for the task's kind."""
    if not storage.exists(uri, s3):
        raise EvalError(f"task {task.name!r}: source {uri} does not exist")
    items: list[Item] = []
    for number, line in enumerate(storage.read_text(uri, s3).splitlines(), start=1):
        if task.max_items is not None and len(items) >= task.max_items:
            break
        if not line.strip():
            continue
        where = f"task {task.name!r}: {uri} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise EvalError(f"{where}: not JSON ({error})") from error
        if not isinstance(record, dict):
            raise EvalError(f"{where}: expected a JSON object")
        try:
            items.append(_parse_item(task, record))
        except EvalError as error:
            raise EvalError(f"{where}: {error}") from None
    if not items:
        raise EvalError(f"task {task.name!r}: source {uri} has no items")
    return items


def _text(record: dict[str, Any], field: str, allow_empty: bool = False) -> str:
    value = record.get(field)
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise EvalError(f"field {field!r}: expected a {'' if allow_empty else 'non-empty '}string, got {value!r}")
    return value


def _parse_item(task: GenerationTask | ChoiceTask | ElboTask, record: dict[str, Any]) -> Item:
    if isinstance(task, GenerationTask):
        return generation_item(record, task.chat)
    if isinstance(task, ChoiceTask):
        choices = record.get("choices")
        if not isinstance(choices, list) or len(choices) < 2:
            raise EvalError(f"field 'choices': expected a list of at least 2 strings, got {choices!r}")
        for index in range(len(choices)):
            _text({"choice": choices[index]}, "choice")
        answer_index = record.get("answer_index")
        if isinstance(answer_index, bool) or not isinstance(answer_index, int) or not 0 <= answer_index < len(choices):
            raise EvalError(f"field 'answer_index': expected an int in [0, {len(choices)}), got {answer_index!r}")
        return ChoiceItem(_text(record, "prompt", allow_empty=True), tuple(choices), answer_index)
    if "text" in record:
        return ElboItem("", _text(record, "text"))
    return ElboItem(_text(record, "prompt", allow_empty=True), _text(record, "answer"))


def generation_item(record: dict[str, Any], chat: bool) -> GenerationItem:
    """Raw: the prompt as is, the item's stop strings. Chat: the chat template around
    ``messages`` (or the prompt as one user turn), ``chat_answer`` when present, no stop strings
    (the reply ends at end-of-turn / EOS)."""
    if not chat:
        stops = record.get("stop", [])
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise EvalError(f"field 'stop': expected a list of non-empty strings, got {stops!r}")
        return GenerationItem(_text(record, "prompt"), _text(record, "answer"), tuple(stops))
    messages = record.get("messages")
    if messages is None:
        messages = [{"role": "user", "content": _text(record, "prompt")}]
    if not isinstance(messages, list) or not messages:
        raise EvalError(f"field 'messages': expected a non-empty list of chat messages, got {messages!r}")
    try:
        prompt = format_chat(messages)
    except (ValueError, AttributeError) as error:
        raise EvalError(f"field 'messages': {error}") from None
    answer = _text(record, "chat_answer" if "chat_answer" in record else "answer")
    return GenerationItem(prompt, answer, ())


def task_seed(suite_seed: int, task_name: str) -> int:
    """The seed of one task's generator: from the suite seed and the task's name, so a task's
    numbers do not depend on which other tasks the suite has."""
    digest = hashlib.sha256(f"{suite_seed}:{task_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


# --------------------------------------------------------------------------- normalisation


def normalise_answer(text: str, stops: Sequence[str] = ()) -> str:
    """Cut ``text`` at the earliest of the stop strings, then strip surrounding whitespace."""
    cut = min((index for index in (text.find(stop) for stop in stops) if index >= 0), default=len(text))
    return text[:cut].strip()


def is_exact_match(prediction: str, answer: str, stops: Sequence[str] = ()) -> bool:
    return normalise_answer(prediction, stops) == answer.strip()


def normalised_score(metric: str, value: float) -> float:
    """A raw task metric -> [0, 1], higher = better (module docstring)."""
    if metric in ("exact_match", "accuracy"):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{metric}: {value} is not a fraction in [0, 1]")
        return float(value)
    if metric == "bits_per_token":
        if not value >= 0.0:  # NaN fails too
            raise ValueError(f"bits_per_token: {value} must be >= 0")
        return 2.0 ** -value
    raise ValueError(f"metric: unknown metric {metric!r}")


PERPLEXITY_METRICS = ("perplexity", "word_perplexity", "byte_perplexity")


def lm_eval_score(metric: str, value: float, higher_is_better: bool | None) -> float:
    """An lm-eval metric -> [0, 1], higher = better: perplexities become 1 / perplexity (the
    geometric-mean probability, as ``elbo`` tasks are scored), ``bits_per_byte`` 2 ** -bits, and
    every other metric must already be a fraction where higher is better (accuracy, exact
    match, pass@1, F1)."""
    if not math.isfinite(value):
        raise EvalError(f"metric {metric!r}: lm-eval reported {value}")
    if metric in PERPLEXITY_METRICS:
        if value < 1.0:
            raise EvalError(f"metric {metric!r}: a perplexity of {value} is below 1")
        return 1.0 / value
    if metric == "bits_per_byte":
        return normalised_score("bits_per_token", value)
    if higher_is_better is False:
        raise EvalError(f"metric {metric!r}: lower is better and it is not a perplexity or bits_per_byte, so it "
                        "has no [0, 1] score; average another of the task's metrics")
    if not 0.0 <= value <= 1.0:
        raise EvalError(f"metric {metric!r}: {value} is not a fraction in [0, 1]; average another of the task's "
                        "metrics")
    return value


def average_score(scores: Sequence[float]) -> float:
    """The suite's average: the unweighted mean of the normalised task scores."""
    if not scores:
        raise ValueError("scores: no task scores to average")
    return math.fsum(scores) / len(scores)


# --------------------------------------------------------------------------- scoring


def decode_answer(tokenizer: Any, answer_ids: Sequence[int], stop_ids: Sequence[int]) -> str:
    """Answer ids -> text: cut at the first stop id (EOS, end-of-turn); special tokens are kept
    and ids outside the tokenizer become U+FFFD, so neither can pass as a right answer."""
    ids = list(answer_ids)
    cut = min((ids.index(stop) for stop in stop_ids if stop in ids), default=len(ids))
    pieces, run = [], []
    for token_id in ids[:cut]:
        if 0 <= token_id < len(tokenizer):
            run.append(token_id)
            continue
        pieces.append(tokenizer.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False))
        pieces.append(REPLACEMENT_CHAR)
        run = []
    pieces.append(tokenizer.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False))
    return "".join(pieces)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def split_context(prompt: str, continuation: str) -> tuple[str, str]:
    """Move the prompt's trailing whitespace onto the continuation (``"uma goes "``, ``"to"`` ->
    ``"uma goes"``, ``" to"``): byte-level BPE attaches a space to the word after it, so this is
    how the joined text is tokenised in training."""
    stripped = prompt.rstrip()
    return stripped, prompt[len(stripped):] + continuation


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def score_generation(model: nn.Module, tokenizer: Any, special: SpecialTokenIds, task: GenerationTask,
                     items: Sequence[GenerationItem], generator: torch.Generator) -> dict[str, Any]:
    """Exact match over ``items``, ``task.batch_size`` prompts per left-padded generate() call."""
    device, num_correct, examples = _device_of(model), 0, []
    for start in range(0, len(items), task.batch_size):
        batch = items[start:start + task.batch_size]
        prompt_BP, mask_BP = left_pad([_encode(tokenizer, item.prompt) for item in batch], special.pad, device)
        width = prompt_BP.shape[1]
        out_BL = generate(model, prompt_BP, attention_mask=mask_BP, options=task.sampling, mask_id=special.mask,
                          eos_id=special.eos, eot_id=special.role_end, generator=generator)
        for item, answer_ids in zip(batch, out_BL[:, width:].tolist()):
            prediction = decode_answer(tokenizer, answer_ids, (special.eos, special.role_end))
            correct = is_exact_match(prediction, item.answer, item.stops)
            num_correct += correct
            if len(examples) < NUM_EXAMPLES:
                examples.append({"prompt": item.prompt, "prediction": normalise_answer(prediction, item.stops),
                                 "answer": item.answer.strip(), "correct": correct})
    value = num_correct / len(items)
    return {"metric": "exact_match", "value": value, "score": normalised_score("exact_match", value),
            "num_items": len(items), "num_correct": num_correct, "examples": examples}


@torch.inference_mode()
def score_choice(model: nn.Module, tokenizer: Any, special: SpecialTokenIds, task: ChoiceTask,
                 items: Sequence[ChoiceItem], generator: torch.Generator) -> dict[str, Any]:
    """Accuracy: an item is right when its answer has the lowest Monte Carlo ELBO (choose)."""
    num_correct = 0
    for item in items:
        contexts = [split_context(item.prompt, choice) for choice in item.choices]
        prompt_ids = _encode(tokenizer, contexts[0][0])
        choices_ids = [_encode(tokenizer, continuation) for _, continuation in contexts]
        picked = choose(model, prompt_ids, choices_ids, num_samples=task.num_mc_samples,
                        batch_size=task.samples_per_forward, mask_id=special.mask, generator=generator)
        num_correct += picked == item.answer_index
    value = num_correct / len(items)
    return {"metric": "accuracy", "value": value, "score": normalised_score("accuracy", value),
            "num_items": len(items), "num_correct": num_correct}


@torch.inference_mode()
def score_elbo(model: nn.Module, tokenizer: Any, special: SpecialTokenIds, task: ElboTask,
               items: Sequence[ElboItem], generator: torch.Generator) -> dict[str, Any]:
    """Bits per token: the summed ELBO bounds (nats) over the summed answer tokens, / ln 2."""
    total_nats, num_tokens = 0.0, 0
    for item in items:
        prompt, answer = split_context(item.prompt, item.answer)
        answer_ids = _encode(tokenizer, answer)
        total_nats += elbo_nll(model, _encode(tokenizer, prompt), answer_ids, num_samples=task.num_mc_samples,
                               batch_size=task.samples_per_forward, mask_id=special.mask, generator=generator)
        num_tokens += len(answer_ids)
    value = total_nats / num_tokens / math.log(2)
    return {"metric": "bits_per_token", "value": value, "score": normalised_score("bits_per_token", value),
            "num_items": len(items), "num_tokens": num_tokens, "nats": total_nats}


# The lm_eval kind is scored by jobs/evaluation/lm_eval_tasks.py (the runner imports it only for
# suites that have one, so lm-eval loads only when used).
SCORERS = {"generation": score_generation, "choice": score_choice, "elbo": score_elbo}
