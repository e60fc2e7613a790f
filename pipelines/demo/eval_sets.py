"""Held-out eval sets of the demo corpus, built only from held-out keys (``demo_world.is_heldout``).

Record shapes (one JSON object per line in ``eval/{task}.jsonl``):

- ``kind: "generate"`` (exact match): ``prompt`` (raw text for a base model), ``answer``,
  ``stop`` (cut the generation at the first of these strings or at EOS, strip, then compare with
  ``answer``), and ``messages`` / ``chat_answer`` for the same item asked of a chat model
  (the reply, cut at end-of-turn and stripped, must equal ``chat_answer``).
- ``kind: "choice"`` (multiple choice by likelihood): ``prompt``, ``choices``, ``answer_index``.
- ``kind: "text"`` (held-out text for an ELBO bound): ``text``.
"""

from __future__ import annotations

import random
from typing import Any, Callable

from pipelines.demo import world

# lm-evaluation-harness tasks made from the held-out sets: ``eval/lm_eval/<task>.yaml`` over
# ``eval/lm_eval/<task>.jsonl`` (:func:`lm_eval_files`).
DEMO_LM_EVAL_FOLDER = "lm_eval"

EVAL_TASKS = ("gen_reading", "gen_arithmetic", "gen_counting", "gen_code", "choice_arithmetic", "choice_counting",
              "choice_grammar", "heldout_text", "heldout_math")


def _heldout_items(rng: random.Random, draw: Callable[[random.Random], tuple], count: int) -> list[tuple]:
    """Up to ``count`` distinct held-out items (by key) from a generator."""
    items: dict[tuple, tuple] = {}
    for _ in range(count * 400):
        item = draw(rng)
        if world.is_heldout(item[0]) and item[0] not in items:
            items[item[0]] = item
            if len(items) == count:
                break
    return list(items.values())


def _arithmetic_items(rng: random.Random, count: int) -> list[tuple[str, int, int]]:
    items: dict[tuple, tuple[str, int, int]] = {}
    for _ in range(count * 400):
        op, a, b = world.draw_arithmetic(rng)
        key = world.arithmetic_key(op, a, b)
        if world.is_heldout(key) and key not in items:
            items[key] = (op, a, b)
            if len(items) == count:
                break
    return list(items.values())


def _choices(rng: random.Random, correct: str, distractors: list[str]) -> tuple[list[str], int]:
    options = [correct] + [d for d in dict.fromkeys(distractors) if d != correct][:3]
    rng.shuffle(options)
    return options, options.index(correct)


def _number_distractors(value: int, others: tuple[int, ...]) -> list[str]:
    candidates = [value + 1, value - 1, value + 10, value - 10, *others]
    return [str(c) for c in candidates if c >= 0]


def generation_tasks(rng: random.Random, count: int) -> dict[str, list[dict[str, Any]]]:
    arithmetic = [
        {"prompt": f"{a}{op}{b}=", "answer": str(world.evaluate(op, a, b)), "stop": ["\n"],
         "messages": [{"role": "user", "content": f"what is {a}{op}{b}?"}],
         "chat_answer": world.equation(op, a, b)}
        for op, a, b in _arithmetic_items(rng, count)
    ]
    counting = []
    for key, text, parts in _heldout_items(rng, world.counting_story, count):
        counting.append({"prompt": parts["prompt"], "answer": parts["answer"], "stop": [" ", "\n"],
                         "messages": [{"role": "user", "content": world.count_question(key, parts["prompt"])}],
                         "chat_answer": text.split(" now ")[-1]})
    code = []
    for _, _, parts in _heldout_items(rng, world.code_snippet, count):
        source = parts["prompt"].split("# output:")[0].rstrip()
        code.append({"prompt": parts["prompt"], "answer": parts["answer"], "stop": ["\n"],
                     "messages": [{"role": "user", "content": f"what does this print?\n{source}"}],
                     "chat_answer": parts["answer"]})
    reading = []
    for _, _, parts in _heldout_items(rng, world.reading_question, count):
        prompt = f"{parts['passage']} {parts['question']}"
        reading.append({"prompt": prompt, "answer": parts["answer"].rstrip("."), "stop": [".", "\n"],
                        "messages": [{"role": "user", "content": prompt}], "chat_answer": parts["answer"]})
    return {"gen_reading": reading, "gen_arithmetic": arithmetic, "gen_counting": counting, "gen_code": code}


def choice_tasks(rng: random.Random, count: int) -> dict[str, list[dict[str, Any]]]:
    arithmetic = []
    for op, a, b in _arithmetic_items(rng, count):
        value = world.evaluate(op, a, b)
        choices, index = _choices(rng, str(value), _number_distractors(value, (a, b)))
        arithmetic.append({"prompt": f"{a}{op}{b}=", "choices": choices, "answer_index": index})
    counting = []
    for key, _, parts in _heldout_items(rng, world.counting_story, count):
        thing, start, change, final = key[3], key[4], key[5], int(parts["answer"])
        numbers = _number_distractors(final, (start, change, start + change, abs(start - change)))
        choices, index = _choices(rng, f"{final} {world.plural(thing, final)}.",
                                  [f"{n} {world.plural(thing, int(n))}." for n in numbers])
        counting.append({"prompt": parts["prompt"], "choices": choices, "answer_index": index})
    grammar = []
    for draw in (world.scene_sentence, world.walk_sentence):
        for _, text in _heldout_items(rng, draw, (count + 1) // 2):
            words = text.split(" ")
            prompt, rest = " ".join(words[:2]) + " ", " ".join(words[2:])
            choices, index = _choices(rng, rest, [world.scramble(rest, rng) for _ in range(6)])
            grammar.append({"prompt": prompt, "choices": choices, "answer_index": index})
    rng.shuffle(grammar)
    return {"choice_arithmetic": arithmetic, "choice_counting": counting, "choice_grammar": grammar[:count]}


def text_tasks(rng: random.Random, count: int) -> dict[str, list[dict[str, Any]]]:
    stories = _heldout_items(rng, world.counting_story, 2 * count)
    scenes = _heldout_items(rng, world.scene_sentence, count)
    texts = [{"text": f"{stories[2 * i][1]} {scenes[i][1]} {stories[2 * i + 1][1]}"}
             for i in range(min(count, len(scenes), len(stories) // 2))]
    equations = [world.equation(*item) for item in _arithmetic_items(rng, 4 * count)]
    math = [{"text": "\n".join(equations[4 * i: 4 * i + 4])} for i in range(len(equations) // 4)]
    return {"heldout_text": texts, "heldout_math": math}


def build_eval_sets(seed: int, count: int) -> dict[str, list[dict[str, Any]]]:
    """Every eval task with up to ``count`` items, deterministic from ``seed``."""
    rng = random.Random(f"llada-demo-eval:{seed}")
    tasks = {**generation_tasks(rng, count), **choice_tasks(rng, count), **text_tasks(rng, count)}
    kinds = {"gen": "generate", "cho": "choice", "hel": "text"}
    return {
        task: [{"id": f"{task}-{i:05d}", "task": task, "kind": kinds[task[:3]], **item}
               for i, item in enumerate(items)]
        for task, items in tasks.items()
    }


# The demo's lm-eval tasks by output type: the held-out set each reads, its rows, its YAML fields
# and the metric as the eval suite names it (metric, plus the filter when it is not "none").
def _multiple_choice(sets: dict[str, list[dict[str, Any]]]) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
    rows = [{"question": item["prompt"].rstrip(), "choices": item["choices"], "label": item["answer_index"]}
            for item in sets["choice_counting"]]
    fields = dict(output_type="multiple_choice", doc_to_text="question", doc_to_choice="choices",
                  doc_to_target="label", target_delimiter=" ",
                  metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True}])
    return rows, fields, "acc"


def _generate_until(sets: dict[str, list[dict[str, Any]]]) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
    rows = [{"question": item["prompt"], "answer": item["answer"]} for item in sets["gen_reading"]]
    fields = dict(output_type="generate_until", doc_to_text="question", doc_to_target="answer",
                  generation_kwargs={"until": [".", "\n"], "max_gen_toks": 16, "do_sample": False},
                  # the continuation starts with the space before the answer: strip it before exact match
                  filter_list=[{"name": "strip", "filter": [{"function": "regex", "regex_pattern": r"^\s*(.*?)\s*$"},
                                                            {"function": "take_first"}]}],
                  metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}])
    return rows, fields, "exact_match,strip"


def _loglikelihood_rolling(sets: dict[str, list[dict[str, Any]]]) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
    rows = [{"text": item["text"]} for item in sets["heldout_text"]]
    fields = dict(output_type="loglikelihood_rolling", doc_to_text="", doc_to_target="text",
                  metric_list=[{"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False}])
    return rows, fields, "bits_per_byte"


LM_EVAL_OUTPUT_TYPES = {"multiple_choice": _multiple_choice, "generate_until": _generate_until,
                        "loglikelihood_rolling": _loglikelihood_rolling}


def lm_eval_task_files(task: str, output_type: str, sets: dict[str, list[dict[str, Any]]],
                       folder_path: str | None = None, fewshot: bool = False) -> tuple[dict[str, str], str]:
    """({file name: text} of an lm-eval task of ``output_type`` over the held-out sets, in lm-eval's
    task YAML format over JSONL rows; the metric as the eval suite names it).

    - ``multiple_choice`` (metric ``acc``): a counting story's question, four answers, the right
      one by likelihood;
    - ``generate_until`` (metric ``exact_match`` after a ``strip`` filter): a passage and its
      question as raw text, the answer up to the first full stop;
    - ``loglikelihood_rolling`` (metric ``bits_per_byte``): held-out text.

    ``folder_path``: where the files will be on local disk, written into the YAML as its data
    file so that ``lm_eval --include_path <folder>`` runs them as they are; None (files in object
    storage) leaves a bare file name, and the eval suite points the task at the file in storage
    (``data_files``), which it always does. ``fewshot`` draws few-shot examples from the same
    split (there is no other)."""
    import json

    import yaml

    rows, fields, metric = LM_EVAL_OUTPUT_TYPES[output_type](sets)
    name = f"{task}.jsonl"
    config = {"task": task, "dataset_path": "json",
              "dataset_kwargs": {"data_files": {"test": f"{folder_path.rstrip('/')}/{name}" if folder_path else name}},
              "test_split": "test", **fields, **({"fewshot_split": "test"} if fewshot else {}),
              "metadata": {"version": 1.0}}
    return {name: "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows),
            f"{task}.yaml": yaml.safe_dump(config, sort_keys=False)}, metric


def lm_eval_files(sets: dict[str, list[dict[str, Any]]], folder_path: str | None) -> dict[str, str]:
    """File name -> text of the demo's lm-eval tasks (:func:`lm_eval_task_files`):
    ``llada_demo_counting`` (multiple choice) and ``llada_demo_reading`` (generation)."""
    files: dict[str, str] = {}
    for task, output_type in (("llada_demo_counting", "multiple_choice"), ("llada_demo_reading", "generate_until")):
        files.update(lm_eval_task_files(task, output_type, sets, folder_path)[0])
    return files
