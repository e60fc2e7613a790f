"""The serve config (serve/config.py), the Serve config YAML that `--print-config` emits, and the
CLI wiring (serve/cli.py), without starting Ray."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from serve.app import IMPORT_PATH, serve_config_document, serve_config_yaml
from serve.cli import add_serve_command, main
from serve.config import AppArgs, ServeConfig, load_serve_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "serve" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_starts_with_its_command_and_validates(path):
    assert path.read_text().startswith("# llada serve "), "a config's first line is the command that runs it"
    config = load_serve_config(str(path))
    assert config.host == "127.0.0.1"
    sampling = config.sampling
    assert (sampling.threshold, sampling.cache, sampling.early_stop) == (0.9, "dual", True)  # the measured choice
    ServeDeploySchema.model_validate(serve_config_document(AppArgs(checkpoint="s3://b/c", config=config)))


def test_the_default_sampling_is_the_fast_options_and_bad_defaults_fail_at_load():
    from llada_core import FAST_OPTIONS

    sampling = ServeConfig().sampling
    assert {name: getattr(sampling, name) for name in FAST_OPTIONS} == FAST_OPTIONS
    with pytest.raises(ValidationError, match="cache"):
        ServeConfig.model_validate({"sampling": {"cache": "sideways"}})
    with pytest.raises(ValidationError, match="threshold: needs remasking"):
        ServeConfig.model_validate({"sampling": {"remasking": "random"}})  # with the default threshold
    reference = ServeConfig.model_validate({"sampling": {"remasking": "random", "threshold": None}})
    assert reference.sampling.threshold is None


def test_configs_are_shipped():
    assert {p.name for p in CONFIGS} >= {"laptop.yaml", "gpu-cluster.yaml"}


def test_an_empty_config_is_valid_and_binds_to_localhost():
    config = ServeConfig()
    assert config.host == "127.0.0.1" and config.port == 8000 and config.api_key_env is None
    assert config.replica.num_gpus == "auto"


@pytest.mark.parametrize("values,field", [
    ({"batching": {"max_batch_size": 32}}, "replica.max_ongoing_requests"),
    ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "autoscaling.min_replicas"),
    ({"autoscaling": {"initial_replicas": 5}}, "autoscaling.initial_replicas"),
    ({"sampling": {"max_tokens": 2000}}, "sampling.max_tokens"),
    ({"sampling": {"cfg_scale": 50}}, "sampling.cfg_scale"),
    ({"replica": {"max_queued_requests": 0}}, "replica.max_queued_requests"),
    ({"replica": {"max_ongoing_requests": 8}, "batching": {"max_batch_size": 8}}, "limits.max_prompts_per_request"),
    ({"replica": {"num_gpus": -1}}, "replica.num_gpus"),
    ({"api_key_env": "not a name"}, "api_key_env"),
    ({"replica": {"gpus": 1}}, "gpus"),
    ({"port": 70000}, "port"),
])
def test_bad_configs_are_refused_naming_the_field(values, field):
    with pytest.raises(ValidationError) as caught:
        ServeConfig.model_validate(values)
    assert field in str(caught.value)


def test_a_serve_config_file_loads_and_flags_override_it_and_a_recipe_is_refused(tmp_path):
    config_file = tmp_path / "serve.yaml"
    config_file.write_text("port: 9000\nbatching: {max_batch_size: 4}\n")
    config = load_serve_config(str(config_file), {"host": "0.0.0.0"})
    assert (config.port, config.host, config.batching.max_batch_size) == (9000, "0.0.0.0", 4)
    (tmp_path / "bad.yaml").write_text("port: [")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_serve_config(str(tmp_path / "bad.yaml"))
    (tmp_path / "recipe.yaml").write_text("run_id: r\nserve:\n  port: 9000\n")
    with pytest.raises(ValueError, match="this is a recipe, not a serve config; use `llada serve RECIPE`"):
        load_serve_config(str(tmp_path / "recipe.yaml"))
    with pytest.raises(ValueError, match="cannot read the serve config"):
        load_serve_config(str(tmp_path / "missing.yaml"))


def test_printed_config_is_a_valid_serve_deploy_config_that_round_trips():
    checkpoint = "s3://bucket/runs/tiny-cpu/stages/sft/checkpoints/checkpoint_000800/hf"
    app_args = AppArgs.model_validate({"checkpoint": checkpoint, "config": {
        "port": 8080, "autoscaling": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 6},
        "replica": {"num_gpus": 1, "max_ongoing_requests": 12, "max_queued_requests": 20},
        "limits": {"max_prompts_per_request": 12}}})
    document = yaml.safe_load(serve_config_yaml(app_args))
    ServeDeploySchema.model_validate(document)  # what `serve deploy` / a RayService checks
    application = document["applications"][0]
    assert application["import_path"] == IMPORT_PATH
    assert AppArgs.model_validate(application["args"]) == app_args
    sampler, ingress = application["deployments"]
    assert sampler["autoscaling_config"]["max_replicas"] == 4
    assert sampler["autoscaling_config"]["target_ongoing_requests"] == 6
    assert (sampler["max_ongoing_requests"], sampler["max_queued_requests"]) == (24, 20)  # router headroom x2
    assert sampler["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert document["http_options"]["host"] == "127.0.0.1" and document["http_options"]["port"] == 8080
    assert document["http_options"]["request_timeout_s"] > app_args.config.request_timeout_s
    assert "runtime_env" not in str(ingress)
    # a roll-out starts the new replicas before the old ones stop (serve/config.py: RolloutSettings)
    assert sampler["max_surge_percent"] == ingress["max_surge_percent"] == 100


def test_num_gpus_auto_is_left_to_the_builder():
    document = serve_config_document(AppArgs(checkpoint="/ckpt"))
    assert "ray_actor_options" not in document["applications"][0]["deployments"][0]


def test_cli_print_config(capsys, tmp_path):
    config_file = tmp_path / "serve.yaml"
    config_file.write_text("model_name: demo\n")
    assert main(["--checkpoint", "/ckpt", "--config", str(config_file), "--port", "8123", "--print-config"]) == 0
    document = yaml.safe_load(capsys.readouterr().out)
    assert document["applications"][0]["args"]["config"]["model_name"] == "demo"
    assert document["http_options"]["port"] == 8123


@pytest.mark.parametrize("argv,needle", [
    (["--print-config"], "--checkpoint: required"),
    (["--checkpoint", "/c", "--detach"], "--detach needs a running Ray cluster"),
    (["--checkpoint", "/c", "--port", "0", "--print-config"], "port"),
    (["--config", "/no/such/serve.yaml", "--checkpoint", "/c"], "cannot read the serve config"),
])
def test_cli_errors_name_the_problem(capsys, monkeypatch, argv, needle):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(argv) == 2
    assert needle in capsys.readouterr().err


def test_add_serve_command_plugs_into_the_llada_parser():
    parser = argparse.ArgumentParser(prog="llada")
    add_serve_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", "--checkpoint", "s3://b/c", "--host", "0.0.0.0", "--print-config"])
    assert args.command == "serve" and args.checkpoint == "s3://b/c" and args.print_config
    assert args.handler.__name__ == "run_serve"


def test_one_proxy_where_the_nodes_share_an_address(monkeypatch):
    import ray

    from serve.app import _nodes_share_an_address

    local = [{"Alive": True, "NodeManagerAddress": "127.0.0.1"}] * 2 + [{"Alive": False, "NodeManagerAddress": "x"}]
    monkeypatch.setattr(ray, "nodes", lambda: local)
    assert _nodes_share_an_address()  # a local multi-node cluster: one proxy, on the head
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "NodeManagerAddress": f"10.0.0.{i}"} for i in (1, 2)])
    assert not _nodes_share_an_address()
