"""`llada rehearse RECIPE`: the recipe's own structure run end to end, small, on the cluster at
hand, before the real run is paid for.

What is kept: every stage with its kind, mixture domains and weights, init_from, selection rule
(and average_k), RoPE base and context, the ratios of its row lengths (anneal 2's rows stay
twice anneal 1's), its optimizer and schedule kind; the model preset with its expert-count ratio
(experts per chosen expert) and its top-k routing; expert parallelism and ZeRO, scaled down to
the cluster; the eval suite's tasks with their kinds; the serve block; the tracking block (under
the rehearsal's own experiment and model name).

What is shrunk: the model's dimensions (:data:`SMALL_MODEL`), row lengths (data.seq_len becomes
:data:`REHEARSAL_SEQ_LEN`, every other length keeps its ratio to it), budgets (a few optimizer
steps per stage), workers, eval items and Monte Carlo samples, served replicas.

What stands in (llada/standins.py), only where the recipe's own input is unreachable from
here: each data source (synthetic documents of the same domain and kind, in the same file
format), the tokenizer (a byte-level BPE trained on the stand-in text) and each eval task's data
(items of the same kind: multiple choice, generation or held-out text; an lm-eval task becomes a
local lm-eval task of that output type).

The rehearsal writes under its own run id (``{run_id}-rehearsal-{UTC time}`` unless named), so the
real run's folders, MLflow experiment and registered model are never touched. Its record,
``rehearsal.json``, lists what was shrunk, what stood in, each stage's outcome and the served
answer; ``rehearsal.yaml`` is the rehearsal's recipe, for `llada run` to reproduce it.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass
from typing import Any, Callable

from jobs.recipe import DEFAULT_AVERAGE_K
from llada.cluster import free_port
from llada.recipe import Recipe
from llada.standins import STANDIN_DOCUMENTS, StandIn, data_stand_ins, eval_block
from pipelines import storage

REHEARSAL_SEQ_LEN = 128  # the rehearsal's data.seq_len; every other row length keeps its ratio to it
MIN_SEQ_LEN = 16
DEFAULT_STEPS = 2  # optimizer steps per stage
MAX_MICRO_BATCH = 2
MAX_GRAD_ACCUMULATION = 2
SERVE_MAX_TOKENS = 32
# The rehearsal model: the recipe's preset with these dimensions (a few hundred thousand
# parameters). Heads keep the preset's query/key-value head ratio, the expert FFN its ratio to the
# hidden size, and the experts their ratio to top-k (:func:`small_model`).
SMALL_MODEL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
SMALL_TOP_K = 2
REHEARSAL_APP = "llada-rehearsal"


@dataclass(frozen=True)
class ClusterShape:
    """What the rehearsal scales to: alive nodes, the CPUs of the smallest, and GPUs in all."""

    nodes: int
    cpus_per_node: float
    gpus: float

    @classmethod
    def of_ray(cls) -> "ClusterShape":
        import ray

        alive = [node for node in ray.nodes() if node.get("Alive")]
        cpus = [node["Resources"].get("CPU", 0.0) for node in alive]
        return cls(nodes=len(alive), cpus_per_node=min(cpus) if cpus else 0.0,
                   gpus=sum(node["Resources"].get("GPU", 0.0) for node in alive))


@dataclass
class Rehearsal:
    recipe: Recipe
    original: Recipe
    shrank: list[tuple[str, str, str]]  # (what, the recipe's, the rehearsal's)
    stand_ins: list[StandIn]

    def record(self) -> dict[str, Any]:
        return {"format": "llada-rehearsal/1", "recipe": self.original.run_id, "run_uri": self.recipe.run_uri,
                "shrank": [{"what": w, "recipe": a, "rehearsal": b} for w, a, b in self.shrank],
                "stood_in": [{"what": s.what, "recipe": s.original, "stand_in": s.uri, "description": s.description}
                             for s in self.stand_ins]}

    def describe(self) -> str:
        width = max(len(what) for what, _, _ in self.shrank)
        lines = [f"rehearsal of {self.original.run_id} at {self.recipe.run_uri}", "", "shrunk:"]
        lines += [f"  {what:<{width}}  {original}  ->  {rehearsal}" for what, original, rehearsal in self.shrank]
        if self.stand_ins:
            lines += ["", "stood in (unreachable from here):"]
            lines += [f"  {s.what}: {s.original}  ->  {s.description}" for s in self.stand_ins]
        else:
            lines += ["", "stood in: nothing (every source and eval file is reachable)"]
        return "\n".join(lines)


def rehearsal_run_id(recipe: Recipe) -> str:
    return f"{recipe.run_id}-rehearsal-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"


def plan_rehearsal(recipe: Recipe, cluster: ClusterShape, storage_uri: str | None = None, run_id: str | None = None,
                   steps: int = DEFAULT_STEPS, s3: storage.S3Settings | None = None) -> Rehearsal:
    """The rehearsal's recipe (validated like any recipe), what it shrank and what stands in.
    Reads the recipe's sources to tell reachable from unreachable; writes nothing."""
    if steps < 1:
        raise ValueError(f"--steps: must be >= 1, got {steps}")
    run_id = run_id or rehearsal_run_id(recipe)
    if run_id == recipe.run_id:
        raise ValueError(f"--run-id: {run_id!r} is the real run's id; a rehearsal never writes into the real run")
    raw = recipe.model_dump(mode="json", exclude_none=True)
    raw.update(run_id=run_id, storage_uri=storage_uri or recipe.storage_uri)
    run_uri = storage.join(storage.absolute(raw["storage_uri"]), run_id)
    standin_uri = storage.join(run_uri, "standins")
    shrank: list[tuple[str, str, str]] = []
    stand_ins: list[StandIn] = []

    tokenizer_ids = _data(recipe, raw, standin_uri, stand_ins, shrank, s3)
    config = recipe.model.build_config()
    model_overrides, experts = small_model(config, tokenizer_ids)
    raw["model"] = {"preset": recipe.model.preset, "overrides": {**recipe.model.overrides, **model_overrides}}
    small = recipe.model.build_config(**model_overrides)
    from llada_core.config import count_parameters

    shrank.append(("model", _model_line(config, count_parameters(config)["total"]),
                   _model_line(small, count_parameters(small)["total"])))
    scaling = rehearsal_scaling(recipe.scaling.model_dump(mode="json", exclude_none=True), cluster, experts)
    raw["scaling"] = scaling
    shrank.append(("scaling", _scaling_line(recipe.scaling.model_dump()), _scaling_line(scaling)))
    factor = REHEARSAL_SEQ_LEN / recipe.data.seq_len
    raw["stages"] = [_stage(recipe, stage.name, raw, factor, steps, shrank) for stage in recipe.stages]
    if recipe.eval != "demo":
        raw["eval"] = eval_block(recipe, standin_uri, stand_ins, shrank, s3)
    raw["serve"] = _serve_block(recipe, cluster, shrank)
    tracking = dict(raw.get("tracking", {}))
    tracking["experiment"] = f"{recipe.tracking.experiment or recipe.run_id}-rehearsal"
    tracking["model_name"] = f"{recipe.tracking.model_name or recipe.run_id}-rehearsal"
    raw["tracking"] = tracking
    rehearsal = Recipe.model_validate(raw)
    if rehearsal.run_uri.rstrip("/") == recipe.run_uri.rstrip("/"):
        raise ValueError(f"--storage/--run-id: the rehearsal would write into the real run at {recipe.run_uri}")
    return Rehearsal(recipe=rehearsal, original=recipe, shrank=shrank, stand_ins=stand_ins)


# ---- model and scaling ----------------------------------------------------------------------

def small_model(config: Any, tokenizer_ids: dict[str, int] | None) -> tuple[dict[str, Any], int]:
    """Overrides of the recipe's preset for the rehearsal model, and its expert count: the small
    dimensions, query/key-value heads in the preset's ratio, the expert FFN in its ratio to the
    hidden size, top-k 2 (1 when the preset routes to one expert) and experts = top-k x the
    preset's experts per chosen expert."""
    heads = SMALL_MODEL["num_attention_heads"]
    kv_heads = max(1, heads * config.num_key_value_heads // config.num_attention_heads)
    while heads % kv_heads:
        kv_heads -= 1
    hidden = SMALL_MODEL["hidden_size"]
    ffn = max(8, round(hidden * config.expert_intermediate_size / config.hidden_size))
    top_k = min(SMALL_TOP_K, config.num_experts_per_tok)
    experts = top_k * max(1, config.num_experts // config.num_experts_per_tok)
    overrides: dict[str, Any] = {**SMALL_MODEL, "num_key_value_heads": kv_heads, "expert_intermediate_size": ffn,
                                 "num_experts": experts, "num_experts_per_tok": top_k}
    if tokenizer_ids is not None:
        overrides.update(tokenizer_ids)
    return overrides, experts


def rehearsal_scaling(scaling: dict[str, Any], cluster: ClusterShape, experts: int) -> dict[str, Any]:
    """The recipe's scaling at the cluster's size: GPU workers where it has GPUs and the recipe
    trains on them, else one CPU worker per node (at least two when the recipe is expert
    parallel, so the all-to-all runs); expert parallelism as large as the recipe's that divides
    the workers and experts; ZeRO and activation checkpointing as the recipe says."""
    wanted_ep = scaling.get("expert_parallel_size", 1)
    use_gpu = bool(scaling.get("use_gpu")) and cluster.gpus >= 1
    if use_gpu:
        workers = max(1, min(scaling.get("num_workers", 1), int(cluster.gpus)))
    else:
        workers = min(scaling.get("num_workers", 1), max(cluster.nodes, 2 if wanted_ep > 1 else 1))
    ep = max(d for d in range(1, min(wanted_ep, workers) + 1) if workers % d == 0 and experts % d == 0)
    result = {"num_workers": workers, "expert_parallel_size": ep, "zero_stage": scaling.get("zero_stage", 0),
              "use_gpu": use_gpu, "data_cpus": 1.0, "max_failures": min(scaling.get("max_failures", 1), 1),
              "activation_checkpointing": scaling.get("activation_checkpointing", False)}
    if not use_gpu:
        result["torch_threads"] = 1  # a few hundred thousand parameters: more threads only contend
        if cluster.nodes >= workers and cluster.cpus_per_node >= 2:
            # one worker per node: a worker holds all but one of its node's CPUs (Ray packs
            # workers onto as few nodes as fit), the CPU left is Ray Data's and the evals'
            result["cpus_per_worker"] = cluster.cpus_per_node - 1
    return result


def _model_line(config: Any, parameters: int) -> str:
    return (f"{parameters / 1e6:,.2f} M parameters (D {config.hidden_size}, {config.num_hidden_layers} layers, "
            f"{config.num_experts} experts top-{config.num_experts_per_tok}, vocab {config.vocab_size:,})")


def _scaling_line(scaling: dict[str, Any]) -> str:
    device = "GPU" if scaling.get("use_gpu") else "CPU"
    return (f"{scaling.get('num_workers', 1)} {device} workers, expert parallel {scaling.get('expert_parallel_size', 1)}, "
            f"ZeRO {scaling.get('zero_stage', 0)}")


# ---- stages ---------------------------------------------------------------------------------

def _scaled(length: int | None, factor: float) -> int | None:
    return None if length is None else max(MIN_SEQ_LEN, round(length * factor))


def _stage(recipe: Recipe, name: str, raw: dict[str, Any], factor: float, steps: int,
           shrank: list[tuple[str, str, str]]) -> dict[str, Any]:
    stage = recipe.stage(name)
    out = stage.model_dump(mode="json", exclude_none=True)
    out.pop("num_steps", None)
    out.pop("scaling", None)  # the rehearsal's scaling is the cluster's (a stage's own layout is not kept)
    out.pop("fault_injection", None)
    for key in ("seq_len", "max_seq_len"):
        if getattr(stage, key) is not None:
            out[key] = _scaled(getattr(stage, key), factor)
    micro = min(stage.micro_batch_size, MAX_MICRO_BATCH)
    accumulation = min(stage.grad_accumulation_steps, MAX_GRAD_ACCUMULATION)
    average_k = stage.average_k or DEFAULT_AVERAGE_K
    stage_steps = max(steps, average_k) if stage.select == "average_top_k" else steps
    if stage.select != "last":
        stage_steps = max(stage_steps, 2)  # a rule that compares checkpoints gets two or more
    seq_len = out.get("seq_len") or raw["data"]["sft_seq_len" if stage.kind == "sft" else "seq_len"]
    workers = raw["scaling"]["num_workers"]
    budget = stage_steps * micro * accumulation * workers * seq_len
    out.update(micro_batch_size=micro, grad_accumulation_steps=accumulation,
               mixture={**out["mixture"], "token_budget": budget},
               checkpoint_every=1 if stage.select != "last" else stage_steps,
               keep_last=stage_steps if stage.select != "last" else 1)
    schedule = dict(out.get("schedule", {}))
    schedule["warmup_steps"] = min(schedule.get("warmup_steps", 0), 1)
    out["schedule"] = schedule
    real = recipe.stage_config(name, data_uri="-", output_uri="-")
    real_rows = real.micro_batch_size * real.grad_accumulation_steps * real.scaling.num_workers
    shrank.append((f"stage {name}", f"{real.num_steps:,} steps of {real_rows} rows x {recipe.seq_len_of(name)}",
                   f"{stage_steps} steps of {micro * accumulation * workers} rows x {seq_len}, "
                   f"{math.ceil(stage_steps / out['checkpoint_every'])} checkpoint(s)"))
    return out


def _data(recipe: Recipe, raw: dict[str, Any], standin_uri: str, stand_ins: list[StandIn],
          shrank: list[tuple[str, str, str]], s3: storage.S3Settings | None) -> dict[str, int] | None:
    """The data block: seq lengths scaled, unreachable sources and tokenizer stood in
    (llada/standins.py); returns the model's vocab_size and special ids unless the data is the
    demo's (the preset's ids are the demo tokenizer's)."""
    data = dict(raw["data"])
    factor = REHEARSAL_SEQ_LEN / recipe.data.seq_len
    data["seq_len"] = REHEARSAL_SEQ_LEN
    data["sft_seq_len"] = _scaled(recipe.data.sft_seq_len, factor)
    shrank.append(("data.seq_len / sft_seq_len", f"{recipe.data.seq_len} / {recipe.data.sft_seq_len}",
                   f"{data['seq_len']} / {data['sft_seq_len']} (every stage's length in the same ratio)"))
    raw["data"] = data
    if recipe.data.demo:
        corpus = dict(data.get("corpus", {}))
        corpus.update(num_text_docs=STANDIN_DOCUMENTS, num_math_docs=STANDIN_DOCUMENTS, num_code_docs=STANDIN_DOCUMENTS,
                      num_anneal_docs=STANDIN_DOCUMENTS, num_sft_chats=STANDIN_DOCUMENTS, num_eval_items=32)
        data["corpus"] = corpus
        shrank.append(("demo corpus", "as the recipe says", f"{STANDIN_DOCUMENTS} documents per split"))
        return None
    return data_stand_ins(recipe, data, standin_uri, stand_ins, s3)


# ---- serving --------------------------------------------------------------------------------

def _serve_block(recipe: Recipe, cluster: ClusterShape, shrank: list[tuple[str, str, str]]) -> dict[str, Any]:
    """The recipe's serve block (or the shipped config for its hardware) with one replica on the
    cluster's device, bound to 127.0.0.1 on a free port."""
    from llada.infra.render import default_serve_config

    config = default_serve_config(recipe)
    block = config.model_dump(mode="json")
    replica = dict(block["replica"], num_gpus=1.0 if cluster.gpus >= 1 else 0.0,
                   num_cpus=min(config.replica.num_cpus, 1.0))
    block.update(host="127.0.0.1", port=free_port(), replica=replica,
                 autoscaling=dict(block["autoscaling"], min_replicas=1, max_replicas=1, initial_replicas=1))
    scaling = config.autoscaling
    shrank.append(("serve", f"{scaling.min_replicas}-{scaling.max_replicas} replicas",
                   f"1 replica on {'GPU' if cluster.gpus >= 1 else 'CPU'}, one chat request"))
    return block


def serve_and_ask(rehearsal: Recipe, checkpoint: str, question: str, timeout_s: float = 300.0) -> dict[str, Any]:
    """Deploy the rehearsal's serve block for ``checkpoint`` on the connected Ray cluster (its own
    app and route), send one chat request through the OpenAI API from this node, and remove the
    app."""
    import os

    import ray
    from openai import OpenAI
    from ray import serve

    from serve.app import run
    from serve.config import AppArgs

    config = rehearsal.serve
    assert config is not None
    try:
        ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
        serve_was_running = True
    except ValueError:
        serve_was_running = False
    key_note = None
    if config.api_key_env and not os.environ.get(config.api_key_env):
        # the real endpoint takes its key from the cluster's secret; the rehearsal proves the
        # authenticated path with a key of its own, set for this process only
        os.environ[config.api_key_env] = secrets.token_urlsafe(24)
        key_note = (f"{config.api_key_env} is not set here: the rehearsal used a one-off key; the real endpoint "
                    "needs it set where the ingress runs (llada infra render: the llada-api-key secret)")
    # the request goes to this node's proxy (run() keeps one proxy, on the head, where nodes share
    # an address: a local multi-node cluster)
    run(AppArgs(checkpoint=checkpoint, config=config), name=REHEARSAL_APP, route_prefix=f"/{REHEARSAL_APP}")
    port = config.port
    if serve_was_running:  # Serve keeps the proxy it has: ask its port (no public API says it)
        from ray.serve.context import _get_global_client

        port = _get_global_client().http_config.port
    try:
        key = os.environ.get(config.api_key_env, "") if config.api_key_env else ""
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/{REHEARSAL_APP}/v1", api_key=key or "unused",
                        timeout=timeout_s, max_retries=2)
        started = time.perf_counter()
        reply = client.chat.completions.create(
            model=config.model_name, messages=[{"role": "user", "content": question}],
            max_tokens=min(config.sampling.max_tokens, SERVE_MAX_TOKENS))
        seconds = time.perf_counter() - started
    finally:
        serve.delete(REHEARSAL_APP)
        if not serve_was_running:
            serve.shutdown()
    return {"question": question, "answer": reply.choices[0].message.content, "model": reply.model,
            "finish_reason": reply.choices[0].finish_reason, "completion_tokens": reply.usage.completion_tokens,
            "seconds": round(seconds, 2), "api_key": key_note or ("required" if config.api_key_env else "off")}


# ---- the whole rehearsal --------------------------------------------------------------------

def write_stand_ins(rehearsal: Rehearsal, s3: storage.S3Settings | None, say: Callable[[str], None]) -> None:
    """Write each stand-in not written yet: a resumed rehearsal keeps its own (a tokenizer
    trained again would not match the shards packed with the first)."""
    missing = [s for s in rehearsal.stand_ins if not storage.exists(s.written_uri, s3)]
    for stand_in in missing:
        stand_in.write(s3)
    if rehearsal.stand_ins:
        say(f"[rehearse] stand-ins under {storage.join(rehearsal.recipe.run_uri, 'standins')}: {len(missing)} written, "
            f"{len(rehearsal.stand_ins) - len(missing)} kept from before")


def run_rehearsal(rehearsal: Rehearsal, s3: storage.S3Settings | None, say: Callable[[str], None],
                  on_step: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Write the stand-ins, run every stage (jobs.dag.run_recipe), serve the final selection and
    ask it one question; returns the record of all of it, also written as ``rehearsal.json`` in
    the rehearsal's run folder."""
    import yaml

    from jobs.dag import run_recipe, run_status

    recipe = rehearsal.recipe
    started = time.perf_counter()
    record = rehearsal.record()
    storage.write_text(storage.join(recipe.run_uri, "rehearsal.yaml"),
                       yaml.safe_dump(recipe.model_dump(mode="json", exclude_none=True), sort_keys=False), s3)
    write_stand_ins(rehearsal, s3, say)
    run_recipe(recipe, s3, progress=say, on_step=on_step)
    rows = run_status(recipe, s3)
    final = rows[-1]["selected"]
    say(f"[rehearse] serving {final['hf_uri']} for one chat request")
    served = serve_and_ask(recipe, final["hf_uri"], _question(recipe, s3))
    record.update(stages=[_stage_outcome(recipe, row, s3) for row in rows], served=served,
                  seconds=round(time.perf_counter() - started, 1), finished_at=time.time())
    storage.write_json(storage.join(recipe.run_uri, "rehearsal.json"), record, s3)
    return record


def _question(recipe: Recipe, s3: storage.S3Settings | None) -> str:
    """A held-out chat question: from the demo corpus when there is one, else a fixed one."""
    if recipe.data.demo:
        from llada.demo import demo_prompts

        return demo_prompts(recipe, per_task=1, s3=s3)[0]["question"]
    return "What is 2+3?"


def _stage_outcome(recipe: Recipe, row: dict[str, Any], s3: storage.S3Settings | None) -> dict[str, Any]:
    """One stage as the rehearsal proves it: state, rule, selected step and its eval average,
    the row length trained on, the nodes its workers ran on, and the exported RoPE and context."""
    from jobs.training.stage import read_history

    name = row["stage"]
    selected = row["selected"] or {}
    history = [r for r in read_history(recipe.stage_uri(name), s3) if "loss" in r]
    outcome: dict[str, Any] = {"stage": name, "kind": row["kind"], "state": row["state"],
                               "select": row["selection_rule"], "selected_step": selected.get("step"),
                               "checkpoints": len(row["checkpoints"]),
                               "seq_len": max((r.get("seq_len", 0) for r in history), default=None),
                               "steps": len(history)}
    if selected:
        checkpoint = next((c for c in row["checkpoints"] if c["uri"] == selected.get("uri")), None)
        outcome["eval_average"] = checkpoint and checkpoint["eval_average"]
        config = storage.read_json(storage.join(selected["hf_uri"], "config.json"), s3)
        outcome.update(rope_theta=config.get("rope_theta"), max_position_embeddings=config.get("max_position_embeddings"))
        metrics_uri = storage.join(selected["uri"], "metrics.json")
        if storage.exists(metrics_uri, s3):
            metrics = storage.read_json(metrics_uri, s3)
            outcome.update(workers=metrics.get("world_size"), nodes=metrics.get("nodes"))
    return outcome


def outcome_table(record: dict[str, Any]) -> str:
    """Each stage of a rehearsal record: state, rule, selected step, eval average, row length,
    RoPE base, context and the workers / nodes it trained on."""
    header = ("stage", "state", "select", "step", "average", "rows", "RoPE", "context", "workers/nodes")
    lines = []
    for s in record["stages"]:
        average = "-" if s.get("eval_average") is None else f"{s['eval_average']:.4f}"
        lines.append((s["stage"], s["state"], s["select"], str(s["selected_step"]), average, str(s["seq_len"]),
                      f"{s.get('rope_theta', 0):g}", str(s.get("max_position_embeddings")),
                      f"{s.get('workers')}/{s.get('nodes')}"))
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in [header, *lines])



