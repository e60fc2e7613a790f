"""The recipe: one YAML file describing a whole run (data, model, the paper's stages, evals,
scaling), validated by a strict schema when it loads, with ``--set key=value`` overrides.

:class:`RunRecipe` is everything jobs/ runs; the `llada` front door adds the typed ``serve:``
block (llada.recipe.Recipe), since jobs/ never imports serve/.

Layout of a run in storage (``{storage_uri}/{run_id}``):

    recipe.json                the resolved recipe
    data/                      corpus, tokenizer, packed shards, one folder per stage's mixture
    stages/{name}/             StageConfig.output_uri: checkpoints, metrics, selection.json, done.json
    report/                    the demo's report
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from jobs.evaluation.tasks import EvalSuiteConfig
from jobs.stage_config import (FaultInjection, ModelSpec, OptimizerSpec, ScalingSpec, ScheduleSpec, StageConfig, Strict,
                               absolute_uri)
from pipelines import storage
from pipelines.mixture import MixtureSpec
from pipelines.prepare import DataSpec

SelectionRule = Literal["best_eval_average", "last", "average_top_k"]
DEFAULT_AVERAGE_K = 3  # select: average_top_k without average_k
# ``eval: demo`` (the built-in suite over the demo corpus) or a suite; one branch is chosen by the
# value, so an error names the suite's own field path (eval.suite.tasks.0...).
EvalBlock = Annotated[Union[Annotated[Literal["demo"], Tag("demo")], Annotated[EvalSuiteConfig, Tag("suite")]],
                      Discriminator(lambda value: "demo" if value == "demo" else "suite")]


class RecipeStage(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    kind: Literal["pretrain", "anneal", "sft"]
    mixture: MixtureSpec
    num_steps: int | None = Field(None, ge=1)  # default: one pass over the mixture's tokens
    micro_batch_size: int = Field(ge=1)
    grad_accumulation_steps: int = Field(1, ge=1)
    optimizer: OptimizerSpec
    schedule: ScheduleSpec = ScheduleSpec()
    rope_theta: float | None = Field(None, gt=0)
    max_position_embeddings: int | None = Field(None, ge=8)
    seq_len: int | None = Field(None, ge=8)  # rows this stage trains on; default data.seq_len (sft_seq_len for SFT)
    max_seq_len: int | None = Field(None, ge=8)
    variable_length_prob: float = Field(0.01, ge=0, le=1)
    load_balance_layers: Literal["mean", "sum"] = Field("mean", exclude_if=lambda value: value == "mean")
    init_from: str | None = None  # an earlier stage: this one starts from the checkpoint it selected
    select: SelectionRule = "best_eval_average"  # how this stage's own checkpoint is chosen
    # select: average_top_k averages the weights of this many best checkpoints (DEFAULT_AVERAGE_K)
    average_k: int | None = Field(None, ge=2)
    checkpoint_every: int = Field(ge=1)
    keep_last: int = Field(3, ge=1)
    scaling: ScalingSpec | None = None  # default: the recipe's
    fault_injection: FaultInjection | None = None  # reliability testing only

    @model_validator(mode="before")
    @classmethod
    def _moved_fields(cls, values: Any) -> Any:
        if isinstance(values, dict) and isinstance(values.get("init_from"), dict):
            raise ValueError("init_from: name the earlier stage (e.g. `init_from: pretrain1`); how that stage's "
                             "checkpoint is chosen is now that stage's own `select:` (was init_from.rule)")
        return values

    @model_validator(mode="after")
    def _check_average_k(self) -> "RecipeStage":
        if self.average_k is not None and self.select != "average_top_k":
            raise ValueError(f"average_k: only used by select: average_top_k (this stage selects by {self.select})")
        return self


class TrackingSpec(Strict):
    """MLflow tracking and registry of the run (jobs/tracking.py). ``uri`` None: the environment's
    MLFLOW_TRACKING_URI, else a SQLite store in a local run folder. Credentials never go here:
    MLflow reads MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN from the environment."""

    enabled: bool = True
    uri: str | None = Field(None, min_length=1)
    experiment: str | None = Field(None, min_length=1)  # default: the run id
    model_name: str | None = Field(None, min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")  # default: the run id
    alias: str = Field("champion", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")

    @field_validator("uri")
    @classmethod
    def _no_credentials(cls, uri: str | None) -> str | None:
        if uri is not None and "@" in uri.split("://", 1)[-1].split("/", 1)[0]:
            raise ValueError("credentials do not belong in the recipe: give the server's URI without user:password "
                             "and set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)")
        return uri


class RunRecipe(Strict):
    run_id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    storage_uri: str
    model: ModelSpec
    data: DataSpec = DataSpec()
    stages: list[RecipeStage] = Field(min_length=1)
    eval: EvalBlock = "demo"  # the suite every checkpoint is scored with
    scaling: ScalingSpec = ScalingSpec()
    seed: int = 0
    tracking: TrackingSpec = TrackingSpec()

    @model_validator(mode="before")
    @classmethod
    def _moved_fields(cls, values: Any) -> Any:
        if isinstance(values, dict) and "final_selection" in values:
            raise ValueError("final_selection: removed; each stage names its own rule as `select:` "
                             "(give the last stage `select: best_eval_average`)")
        return values

    @field_validator("storage_uri")
    @classmethod
    def _absolute(cls, uri: str) -> str:
        return absolute_uri(uri)  # `./runs` means the folder where the recipe is loaded

    @model_validator(mode="after")
    def _check(self) -> "RunRecipe":
        names = [stage.name for stage in self.stages]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"stages: duplicate stage names {duplicates}")
        for index, stage in enumerate(self.stages):
            if stage.init_from and stage.init_from not in names[:index]:
                raise ValueError(
                    f"stages.{index}.init_from: {stage.init_from!r} is not an earlier stage (earlier: {names[:index]})")
            try:
                self.stage_config(stage.name, data_uri="-", output_uri="-")
            except ValueError as error:
                raise ValueError(f"stages.{index} ({stage.name}): {error}") from None
        self._check_eval_sources()
        self._check_contexts()
        return self

    def _check_contexts(self) -> None:
        """No stage trains rows longer than the model's context (the exported config would claim
        less context than the model was trained on, or RoPE would meet unseen positions)."""
        for index, stage in enumerate(self.stages):
            seq_len = self.seq_len_of(stage.name)
            if stage.max_seq_len is not None:
                seq_len = min(seq_len, stage.max_seq_len)
            context = self.context_of(stage.name)
            if seq_len > context:
                field = f"stages.{index}.seq_len" if stage.seq_len else (
                    "data.sft_seq_len" if stage.kind == "sft" else "data.seq_len")
                raise ValueError(f"stages.{index} ({stage.name}): trains rows of {seq_len} tokens ({field}) but the "
                                 f"model's context is {context} (max_position_embeddings); raise the stage's "
                                 f"max_position_embeddings or shorten the rows")

    def seq_len_of(self, name: str) -> int:
        """The length of the rows a stage trains on: its own ``seq_len``, else the data's default
        for its kind."""
        stage = self.stage(name)
        return stage.seq_len or (self.data.sft_seq_len if stage.kind == "sft" else self.data.seq_len)

    def context_of(self, name: str) -> int:
        """The context a stage trains with: its own max_position_embeddings, else that of the
        stage it starts from (a checkpoint keeps its context), else the model's."""
        stage = self.stage(name)
        if stage.max_position_embeddings is not None:
            return stage.max_position_embeddings
        if stage.init_from is not None:
            return self.context_of(stage.init_from)
        return self.model.build_config().max_position_embeddings

    def _check_eval_sources(self) -> None:
        """Every eval source must be able to exist for this run: the demo suite and ``demo:``
        sources read the demo corpus's held-out sets, which only demo data writes."""
        if self.data.demo:
            return
        if self.eval == "demo":
            raise ValueError("eval: the demo suite scores checkpoints on the demo corpus's held-out sets, but "
                             "data.demo is false, so there is no demo corpus; give an eval suite whose tasks "
                             "read your own sources (eval: {tasks: [...]})")
        demo_tasks = [task.name for task in self.eval.tasks if task.demo_paths()]
        if demo_tasks:
            raise ValueError(f"eval.tasks: {demo_tasks} read demo: sources, but data.demo is false, so there is "
                             "no demo corpus; point them at your own eval files")

    @property
    def run_uri(self) -> str:
        return storage.join(self.storage_uri, self.run_id)

    def stage_uri(self, name: str) -> str:
        return storage.join(self.run_uri, "stages", name)

    def data_uri(self) -> str:
        return storage.join(self.run_uri, "data")

    def stage(self, name: str) -> RecipeStage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise ValueError(f"stage: no stage named {name!r} in the recipe (stages: {[s.name for s in self.stages]})")

    def selection_rule(self, name: str) -> SelectionRule:
        """How the stage's checkpoint is chosen (its own ``select``)."""
        return self.stage(name).select

    def stage_config(self, name: str, data_uri: str, output_uri: str, tokenizer_uri: str | None = None,
                     init_from: str | None = None) -> StageConfig:
        stage = self.stage(name)
        scaling = stage.scaling or self.scaling
        seq_len = self.seq_len_of(name)
        tokens_per_step = stage.micro_batch_size * stage.grad_accumulation_steps * scaling.num_workers * seq_len
        num_steps = stage.num_steps or max(1, stage.mixture.token_budget // tokens_per_step)
        return StageConfig(
            name=stage.name, kind=stage.kind, model=self.model, data_uri=data_uri, output_uri=output_uri,
            tokenizer_uri=tokenizer_uri, init_from=init_from, num_steps=num_steps,
            micro_batch_size=stage.micro_batch_size, grad_accumulation_steps=stage.grad_accumulation_steps,
            max_seq_len=stage.max_seq_len, rope_theta=stage.rope_theta,
            max_position_embeddings=stage.max_position_embeddings, variable_length_prob=stage.variable_length_prob,
            load_balance_layers=stage.load_balance_layers,
            optimizer=stage.optimizer, schedule=stage.schedule, scaling=scaling,
            checkpoint_every=min(stage.checkpoint_every, num_steps), keep_last=stage.keep_last,
            seed=self.seed + 1000 * [s.name for s in self.stages].index(name),
            fault_injection=stage.fault_injection,
        )

    def fingerprint(self, name: str) -> str:
        """Hash of everything that determines a stage's result (to tell a finished stage from a
        changed one on rerun)."""
        stage = self.stage(name)
        upstream = [self.fingerprint(stage.init_from)] if stage.init_from else []
        # average_k only counts where it is used, so stages fingerprinted before it existed still match.
        unused = {"average_k"} if stage.select != "average_top_k" else set()
        identity = {"stage": stage.model_dump(mode="json", exclude=unused), "model": self.model.model_dump(mode="json"),
                    "data": self.data.model_dump(mode="json"), "scaling": self.scaling.model_dump(mode="json"),
                    "seed": self.seed, "upstream": upstream}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def apply_overrides(raw: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    """``--set a.b=value``: dotted paths into the YAML; list items by index or, for stages, by name
    (``stages.sft.num_steps=10``). Values are parsed as YAML (numbers, booleans, lists)."""
    result = copy.deepcopy(raw)
    for assignment in assignments:
        path, separator, text = assignment.partition("=")
        if not separator or not path:
            raise ValueError(f"--set: expected KEY=VALUE, got {assignment!r}")
        *parents, leaf = path.split(".")
        node: Any = result
        for depth, key in enumerate(parents):
            node = _child(node, key, ".".join(parents[: depth + 1]))
        if isinstance(node, list):
            node[_list_index(node, leaf, path)] = yaml.safe_load(text)
        elif isinstance(node, dict):
            node[leaf] = yaml.safe_load(text)
        else:
            raise ValueError(f"--set {path}: {'.'.join(parents)} is not a mapping or list")
    return result


def _list_index(node: list, key: str, path: str) -> int:
    if key.isdigit() and int(key) < len(node):
        return int(key)
    for index, item in enumerate(node):
        if isinstance(item, dict) and item.get("name") == key:
            return index
    raise ValueError(f"--set {path}: no item {key!r}")


def _child(node: Any, key: str, path: str) -> Any:
    if isinstance(node, list):
        return node[_list_index(node, key, path)]
    if isinstance(node, dict):
        if key not in node:
            node[key] = {}
        return node[key]
    raise ValueError(f"--set {path}: not a mapping or list")


def load_recipe(path_or_uri: str, overrides: list[str] | None = None, s3: storage.S3Settings | None = None,
                schema: type[RunRecipe] = RunRecipe) -> RunRecipe:
    """Read a recipe YAML (path or URI), apply ``--set`` overrides, validate against ``schema``."""
    try:
        text = storage.read_text(path_or_uri, s3)
    except Exception as error:
        raise ValueError(f"recipe {path_or_uri}: cannot read it ({error})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(f"recipe {path_or_uri}: not valid YAML ({error})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"recipe {path_or_uri}: expected a mapping at the top level")
    return schema.model_validate(apply_overrides(raw, overrides or []))
