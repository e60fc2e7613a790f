"""The rehearsal's stand-ins (`llada rehearse`, llada/rehearse.py): what takes the place of a
recipe's input that cannot be reached from where the rehearsal runs, in the same format.

- A data source: synthetic documents of its domain and kind (the demo corpus's generators: chats
  for SFT, math, code or curated text by the domain's name, else plain text) in its file format
  (parquet, JSON lines or text) and record field.
- The tokenizer: a byte-level BPE fitted on the stand-in text (the demo's, ``train_bpe``).
- An eval task's data: items of the task's kind from the demo's held-out sets; an lm-eval task
  whose data would come from the Hugging Face hub becomes a local lm-eval task (YAML and JSON
  lines) scored the same way: multiple choice, generation or rolling likelihood.

Each stand-in is planned first (:class:`StandIn`, nothing written) and written by the rehearsal
before it runs, once: a resumed rehearsal keeps what it wrote.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass, field
from typing import Any, Callable

from pipelines import storage

STANDIN_DOCUMENTS = 400  # per stand-in data source
STANDIN_VOCAB = 1024
EVAL_ITEMS = 4  # items per eval task
MC_SAMPLES = 2  # Monte Carlo samples of the ELBO per answer
GEN_TOKENS = 16  # answer tokens of generation tasks


@dataclass
class StandIn:
    """One input the rehearsal writes because the recipe's own is unreachable."""

    what: str  # "data.sources.0 (text)", "data.tokenizer_uri", "eval.tasks.mmlu"
    original: str
    uri: str
    description: str
    write: Callable[[storage.S3Settings | None], None] = field(repr=False, compare=False)
    written_uri: str = ""  # a file that exists once written (a resumed rehearsal keeps what it wrote)


def reachable(uri: str, s3: storage.S3Settings | None) -> bool:
    try:
        return bool(storage.list_files(uri, s3))
    except (storage.StorageError, OSError):
        return False


def data_stand_ins(recipe: Any, data: dict[str, Any], standin_uri: str, stand_ins: list[StandIn],
                   s3: storage.S3Settings | None) -> dict[str, int]:
    """Stand in for each unreachable source and the tokenizer in ``data`` (a recipe's data block
    as a dict, changed in place); returns the model's vocab_size and special ids for the
    tokenizer the rehearsal will use."""
    sources = []
    texts: list[str] = []
    for index, source in enumerate(recipe.data.sources):
        entry = source.model_dump(mode="json", exclude_none=True)
        if not reachable(source.uri, s3):
            stand_in = _data_stand_in(index, source, standin_uri, texts)
            stand_ins.append(stand_in)
            entry["uri"] = stand_in.uri
        sources.append(entry)
    data["sources"] = sources
    tokenizer_uri = recipe.data.tokenizer_uri
    assert tokenizer_uri is not None  # DataSpec requires it with your own sources
    if reachable(tokenizer_uri, s3):
        from pipelines.tokenizer import load_tokenizer, special_token_ids

        tokenizer = load_tokenizer(tokenizer_uri, s3)
        ids = special_token_ids(tokenizer)
        return {"vocab_size": len(tokenizer), "mask_token_id": ids.mask, "eos_token_id": ids.eos,
                "pad_token_id": ids.pad}
    from llada_core import tokens

    uri = storage.join(standin_uri, "tokenizer")
    if not texts:  # every source is reachable but the tokenizer is not: fit it on stand-in text
        texts.extend(_documents("text", "pretrain", random.Random("llada-rehearsal:tokenizer")))

    def write(s3_: storage.S3Settings | None) -> None:
        from pipelines.tokenizer import save_tokenizer, train_bpe

        save_tokenizer(train_bpe(texts, vocab_size=STANDIN_VOCAB), uri, s3_)

    stand_ins.append(StandIn("data.tokenizer_uri", tokenizer_uri, uri,
                             f"a byte-level BPE of at most {STANDIN_VOCAB} tokens fitted on the stand-in text", write,
                             storage.join(uri, "tokenizer.json")))
    data["tokenizer_uri"] = uri
    data["vocab_size"] = STANDIN_VOCAB
    special = list(tokens.SPECIAL_TOKENS)  # train_bpe puts them first, in this order
    return {"vocab_size": STANDIN_VOCAB, "mask_token_id": special.index(tokens.MASK_TOKEN),
            "eos_token_id": special.index(tokens.EOS_TOKEN), "pad_token_id": special.index(tokens.EOS_TOKEN)}


def _documents(domain: str, kind: str, rng: random.Random) -> list[Any]:
    """Synthetic documents for a domain, from the demo corpus's generators: chats for SFT, and
    for pretraining the generator whose name the domain suggests (math, code, anneal / curated /
    high-quality), else plain text."""
    from pipelines.demo import corpus

    if kind == "sft":
        return [corpus.chat_conversation(rng) for _ in range(STANDIN_DOCUMENTS)]
    name = domain.lower()
    if "math" in name:
        make = lambda: corpus.math_document(rng)  # noqa: E731
    elif "code" in name:
        make = lambda: corpus.code_document(rng)  # noqa: E731
    elif any(word in name for word in ("anneal", "quality", "curated")):
        make = lambda: corpus.anneal_document(rng)  # noqa: E731
    else:
        make = lambda: corpus.text_document(rng, 0.1)  # noqa: E731
    return [make() for _ in range(STANDIN_DOCUMENTS)]


def _data_stand_in(index: int, source: Any, standin_uri: str, texts: list[str]) -> StandIn:
    from pipelines.sources import file_format

    fmt = _format_of(source.uri, file_format)
    extension = {"parquet": ".parquet", "jsonl": ".jsonl", "text": ".txt"}[fmt]
    if source.kind == "sft" and fmt == "text":
        extension = ".jsonl"  # chats need records
    folder = storage.join(standin_uri, "data", f"{index:02d}-{source.domain}")
    documents = _documents(source.domain, source.kind, random.Random(f"llada-rehearsal:{index}:{source.domain}"))
    for document in documents:
        if isinstance(document, list):
            texts.extend(message["content"] for message in document)
        else:
            texts.append(document)
    field_name = source.record_field
    file_uri = storage.join(folder, f"part-00000{extension}")

    def write(s3: storage.S3Settings | None) -> None:
        storage.write_bytes(file_uri, _encode(documents, field_name, extension), s3)

    what = "chats" if source.kind == "sft" else f"{source.domain} documents"
    return StandIn(f"data.sources.{index} ({source.domain})", source.uri, storage.join(folder, f"*{extension}"),
                   f"{len(documents)} synthetic {what} ({extension[1:]}, field {field_name!r})", write, file_uri)


def _format_of(uri: str, file_format: Callable[[str], str]) -> str:
    """The format a source's files have, from its URI (a folder without extension: JSON lines)."""
    try:
        return file_format(uri)
    except ValueError:
        return "jsonl"


def _encode(documents: list[Any], field_name: str, extension: str) -> bytes:
    if extension == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        buffer = io.BytesIO()
        table = pa.table({"id": [f"standin-{i:06d}" for i in range(len(documents))], field_name: documents})
        pq.write_table(table, buffer)
        return buffer.getvalue()
    if extension == ".txt":
        return "\n\n".join(documents).encode()
    return "".join(json.dumps({"id": f"standin-{i:06d}", field_name: document}) + "\n"
                   for i, document in enumerate(documents)).encode()


# lm-eval metrics scored by generation, and by rolling likelihood (everything else: by choice)
_GENERATION_METRICS = ("exact_match", "pass@", "pass_at", "bleu", "rouge", "f1", "em")
_ROLLING_METRICS = ("perplexity", "bits_per_byte")


def lm_eval_output_type(task: Any) -> str:
    """How an lm-eval task is scored, from the recipe's own entry: generation when it sets
    gen_length or names a generation metric, rolling likelihood for perplexities and bits per
    byte, else multiple choice."""
    metric = (task.metric or "").split(",")[0].lower()
    if any(metric.startswith(name) for name in _ROLLING_METRICS) or "perplexity" in metric:
        return "loglikelihood_rolling"
    if task.gen_length is not None or any(metric.startswith(name) for name in _GENERATION_METRICS):
        return "generate_until"
    return "multiple_choice"


def _task_reachable(task: Any, s3: storage.S3Settings | None) -> bool:
    from jobs.evaluation.tasks import LmEvalTask, missing_paths

    if isinstance(task, LmEvalTask) and not task.data_files:
        return False  # its data would come from the Hugging Face hub: never downloaded here
    try:
        return not missing_paths(task, s3)
    except (storage.StorageError, OSError):
        return False


def eval_block(recipe: Any, standin_uri: str, stand_ins: list[StandIn], shrank: list[tuple[str, str, str]],
                s3: storage.S3Settings | None) -> dict[str, Any]:
    from pipelines.demo.eval_sets import build_eval_sets

    suite = recipe.eval
    assert suite != "demo"
    sets = build_eval_sets(seed=suite.seed, count=EVAL_ITEMS)
    folder = storage.join(standin_uri, "eval")
    tasks = []
    for task in suite.tasks:
        entry = task.model_dump(mode="json", exclude_none=True)
        entry["max_items"] = min(task.max_items or EVAL_ITEMS, EVAL_ITEMS)
        if "num_mc_samples" in entry:
            entry["num_mc_samples"] = min(entry["num_mc_samples"], MC_SAMPLES)
            entry.pop("mc_batch_size", None)
        if task.kind == "generation":
            sampling = dict(entry.get("sampling", {}))
            sampling["gen_length"] = min(sampling.get("gen_length", GEN_TOKENS), GEN_TOKENS)
            sampling["block_length"] = min(sampling.get("block_length", sampling["gen_length"]), sampling["gen_length"])
            sampling.pop("steps", None)
            entry["sampling"] = sampling
        if task.kind == "lm_eval":
            entry["gen_length"] = min(task.gen_length or GEN_TOKENS, GEN_TOKENS)
            entry["block_length"] = min(task.block_length, entry["gen_length"])
            entry["batch_size"] = min(task.batch_size, EVAL_ITEMS)
            if task.num_fewshot:
                entry["num_fewshot"] = 1  # the few-shot path, with one example
        if not _task_reachable(task, s3):
            entry, stand_in = _eval_stand_in(task, entry, folder, sets)
            stand_ins.append(stand_in)
        tasks.append(entry)
    shrank.append(("eval", f"{len(suite.tasks)} tasks", f"the same {len(tasks)} tasks, at most {EVAL_ITEMS} items each, "
                                                         f"{MC_SAMPLES} Monte Carlo samples, answers of {GEN_TOKENS} tokens"))
    return {"seed": suite.seed, "tasks": tasks}


def _eval_stand_in(task: Any, entry: dict[str, Any], folder: str,
                   sets: dict[str, list[dict[str, Any]]]) -> tuple[dict[str, Any], StandIn]:
    """Local items of the task's kind in place of an unreachable source."""
    original = ", ".join(task.paths()) or f"lm-eval {task.task!r} (Hugging Face hub)"
    if task.kind != "lm_eval":
        source_set = {"generation": "gen_reading", "choice": "choice_counting", "elbo": "heldout_text"}[task.kind]
        uri = storage.join(folder, f"{task.name}.jsonl")
        rows = sets[source_set]
        entry["source"] = uri

        def write(s3: storage.S3Settings | None) -> None:
            storage.write_text(uri, "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows), s3)

        return entry, StandIn(f"eval.tasks.{task.name}", original, uri,
                              f"{len(rows)} synthetic {task.kind} items ({source_set})", write, uri)
    from pipelines.demo.eval_sets import lm_eval_task_files

    output_type = lm_eval_output_type(task)
    name = f"llada_rehearsal_{task.name.replace('-', '_').replace('.', '_')}"
    task_folder = storage.join(folder, "lm_eval", task.name)
    files, metric = lm_eval_task_files(name, output_type, sets, fewshot=bool(entry.get("num_fewshot")))
    data_uri = storage.join(task_folder, f"{name}.jsonl")
    entry.update(task=name, metric=metric, include_path=task_folder, data_files={"test": data_uri},
                 allow_code_execution=False)

    def write_lm_eval(s3: storage.S3Settings | None) -> None:
        for file_name, text in files.items():
            storage.write_text(storage.join(task_folder, file_name), text, s3)

    kind = {"multiple_choice": "multiple-choice", "generate_until": "generation",
            "loglikelihood_rolling": "rolling-likelihood"}[output_type]
    items = len(files[f"{name}.jsonl"].splitlines())
    note = "; its code is not run" if task.allow_code_execution else ""
    return entry, StandIn(f"eval.tasks.{task.name}", original, task_folder,
                          f"local lm-eval task {name}: {items} synthetic {kind} items, metric {metric}{note}",
                          write_lm_eval, data_uri)
