"""The `llada` command. One subparser per command; each command lives in its own ``add_*`` /
``run_*`` pair (data here; run, train, status, eval, generate, submit, demo, serve in
llada/commands.py; infra in llada/infra/cli.py).

    llada data prepare --output ./runs/demo                 # built-in corpus, tokenizer, shards
    llada data prepare --output s3://bucket/data --source web=s3://bucket/raw/*.jsonl --tokenizer ./tok
    llada data prepare --config recipe.yaml                  # a `data:` block, or a whole PrepareConfig
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Sequence

import yaml

from llada.commands import add_verbose_argument


def _pairs(values: list[str] | None, flag: str) -> list[tuple[str, str]]:
    pairs = []
    for value in values or []:
        name, separator, rest = value.partition("=")
        if not separator or not name or not rest:
            raise SystemExit(f"{flag}: expected NAME=VALUE, got {value!r}")
        pairs.append((name, rest))
    return pairs


def add_data_command(subparsers: Any) -> None:
    data = subparsers.add_parser("data", help="prepare training data (corpus, tokenizer, token shards)")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    prepare = data_commands.add_parser(
        "prepare", help="build the corpus and tokenizer, tokenize and pack into shards (reuses finished steps)")
    prepare.add_argument("--config", help="YAML file: a PrepareConfig, or a recipe with a `data:` block")
    prepare.add_argument("--output", help="output URI (path, file:// or s3://bucket/prefix)")
    prepare.add_argument("--source", action="append", metavar="DOMAIN=URI",
                         help="pretraining files (path, folder or glob; .jsonl/.txt/.parquet); repeatable. "
                              "Without sources the built-in demo corpus is used")
    prepare.add_argument("--sft-source", action="append", metavar="DOMAIN=URI",
                         help="SFT chat files (.jsonl/.parquet with a `messages` field); repeatable")
    prepare.add_argument("--tokenizer", help="HF tokenizer directory URI (default: train the demo BPE)")
    prepare.add_argument("--seq-len", type=int, help="pretraining sequence length (default 256)")
    prepare.add_argument("--sft-seq-len", type=int, help="SFT sequence length (default 256)")
    prepare.add_argument("--vocab-size", type=int, help="demo tokenizer vocabulary bound (default 4096)")
    prepare.add_argument("--corpus-seed", type=int, help="seed of the demo corpus (default 0)")
    prepare.add_argument("--corpus-scale", type=float, help="multiply the demo corpus sizes (default 1.0)")
    prepare.add_argument("--stage", action="append", metavar="NAME=TOKENS",
                         help="also write a stage's mixture (demo weights of NAME, e.g. pretrain1=2000000)")
    prepare.add_argument("--overwrite", action="store_true", help="replace outputs built from other inputs")
    prepare.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    add_verbose_argument(prepare)
    prepare.set_defaults(handler=run_data_prepare)


def _prepare_config(args: argparse.Namespace) -> Any:
    from pipelines.demo.corpus import CorpusSpec
    from pipelines.mixture import DEMO_STAGE_WEIGHTS, MixtureSpec
    from pipelines.prepare import PrepareConfig

    values: dict[str, Any] = {}
    if args.config:
        with open(args.config) as handle:
            loaded = yaml.safe_load(handle) or {}
        values = dict(loaded.get("data", loaded)) if isinstance(loaded, dict) else {}
    sources = [{"uri": uri, "domain": domain} for domain, uri in _pairs(args.source, "--source")]
    sources += [{"uri": uri, "domain": domain, "kind": "sft"} for domain, uri in _pairs(args.sft_source, "--sft-source")]
    if sources:
        values["sources"], values["demo"] = values.get("sources", []) + sources, False
    for flag, field in (("output", "output_uri"), ("tokenizer", "tokenizer_uri"), ("seq_len", "seq_len"),
                        ("sft_seq_len", "sft_seq_len"), ("vocab_size", "vocab_size")):
        if getattr(args, flag) is not None:
            values[field] = getattr(args, flag)
    if args.overwrite:
        values["overwrite"] = True
    corpus = dict(values.get("corpus", {}))
    if args.corpus_seed is not None:
        corpus["seed"] = args.corpus_seed
    if args.corpus_scale is not None:
        base = CorpusSpec()
        for name in ("num_text_docs", "num_math_docs", "num_code_docs", "num_anneal_docs", "num_sft_chats"):
            corpus[name] = max(1, round(getattr(base, name) * args.corpus_scale))
    values["corpus"] = corpus
    stages = dict(values.get("stages", {}))
    for name, budget in _pairs(args.stage, "--stage"):
        if name not in DEMO_STAGE_WEIGHTS:
            raise SystemExit(f"--stage: no demo weights for {name!r}; choose one of {sorted(DEMO_STAGE_WEIGHTS)} "
                             f"or give the stage's weights in --config")
        stages[name] = MixtureSpec(weights=DEMO_STAGE_WEIGHTS[name], token_budget=int(budget)).model_dump()
    values["stages"] = stages
    if "output_uri" not in values:
        raise SystemExit("llada data prepare: --output is required (or output_uri in --config)")
    return PrepareConfig.model_validate(values)


def run_data_prepare(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from llada.commands import ray_session
    from pipelines.prepare import prepare, summary_table
    from pipelines.storage import StorageError

    try:
        config = _prepare_config(args)
    except ValidationError as error:
        raise SystemExit(f"llada data prepare: invalid configuration:\n{error}") from None
    with ray_session(args, config.output_uri) as console:
        try:
            summary = prepare(config, progress=console.say)
        except (StorageError, ValueError, RuntimeError) as error:
            console.error(f"llada data prepare: {error}")
            return 1
        console.say()
        console.say(summary_table(summary))
        console.say(f"tokenizer: {summary['tokenizer_uri']} ({summary['tokenizer_size']} tokens)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from llada.commands import COMMANDS as RECIPE_COMMANDS
    from llada.infra.cli import add_infra_command

    commands: tuple[Callable[[Any], None], ...] = (add_data_command, *RECIPE_COMMANDS, add_infra_command)
    parser = argparse.ArgumentParser(prog="llada", description="Train and serve LLaDA-MoE on Ray.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in commands:
        add_command(subparsers)
    return parser


def user_errors() -> tuple[type[Exception], ...]:
    """Errors that name a user's problem (unreachable storage, a bad data or eval file, a broken
    checkpoint): printed as one line, without a traceback."""
    from jobs.checkpoints import ResumeError
    from jobs.edits import StageChanged
    from jobs.evaluation.tasks import EvalError
    from jobs.lease import LeaseHeld
    from llada_core.checkpoint import CheckpointError
    from pipelines.pack import PackError
    from pipelines.reader import DataError
    from pipelines.sources import SourceError
    from pipelines.storage import StorageError
    from pipelines.tokenizer import TokenizerError

    return (StorageError, TokenizerError, SourceError, PackError, DataError, EvalError, CheckpointError, ResumeError,
            StageChanged, LeaseHeld)


def main(argv: Sequence[str] | None = None) -> int:
    from llada.console import Console

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm-eval"]:  # lm-eval parses its own arguments
        from llada.commands import run_lm_eval

        return run_lm_eval(argv[1:])
    args = build_parser().parse_args(argv)
    args.console = Console(verbose=getattr(args, "verbose", False), user_errors=user_errors())
    try:
        return int(args.handler(args) or 0)
    except user_errors() as error:
        if args.console.verbose:
            raise
        args.console.error(f"llada {args.command}: {error}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
