"""Every shipped recipe validates; overrides and bad recipes behave as users expect."""

from pathlib import Path

import pytest
import yaml

from llada.cli import main
from jobs.recipe import apply_overrides
from llada.recipe import Recipe, load_recipe
from jobs.submit import entrypoint

RECIPES = sorted((Path(__file__).resolve().parents[2] / "jobs" / "recipes").glob("*.yaml"))


def test_the_two_recipes_of_the_issue_are_shipped():
    assert {p.name for p in RECIPES} >= {"tiny-cpu.yaml", "llada-moe-7b-a1b.yaml"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates_and_starts_with_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# Run: llada "), f"{path.name} must start with the command that runs it"
    recipe = load_recipe(str(path))
    assert [s.kind for s in recipe.stages] == ["pretrain", "pretrain", "anneal", "anneal", "sft"]
    for stage in recipe.stages:
        recipe.stage_config(stage.name, data_uri="d", output_uri="o")


def test_the_full_scale_recipe_follows_the_paper():
    recipe = load_recipe(str(next(p for p in RECIPES if p.name == "llada-moe-7b-a1b.yaml")))
    budgets = [s.mixture.token_budget for s in recipe.stages[:4]]
    assert budgets == [10 * 10**12, 10 * 10**12, 500 * 10**9, 500 * 10**9]
    anneal2 = recipe.stage("anneal2")
    assert (anneal2.rope_theta, anneal2.max_position_embeddings) == (50_000.0, 8192)
    config = recipe.stage_config("pretrain1", "d", "o").model_config_resolved()
    assert (config.num_experts, config.num_experts_per_tok, config.rope_theta) == (64, 8, 10_000.0)
    assert recipe.stage("anneal1").init_from == "pretrain2"
    assert recipe.stage("pretrain2").select == "best_eval_average" and recipe.stage("anneal1").select == "last"
    assert recipe.stage("sft").select == "best_eval_average"  # what serving loads
    assert recipe.eval != "demo" and not any(t.demo_paths() for t in recipe.eval.tasks)
    assert recipe.scaling.use_gpu and recipe.scaling.activation_checkpointing


def test_the_full_scale_suite_is_the_papers_benchmarks_by_their_lm_eval_names():
    from lm_eval.tasks import TaskManager

    recipe = load_recipe(str(next(p for p in RECIPES if p.name == "llada-moe-7b-a1b.yaml")))
    names = {task.task for task in recipe.eval.tasks if task.kind == "lm_eval"}
    assert {"mmlu", "gsm8k", "minerva_math", "humaneval", "mbpp", "bbh_cot_fewshot"} <= names
    manager = TaskManager()
    unknown = sorted(name for name in names if name not in manager.all_subtasks and name not in manager.all_groups)
    assert not unknown, f"not lm-eval tasks or groups: {unknown}"


def test_overrides_by_dotted_path_and_stage_name():
    raw = {"run_id": "r", "stages": [{"name": "a", "num_steps": 1}, {"name": "b"}], "model": {"preset": "tiny"}}
    out = apply_overrides(raw, ["stages.b.num_steps=7", "stages.0.num_steps=3", "model.overrides.num_experts=8",
                                "run_id=other"])
    assert out["stages"][1]["num_steps"] == 7 and out["stages"][0]["num_steps"] == 3
    assert out["model"]["overrides"] == {"num_experts": 8} and out["run_id"] == "other"
    assert raw["stages"][1] == {"name": "b"}  # the input is not modified
    with pytest.raises(ValueError, match="no item 'zzz'"):
        apply_overrides(raw, ["stages.zzz.num_steps=1"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        apply_overrides(raw, ["stages"])


def tiny_raw():
    return yaml.safe_load(next(p for p in RECIPES if p.name == "tiny-cpu.yaml").read_text())


def test_bad_recipes_name_the_field():
    raw = tiny_raw()
    raw["stages"][1]["init_from"] = "sft"
    with pytest.raises(ValueError, match=r"stages.1.init_from: 'sft' is not an earlier stage"):
        Recipe.model_validate(raw)
    raw = tiny_raw()
    raw["stages"][1]["select"] = "best"
    with pytest.raises(ValueError, match=r"stages.1.select"):
        Recipe.model_validate(raw)
    raw = tiny_raw()
    raw["stages"][0]["average_k"] = 2
    with pytest.raises(ValueError, match=r"stages.0\n.*average_k: only used by select: average_top_k \(this stage "
                                         r"selects by last\)"):
        Recipe.model_validate(raw)
    raw["stages"][0]["select"] = "average_top_k"
    assert Recipe.model_validate(raw).stages[0].average_k == 2
    raw["stages"][0]["average_k"] = 1
    with pytest.raises(ValueError, match=r"stages.0.average_k"):
        Recipe.model_validate(raw)
    raw = tiny_raw()
    raw["stages"][2]["name"] = "pretrain1"
    with pytest.raises(ValueError, match="duplicate stage names"):
        Recipe.model_validate(raw)
    raw = tiny_raw()
    raw["data"]["demo"] = False  # own data needs sources and a tokenizer
    with pytest.raises(ValueError, match="sources"):
        Recipe.model_validate(raw)
    raw = tiny_raw()
    raw["stages"][0]["mixture"]["weights"] = {"text": -1.0}
    with pytest.raises(ValueError, match="weights.text"):
        Recipe.model_validate(raw)


def test_the_recipe_formats_of_earlier_versions_get_a_message_saying_what_changed():
    raw = tiny_raw()
    raw["stages"][1]["init_from"] = {"stage": "pretrain1", "rule": "last"}
    with pytest.raises(ValueError, match=r"init_from: name the earlier stage .* own `select:`"):
        Recipe.model_validate(raw)
    with pytest.raises(ValueError, match=r"final_selection: removed; each stage names its own rule"):
        Recipe.model_validate({**tiny_raw(), "final_selection": "best_eval_average"})


OWN_DATA = {"demo": False, "tokenizer_uri": "s3://b/tok", "sources": [{"uri": "s3://b/web/*.jsonl", "domain": "text"}]}


@pytest.mark.parametrize("eval_block, message", [
    ("demo", "eval: the demo suite scores checkpoints on the demo corpus's held-out sets, but data.demo is false"),
    ({"tasks": [{"name": "t", "kind": "elbo", "source": "demo:heldout_text", "num_mc_samples": 2}]},
     r"eval.tasks: \['t'\] read demo: sources, but data.demo is false"),
])
def test_a_recipe_whose_eval_suite_cannot_run_fails_at_load(eval_block, message):
    raw = {**tiny_raw(), "data": OWN_DATA, "eval": eval_block}
    with pytest.raises(ValueError, match=message):
        Recipe.model_validate(raw)
    own_suite = {"tasks": [{"name": "t", "kind": "elbo", "source": "s3://b/eval/t.jsonl", "num_mc_samples": 2}]}
    assert Recipe.model_validate({**raw, "eval": own_suite}).eval.tasks[0].name == "t"


def test_eval_and_serve_blocks_are_typed_and_checked_at_load():
    with pytest.raises(ValueError, match=r"eval.suite.tasks.0.generation.sampling"):
        Recipe.model_validate({**tiny_raw(), "eval": {"tasks": [
            {"name": "g", "kind": "generation", "source": "x.jsonl", "sampling": {"gen_length": 8, "cache": "full"}}]}})
    with pytest.raises(ValueError, match=r"serve.replica\n.*replica.num_gpus: must be >= 0"):
        Recipe.model_validate({**tiny_raw(), "serve": {"replica": {"num_gpus": -1}}})
    recipe = Recipe.model_validate({**tiny_raw(), "serve": {"port": 9001}})
    assert recipe.serve.port == 9001 and recipe.serve.sampling.cache == "dual"


def test_cli_exits_non_zero_naming_the_field_path(capsys, tmp_path):
    path = next(p for p in RECIPES if p.name == "tiny-cpu.yaml")
    with pytest.raises(SystemExit) as exit_info:
        main(["status", str(path), "--set", "stages.sft.micro_batch_size=0"])
    assert exit_info.value.code == 2
    assert "stages.4.micro_batch_size" in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text("run_id: [unclosed\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["status", str(broken)])
    assert exit_info.value.code == 2 and "not valid YAML" in capsys.readouterr().err


def test_status_json_on_a_fresh_run(capsys, tmp_path):
    path = next(p for p in RECIPES if p.name == "tiny-cpu.yaml")
    assert main(["status", str(path), "--set", f"storage_uri={tmp_path}", "--json"]) == 0
    import json

    report = json.loads(capsys.readouterr().out)
    assert [s["stage"] for s in report["stages"]] == ["pretrain1", "pretrain2", "anneal1", "anneal2", "sft"]
    assert all(s["state"] == "not started" and s["selected"] is None for s in report["stages"])


def test_submit_entrypoint_uses_the_given_interpreter():
    command = entrypoint("jobs/recipes/tiny-cpu.yaml", "sft", ["a.b=1"], "/opt/py/bin/python")
    assert command == "/opt/py/bin/python -m llada run jobs/recipes/tiny-cpu.yaml --stage sft --set a.b=1"


@pytest.mark.parametrize("command", ["data", "run", "train", "status", "eval", "generate", "submit", "demo", "serve"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0 and "usage: llada" in capsys.readouterr().out


def test_serve_with_a_recipe_needs_a_finished_run(capsys, tmp_path):
    path = next(p for p in RECIPES if p.name == "tiny-cpu.yaml")
    recipe_copy = tmp_path / "recipe.yaml"
    recipe_copy.write_text(path.read_text().replace("storage_uri: ./runs", f"storage_uri: {tmp_path}"))
    assert main(["serve", str(recipe_copy), "--print-config"]) == 2
    assert "no selection record" in capsys.readouterr().err


def test_relative_local_paths_become_absolute_where_the_recipe_is_loaded(tmp_path, monkeypatch):
    """Ray Train workers run in another directory: `./runs` must already name the driver's folder,
    or checkpoint records land in the worker's directory (the demo lost its checkpoints so)."""
    monkeypatch.chdir(tmp_path)
    raw = yaml.safe_load(next(p for p in RECIPES if p.name == "tiny-cpu.yaml").read_text())
    recipe = Recipe.model_validate({**raw, "storage_uri": "./runs"})
    assert recipe.storage_uri == str(tmp_path / "runs")
    config = recipe.stage_config("sft", data_uri="data/sft", output_uri="out", tokenizer_uri="tok",
                                 init_from="ckpt/hf")
    assert [config.data_uri, config.output_uri, config.tokenizer_uri, config.init_from] == [
        str(tmp_path / name) for name in ("data/sft", "out", "tok", "ckpt/hf")]
    remote = Recipe.model_validate({**raw, "storage_uri": "s3://bucket/runs"})
    assert remote.storage_uri == "s3://bucket/runs"
    with pytest.raises(ValueError, match="unsupported scheme"):
        Recipe.model_validate({**raw, "storage_uri": "ftp://host/runs"})


def test_an_s3_recipe_is_served_with_its_serve_block_and_the_selected_checkpoint(s3_server, capsys):
    """`llada serve s3://.../recipe.yaml`: the recipe is read from storage like every other command
    (it was once re-read with open()), its serve: block applies, the last stage's selection names
    the checkpoint."""
    import json

    bucket = s3_server.bucket("recipes")
    raw = {**tiny_raw(), "storage_uri": f"{bucket}/runs", "serve": {"port": 9123, "model_name": "tiny-s3"}}
    s3_server.client().put_object(Bucket=bucket[5:], Key="recipe.yaml", Body=yaml.safe_dump(raw).encode())
    selected = {"uri": f"{bucket}/runs/tiny-cpu/stages/sft/checkpoints/checkpoint_000800",
                "hf_uri": f"{bucket}/runs/tiny-cpu/stages/sft/checkpoints/checkpoint_000800/hf", "step": 800}
    s3_server.client().put_object(Bucket=bucket[5:], Key="runs/tiny-cpu/stages/sft/selection.json",
                                  Body=json.dumps({"format": "llada-selection/2", "checkpoint": selected}).encode())
    assert main(["serve", f"{bucket}/recipe.yaml", "--print-config"]) == 0
    printed = capsys.readouterr().out
    document = yaml.safe_load(printed[printed.index("# Ray Serve config"):])
    args = document["applications"][0]["args"]
    assert args["checkpoint"] == selected["hf_uri"]
    assert args["config"]["model_name"] == "tiny-s3" and document["http_options"]["port"] == 9123


def test_serve_without_a_serve_block_uses_the_shipped_config_for_the_recipes_hardware(capsys, tmp_path):
    path = next(p for p in RECIPES if p.name == "tiny-cpu.yaml")
    assert main(["serve", str(path), "--checkpoint", "/ckpt/hf", "--print-config"]) == 0
    document = yaml.safe_load(capsys.readouterr().out)
    assert document["applications"][0]["args"]["config"]["sampling"]["max_tokens"] == 64  # laptop.yaml


@pytest.mark.parametrize("path, value, message", [
    (("stages", 0, "micro_batch_size"), "16", "Input should be a valid integer"),
    (("stages", 0, "micro_batch_size"), True, "Input should be a valid integer"),
    (("scaling", "num_workers"), 1.0, "Input should be a valid integer"),
    (("data", "seq_len"), "128", "Input should be a valid integer"),
])
def test_the_schema_is_strict_about_types(path, value, message):
    raw = tiny_raw()
    node = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ValueError, match=message):
        Recipe.model_validate(raw)


def test_no_stage_trains_rows_longer_than_the_models_context():
    raw = tiny_raw()
    for stage in raw["stages"]:
        stage["num_steps"] = 50  # not derived from the budget, which longer rows would shrink
    raw["data"]["seq_len"] = 2048  # the tiny preset's context is 1024; anneal 2 raises it to 2048
    with pytest.raises(ValueError, match=r"stages.0 \(pretrain1\): trains rows of 2048 tokens \(data.seq_len\) but the "
                                         r"model's context is 1024"):
        Recipe.model_validate(raw)
    raw["data"]["seq_len"], raw["data"]["sft_seq_len"] = 128, 2048
    recipe = Recipe.model_validate(raw)  # sft starts from anneal 2, whose context is 2048
    assert recipe.context_of("sft") == 2048 and recipe.context_of("anneal1") == 1024


def test_a_second_driver_is_refused_before_any_work_naming_the_holder(capsys, tmp_path):
    from jobs.lease import acquire, release

    path = next(p for p in RECIPES if p.name == "tiny-cpu.yaml")
    holder = acquire(str(tmp_path / "tiny-cpu"), "llada run (the first driver)")
    try:
        assert main(["run", str(path), "--set", f"storage_uri={tmp_path}"]) == 2
        error = capsys.readouterr().err
        assert "is being run by another driver" in error and "llada run (the first driver)" in error
        assert "--break-lease" in error and "Traceback" not in error
        assert not (tmp_path / "tiny-cpu" / "data").exists()  # nothing was prepared
    finally:
        release(holder)
