"""Cluster deployment (llada/infra/render.py, llada/infra/launcher.py, `llada infra render`, infra/):
every shipped and rendered manifest fits the KubeRay CRDs (tests/unit/kuberay_schema.py) or Ray's
own cluster-launcher schema, the shipped files are what their first line renders, the RayService
serves exactly what `llada serve --print-config` prints, and the image installs like `make setup`."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml
from kuberay_schema import check_manifest, k8s_problems
from pydantic import ValidationError

from llada.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
GPU_RECIPE = "jobs/recipes/llada-moe-7b-a1b.yaml"
CPU_RECIPE = "jobs/recipes/tiny-cpu.yaml"
CHECKPOINT = "s3://bucket/runs/r/stages/sft/checkpoints/checkpoint_000010/hf"
SHIPPED_KUBERAY = sorted((ROOT / "infra" / "kuberay").glob("*.yaml"))
SHIPPED_LAUNCHER = sorted((ROOT / "infra" / "cluster-launcher").glob("*.yaml"))
RENDERINGS = {
    "raycluster": ["--kind", "raycluster"],
    "rayjob": ["--kind", "rayjob"],
    "rayjob-stage": ["--kind", "rayjob", "--stage", "sft", "--set", "stages.sft.num_steps=1000"],
    "rayservice": ["--kind", "rayservice", "--checkpoint", CHECKPOINT],
}


@pytest.fixture(autouse=True)
def _in_project_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the shipped files name their recipe relative to the project


def render(capsys, recipe: str, *flags: str) -> str:
    assert main(["infra", "render", recipe, *flags]) == 0
    return capsys.readouterr().out


def ray_launcher_schema() -> dict:
    ray_dir = Path(importlib.util.find_spec("ray").submodule_search_locations[0])
    return json.loads((ray_dir / "autoscaler" / "ray-schema.json").read_text())


@pytest.mark.parametrize("path", SHIPPED_KUBERAY + SHIPPED_LAUNCHER, ids=lambda p: p.name)
def test_each_shipped_file_is_what_its_first_line_renders(path, capsys):
    command = path.read_text().splitlines()[0].removeprefix("# ")
    argv = shlex.split(command)
    assert argv[:3] == ["llada", "infra", "render"], f"{path.name} must start with the command that renders it"
    assert render(capsys, *argv[3:]) == path.read_text(), f"{path.name} drifted from its recipe: run `{command}`"


def test_the_issue_s_files_are_shipped():
    assert {p.name for p in SHIPPED_KUBERAY} == {"raycluster.yaml", "rayjob.yaml", "rayservice.yaml"}
    assert [p.name for p in SHIPPED_LAUNCHER] == ["aws-gpu.yaml"]
    assert (ROOT / "infra" / "Dockerfile").is_file()


@pytest.mark.parametrize("path", SHIPPED_KUBERAY, ids=lambda p: p.name)
def test_every_shipped_manifest_fits_the_kuberay_crds(path):
    check_manifest(yaml.safe_load(path.read_text()))


@pytest.mark.parametrize("recipe", [GPU_RECIPE, CPU_RECIPE])
@pytest.mark.parametrize("rendering", sorted(RENDERINGS))
def test_every_rendered_manifest_fits_the_kuberay_crds(recipe, rendering, capsys):
    check_manifest(yaml.safe_load(render(capsys, recipe, *RENDERINGS[rendering])))


@pytest.mark.parametrize("path,mutate,field", [
    ("raycluster.yaml", lambda d: d["spec"]["workerGroupSpecs"][1].update(replicas="2"), "replicas"),
    ("raycluster.yaml", lambda d: d["spec"]["workerGroupSpecs"][1].update(minReplica=0), "minReplica"),
    ("raycluster.yaml", lambda d: d["spec"].update(enableInTreeAutoscaling="true"), "enableInTreeAutoscaling"),
    ("raycluster.yaml", lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}), "num-cpus"),
    ("raycluster.yaml", lambda d: d["spec"]["authOptions"].update(mode="tokens"), "authOptions.mode"),
    ("raycluster.yaml", lambda d: containers(d)[0].update(resource={}), "resource: unknown field of V1Container"),
    ("raycluster.yaml", lambda d: containers(d)[0]["env"][0].update(value=1800), "env[0].value: expected str"),
    ("raycluster.yaml", lambda d: containers(d)[0]["ports"][0].update(containerPort="6379"), "containerPort"),
    ("raycluster.yaml", lambda d: containers(d)[0].pop("name"), "`name`, must not be `None`"),
    ("rayjob.yaml", lambda d: d["spec"].update(backoffLimit=2.5), "backoffLimit"),
    ("rayjob.yaml", lambda d: d["spec"].update(entryPoint="llada run x"), "entryPoint"),
    ("rayjob.yaml", lambda d: d["spec"].update(shutdownAfterJobFinishes=True), "mutually exclusive"),
    ("rayjob.yaml", lambda d: d["spec"]["deletionStrategy"]["deletionRules"][0]["condition"].update(ttlSecond=1),
     "ttlSecond"),
    ("rayjob.yaml", lambda d: d["spec"]["deletionStrategy"]["deletionRules"][1]["condition"].update(ttlSeconds=-1),
     "ttlSeconds"),
    ("rayservice.yaml", lambda d: d["spec"].update(serveConfigV2={"applications": []}), "serveConfigV2"),
    ("rayservice.yaml", lambda d: d["spec"].update(rayClusterSpec=d["spec"].pop("rayClusterConfig")), "rayClusterSpec"),
])
def test_the_checker_refuses_a_misspelled_field_or_a_wrong_type(path, mutate, field):
    document = yaml.safe_load((ROOT / "infra" / "kuberay" / path).read_text())
    check_manifest(copy.deepcopy(document))
    mutate(document)
    with pytest.raises(ValidationError) as caught:
        check_manifest(document)
    assert field in str(caught.value)


def containers(document: dict) -> list[dict]:
    return document["spec"]["headGroupSpec"]["template"]["spec"]["containers"]


def test_the_kubernetes_walker_follows_the_client_models():
    assert k8s_problems({"containers": [{"name": "c", "image": "i"}]}, "V1PodSpec") == []
    assert k8s_problems({"containers": [{"name": "c", "imagee": "i"}]}, "V1PodSpec") == [
        ".containers[0].imagee: unknown field of V1Container"]
    assert k8s_problems({"limits": {"cpu": 4}}, "V1ResourceRequirements") == [".limits.cpu: expected str, got int 4"]
    assert k8s_problems({"port": 8000, "path": "/"}, "V1HTTPGetAction") == []  # int-or-string


@pytest.mark.parametrize("config", ["serve/configs/gpu-cluster.yaml", "serve/configs/laptop.yaml"])
def test_the_rayservice_serves_what_llada_serve_print_config_prints(config, capsys):
    from ray.serve.schema import ServeDeploySchema

    service = yaml.safe_load(render(capsys, CPU_RECIPE, "--kind", "rayservice", "--checkpoint", CHECKPOINT,
                                    "--serve-config", config))
    assert main(["serve", "--checkpoint", CHECKPOINT, "--config", config, "--host", "0.0.0.0", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == yaml.safe_load(printed)
    ServeDeploySchema.model_validate(yaml.safe_load(printed))
    port = yaml.safe_load(printed)["http_options"]["port"]
    for spec in [service["spec"]["rayClusterConfig"]["headGroupSpec"],
                 *service["spec"]["rayClusterConfig"]["workerGroupSpecs"]]:
        assert {"name": "serve", "containerPort": port} in spec["template"]["spec"]["containers"][0]["ports"]


def test_the_shipped_rayservice_serves_the_gpu_cluster_config(capsys):
    service = yaml.safe_load((ROOT / "infra" / "kuberay" / "rayservice.yaml").read_text())
    checkpoint = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]["checkpoint"]
    main(["serve", "--checkpoint", checkpoint, "--config", "serve/configs/gpu-cluster.yaml", "--host", "0.0.0.0",
          "--print-config"])
    assert service["spec"]["serveConfigV2"] == capsys.readouterr().out  # byte for byte
    env = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "LLADA_API_KEY", "valueFrom": {"secretKeyRef": {"name": "llada-api-key", "key": "api-key"}}} in env


def test_a_recipe_serve_block_is_the_rayservice_config(capsys, tmp_path):
    recipe = yaml.safe_load((ROOT / CPU_RECIPE).read_text())
    recipe["serve"] = {"model_name": "tiny", "port": 8100, "replica": {"num_gpus": 0}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    service = yaml.safe_load(render(capsys, str(path), "--kind", "rayservice", "--checkpoint", CHECKPOINT))
    main(["serve", str(path), "--checkpoint", CHECKPOINT, "--host", "0.0.0.0", "--print-config"])
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == yaml.safe_load(capsys.readouterr().out)
    assert yaml.safe_load(service["spec"]["serveConfigV2"])["http_options"]["port"] == 8100


@pytest.mark.parametrize("flags,expected", [
    ([], "llada run /app/jobs/recipes/llada-moe-7b-a1b.yaml"),
    (["--stage", "sft", "--set", "stages.sft.num_steps=1000"],
     "llada run /app/jobs/recipes/llada-moe-7b-a1b.yaml --stage sft --set stages.sft.num_steps=1000"),
])
def test_the_rayjob_runs_llada_run_on_the_recipe_in_the_image(flags, expected, capsys):
    job = yaml.safe_load(render(capsys, GPU_RECIPE, "--kind", "rayjob", *flags))
    assert job["spec"]["entrypoint"] == expected
    assert job["metadata"]["name"] == ("llada-moe-7b-a1b-sft" if flags else "llada-moe-7b-a1b")
    argv = shlex.split(job["spec"]["entrypoint"])
    args = build_parser().parse_args(argv[1:])  # our own CLI accepts it
    assert args.handler.__name__ == "run_run" and args.stage == (flags[1] if flags else None)
    assert (ROOT / args.recipe.removeprefix("/app/")).is_file()  # the Dockerfile copies the project to /app
    assert "COPY . /app" in (ROOT / "infra" / "Dockerfile").read_text()


def test_the_rayjob_shuts_its_cluster_down_and_retries():
    spec = yaml.safe_load((ROOT / "infra" / "kuberay" / "rayjob.yaml").read_text())["spec"]
    rules = {(r["policy"], r["condition"].get("jobStatus") or r["condition"]["jobDeploymentStatus"]):
             r["condition"]["ttlSeconds"] for r in spec["deletionStrategy"]["deletionRules"]}
    assert rules[("DeleteCluster", "SUCCEEDED")] == 0 and ("DeleteCluster", "FAILED") in rules
    assert ("DeleteCluster", "Failed") in rules  # a job that never started still frees its cluster
    assert spec["backoffLimit"] >= 1 and "shutdownAfterJobFinishes" not in spec


def test_the_gpu_cluster_follows_the_recipe():
    cluster = yaml.safe_load((ROOT / "infra" / "kuberay" / "raycluster.yaml").read_text())["spec"]
    assert cluster["headGroupSpec"]["rayStartParams"] == {"num-cpus": "0"}
    assert cluster["authOptions"] == {"mode": "token", "secretName": "llada-ray-auth"}
    assert cluster["enableInTreeAutoscaling"] is True and cluster["rayVersion"] == "2.60.0"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    gpu = groups["gpu"]
    assert (gpu["minReplicas"], gpu["replicas"], gpu["maxReplicas"]) == (0, 0, 8)  # 64 workers, 8 per node
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert (limits["nvidia.com/gpu"], limits["cpu"]) == ("8", "64")  # scaling.cpus_per_worker: 8
    assert groups["cpu"]["maxReplicas"] == 4  # scaling.data_cpus: 64 on 16-CPU nodes
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f"ray[train,data,serve]=={cluster['rayVersion']}" in pyproject


@pytest.mark.parametrize("path", SHIPPED_KUBERAY, ids=lambda p: p.name)
def test_credentials_come_from_secrets_and_are_never_inlined(path):
    text = path.read_text()
    document = yaml.safe_load(text)
    for container in all_containers(document):
        # The storage Secret, and on training clusters MLflow's (optional: tracking may be off).
        assert container["envFrom"][0] == {"secretRef": {"name": "llada-storage"}}
        assert container["envFrom"][1:] in ([], [{"secretRef": {"name": "llada-mlflow", "optional": True}}])
        if document["kind"] != "RayService":
            assert container["envFrom"][1:], "training pods get MLflow's settings from the llada-mlflow Secret"
        for variable in container.get("env", []):
            if re.search(r"KEY|SECRET|TOKEN|PASSWORD", variable["name"]):
                assert "value" not in variable and "secretKeyRef" in variable["valueFrom"], variable
    assert not re.search(r"AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID|auth_token:", text)


def all_containers(document: dict) -> list[dict]:
    spec = document["spec"]
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_the_cpu_recipe_renders_a_cpu_only_cluster(capsys):
    cluster = yaml.safe_load(render(capsys, CPU_RECIPE, "--kind", "raycluster"))
    assert [g["groupName"] for g in cluster["spec"]["workerGroupSpecs"]] == ["cpu"]
    assert "nvidia.com/gpu" not in json.dumps(cluster) and "llada-storage" not in json.dumps(cluster)
    assert cluster["metadata"]["name"] == "tiny-cpu"
    assert main(["infra", "render", CPU_RECIPE, "--kind", "rayjob"]) == 0
    assert "local to each node" in capsys.readouterr().err  # a warning, with the fix


def test_s3_storage_brings_the_storage_secret(capsys):
    cluster = yaml.safe_load(render(capsys, CPU_RECIPE, "--kind", "raycluster", "--set", "storage_uri=s3://b/runs"))
    assert all(c["envFrom"][0] == {"secretRef": {"name": "llada-storage"}} for c in all_containers(cluster))
    assert "local to each node" not in capsys.readouterr().err


@pytest.mark.parametrize("path", SHIPPED_LAUNCHER, ids=lambda p: p.name)
def test_the_shipped_cluster_launcher_fits_rays_schema(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(path.read_text())
    jsonschema.validate(config, ray_launcher_schema())
    filled = prepare_config(config)  # what `ray up` does first: merge Ray's AWS defaults, then validate
    validate_config(filled)
    assert filled["setup_commands"] == []  # nothing installed over the image
    assert config["docker"]["image"].endswith("-cuda")
    assert config["available_node_types"]["gpu"]["min_workers"] == 0
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--num-cpus=0" in head_start and "RAY_AUTH_MODE=token" in head_start
    assert set(config["file_mounts"]) == {"~/.ray/auth_token", "~/.llada/cluster.env"}  # copied, not inlined


@pytest.mark.parametrize("recipe", [GPU_RECIPE, CPU_RECIPE])
def test_rendered_cluster_launchers_fit_rays_schema_and_a_typo_does_not(recipe, capsys):
    config = yaml.safe_load(render(capsys, recipe, "--kind", "cluster-launcher"))
    jsonschema.validate(config, ray_launcher_schema())
    config["available_node_types"]["cpu"]["max_worker"] = 3
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        jsonschema.validate(config, ray_launcher_schema())


def pip_installs(commands: list[str]) -> list[tuple[set[str], list[str]]]:
    """(flags, targets) of each `pip install` among shell commands; an index URL counts as a flag."""
    installs = []
    for command in commands:
        for part in command.split("&&"):
            words = shlex.split(part.replace("$(PY)", "python"))
            if "pip" not in words or "install" not in words:
                continue
            words = words[words.index("install") + 1:]
            flags = {w for w in words if w.startswith("-")}
            values = {words[i + 1] for i, w in enumerate(words) if w in ("--index-url", "--extra-index-url")}
            installs.append((flags, [w for w in words if not w.startswith("-") and w not in values]))
    return installs


def dockerfile_runs(text: str) -> list[str]:
    joined = re.sub(r"\\\n", " ", text)
    return [line.strip()[4:] for line in joined.splitlines() if line.strip().startswith("RUN ")]


def without_extras(targets: list[str]) -> list[str]:
    return [re.sub(r"\[.*\]$", "", target) for target in targets]  # '.[dev]' (Makefile) is '.' (image)


def test_the_dockerfile_installs_the_way_make_setup_does():
    makefile = (ROOT / "Makefile").read_text()
    setup = [line.strip() for line in makefile.split("$(STAMP): pyproject.toml Makefile")[1].split("\n\n")[0]
             .splitlines() if line.startswith("\t")]
    dockerfile = (ROOT / "infra" / "Dockerfile").read_text()
    make_steps = [step for step in pip_installs(setup) if "pip" not in step[1]]
    docker_steps = [step for step in pip_installs(dockerfile_runs(dockerfile)) if "pip" not in step[1]]
    assert [without_extras(t) for _, t in docker_steps] == [without_extras(t) for _, t in make_steps] == [
        [make_steps[0][1][0]], [make_steps[1][1][0]], ["."]]
    assert make_steps[0][1][0].startswith("torch==") and make_steps[1][1][0].startswith("deepspeed==")
    assert "--no-build-isolation" in make_steps[1][0] and "--no-build-isolation" in docker_steps[1][0]
    assert "-e" in make_steps[2][0] and "-e" in docker_steps[2][0]
    assert "--index-url" in docker_steps[0][0]  # torch from PyTorch's index: the CUDA or the CPU wheel
    assert "LLADA_TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in dockerfile
    assert re.search(r"LLADA_TORCH_INDEX_URL=https://download.pytorch.org/whl/cu\d+", dockerfile)
    assert re.search(r"^FROM \$\{CUDA_BASE\} AS base-cuda$", dockerfile, re.MULTILINE)
    assert re.search(r"^FROM base-\$\{VARIANT\}$", dockerfile, re.MULTILINE)


@pytest.mark.parametrize("flags,message", [
    (["--kind", "rayservice"], "give --checkpoint URI"),
    (["--kind", "rayservice", "--checkpoint", "/c/hf", "--model", "models:/m@champion"], "one of them"),
    (["--kind", "rayjob", "--model", "models:/m@champion"], "--model: only for --kind rayservice"),
    (["--kind", "raycluster", "--checkpoint", CHECKPOINT], "--checkpoint: only for --kind rayservice"),
    (["--kind", "raycluster", "--stage", "sft"], "--stage: only for --kind rayjob"),
    (["--kind", "rayjob", "--stage", "nope"], "no stage named 'nope'"),
    (["--kind", "rayservice", "--checkpoint", CHECKPOINT, "--serve-config", "serve/configs/missing.yaml"],
     "cannot read the serve config"),
])
def test_bad_input_exits_non_zero_naming_the_problem(flags, message, capsys):
    assert main(["infra", "render", GPU_RECIPE, *flags]) == 2
    assert message in capsys.readouterr().err


def test_a_gpu_sampler_must_say_how_many_gpus(capsys, tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("replica: {num_gpus: auto}\n")
    assert main(["infra", "render", GPU_RECIPE, "--kind", "rayservice", "--checkpoint", CHECKPOINT,
                 "--serve-config", str(config)]) == 2
    assert "replica.num_gpus" in capsys.readouterr().err


def test_a_recipe_outside_the_image_is_refused_for_a_rayjob(capsys, tmp_path):
    outside = tmp_path / "mine.yaml"
    outside.write_text((ROOT / GPU_RECIPE).read_text())
    assert main(["infra", "render", str(outside), "--kind", "rayjob"]) == 2
    assert "outside the project" in capsys.readouterr().err
    job = yaml.safe_load(render(capsys, GPU_RECIPE, "--kind", "rayjob"))
    assert job["spec"]["entrypoint"].startswith("llada run /app/")


def test_bad_recipes_and_kinds_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["infra", "render", GPU_RECIPE, "--kind", "raycluster", "--set", "scaling.num_workers=0"])
    assert exit_info.value.code == 2 and "scaling.num_workers" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["infra", "render", GPU_RECIPE, "--kind", "deployment"])
    assert exit_info.value.code == 2 and "invalid choice: 'deployment'" in capsys.readouterr().err


def test_output_goes_to_a_file_and_help_exists(capsys, tmp_path):
    out = tmp_path / "cluster.yaml"
    assert main(["infra", "render", GPU_RECIPE, "--kind", "raycluster", "--output", str(out)]) == 0
    assert capsys.readouterr().out == "" and out.read_text().startswith("# llada infra render ")
    with pytest.raises(SystemExit) as exit_info:
        main(["infra", "render", "--help"])
    assert exit_info.value.code == 0 and "usage: llada infra render" in capsys.readouterr().out


def test_the_readme_s_deployment_commands_exist():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Deploying to a cluster")[1].split("\n## ")[0]
    lines = re.sub(r"\\\n\s*", " ", section).splitlines()
    commands = [shlex.split(line.split("  #")[0].split(" > ")[0]) for line in lines if line.startswith("llada ")]
    assert len(commands) >= 6
    for argv in commands:
        build_parser().parse_args(argv[1:])  # every `llada` command the README gives parses
    assert "--kind rayjob" in section and "--kind rayservice" in section and "--kind cluster-launcher" in section
