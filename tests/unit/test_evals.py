"""The eval suite: config validation, per-kind scoring and normalisation, score records and reuse.

Models here are tiny (a few thousand parameters) and saved with llada_core.save_model beside a
BPE tokenizer trained on a few lines, so each evaluation takes well under a second. No Ray.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from jobs.checkpoints import CheckpointRef
from jobs.evaluation import tasks as eval_tasks
from jobs.evaluation.tasks import (
    ChoiceItem,
    EvalError,
    EvalSuiteConfig,
    average_score,
    decode_answer,
    generation_item,
    is_exact_match,
    load_items,
    normalise_answer,
    normalised_score,
    split_context,
    task_seed,
)
from jobs.evaluation.runner import (
    SCORES_RECORD,
    demo_eval_suite,
    evaluate_checkpoint,
    read_score_record,
    score_checkpoint,
    suite_hash,
)
from llada_core import LLaDAMoEModelLM, elbo_nll, generate, preset, save_model
from llada_core.tokens import format_chat
from pipelines import storage
from pipelines.tokenizer import save_tokenizer, special_token_ids, train_bpe

LINES = [
    "alice has 3 pens. alice gets 2 more pens. now alice has 5 pens.",
    "bob has 7 cups. bob gives 4 cups to carol. now bob has 3 cups.",
    "the green duck eats in the forest. judy sees the green duck.",
    "12+7=19\n8-3=5\n6*4=24\n40+2=42",
    "for i in range(3):\n    print(i)\n# output: 0 1 2",
]


def tiny_checkpoint(folder: Path, uniform: bool = False, seed: int = 0) -> Path:
    """``folder/hf`` with a random tiny model (vocab = the tokenizer's size) and its tokenizer.
    ``uniform``: lm_head zeroed, so every logit is 0 and every prediction the uniform one."""
    tokenizer = train_bpe(LINES * 4, vocab_size=320, min_frequency=1)
    config = preset("tiny", vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=2, expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
    torch.manual_seed(seed)
    model = LLaDAMoEModelLM(config)
    if uniform:
        with torch.no_grad():
            model.lm_head.weight.zero_()
    hf = folder / "hf"
    save_model(model, hf)
    save_tokenizer(tokenizer, str(hf))
    return hf


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("evals") / "checkpoint_000012")


@pytest.fixture(scope="module")
def eval_sets(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("eval-sets")
    return {
        "gen": write_jsonl(folder / "gen.jsonl", [
            {"prompt": "12+7=", "answer": "19", "stop": ["\n"]},
            {"prompt": "alice has 3 pens. now alice has ", "answer": "3", "stop": [" "]},
            {"prompt": "8-3=", "answer": "5", "stop": ["\n"],
             "messages": [{"role": "user", "content": "what is 8-3?"}], "chat_answer": "8-3=5"},
        ]),
        "choice": write_jsonl(folder / "choice.jsonl", [
            {"prompt": "12+7=", "choices": ["19", "20", "18"], "answer_index": 0},
            {"prompt": "the green ", "choices": ["duck eats", "eats duck"], "answer_index": 0},
        ]),
        "text": write_jsonl(folder / "text.jsonl", [{"text": LINES[0]}, {"text": LINES[3]}]),
    }


# The reference loop (no fast option), as generate()'s defaults are.
REFERENCE = {"threshold": None, "cache": None, "early_stop": False}


def small_suite(eval_sets: dict[str, str], seed: int = 0, **sampling) -> EvalSuiteConfig:
    return EvalSuiteConfig.model_validate({"seed": seed, "tasks": [
        {"name": "gen", "kind": "generation", "source": eval_sets["gen"], "batch_size": 2,
         "sampling": {"gen_length": 4, "steps": 4, **REFERENCE, **sampling}},
        {"name": "choice", "kind": "choice", "source": eval_sets["choice"], "num_mc_samples": 4, "mc_batch_size": 2},
        {"name": "text", "kind": "elbo", "source": eval_sets["text"], "num_mc_samples": 4},
    ]})


# --------------------------------------------------------------------------- config


def test_demo_suite_validates_and_resolves_against_a_corpus():
    suite = demo_eval_suite()
    assert {task.kind for task in suite.tasks} == {"generation", "choice", "elbo", "lm_eval"}
    assert all(path.startswith("demo:") for task in suite.tasks for path in task.paths())
    assert any(task.kind == "generation" and task.chat for task in suite.tasks)
    assert EvalSuiteConfig.model_validate(suite.model_dump()) == suite
    pinned = demo_eval_suite("s3://bucket/corpus")
    assert pinned.tasks[0].source == "s3://bucket/corpus/eval/gen_reading.jsonl"
    [lm_eval_task] = [task for task in pinned.tasks if task.kind == "lm_eval"]
    assert lm_eval_task.include_path == "s3://bucket/corpus/eval/lm_eval"
    assert lm_eval_task.data_files == {"test": "s3://bucket/corpus/eval/lm_eval/llada_demo_counting.jsonl"}
    assert eval_tasks.resolve_source("demo:heldout_text", "/c") == "/c/eval/heldout_text.jsonl"
    with pytest.raises(EvalError, match="corpus URI"):
        eval_tasks.resolve_source("demo:heldout_text", None)


GEN = {"name": "g", "kind": "generation", "source": "x.jsonl", "sampling": {"gen_length": 8}}
MC = {"name": "c", "kind": "choice", "source": "x.jsonl", "num_mc_samples": 8}


def gen(**sampling):  # type: ignore[no-untyped-def]
    return {**GEN, "sampling": {**GEN["sampling"], **sampling}}


@pytest.mark.parametrize("tasks, path, message", [
    ([{**GEN, "bogus": 1}], "tasks.0.generation.bogus", "Extra inputs"),
    ([{**GEN, "gen_length": 8}], "tasks.0.generation.gen_length", "Extra inputs"),
    ([gen(block_length=3)], "tasks.0.generation.sampling", "block_length: 3 must divide gen_length=8"),
    ([gen(steps=16, threshold=None)], "tasks.0.generation.sampling", "steps: 16 exceeds gen_length=8"),
    ([gen(block_length=4, steps=3, threshold=None)], "tasks.0.generation.sampling", "steps: 3 must be divisible"),
    ([gen(threshold=1.5)], "tasks.0.generation.sampling", "threshold: Input should be less than or equal to 1"),
    ([gen(cache="full")], "tasks.0.generation.sampling", "cache: Input should be 'prefix' or 'dual'"),
    ([{**MC, "mc_batch_size": 3}], "tasks.0.choice", "num_mc_samples: 8 must be a multiple of mc_batch_size=3"),
    ([{**MC, "kind": "ranking"}], "tasks.0", "does not match any of the expected tags"),
    ([{**GEN, "source": "demo:nope"}], "tasks.0.generation", "unknown demo eval set 'nope'"),
    ([{**MC, "source": "demo:gen_arithmetic"}], "tasks.0.choice", "holds generation items, not 'choice'"),
    ([GEN, {**MC, "name": "g"}], "tasks", "tasks[1].name: 'g' is already the name of tasks[0]"),
    ([], "tasks", "at least 1 item"),
])
def test_config_errors_name_the_field(tasks, path, message):
    with pytest.raises(ValidationError) as caught:
        EvalSuiteConfig.model_validate({"tasks": tasks})
    text = str(caught.value)
    assert path in text and message in text, text


def test_generation_tasks_sample_with_the_fast_options_unless_told_otherwise():
    from llada_core import FAST_OPTIONS, SamplingOptions

    default = EvalSuiteConfig.model_validate({"tasks": [GEN]}).tasks[0].sampling
    assert default == SamplingOptions(gen_length=8, block_length=8, steps=8, **FAST_OPTIONS)
    reference = EvalSuiteConfig.model_validate({"tasks": [gen(**REFERENCE)]}).tasks[0].sampling
    assert reference == SamplingOptions(gen_length=8, block_length=8, steps=8)
    assert EvalSuiteConfig.model_validate({"tasks": [{**GEN, "sampling": {}}]}).tasks[0].sampling.gen_length == 128


# --------------------------------------------------------------------------- normalisation


def test_normalised_scores_by_hand():
    assert normalised_score("exact_match", 0.25) == 0.25
    assert normalised_score("accuracy", 1.0) == 1.0
    assert normalised_score("bits_per_token", 0.0) == 1.0
    assert normalised_score("bits_per_token", 1.0) == 0.5
    assert normalised_score("bits_per_token", 3.0) == 0.125
    # a uniform model over V tokens: log2(V) bits per token -> score 1/V
    assert normalised_score("bits_per_token", math.log2(4096)) == pytest.approx(1 / 4096)
    assert average_score([1.0, 0.5, 0.125]) == pytest.approx(1.625 / 3)
    for metric, value in (("exact_match", 1.5), ("accuracy", -0.1), ("bits_per_token", -1.0),
                          ("bits_per_token", float("nan")), ("perplexity", 1.0)):
        with pytest.raises(ValueError, match=metric):
            normalised_score(metric, value)
    with pytest.raises(ValueError, match="no task scores"):
        average_score([])


@pytest.mark.parametrize("prediction, answer, stops, expected", [
    ("165", "165", [], True),
    ("  165 \n", "165", [], True),  # surrounding whitespace
    ("165\n12+3=15", "165", ["\n"], True),  # cut at the stop string
    ("11 hats.", "11", [" ", "\n"], True),  # the earliest stop wins
    ("165\n", " 165 ", [], True),  # the reference is stripped too
    ("16 5", "165", [], False),  # inner spaces count
    ("Alice", "alice", [], False),  # case counts
    ("1650", "165", ["\n"], False),
    ("", "165", [], False),
    ("165<|role_end|>", "165", [], False),  # a special token left in the text is not cut here
])
def test_exact_match_normalisation(prediction, answer, stops, expected):
    assert is_exact_match(prediction, answer, stops) is expected


def test_normalise_answer_cuts_at_the_earliest_stop():
    assert normalise_answer("a b\nc", ["\n", " "]) == "a"
    assert normalise_answer(" x\ny", ["\n"]) == "x"
    assert normalise_answer("xyz", ["q"]) == "xyz"


def test_decode_answer_cuts_at_eos_or_end_of_turn_and_marks_unknown_ids(checkpoint):
    from pipelines.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(checkpoint))
    special = special_token_ids(tokenizer)
    ids = tokenizer("19", add_special_tokens=False)["input_ids"]
    stops = (special.eos, special.role_end)
    assert decode_answer(tokenizer, ids + [special.eos] + ids, stops) == "19"
    assert decode_answer(tokenizer, ids + [special.role_end, special.eos], stops) == "19"
    assert decode_answer(tokenizer, [special.eos] + ids, stops) == ""
    assert decode_answer(tokenizer, ids + [len(tokenizer) + 5] + ids, stops) == "19\ufffd19"
    assert decode_answer(tokenizer, ids + [special.role_start], stops) == "19<role>"


def test_split_context_moves_trailing_whitespace():
    assert split_context("uma goes ", "to the forest") == ("uma goes", " to the forest")
    assert split_context("12+7=", "19") == ("12+7=", "19")
    assert split_context("", "text") == ("", "text")


def test_generation_items_raw_and_chat():
    record = {"prompt": "8-3=", "answer": "5", "stop": ["\n"],
              "messages": [{"role": "user", "content": "what is 8-3?"}], "chat_answer": "8-3=5"}
    raw = generation_item(record, chat=False)
    assert (raw.prompt, raw.answer, raw.stops) == ("8-3=", "5", ("\n",))
    chat = generation_item(record, chat=True)
    assert chat.prompt == format_chat(record["messages"]) == \
        "<role>HUMAN</role>what is 8-3?<|role_end|><role>ASSISTANT</role>"
    assert (chat.answer, chat.stops) == ("8-3=5", ())
    plain = generation_item({"prompt": "hi", "answer": "hello"}, chat=True)
    assert plain.prompt == format_chat([{"role": "user", "content": "hi"}]) and plain.answer == "hello"


def test_load_items_checks_each_line(tmp_path, eval_sets):
    suite = small_suite(eval_sets)
    gen, choice, _ = suite.tasks
    assert len(load_items(gen.model_copy(update={"max_items": 2}), eval_sets["gen"])) == 2
    assert load_items(choice, eval_sets["choice"])[0] == ChoiceItem("12+7=", ("19", "20", "18"), 0)
    cases = [
        (gen, ['{"prompt": "1+1=", "answer": "2"}', "not json"], "line 2: not JSON"),
        (gen, ['{"prompt": "1+1="}'], "line 1: field 'answer'"),
        (gen, ['{"prompt": "1+1=", "answer": ""}'], "field 'answer': expected a non-empty string"),
        (gen, ['{"prompt": "1", "answer": "2", "stop": "\\n"}'], "field 'stop'"),
        (choice, ['{"prompt": "q", "choices": ["a", "b"], "answer_index": 2}'], "answer_index"),
        (choice, ['{"prompt": "q", "choices": ["a"], "answer_index": 0}'], "at least 2"),
        (gen, [""], "has no items"),
    ]
    for task, lines, message in cases:
        path = tmp_path / "bad.jsonl"
        path.write_text("\n".join(lines) + "\n")
        with pytest.raises(EvalError, match=message) as caught:
            load_items(task, str(path))
        assert f"task {task.name!r}" in str(caught.value)
    with pytest.raises(EvalError, match="does not exist"):
        load_items(gen, str(tmp_path / "missing.jsonl"))


# --------------------------------------------------------------------------- evaluation


def test_evaluate_checkpoint_record_shape_and_ranges(checkpoint, eval_sets):
    suite = small_suite(eval_sets)
    record = evaluate_checkpoint(str(checkpoint), suite)
    assert record["checkpoint"] is None and record["hf_uri"] == str(checkpoint)  # any HF folder, no run
    ref = CheckpointRef(uri=str(checkpoint.parent), hf_uri=str(checkpoint), step=12)
    assert evaluate_checkpoint(str(checkpoint), suite, ref=ref)["checkpoint"] == ref.to_json()
    assert record["suite_hash"] == suite_hash(suite) and record["suite"] == suite.model_dump(mode="json")
    assert list(record["tasks"]) == ["gen", "choice", "text"]
    gen, choice, text = record["tasks"].values()
    assert gen["metric"] == "exact_match" and gen["num_items"] == 3 and 0 <= gen["num_correct"] <= 3
    assert gen["value"] == gen["num_correct"] / 3 and len(gen["examples"]) == 3
    assert choice["metric"] == "accuracy" and choice["num_items"] == 2 and choice["value"] == choice["num_correct"] / 2
    assert text["metric"] == "bits_per_token" and text["value"] > 0 and text["num_tokens"] > 0
    assert text["score"] == pytest.approx(2 ** -text["value"])
    for task in record["tasks"].values():
        assert 0.0 <= task["score"] <= 1.0 and task["seconds"] >= 0
    assert record["average"] == pytest.approx(sum(t["score"] for t in record["tasks"].values()) / 3)
    assert set(record["timings"]) == {"load_s", "eval_s", "total_s"}
    assert record["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    json.dumps(record)  # the record is plain JSON
    # deterministic: the same suite gives the same numbers
    again = evaluate_checkpoint(str(checkpoint), suite)
    assert {n: t["value"] for n, t in again["tasks"].items()} == {n: t["value"] for n, t in record["tasks"].items()}


def test_uniform_model_gives_known_scores(tmp_path):
    """All logits 0: every token has probability 1/V, so the ELBO is exactly A*ln V for an answer
    of A tokens (bits per token log2 V, score 1/V); the shortest choice always wins (ties: the
    first); greedy generation picks id 0 (EOS) everywhere, an empty answer."""
    hf = tiny_checkpoint(tmp_path / "checkpoint_000001", uniform=True)
    from pipelines.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(hf))
    assert special_token_ids(tokenizer).eos == 0
    short, middle, longer = "duck", " duck eats", " duck eats in the forest"
    lengths = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in (short, middle, longer)]
    assert lengths == sorted(set(lengths)), lengths
    sets = {
        "gen": write_jsonl(tmp_path / "gen.jsonl", [{"prompt": "12+7=", "answer": "19"}] * 2),
        "choice": write_jsonl(tmp_path / "choice.jsonl", [
            {"prompt": "the", "choices": [short, middle, longer], "answer_index": 0},
            {"prompt": "the", "choices": [longer, short, middle], "answer_index": 1},
            {"prompt": "the", "choices": [middle, longer, short], "answer_index": 2},
            {"prompt": "the", "choices": [short, middle, longer], "answer_index": 2},  # wrong: short wins
        ]),
        "text": write_jsonl(tmp_path / "text.jsonl", [{"text": LINES[2]}, {"prompt": "q: ", "answer": LINES[1]}]),
    }
    record = evaluate_checkpoint(str(hf), small_suite(sets), device="cpu")
    vocab_size = len(tokenizer)
    text = record["tasks"]["text"]
    assert text["value"] == pytest.approx(math.log2(vocab_size), rel=1e-5)
    assert text["score"] == pytest.approx(1 / vocab_size, rel=1e-4)
    assert record["tasks"]["choice"]["value"] == 0.75
    gen = record["tasks"]["gen"]
    assert gen["value"] == 0.0 and gen["examples"][0]["prediction"] == ""
    assert record["average"] == pytest.approx((0.0 + 0.75 + 1 / vocab_size) / 3, rel=1e-4)


def test_elbo_task_equals_elbo_nll_called_directly(checkpoint, eval_sets):
    from llada_core import load_model
    from pipelines.tokenizer import load_tokenizer

    suite = EvalSuiteConfig.model_validate({"seed": 7, "tasks": [
        {"name": "text", "kind": "elbo", "source": eval_sets["text"], "num_mc_samples": 4}]})
    record = evaluate_checkpoint(str(checkpoint), suite, device="cpu")  # the CPU generator's draws
    model, tokenizer = load_model(checkpoint).eval(), load_tokenizer(str(checkpoint))
    generator = torch.Generator().manual_seed(task_seed(7, "text"))
    total_nats, total_tokens = 0.0, 0
    for line in (LINES[0], LINES[3]):
        ids = tokenizer(line, add_special_tokens=False)["input_ids"]
        total_nats += elbo_nll(model, [], ids, num_samples=4, batch_size=4, generator=generator)
        total_tokens += len(ids)
    expected_bits = total_nats / total_tokens / math.log(2)
    assert record["tasks"]["text"]["num_tokens"] == total_tokens
    assert record["tasks"]["text"]["value"] == pytest.approx(expected_bits, rel=1e-9)


def test_generation_score_matches_generate_called_directly(checkpoint, tmp_path):
    """Items whose answers are what generate() itself produces score 1, a wrong one 0."""
    from llada_core import load_model
    from pipelines.tokenizer import load_tokenizer

    model, tokenizer = load_model(checkpoint).eval(), load_tokenizer(str(checkpoint))
    special = special_token_ids(tokenizer)
    items = []
    for prompt in ("12+7=", "8-3=", "alice has ", "bob gives ", "the green ", "now bob has "):
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        out = generate(model, ids, steps=4, gen_length=4, block_length=4, mask_id=special.mask,
                       generator=torch.Generator().manual_seed(0))
        text = decode_answer(tokenizer, out[0, ids.shape[1]:].tolist(), (special.eos, special.role_end)).strip()
        if text:
            items.append({"prompt": prompt, "answer": text})
    assert len(items) >= 2, "the random model answered nothing usable"
    items = items[:2] + [{"prompt": "12+7=", "answer": "no such answer"}]
    source = write_jsonl(tmp_path / "gen.jsonl", items)
    suite = EvalSuiteConfig.model_validate({"tasks": [
        {"name": "gen", "kind": "generation", "source": source, "batch_size": 1,
         "sampling": {"gen_length": 4, "steps": 4, **REFERENCE}}]})
    task = evaluate_checkpoint(str(checkpoint), suite, device="cpu")["tasks"]["gen"]
    assert (task["num_correct"], task["value"]) == (2, pytest.approx(2 / 3))
    assert [example["correct"] for example in task["examples"]] == [True, True, False]


def test_demo_sources_resolve_against_the_corpus(checkpoint, tmp_path):
    from pipelines.demo.corpus import CorpusSpec, write_demo_corpus

    corpus = str(tmp_path / "corpus")
    write_demo_corpus(corpus, CorpusSpec(num_text_docs=2, num_math_docs=2, num_code_docs=2, num_anneal_docs=2,
                                         num_sft_chats=2, num_eval_items=4, files_per_split=1))
    suite = EvalSuiteConfig.model_validate({"tasks": [
        {"name": "chat", "kind": "generation", "source": "demo:gen_arithmetic", "chat": True,
         "sampling": {"gen_length": 4}, "max_items": 2},
        {"name": "text", "kind": "elbo", "source": "demo:heldout_math", "num_mc_samples": 2, "max_items": 2},
    ]})
    record = evaluate_checkpoint(str(checkpoint), suite, corpus_uri=corpus)
    assert record["sources"]["chat"] == f"{corpus}/eval/gen_arithmetic.jsonl"
    assert record["tasks"]["chat"]["examples"][0]["prompt"].startswith("<role>HUMAN</role>what is ")
    assert record["tasks"]["text"]["num_items"] == 2
    assert suite_hash(suite, corpus) != suite_hash(suite, str(tmp_path / "other"))
    with pytest.raises(EvalError, match="corpus URI"):
        evaluate_checkpoint(str(checkpoint), suite)


def test_score_checkpoint_writes_and_reuses_scores_json(checkpoint, eval_sets, monkeypatch):
    import jobs.evaluation.runner as evals

    folder = str(checkpoint.parent)
    ref = CheckpointRef(uri=folder, hf_uri=str(checkpoint), step=12)
    suite = small_suite(eval_sets)
    (checkpoint.parent / SCORES_RECORD).unlink(missing_ok=True)
    first = score_checkpoint(ref, suite)
    assert first["checkpoint"] == ref.to_json()
    assert first["reused"] is False
    stored = read_score_record(folder)
    assert stored == {k: v for k, v in first.items() if k != "reused"}
    assert (checkpoint.parent / SCORES_RECORD).exists() and (checkpoint.parent / "hf").is_dir()

    def must_not_run(*args, **kwargs):
        raise AssertionError("a matching scores.json must be reused, not re-evaluated")

    monkeypatch.setattr(evals, "evaluate_checkpoint", must_not_run)
    again = score_checkpoint(ref, suite)
    assert again["reused"] is True and again["average"] == first["average"]

    # another suite (a different seed) does not match: evaluated again and overwritten
    monkeypatch.setattr(evals, "evaluate_checkpoint",
                        lambda hf_uri, suite, *a, **k: {"checkpoint": k["ref"].to_json(), "suite_hash": suite_hash(suite),
                                                         "average": 0.5, "hf_uri": hf_uri})
    other = score_checkpoint(ref, small_suite(eval_sets, seed=1))
    assert other["reused"] is False and other["hf_uri"] == ref.hf_uri
    assert read_score_record(folder)["suite_hash"] == suite_hash(small_suite(eval_sets, seed=1))
    (checkpoint.parent / SCORES_RECORD).unlink()


def test_checkpoint_on_s3(s3_server, checkpoint, eval_sets):
    bucket = s3_server.bucket("evals")
    folder = f"{bucket}/stage/checkpoints/checkpoint_000012"
    storage.upload_dir(str(checkpoint), f"{folder}/hf", s3_server.settings)
    text_uri = f"{bucket}/eval/text.jsonl"
    storage.write_text(text_uri, Path(eval_sets["text"]).read_text(), s3_server.settings)
    suite = EvalSuiteConfig.model_validate({"tasks": [
        {"name": "text", "kind": "elbo", "source": text_uri, "num_mc_samples": 2}]})
    ref = CheckpointRef.at(f"{bucket}/stage", 12)
    assert ref.uri == folder
    record = score_checkpoint(ref, suite, s3=s3_server.settings)
    assert record["reused"] is False and record["checkpoint"]["step"] == 12 and record["hf_uri"] == f"{folder}/hf"
    assert storage.read_json(f"{folder}/{SCORES_RECORD}", s3_server.settings)["average"] == record["average"]
    assert score_checkpoint(ref, suite, s3=s3_server.settings)["reused"] is True
