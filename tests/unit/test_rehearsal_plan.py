"""What `llada rehearse` keeps, shrinks and stands in (llada/rehearse.py, llada/standins.py),
without Ray: the rehearsal recipe of the shipped recipes, reachable inputs kept, and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llada.commands import RECIPES_DIR
from llada.recipe import load_recipe
from llada.rehearse import REHEARSAL_SEQ_LEN, ClusterShape, plan_rehearsal, rehearsal_scaling
from llada.standins import lm_eval_output_type
from pipelines import storage

TWO_CPU_NODES = ClusterShape(nodes=2, cpus_per_node=3.0, gpus=0.0)


@pytest.fixture(scope="module")
def big() -> object:
    return load_recipe(str(RECIPES_DIR / "llada-moe-7b-a1b.yaml"))


def test_the_7b_rehearsal_keeps_the_recipe_structure_and_shrinks_the_rest(big, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens: the bucket is unreachable
    monkeypatch.setenv("LLADA_S3_CONNECT_TIMEOUT_S", "0.2")
    monkeypatch.setenv("LLADA_S3_MAX_ATTEMPTS", "1")
    from pipelines.storage import S3Settings

    rehearsal = plan_rehearsal(big, TWO_CPU_NODES, str(tmp_path), "r1", steps=2, s3=S3Settings.from_env())
    small = rehearsal.recipe
    assert small.run_uri == f"{tmp_path}/r1" and small.run_id != big.run_id
    # the same stages, kinds, domains, weights, rules, init_from, RoPE and context changes
    for real, rehearsed in zip(big.stages, small.stages, strict=True):
        assert (rehearsed.name, rehearsed.kind, rehearsed.select, rehearsed.init_from) == \
               (real.name, real.kind, real.select, real.init_from)
        assert rehearsed.mixture.weights == real.mixture.weights
        assert (rehearsed.rope_theta, rehearsed.max_position_embeddings) == (real.rope_theta, real.max_position_embeddings)
        assert small.seq_len_of(real.name) * big.data.seq_len == big.seq_len_of(real.name) * REHEARSAL_SEQ_LEN
        config = small.stage_config(real.name, data_uri="-", output_uri="-")
        assert config.num_steps == 2  # from its shrunk token budget, as a real stage computes it
        assert config.checkpoint_every == (2 if real.select == "last" else 1)
    assert small.seq_len_of("anneal2") == 2 * small.seq_len_of("anneal1")
    # the preset's family and routing ratios, small dims, the stand-in tokenizer's ids
    real_model, model = big.model.build_config(), small.model.build_config()
    assert small.model.preset == big.model.preset and model.hidden_size == 64
    assert model.num_experts // model.num_experts_per_tok == real_model.num_experts // real_model.num_experts_per_tok
    assert model.num_experts_per_tok == 2 and model.rope_theta == real_model.rope_theta == 10000.0
    assert (model.vocab_size, model.eos_token_id, model.mask_token_id) == (1024, 0, 1)
    # expert parallel and ZeRO scaled to two CPU nodes: one worker on each
    assert small.scaling.model_dump(include={"num_workers", "expert_parallel_size", "zero_stage", "use_gpu",
                                             "cpus_per_worker", "activation_checkpointing"}) == {
        "num_workers": 2, "expert_parallel_size": 2, "zero_stage": 1, "use_gpu": False, "cpus_per_worker": 2.0,
        "activation_checkpointing": True}
    # every input stood in, in its format, under the rehearsal's own folder
    stood = {s.what: s for s in rehearsal.stand_ins}
    assert sorted(stood) == sorted([f"data.sources.{i} ({d})" for i, d in
                                    enumerate(["text", "math", "code", "anneal", "chat"])]
                                   + ["data.tokenizer_uri"] + [f"eval.tasks.{t.name}" for t in big.eval.tasks])
    assert stood["data.sources.0 (text)"].uri.endswith("*.parquet")
    assert stood["data.sources.4 (chat)"].uri.endswith("*.jsonl")
    assert all(s.uri.startswith(f"{tmp_path}/r1/standins/") for s in rehearsal.stand_ins)
    tasks = {task.name: task for task in small.eval.tasks}
    assert list(tasks) == [task.name for task in big.eval.tasks]
    assert (tasks["mmlu"].metric, tasks["gsm8k"].metric) == ("acc", "exact_match,strip")
    assert all(t.max_items <= 4 and not t.allow_code_execution for t in tasks.values())
    # the rehearsal's own MLflow experiment and registered model, never the real run's
    assert small.tracking.model_name == "llada-moe-7b-a1b-rehearsal"
    assert small.serve.autoscaling.max_replicas == 1 and small.serve.host == "127.0.0.1"
    text = rehearsal.describe()
    assert "stage anneal2" in text and "x 8192  ->" in text and "stood in" in text
    json.dumps(rehearsal.record())  # the record is plain JSON


def test_stand_ins_are_written_once_in_their_formats(big, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    from llada.rehearse import write_stand_ins
    from pipelines.sources import SourceSpec, expand_sources, read_documents
    from pipelines.tokenizer import load_tokenizer

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("LLADA_S3_MAX_ATTEMPTS", "1")
    rehearsal = plan_rehearsal(big, TWO_CPU_NODES, str(tmp_path), "r1")
    lines: list[str] = []
    write_stand_ins(rehearsal, None, lines.append)
    assert "19 written, 0 kept" in lines[-1]
    for source in rehearsal.recipe.data.sources:  # the platform's own reader takes them
        documents = [d for unit in expand_sources([SourceSpec.model_validate(source.model_dump())])
                     for d in read_documents(unit).records]
        assert len(documents) == 400, source.uri
    text_file = storage.list_files(rehearsal.recipe.data.sources[0].uri)[0]
    assert pq.read_table(text_file).column_names == ["id", "text"]
    assert len(load_tokenizer(rehearsal.recipe.data.tokenizer_uri)) <= 1024
    tokenizer_file = storage.join(rehearsal.recipe.data.tokenizer_uri, "tokenizer.json")
    before = Path(tokenizer_file).stat().st_mtime_ns
    write_stand_ins(rehearsal, None, lines.append)  # a resumed rehearsal keeps its tokenizer and files
    assert "0 written, 19 kept" in lines[-1] and Path(tokenizer_file).stat().st_mtime_ns == before


def test_reachable_inputs_are_kept(tmp_path):
    from pipelines.tokenizer import save_tokenizer, train_bpe

    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "a.jsonl").write_text("".join(json.dumps({"text": f"doc {i} of the web"}) + "\n"
                                                      for i in range(50)))
    save_tokenizer(train_bpe([f"doc {i} of the web" for i in range(50)], vocab_size=300), str(tmp_path / "tok"))
    (tmp_path / "eval.jsonl").write_text(json.dumps({"text": "held out"}) + "\n")
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(f"""
run_id: mine
storage_uri: {tmp_path}/runs
model: {{preset: tiny}}
data: {{demo: false, tokenizer_uri: {tmp_path}/tok, seq_len: 256, sources: [{{uri: "{tmp_path}/web/*.jsonl", domain: web}}]}}
stages:
  - {{name: p1, kind: pretrain, mixture: {{weights: {{web: 1.0}}, token_budget: 100000}}, micro_batch_size: 4,
     optimizer: {{lr: 0.001}}, checkpoint_every: 10}}
eval: {{tasks: [{{name: held, kind: elbo, source: {tmp_path}/eval.jsonl, num_mc_samples: 16}}]}}
""")
    recipe = load_recipe(str(recipe_file))
    rehearsal = plan_rehearsal(recipe, ClusterShape(nodes=1, cpus_per_node=2.0, gpus=0.0), run_id="mine-r")
    assert rehearsal.stand_ins == []
    small = rehearsal.recipe
    assert small.data.sources[0].uri == f"{tmp_path}/web/*.jsonl" and small.data.tokenizer_uri == f"{tmp_path}/tok"
    model = small.model.build_config()
    assert model.vocab_size == len(__import__("pipelines.tokenizer").tokenizer.load_tokenizer(f"{tmp_path}/tok"))
    assert small.eval.tasks[0].source == f"{tmp_path}/eval.jsonl" and small.eval.tasks[0].num_mc_samples == 2
    assert small.run_uri == f"{tmp_path}/runs/mine-r" and small.scaling.num_workers == 1
    assert "nothing" in rehearsal.describe()


def test_the_demo_recipe_rehearses_its_demo_corpus(tmp_path):
    recipe = load_recipe(str(RECIPES_DIR / "tiny-cpu.yaml"))
    rehearsal = plan_rehearsal(recipe, ClusterShape(nodes=1, cpus_per_node=2.0, gpus=0.0), str(tmp_path))
    small = rehearsal.recipe
    assert rehearsal.stand_ins == [] and small.eval == "demo" and small.data.demo
    assert small.run_id.startswith("tiny-cpu-rehearsal-") and small.data.corpus.num_text_docs == 400
    averaged = small.stage("pretrain2")
    assert averaged.select == "average_top_k" and averaged.average_k == 2
    assert small.stage_config("pretrain2", data_uri="-", output_uri="-").num_steps >= 2


def test_refusals_name_the_problem(big, tmp_path):
    with pytest.raises(ValueError, match="real run's id"):
        plan_rehearsal(big, TWO_CPU_NODES, str(tmp_path), run_id=big.run_id)
    with pytest.raises(ValueError, match="--steps"):
        plan_rehearsal(big, TWO_CPU_NODES, str(tmp_path), run_id="x", steps=0)


@pytest.mark.parametrize(("metric", "gen_length", "expected"), [
    ("acc", None, "multiple_choice"), ("acc_norm", None, "multiple_choice"),
    ("exact_match,flexible-extract", None, "generate_until"), ("pass@1,create_test", 512, "generate_until"),
    ("pass_at_1", None, "generate_until"), (None, 256, "generate_until"),
    ("word_perplexity", None, "loglikelihood_rolling"), ("bits_per_byte", None, "loglikelihood_rolling"),
])
def test_lm_eval_tasks_stand_in_by_how_they_are_scored(metric, gen_length, expected):
    from jobs.evaluation.tasks import LmEvalTask

    task = LmEvalTask(name="t", kind="lm_eval", task="t", metric=metric, gen_length=gen_length)
    assert lm_eval_output_type(task) == expected


@pytest.mark.parametrize(("cluster", "wanted", "expected"), [
    (ClusterShape(2, 3.0, 0.0), {"num_workers": 64, "expert_parallel_size": 8, "use_gpu": True},
     {"num_workers": 2, "expert_parallel_size": 2, "use_gpu": False, "cpus_per_worker": 2.0}),
    (ClusterShape(1, 2.0, 0.0), {"num_workers": 1}, {"num_workers": 1, "expert_parallel_size": 1}),
    (ClusterShape(1, 16.0, 4.0), {"num_workers": 64, "expert_parallel_size": 8, "use_gpu": True},
     {"num_workers": 4, "expert_parallel_size": 4, "use_gpu": True}),
    (ClusterShape(1, 2.0, 0.0), {"num_workers": 8, "expert_parallel_size": 4},
     {"num_workers": 2, "expert_parallel_size": 2}),  # one small node: two workers share it
])
def test_scaling_fits_the_cluster(cluster, wanted, expected):
    got = rehearsal_scaling(wanted, cluster, experts=16)
    assert {key: got.get(key) for key in expected} == expected
    if not got["use_gpu"] and cluster.nodes < got["num_workers"]:
        assert "cpus_per_worker" not in got  # the platform sizes workers from the cluster


def test_the_command_refuses_a_local_cluster_and_an_address_together(capsys):
    from llada.cli import main

    assert main(["rehearse", str(RECIPES_DIR / "tiny-cpu.yaml"), "--nodes", "2", "--ray-address", "127.0.0.1:1"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["rehearse", str(RECIPES_DIR / "tiny-cpu.yaml"), "--steps", "0"]) == 2
