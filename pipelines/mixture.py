"""Mixtures: a stage's data is a weighted mix of packed domains, drawn from a seed, sized by
the stage's token budget, and written in its final order as the stage's own shards.

- Budget: ``num_sequences = token_budget // seq_len`` rows, so the budget counts positions.
  A packed pretraining row costs all of them; an SFT batch is cut to its longest row in
  training (LLADA_SPEC section 4), so for SFT the budget is an upper bound on the compute.
- Per-domain rows: ``weight * num_sequences`` rounded by largest remainder, so the counts sum
  exactly to ``num_sequences`` and each is within 1 row of its exact share.
- Rows of a domain are taken in a seeded permutation; a domain with fewer rows than its share
  is repeated (a fresh permutation per pass; the number of passes is recorded as ``epochs``).
- The rows of all domains are then shuffled together (seeded) and numbered ``sample_index``.

Materialising the stage (a copy of the chosen rows) keeps the reader a plain ordered parquet
read and makes the stage's order a fact on disk; it costs one copy of the stage's data, which is
small for the demo and proportional to the budget in general.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipelines import storage
from pipelines.pack import load_manifest

STAGE_MANIFEST = "stage.json"
STAGE_FORMAT = "llada-stage/1"

# The paper's stages (LLADA_SPEC section 5) over the demo domains: pretrain 2 re-weights math and
# code up; the anneal stages read the curated subset; SFT reads chat pairs.
DEMO_STAGE_WEIGHTS: dict[str, dict[str, float]] = {
    "pretrain1": {"text": 0.6, "math": 0.2, "code": 0.2},
    "pretrain2": {"text": 0.3, "math": 0.35, "code": 0.35},
    "anneal1": {"anneal": 1.0},
    "anneal2": {"anneal": 1.0},
    "sft": {"chat": 1.0},
}


class MixtureSpec(BaseModel):
    """Domain weights (any positive scale; normalised), token budget and seed of one stage."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    weights: dict[str, float] = Field(min_length=1)
    token_budget: int = Field(gt=0)
    seed: int = 0

    @field_validator("weights")
    @classmethod
    def _positive(cls, weights: dict[str, float]) -> dict[str, float]:
        for domain, weight in weights.items():
            if not weight > 0:
                raise ValueError(f"weights.{domain}: must be > 0, got {weight}")
        return weights


def largest_remainder(weights: dict[str, float], total: int) -> dict[str, int]:
    """Integer counts summing to ``total``, each within 1 of ``total * weight / sum(weights)``."""
    domains = sorted(weights)
    exact = np.array([weights[d] for d in domains], dtype=np.float64)
    exact = exact / exact.sum() * total
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - int(counts.sum())]] += 1
    return {domain: int(count) for domain, count in zip(domains, counts)}


def _domain_seed(seed: int, domain: str) -> list[int]:
    return [seed, int.from_bytes(hashlib.sha256(domain.encode()).digest()[:4], "big")]


def plan_mixture(manifest: dict[str, Any], spec: MixtureSpec) -> dict[str, Any]:
    """The stage's rows in order: ``shard`` (index into manifest shards), ``row`` (row within the
    shard), ``domain``; plus per-domain ``counts`` and ``epochs``."""
    available = {d for d in manifest["domains"]}
    for domain in spec.weights:
        if domain not in available:
            raise ValueError(f"weights.{domain}: no such domain in the packed data; it has {sorted(available)}")
    kinds = {manifest["domains"][d]["kind"] for d in spec.weights}
    if len(kinds) > 1:
        raise ValueError(f"weights: mixes pretraining and SFT domains {sorted(spec.weights)}; a stage is one kind")
    num_sequences = spec.token_budget // manifest["seq_len"]
    if num_sequences < 1:
        raise ValueError(f"token_budget: {spec.token_budget} is less than one sequence of {manifest['seq_len']} tokens")
    counts = largest_remainder(spec.weights, num_sequences)
    shard_parts, row_parts, domain_parts, epochs = [], [], [], {}
    for domain, count in counts.items():
        refs = [(i, r) for i, shard in enumerate(manifest["shards"]) if shard["domain"] == domain
                for r in range(shard["rows"])]
        if not refs:
            raise ValueError(f"weights.{domain}: the domain has no packed rows")
        rng = np.random.default_rng(_domain_seed(spec.seed, domain))
        passes = -(-count // len(refs))
        order = np.concatenate([rng.permutation(len(refs)) for _ in range(passes)])[:count]
        chosen = np.asarray(refs, dtype=np.int64)[order].reshape(-1, 2)
        shard_parts.append(chosen[:, 0])
        row_parts.append(chosen[:, 1])
        domain_parts += [domain] * count
        epochs[domain] = count / len(refs)
    mix = np.random.default_rng([spec.seed, 7]).permutation(num_sequences)
    return {"shard": np.concatenate(shard_parts)[mix], "row": np.concatenate(row_parts)[mix],
            "domain": [domain_parts[i] for i in mix], "counts": counts, "epochs": epochs,
            "num_sequences": num_sequences}


def stage_key(manifest: dict[str, Any], spec: MixtureSpec, rows_per_shard: int) -> str:
    identity = {"format": STAGE_FORMAT, "job_key": manifest["job_key"], "spec": spec.model_dump(),
                "rows_per_shard": rows_per_shard}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def write_stage(packed_uri: str, spec: MixtureSpec, stage_uri: str, rows_per_shard: int = 2048,
                s3: storage.S3Settings | None = None) -> dict[str, Any]:
    """Materialise the stage's rows in order under ``stage_uri`` (reused when already there)."""
    manifest = load_manifest(packed_uri, s3)
    key = stage_key(manifest, spec, rows_per_shard)
    stage_manifest_uri = storage.join(stage_uri, STAGE_MANIFEST)
    if storage.exists(stage_manifest_uri, s3):
        existing = storage.read_json(stage_manifest_uri, s3)
        if existing.get("stage_key") == key:
            return {**existing, "reused": True}
        storage.remove_tree(stage_manifest_uri, s3)
        storage.remove_tree(storage.join(stage_uri, "shards"), s3)
    plan = plan_mixture(manifest, spec)
    tables: dict[int, pa.Table] = {}  # source shards, each read once (demo-sized data)
    shards = []
    for part, start in enumerate(range(0, plan["num_sequences"], rows_per_shard)):
        stop = min(start + rows_per_shard, plan["num_sequences"])
        shard_ids, row_ids = plan["shard"][start:stop], plan["row"][start:stop]
        pieces, positions = [], []
        for shard_index in np.unique(shard_ids):
            if shard_index not in tables:
                data = storage.read_bytes(storage.join(packed_uri, manifest["shards"][shard_index]["path"]), s3)
                tables[shard_index] = pq.read_table(io.BytesIO(data))
            selected = np.nonzero(shard_ids == shard_index)[0]
            pieces.append(tables[shard_index].take(row_ids[selected]))
            positions.append(selected)
        table = pa.concat_tables(pieces).take(np.argsort(np.concatenate(positions)))
        table = table.append_column("sample_index", pa.array(np.arange(start, stop, dtype=np.int64)))
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        relative = f"shards/{part:05d}.parquet"
        storage.write_bytes(storage.join(stage_uri, relative), buffer.getvalue(), s3)
        shards.append({"path": relative, "rows": stop - start, "first_sample": start})
    stage = {"format": STAGE_FORMAT, "stage_key": key, "spec": spec.model_dump(), "seq_len": manifest["seq_len"],
             "kind": manifest["domains"][next(iter(spec.weights))]["kind"], "packed_uri": packed_uri,
             "tokenizer": manifest["tokenizer"], "num_sequences": plan["num_sequences"],
             "domain_sequences": plan["counts"], "domain_epochs": plan["epochs"], "shards": shards}
    storage.write_json(stage_manifest_uri, stage, s3)  # written last: marks the stage complete
    return {**stage, "reused": False}
