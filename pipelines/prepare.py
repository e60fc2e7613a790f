"""`llada data prepare` as a library call: corpus -> tokenizer -> packed shards (-> stage plans).

Output layout under ``output_uri``::

    corpus/                   the built-in demo corpus (when ``demo``)
    tokenizer/                the demo tokenizer (when no ``tokenizer_uri`` is given)
    packed/{kind}-{seq_len}/  shards, shards.parquet (the index) and manifest.json, for each
                              (kind, row length) the stages need, holding only the domains
                              read at that length (pretraining and anneal domains are kind
                              "pretrain", chat domains "sft")
    stages/{name}/stage.json  the stage's plan (pipelines/mixture.py): no rows are copied

Every step reuses its output when its inputs have not changed, so a rerun is cheap.
"""

from __future__ import annotations

from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipelines import storage
from pipelines.demo.corpus import PRETRAIN_DOMAINS, CorpusSpec, write_demo_corpus
from pipelines.mixture import PLAN_NAME, MixtureSpec, plan_stage
from pipelines.pack import PackConfig, load_manifest, load_shard_index, run_pack_job
from pipelines.sources import SourceError, SourceSpec
from pipelines.tokenizer import load_tokenizer, train_demo_tokenizer


class DataSpec(BaseModel):
    """The data of a run: either ``demo`` (built-in corpus) or your ``sources``, the tokenizer
    and sequence lengths. A recipe's ``data:`` block is one of these."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    demo: bool = True
    corpus: CorpusSpec = CorpusSpec()
    sources: list[SourceSpec] = Field(default_factory=list)
    tokenizer_uri: str | None = None
    vocab_size: int = Field(4096, ge=300)
    seq_len: int = Field(256, ge=8)
    sft_seq_len: int = Field(256, ge=8)

    @model_validator(mode="after")
    def _check(self) -> "DataSpec":
        if not self.demo and not self.sources:
            raise ValueError("sources: give at least one source, or set demo: true for the built-in corpus")
        if not self.demo and self.tokenizer_uri is None:
            raise ValueError("tokenizer_uri: required with your own sources (the demo tokenizer fits only the demo)")
        return self


class PrepareConfig(DataSpec):
    """What `llada data prepare` does: a DataSpec, where to write it, and the stages' mixtures
    (with the sequence length of each stage that does not train at its kind's default)."""

    output_uri: str
    stages: dict[str, MixtureSpec] = Field(default_factory=dict)
    stage_seq_lens: dict[str, int] = Field(default_factory=dict)
    overwrite: bool = False

    def kinds_and_lengths(self, kinds: dict[str, str]) -> set[tuple[str, int]]:
        """The (kind, seq_len) pairs to pack: each stage's (``kinds``: domain -> kind), or the
        kind defaults when there are no stages."""
        default = {"pretrain": self.seq_len, "sft": self.sft_seq_len}
        if not self.stages:
            return {(kind, default[kind]) for kind in set(kinds.values())}
        pairs = set()
        for name, spec in self.stages.items():
            kind = kinds.get(next(iter(spec.weights)), "pretrain")
            pairs.add((kind, self.stage_seq_lens.get(name, default[kind])))
        return pairs


def demo_sources(corpus_uri: str) -> list[SourceSpec]:
    sources = [SourceSpec(uri=storage.join(corpus_uri, f"pretrain/{d}/*.jsonl"), domain=d) for d in PRETRAIN_DOMAINS]
    sources.append(SourceSpec(uri=storage.join(corpus_uri, "anneal/anneal/*.jsonl"), domain="anneal"))
    sources.append(SourceSpec(uri=storage.join(corpus_uri, "sft/chat/*.jsonl"), domain="chat", kind="sft"))
    return sources


def prepare(config: PrepareConfig, s3: storage.S3Settings | None = None,
            progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every step; returns {"corpus", "tokenizer_uri", "packed": {kind: manifest}, "stages"}."""
    settings = s3 or storage.S3Settings.from_env()
    out = config.output_uri
    summary: dict[str, Any] = {"corpus": None, "packed": {}, "stages": {}}
    sources = list(config.sources)
    if config.demo:
        progress(f"[corpus] writing the built-in demo corpus to {storage.join(out, 'corpus')}")
        summary["corpus"] = write_demo_corpus(storage.join(out, "corpus"), config.corpus, settings,
                                              overwrite=config.overwrite)
        sources += demo_sources(storage.join(out, "corpus"))
    tokenizer_uri = config.tokenizer_uri or storage.join(out, "tokenizer")
    if config.tokenizer_uri is None:
        reuse = summary["corpus"] and summary["corpus"]["reused"] and \
            storage.exists(storage.join(tokenizer_uri, "tokenizer.json"), settings)
        progress(f"[tokenizer] {'reusing' if reuse else 'training'} the demo BPE at {tokenizer_uri}")
        if not reuse:
            train_demo_tokenizer(storage.join(out, "corpus"), tokenizer_uri, config.vocab_size, settings)
    summary["tokenizer_uri"] = tokenizer_uri
    summary["tokenizer_size"] = len(load_tokenizer(tokenizer_uri, settings))
    kinds = {source.domain: source.kind for source in sources}
    default = {"pretrain": config.seq_len, "sft": config.sft_seq_len}
    for kind, seq_len in sorted(config.kinds_and_lengths(kinds)):
        kind_sources = [s for s in sources if s.kind == kind and (not config.stages or _used(s.domain, kind, seq_len,
                                                                                              config, kinds))]
        if not kind_sources:
            continue
        packed_uri = storage.join(out, "packed", f"{kind}-{seq_len}")
        progress(f"[pack] {kind} at {seq_len} tokens: {len(kind_sources)} sources -> {packed_uri}")
        summary["packed"][f"{kind}-{seq_len}"] = run_pack_job(PackConfig(
            sources=kind_sources, tokenizer_uri=tokenizer_uri, output_uri=packed_uri, seq_len=seq_len,
            overwrite=config.overwrite), settings)
        check_every_domain_has_documents(summary["packed"][f"{kind}-{seq_len}"], kind)
    for name, spec in config.stages.items():
        kind = kinds.get(next(iter(spec.weights)), "pretrain")
        seq_len = config.stage_seq_lens.get(name, default[kind])
        packed_uri = storage.join(out, "packed", f"{kind}-{seq_len}")
        if f"{kind}-{seq_len}" not in summary["packed"]:
            raise ValueError(f"stages.{name}.weights: domains {sorted(spec.weights)} are not in the packed data "
                             f"(sources: {sorted(kinds)})")
        plan = write_stage_plan(packed_uri, spec, storage.join(out, "stages", name), settings)
        progress(f"[stage] {name}: {plan['num_sequences']} rows of {seq_len} tokens from {sorted(spec.weights)} "
                 f"(passes: {', '.join(f'{d} {p:.2f}' for d, p in sorted(plan['passes'].items()))})")
        summary["stages"][name] = plan
    return summary


def _used(domain: str, kind: str, seq_len: int, config: PrepareConfig, kinds: dict[str, str]) -> bool:
    """Whether a stage reads ``domain`` at ``seq_len`` (only those domains are packed at it)."""
    default = {"pretrain": config.seq_len, "sft": config.sft_seq_len}
    return any(domain in spec.weights and config.stage_seq_lens.get(name, default[kind]) == seq_len
               for name, spec in config.stages.items() if kinds.get(next(iter(spec.weights))) == kind)


def write_stage_plan(packed_uri: str, spec: MixtureSpec, stage_uri: str,
                     s3: storage.S3Settings | None = None) -> dict[str, Any]:
    """The stage's plan as ``{stage_uri}/stage.json`` (reused when equal): O(shards) to compute,
    a few hundred bytes to store; the stage's rows are never copied."""
    plan = plan_stage(packed_uri, load_manifest(packed_uri, s3), load_shard_index(packed_uri, s3), spec).to_json()
    uri = storage.join(stage_uri, PLAN_NAME)
    if storage.exists(uri, s3) and storage.read_json(uri, s3) == plan:
        return {**plan, "reused": True}
    storage.write_json(uri, plan, s3)
    return {**plan, "reused": False}


def check_every_domain_has_documents(manifest: dict[str, Any], kind: str) -> None:
    """A source that yields nothing (empty files, every record malformed) is an error, not an
    empty domain that a stage mixture silently lacks."""
    for domain, totals in sorted(manifest["domains"].items()):
        if totals["documents"] == 0:
            where = totals.get("first_malformed") or totals.get("first_empty") or "no records at all"
            raise SourceError(f"{kind} domain {domain!r}: its {totals['files']} file(s) yielded no usable document "
                              f"({totals['malformed']} malformed, {totals['empty']} empty; first: {where})")


def summary_table(summary: dict[str, Any]) -> str:
    """A fixed-width table: one line per domain, then one per stage."""
    header = ("domain", "kind", "files", "documents", "tokens", "sequences", "pad", "skipped", "status")
    lines = [header]
    for kind, manifest in summary["packed"].items():
        status = "reused" if manifest.get("reused") else "written"
        for domain, totals in sorted(manifest["domains"].items()):
            skipped = totals["malformed"] + totals["empty"] + totals["too_long"]
            lines.append((domain, kind, str(totals["files"]), str(totals["documents"]), str(totals["tokens"]),
                          str(totals["sequences"]), str(totals["pad_tokens"]), str(skipped), status))
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in lines]
    for name, stage in summary["stages"].items():
        shares = ", ".join(f"{d} {n}/{stage['unit_rows']} rows, {stage['passes'][d]:.2f} passes"
                           for d, n in sorted(stage["composition"].items()))
        text.append(f"stage {name}: {stage['num_sequences']} sequences of {stage['seq_len']} tokens ({shares})"
                    f"{' (reused)' if stage.get('reused') else ''}")
    problems = [p for m in summary["packed"].values() for p in m.get("problems", [])]
    text += [f"WARNING {p}" for p in problems]
    return "\n".join(text)
