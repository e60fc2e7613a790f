"""The lm-evaluation-harness adapter (jobs/evaluation/lm_eval_model.py) and the suite's lm_eval
kind (jobs/evaluation/lm_eval_tasks.py), on tiny random checkpoints and the demo corpus's local
task YAMLs. Offline: no dataset is downloaded; lm-eval reads local JSONL files only. No Ray."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance

from jobs.evaluation.lm_eval_model import LLaDAEvalLM, cut_at_stops, request_seed
from jobs.evaluation.runner import evaluate_checkpoint, suite_hash
from jobs.evaluation.tasks import EvalError, EvalSuiteConfig, lm_eval_score, split_context
from llada.answers import sample_answers
from llada_core import elbo_nll, load_model
from llada_core.options import SamplingOptions
from llada_core.tokens import format_chat
from pipelines.demo.eval_sets import build_eval_sets, lm_eval_files
from pipelines.tokenizer import load_tokenizer
from tests.unit.test_evals import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("lm-eval") / "checkpoint_000007", seed=4)


@pytest.fixture(scope="module")
def lm(checkpoint) -> LLaDAEvalLM:
    return LLaDAEvalLM(pretrained=str(checkpoint), device="cpu", mc_num=8, mc_batch_size=4, seed=5, block_length=8)


@pytest.fixture(scope="module")
def demo_tasks(tmp_path_factory) -> Path:
    """The demo corpus's lm-eval files (8 items each) in a local folder."""
    folder = tmp_path_factory.mktemp("demo-lm-eval")
    sets = {name: items[:8] for name, items in build_eval_sets(0, 8).items()}
    for name, text in lm_eval_files(sets, str(folder)).items():
        (folder / name).write_text(text)
    return folder


def _request(kind: str, *arguments, index: int = 0) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=tuple(arguments), idx=index)


def _reference_elbo(checkpoint: Path, context: str, continuation: str, seed: int, mc: int, batch: int) -> float:
    model = load_model(checkpoint).eval()
    tokenizer = load_tokenizer(str(checkpoint))
    prompt, answer = split_context(context, continuation)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    generator = torch.Generator().manual_seed(request_seed(seed, prompt_ids, answer_ids))
    return elbo_nll(model, prompt_ids, answer_ids, num_samples=mc, batch_size=batch,
                    mask_id=model.config.mask_token_id, generator=generator)


def test_loglikelihood_is_minus_the_core_elbo_for_the_same_seed(lm, checkpoint):
    [(logprob, is_greedy)] = lm.loglikelihood([_request("loglikelihood", "12+7=", "19")])
    assert logprob == pytest.approx(-_reference_elbo(checkpoint, "12+7=", "19", seed=5, mc=8, batch=4), rel=1e-5)
    assert logprob < 0 and is_greedy is False


def test_a_request_scores_the_same_alone_and_batched_with_others(lm):
    pairs = [("alice has 3 pens. now alice has ", "3 pens."), ("12+7=", "19"), ("", "the green duck eats"),
             ("bob has 7 cups. bob gives 4 cups to carol. now bob has", " 3 cups.")]
    together = lm.loglikelihood([_request("loglikelihood", c, x, index=i) for i, (c, x) in enumerate(pairs)])
    alone = [lm.loglikelihood([_request("loglikelihood", c, x)])[0] for c, x in pairs]
    for (got, _), (expected, _) in zip(together, alone):
        assert got == pytest.approx(expected, rel=1e-5)


def test_check_greedy_compares_the_greedy_fill_with_the_continuation(checkpoint):
    from llada_core import generate

    lm = LLaDAEvalLM(pretrained=str(checkpoint), device="cpu", mc_num=4, mc_batch_size=4, check_greedy=True)
    prompt_ids = lm.tokenizer("12+7=", add_special_tokens=False)["input_ids"]
    with torch.no_grad():  # the model's own greedy fill of 3 tokens, one token per step
        filled = generate(lm.model, torch.tensor([prompt_ids]), options=SamplingOptions.checked(gen_length=3),
                          mask_id=lm.special.mask)[0, len(prompt_ids):].tolist()
    other = [(filled[0] + 1) % lm.model.config.vocab_size, *filled[1:]]
    if other[0] == lm.special.mask:
        other[0] = (other[0] + 1) % lm.model.config.vocab_size
    assert lm._greedy_matches([(prompt_ids, filled), (prompt_ids, other)]) == [True, False]
    [(_, is_greedy)] = lm.loglikelihood([_request("loglikelihood", "12+7=", "19")])
    ids_19 = lm.tokenizer("19", add_special_tokens=False)["input_ids"]
    assert is_greedy == lm._greedy_matches([(prompt_ids, ids_19)])[0]


def test_rolling_loglikelihood_is_the_elbo_of_the_whole_text(lm, checkpoint):
    text = "the green duck eats in the forest."
    [total] = lm.loglikelihood_rolling([_request("loglikelihood_rolling", text)])
    assert total == pytest.approx(-_reference_elbo(checkpoint, "", text, seed=5, mc=8, batch=4), rel=1e-5)


def test_rolling_chunks_cover_every_token_once(lm):
    ids = list(range(10))
    lm.max_length = 4
    try:
        chunks = lm.rolling_chunks(ids)
    finally:
        lm.max_length = int(lm.model.config.max_position_embeddings)
    assert [answer for _, answer in chunks] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert [prompt for prompt, _ in chunks] == [[], [0, 1], [2, 3], [4, 5], [6, 7]]


def test_generate_until_equals_llada_generate_greedy(lm, checkpoint):
    prompt = "alice has 3 pens. alice gets 2 more pens. now alice has"
    [text] = lm.generate_until([_request("generate_until", prompt, {"until": [], "max_gen_toks": 8})])
    options = SamplingOptions.fast(gen_length=8, block_length=8)  # `llada generate --gen-length 8 --raw`
    [expected] = sample_answers(str(checkpoint), [prompt], options, chat=False)
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert lm.tokenizer.decode(ids, skip_special_tokens=True).strip() == expected


def test_generate_until_cuts_at_the_first_stop_string_without_stripping(lm):
    prompt = "bob has 7 cups. bob gives 4 cups to carol. now bob has"
    [full] = lm.generate_until([_request("generate_until", prompt, {"until": [], "max_gen_toks": 16})])
    assert len(full) >= 3, full
    stop = full[1:3]
    [cut] = lm.generate_until([_request("generate_until", prompt, {"until": [stop], "max_gen_toks": 16})])
    assert cut == full[:full.find(stop)]
    assert cut_at_stops(" in the lake. where", [".", "\n"]) == " in the lake"
    assert cut_at_stops("no stop here", ["\n"]) == "no stop here"


def test_chat_template_is_the_released_format(lm):
    messages = [{"role": "user", "content": "what is 8-3?"}]
    assert lm.apply_chat_template(messages) == format_chat(messages)
    assert lm.tokenizer_name.startswith("llada-")


def test_bad_model_args_are_named(checkpoint):
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['temprature'\]"):
        LLaDAEvalLM(pretrained=str(checkpoint), temprature=0.5)
    with pytest.raises(ValueError, match="mc_num=10 must be a multiple of mc_batch_size=4"):
        LLaDAEvalLM(pretrained=str(checkpoint), mc_num=10, mc_batch_size=4)
    with pytest.raises(ValueError, match="cache"):
        LLaDAEvalLM(pretrained=str(checkpoint), cache="triple")


def test_lm_eval_scores_normalise_to_fractions():
    assert lm_eval_score("acc", 0.25, True) == 0.25
    assert lm_eval_score("word_perplexity", 4.0, False) == 0.25
    assert lm_eval_score("bits_per_byte", 1.0, False) == 0.5
    with pytest.raises(EvalError, match="not a fraction"):
        lm_eval_score("bleu", 23.0, True)
    with pytest.raises(EvalError, match="lower is better"):
        lm_eval_score("ter", 0.3, False)


def _suite(demo_tasks: Path, **extra) -> EvalSuiteConfig:
    files = {"counting": demo_tasks / "llada_demo_counting.jsonl", "reading": demo_tasks / "llada_demo_reading.jsonl"}
    return EvalSuiteConfig.model_validate({"seed": 0, "tasks": [
        {"name": "counting", "kind": "lm_eval", "task": "llada_demo_counting", "metric": "acc",
         "include_path": str(demo_tasks), "data_files": {"test": str(files["counting"])}, "num_mc_samples": 4,
         **extra},
        {"name": "reading", "kind": "lm_eval", "task": "llada_demo_reading", "metric": "exact_match,strip",
         "include_path": str(demo_tasks), "block_length": 8, "batch_size": 8},
    ]})


def test_lm_eval_tasks_in_the_suite_score_into_the_record(checkpoint, demo_tasks):
    suite = _suite(demo_tasks)
    record = evaluate_checkpoint(str(checkpoint), suite, device="cpu")
    counting, reading = record["tasks"]["counting"], record["tasks"]["reading"]
    assert counting["kind"] == "lm_eval" and counting["metric"] == "acc"
    assert counting["num_items"] == 8 and counting["num_items_original"] == 8
    assert 0.0 <= counting["score"] <= 1.0 and counting["score"] == counting["value"]
    assert counting["score"] * 8 == pytest.approx(round(counting["score"] * 8))  # a count of right answers
    assert reading["metric"] == "exact_match,strip" and reading["num_items"] == 8
    assert record["average"] == pytest.approx((counting["score"] + reading["score"]) / 2)
    assert record["sources"]["counting"]["lm_eval_task"] == "llada_demo_counting"
    assert suite_hash(suite) != suite_hash(_suite(demo_tasks, num_mc_samples=8))


def test_a_missing_data_file_names_the_task_and_path(checkpoint, demo_tasks, tmp_path):
    missing = tmp_path / "nowhere.jsonl"
    suite = EvalSuiteConfig.model_validate({"tasks": [
        {"name": "counting", "kind": "lm_eval", "task": "llada_demo_counting", "metric": "acc",
         "include_path": str(demo_tasks), "data_files": {"test": str(missing)}}]})
    with pytest.raises(EvalError, match=f"task 'counting': data file {missing} \\(split 'test'\\) does not exist"):
        evaluate_checkpoint(str(checkpoint), suite, device="cpu")


def test_a_missing_dataset_in_the_task_yaml_names_the_task_and_path(checkpoint, tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    gone = tmp_path / "gone.jsonl"
    text = lm_eval_files({"choice_counting": [], "gen_reading": []}, str(tmp_path))["llada_demo_counting.yaml"]
    (folder / "t.yaml").write_text(text.replace(str(tmp_path / "llada_demo_counting.jsonl"), str(gone)))
    suite = EvalSuiteConfig.model_validate({"tasks": [
        {"name": "c", "kind": "lm_eval", "task": "llada_demo_counting", "metric": "acc", "include_path": str(folder)}]})
    with pytest.raises(EvalError, match=r"task 'c': lm-eval task 'llada_demo_counting' could not load its data") as info:
        evaluate_checkpoint(str(checkpoint), suite, device="cpu")
    assert str(gone) in str(info.value)


def test_an_unknown_task_or_metric_is_named(checkpoint, demo_tasks):
    suite = EvalSuiteConfig.model_validate({"tasks": [
        {"name": "c", "kind": "lm_eval", "task": "llada_demo_countin", "include_path": str(demo_tasks)}]})
    with pytest.raises(EvalError, match=r"no lm-eval task or group .llada_demo_countin..*did you mean \['llada_demo_counting'"):
        evaluate_checkpoint(str(checkpoint), suite, device="cpu")
    suite = EvalSuiteConfig.model_validate({"tasks": [
        {"name": "c", "kind": "lm_eval", "task": "llada_demo_counting", "metric": "f1", "max_items": 2,
         "num_mc_samples": 2, "include_path": str(demo_tasks)}]})
    with pytest.raises(EvalError, match=r"reports no metric 'f1'; it reports \['acc,none'"):
        evaluate_checkpoint(str(checkpoint), suite, device="cpu")


def test_llada_lm_eval_runs_lm_evals_own_cli_with_our_model(checkpoint, demo_tasks, tmp_path):
    out = tmp_path / "results"
    result = subprocess.run(
        [sys.executable, "-m", "llada", "lm-eval", "run", "--model", "llada", "--model_args",
         f"pretrained={checkpoint},mc_num=4,mc_batch_size=4,block_length=8", "--tasks", "llada_demo_counting",
         "llada_demo_reading", "--include_path", str(demo_tasks), "--limit", "4", "--output_path", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    [written] = list(out.rglob("results_*.json"))
    results = json.loads(written.read_text())["results"]
    assert 0.0 <= results["llada_demo_counting"]["acc,none"] <= 1.0
    assert "exact_match,strip" in results["llada_demo_reading"]


def test_an_lm_eval_group_is_scored_by_its_aggregate(checkpoint, demo_tasks, tmp_path):
    folder = tmp_path / "group"
    folder.mkdir()
    for name in ("llada_demo_counting.yaml",):
        (folder / name).write_text((demo_tasks / name).read_text())
    (folder / "group.yaml").write_text(
        "group: llada_demo_group\ntask:\n  - llada_demo_counting\n"
        "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\nmetadata:\n  version: 1.0\n")
    suite = EvalSuiteConfig.model_validate({"tasks": [
        {"name": "g", "kind": "lm_eval", "task": "llada_demo_group", "metric": "acc", "include_path": str(folder),
         "max_items": 4, "num_mc_samples": 2}]})
    record = evaluate_checkpoint(str(checkpoint), suite, device="cpu")
    assert record["tasks"]["g"]["num_items"] == 4 and 0.0 <= record["tasks"]["g"]["score"] <= 1.0
    with pytest.raises(EvalError, match="is a group of tasks"):
        evaluate_checkpoint(str(checkpoint), EvalSuiteConfig.model_validate({"tasks": [
            {"name": "g", "kind": "lm_eval", "task": "llada_demo_group", "include_path": str(folder),
             "data_files": {"test": str(demo_tasks / "llada_demo_counting.jsonl")}}]}), device="cpu")


def test_ad_hoc_lm_eval_tasks_of_llada_eval():
    from llada.commands import ad_hoc_suite
    from llada.console import scores_table

    suite = ad_hoc_suite(["arc_easy=acc_norm", "gsm8k=exact_match,flexible-extract", "piqa"], include_path=None,
                         limit=5)
    assert [(t.task, t.metric, t.max_items) for t in suite.tasks] == [
        ("arc_easy", "acc_norm", 5), ("gsm8k", "exact_match,flexible-extract", 5), ("piqa", None, 5)]
    with pytest.raises(ValueError, match="--lm-eval-tasks"):
        ad_hoc_suite(["arc_easy"], include_path=None, limit=0)
    table = scores_table([{"checkpoint": {"step": 40}, "average": 0.5,
                           "tasks": {"arc_easy": {"metric": "acc_norm", "score": 0.25},
                                     "gsm8k": {"metric": "exact_match,strict-match", "score": 0.75}}}])
    lines = table.splitlines()
    assert lines[0].split() == ["checkpoint", "arc_easy", "gsm8k", "average"]
    assert lines[1].split() == ["step", "40", "0.2500", "0.7500", "0.5000"]
    assert "arc_easy: acc_norm" in lines[2]


def test_chat_tasks_reach_the_sampler_in_the_chat_template(checkpoint, demo_tasks, monkeypatch):
    seen: list[str] = []
    original = LLaDAEvalLM._sample

    def recording(self, prompts, options):  # type: ignore[no-untyped-def]
        seen.extend(self.tokenizer.decode(p, skip_special_tokens=False) for p in prompts)
        return original(self, prompts, options)

    monkeypatch.setattr(LLaDAEvalLM, "_sample", recording)
    suite = EvalSuiteConfig.model_validate({"tasks": [
        {"name": "reading", "kind": "lm_eval", "task": "llada_demo_reading", "metric": "exact_match,strip",
         "include_path": str(demo_tasks), "block_length": 8, "max_items": 3, "chat": True}]})
    evaluate_checkpoint(str(checkpoint), suite, device="cpu")
    assert len(seen) == 3
    assert all(text.startswith("<role>HUMAN</role>") and text.endswith("<role>ASSISTANT</role>") for text in seen), seen
