"""`llada data prepare` as a library call: corpus -> tokenizer -> packed shards (-> stage data).

Output layout under ``output_uri``::

    corpus/            the built-in demo corpus (when ``demo``)
    tokenizer/         the demo tokenizer (when no ``tokenizer_uri`` is given)
    packed/pretrain/   shards + manifest.json of the pretraining (and anneal) domains
    packed/sft/        shards + manifest.json of the SFT domains
    stages/{name}/     ordered stage data + stage.json, for each entry of ``stages``

Every step reuses its output when its inputs have not changed, so a rerun is cheap.
"""

from __future__ import annotations

from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipelines import storage
from pipelines.demo.corpus import PRETRAIN_DOMAINS, CorpusSpec, write_demo_corpus
from pipelines.mixture import MixtureSpec, write_stage
from pipelines.pack import PackConfig, run_pack_job
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
    """What `llada data prepare` does: a DataSpec, where to write it, and the stages' mixtures."""

    output_uri: str
    stages: dict[str, MixtureSpec] = Field(default_factory=dict)
    overwrite: bool = False


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
    for kind, seq_len in (("pretrain", config.seq_len), ("sft", config.sft_seq_len)):
        kind_sources = [s for s in sources if s.kind == kind]
        if not kind_sources:
            continue
        packed_uri = storage.join(out, "packed", kind)
        progress(f"[pack] {kind}: {len(kind_sources)} sources -> {packed_uri}")
        summary["packed"][kind] = run_pack_job(PackConfig(
            sources=kind_sources, tokenizer_uri=tokenizer_uri, output_uri=packed_uri, seq_len=seq_len,
            overwrite=config.overwrite), settings)
        check_every_domain_has_documents(summary["packed"][kind], kind)
    for name, spec in config.stages.items():
        kinds = [k for k, m in summary["packed"].items() if set(spec.weights) <= set(m["domains"])]
        if not kinds:
            raise ValueError(f"stages.{name}.weights: domains {sorted(spec.weights)} are not all in one packed set")
        progress(f"[stage] {name}: {spec.token_budget} tokens from {sorted(spec.weights)}")
        summary["stages"][name] = write_stage(storage.join(out, "packed", kinds[0]), spec,
                                              storage.join(out, "stages", name), s3=settings)
    return summary


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
        shares = ", ".join(f"{d}={n}" for d, n in sorted(stage["domain_sequences"].items()))
        text.append(f"stage {name}: {stage['num_sequences']} sequences ({shares})"
                    f"{' (reused)' if stage.get('reused') else ''}")
    problems = [p for m in summary["packed"].values() for p in m.get("problems", [])]
    text += [f"WARNING {p}" for p in problems]
    return "\n".join(text)
