"""Checkpoint weight averaging: the weights (llada_core.average_checkpoints), the stage's average
checkpoint (jobs/evaluation/averaging.py) and the average_top_k decision (selection.py). No Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from jobs.checkpoints import COMPLETE_RECORD, CheckpointRef
from jobs.evaluation.averaging import average_ref, write_average
from jobs.evaluation.selection import averaging_selection_record, select_checkpoint, top_k
from llada_core import CheckpointError, LLaDAMoEModelLM, average_checkpoints, load_model, preset, save_model
from pipelines.tokenizer import save_tokenizer, train_bpe
from tests.unit.test_evals import LINES, tiny_checkpoint


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_model(folder).state_dict()


def test_average_of_identical_checkpoints_equals_them(tmp_path):
    first = tiny_checkpoint(tmp_path / "a", seed=3)
    second = tmp_path / "b" / "hf"
    second.parent.mkdir()
    import shutil

    shutil.copytree(first, second)
    out = average_checkpoints([first, second, first], tmp_path / "avg")
    expected, got = _weights(first), _weights(out)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in first.iterdir())


def test_average_is_the_elementwise_mean(tmp_path):
    folders = [tiny_checkpoint(tmp_path / name, seed=seed) for name, seed in (("a", 1), ("b", 2))]
    out = average_checkpoints(folders, tmp_path / "avg")
    a, b, mean = _weights(folders[0]), _weights(folders[1]), _weights(out)
    assert not torch.equal(a["lm_head.weight"], b["lm_head.weight"])
    for key in a:
        torch.testing.assert_close(mean[key], (a[key] + b[key]) / 2, rtol=0, atol=1e-6)


def test_bf16_checkpoints_average_in_high_precision_and_keep_their_dtype(tmp_path):
    tokenizer = train_bpe(LINES * 4, vocab_size=320, min_frequency=1)
    config = preset("tiny", vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=2, expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
    folders = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        folder = tmp_path / f"m{seed}"
        save_model(LLaDAMoEModelLM(config), folder, dtype=torch.bfloat16)
        save_tokenizer(tokenizer, str(folder))
        folders.append(folder)
    out = average_checkpoints(folders, tmp_path / "avg")
    a, b, mean = (load_model(f).state_dict() for f in (*folders, out))
    assert mean["lm_head.weight"].dtype == torch.bfloat16
    expected = ((a["lm_head.weight"].double() + b["lm_head.weight"].double()) / 2).to(torch.bfloat16)
    assert torch.equal(mean["lm_head.weight"], expected)


def test_a_mixed_architecture_is_refused_naming_the_field(tmp_path):
    small = tiny_checkpoint(tmp_path / "a")
    tokenizer = train_bpe(LINES * 4, vocab_size=320, min_frequency=1)
    config = preset("tiny", vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=2, expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
    deeper = tmp_path / "b"
    save_model(LLaDAMoEModelLM(config), deeper)
    save_tokenizer(tokenizer, str(deeper))
    with pytest.raises(CheckpointError, match=r"num_hidden_layers \(1 vs 2\)"):
        average_checkpoints([small, deeper], tmp_path / "avg")
    assert not (tmp_path / "avg").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".avg")]  # no staging folder left


def test_fewer_than_two_checkpoints_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="at least 2"):
        average_checkpoints([tiny_checkpoint(tmp_path / "a")], tmp_path / "avg")


def _stage_checkpoint(stage: Path, step: int, seed: int) -> CheckpointRef:
    ref = CheckpointRef.at(str(stage), step)
    tiny_checkpoint(Path(ref.uri), seed=seed)
    return ref


def test_write_average_makes_a_complete_checkpoint_and_reuses_it(tmp_path):
    stage = tmp_path / "stages" / "pretrain2"
    members = [_stage_checkpoint(stage, 93, 1), _stage_checkpoint(stage, 47, 2)]
    info = write_average(str(stage), members)
    assert info.ref == average_ref(str(stage), members)
    assert info.ref.uri.endswith("averages/top-000047-000093") and info.ref.step == 93
    record = json.loads((Path(info.uri) / COMPLETE_RECORD).read_text())
    assert [m["step"] for m in record["metrics"]["averaged"]] == [93, 47]
    assert "hf/model.safetensors" in record["files"]
    written = (Path(info.hf_uri) / "model.safetensors").stat().st_mtime_ns
    again = write_average(str(stage), members)
    assert again.ref == info.ref and (Path(info.hf_uri) / "model.safetensors").stat().st_mtime_ns == written


def test_write_average_refuses_another_tokenizer(tmp_path):
    stage = tmp_path / "stages" / "s"
    members = [_stage_checkpoint(stage, 10, 1), _stage_checkpoint(stage, 20, 1)]
    other = train_bpe(LINES[:2] * 4, vocab_size=320, min_frequency=1)
    save_tokenizer(other, members[1].hf_uri)
    with pytest.raises(ValueError, match="another tokenizer"):
        write_average(str(stage), members)
    assert not (stage / "averages").exists()


def _record(step: int, average: float, suite_hash: str = "h") -> dict:
    ref = CheckpointRef(uri=f"/run/stages/s/checkpoints/checkpoint_{step:06d}",
                        hf_uri=f"/run/stages/s/checkpoints/checkpoint_{step:06d}/hf", step=step)
    return {"checkpoint": ref.to_json(), "average": average, "suite_hash": suite_hash,
            "tasks": {"t": {"metric": "accuracy", "value": average, "score": average}}}


def _average_record(steps: list[int], average: float, suite_hash: str = "h") -> dict:
    ref = average_ref("/run/stages/s", [CheckpointRef.at("/run/stages/s", s) for s in steps])
    return {"checkpoint": ref.to_json(), "average": average, "suite_hash": suite_hash,
            "tasks": {"t": {"metric": "accuracy", "value": average, "score": average}}}


def test_top_k_ranks_by_average_then_later_step():
    records = [_record(10, 0.2), _record(20, 0.5), _record(30, 0.4), _record(40, 0.5)]
    assert [ref.step for ref in top_k(records, 3)] == [40, 20, 30]
    assert [ref.step for ref in top_k(records, 10)] == [40, 20, 30, 10]


@pytest.mark.parametrize("average, winner", [(0.55, "average"), (0.5, "average"), (0.45, "single")])
def test_the_average_is_selected_only_when_it_scores_at_least_the_best_single(average, winner):
    records = [_record(10, 0.3), _record(20, 0.5), _record(30, 0.4)]
    single = select_checkpoint(records, "best_eval_average")
    members = top_k(records, 2)
    record = averaging_selection_record(single, _average_record([20, 30], average), members, 2)
    assert record["rule"] == "average_top_k"
    assert record["averaging"]["winner"] == winner
    assert record["averaging"]["margin"] == pytest.approx(average - 0.5)
    assert record["averaging"]["best_single"]["step"] == 20
    chosen = record["checkpoint"]["uri"]
    if winner == "average":
        assert chosen.endswith("averages/top-000020-000030") and record["average"] == average
    else:
        assert chosen.endswith("checkpoint_000020") and record["average"] == 0.5
    assert winner in record["reason"] or ("single checkpoint" in record["reason"])
    assert f"{average - 0.5:+.4f}" in record["reason"]


def test_an_average_scored_by_another_suite_is_refused():
    records = [_record(10, 0.3), _record(20, 0.5)]
    single = select_checkpoint(records, "best_eval_average")
    with pytest.raises(ValueError, match="another eval suite"):
        averaging_selection_record(single, _average_record([10, 20], 0.9, suite_hash="other"), top_k(records, 2), 2)


def test_one_checkpoint_has_nothing_to_average():
    records = [_record(10, 0.3)]
    single = select_checkpoint(records, "best_eval_average")
    record = averaging_selection_record(single, None, top_k(records, 3), 3)
    assert record["checkpoint"]["step"] == 10 and record["averaging"]["winner"] == "single"
    assert "nothing to average" in record["reason"]
