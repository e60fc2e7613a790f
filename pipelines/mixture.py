"""A stage's data as a function, not a copy: the order of a stage's rows is computed from the
packed shards' index, the stage's mixture and its seed, by every reader, for any position, without
materialising it. Planning costs O(number of shards); nothing is written but a small plan.

Legend: U rows per unit, D domains, S rows of a shard, G rows of a row group.

The order (every function here is pure; readers compute the same rows for the same position):

- **Units.** The stage is an endless sequence of units of ``unit_rows`` (U) rows. Every unit has
  the same composition: each domain's share of U by largest remainder, so over any window of
  rows a domain's share is within 1 row per unit of its weight (0.02% of U = 4096). Within a
  unit the domains' rows are interleaved by a permutation seeded by (seed, unit).
- **Domain order.** Domain d contributes n_d rows to every unit, so unit u takes rows
  [u n_d, (u + 1) n_d) of the domain's own order, an endless sequence of passes over the
  domain: a pass visits the domain's shards in an order seeded by (seed, domain, pass), and
  within a shard its row groups in a seeded order and the rows of each row group in a seeded
  order. A domain smaller than its share repeats with a fresh order per pass (the plan says how
  many passes the stage's budget makes); no row repeats within a pass.
- **Shuffle quality.** A unit's rows of one domain are a run of n_d consecutive rows of the
  domain order: ceil(n_d / G) + 1 row groups of at most 2 shards. A global batch of W workers
  draws from W units (worker w reads units w, w + W, ...), so from about 2 W shards per domain;
  consecutive units of one worker are W n_d rows apart in each domain's order. Shards (one
  input file's region each) are visited in a fresh order every pass. What this does not give:
  rows of one micro-batch from many input files at once (MosaicML's shuffle blocks do, by
  holding several shards per reader in memory); the reader here holds a few row groups.

The budget: ``num_sequences = token_budget // seq_len`` rows (a packed pretraining row costs all
its positions; an SFT batch is cut to its longest row in training, so for SFT the budget is an
upper bound on the compute). It sets the default number of steps; the order itself is endless
(a stage that trains longer continues into the next passes).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

PLAN_NAME = "stage.json"
PLAN_FORMAT = "llada-stage-plan/1"
DEFAULT_UNIT_ROWS = 4096

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


def _seed(*parts: Any) -> list[int]:
    """A numpy seed from any parts (names are hashed, so each stream is independent)."""
    words = []
    for part in parts:
        if isinstance(part, str):
            words.append(int.from_bytes(hashlib.sha256(part.encode()).digest()[:4], "big"))
        else:
            words.append(int(part))
    return words


class DomainShards:
    """One domain's shards in the packed index order: relative paths and row counts, with each
    pass's shard order computed once (O(shards) per pass, not per read)."""

    def __init__(self, paths: list[str], rows: np.ndarray) -> None:
        self.paths = paths
        self.rows = np.asarray(rows, dtype=np.int64)
        self.total_rows = int(self.rows.sum())
        self._passes: dict[tuple[int, str, int], tuple[np.ndarray, np.ndarray]] = {}

    def pass_order(self, seed: int, domain: str, pass_index: int) -> tuple[np.ndarray, np.ndarray]:
        """A pass's shard visiting order and the prefix sums of their rows."""
        key = (seed, domain, pass_index)
        if key not in self._passes:
            if len(self._passes) >= 4:  # a reader moves forward: a few passes are enough
                self._passes.pop(next(iter(self._passes)))
            order = np.random.default_rng(_seed(seed, domain, "pass", pass_index)).permutation(len(self.rows))
            self._passes[key] = (order, np.concatenate([[0], np.cumsum(self.rows[order])]))
        return self._passes[key]


@dataclass(frozen=True)
class StagePlan:
    """Everything a reader needs to compute the stage's rows (small: no per-row or per-shard
    data; the shard index stays in the packed set)."""

    packed_uri: str
    kind: str
    seq_len: int
    seed: int
    weights: dict[str, float]
    unit_rows: int
    composition: dict[str, int]  # rows of each domain in every unit
    num_sequences: int  # rows the token budget pays for
    domain_rows: dict[str, int]  # rows of each domain in the packed set (one pass)
    row_group_rows: int
    eos_id: int  # SFT rows are padded with it when read

    @property
    def passes(self) -> dict[str, float]:
        """How many passes over each domain the budget's rows make."""
        units = self.num_sequences / self.unit_rows
        return {d: units * n / self.domain_rows[d] for d, n in self.composition.items()}

    def to_json(self) -> dict[str, Any]:
        return {"format": PLAN_FORMAT, "packed_uri": self.packed_uri, "kind": self.kind, "seq_len": self.seq_len,
                "seed": self.seed, "weights": self.weights, "unit_rows": self.unit_rows,
                "composition": self.composition, "num_sequences": self.num_sequences,
                "domain_rows": self.domain_rows, "row_group_rows": self.row_group_rows, "eos_id": self.eos_id,
                "passes": {d: round(p, 4) for d, p in self.passes.items()}}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> "StagePlan":
        if value.get("format") != PLAN_FORMAT:
            raise ValueError(f"stage plan: unknown format {value.get('format')!r}, expected {PLAN_FORMAT}")
        fields = {k: value[k] for k in ("packed_uri", "kind", "seq_len", "seed", "weights", "unit_rows",
                                         "composition", "num_sequences", "domain_rows", "row_group_rows",
                                         "eos_id")}
        return cls(**fields)


def plan_stage(packed_uri: str, manifest: dict[str, Any], shards: dict[str, DomainShards], spec: MixtureSpec,
               unit_rows: int = DEFAULT_UNIT_ROWS) -> StagePlan:
    """The stage's plan from the packed set's manifest and shard index: O(number of shards)."""
    available = set(manifest["domains"])
    for domain in spec.weights:
        if domain not in available:
            raise ValueError(f"weights.{domain}: no such domain in the packed data; it has {sorted(available)}")
    kinds = {manifest["domains"][d]["kind"] for d in spec.weights}
    if len(kinds) > 1:
        raise ValueError(f"weights: mixes pretraining and SFT domains {sorted(spec.weights)}; a stage is one kind")
    seq_len = manifest["seq_len"]
    num_sequences = spec.token_budget // seq_len
    if num_sequences < 1:
        raise ValueError(f"token_budget: {spec.token_budget} is less than one sequence of {seq_len} tokens")
    domain_rows = {d: shards[d].total_rows for d in spec.weights}
    empty = sorted(d for d, rows in domain_rows.items() if rows == 0)
    if empty:
        raise ValueError(f"weights.{empty[0]}: the domain has no packed rows")
    composition = largest_remainder(spec.weights, unit_rows)
    return StagePlan(packed_uri=packed_uri, kind=kinds.pop(), seq_len=seq_len, seed=spec.seed,
                     weights=dict(spec.weights), unit_rows=unit_rows, composition=composition,
                     num_sequences=num_sequences, domain_rows=domain_rows,
                     row_group_rows=int(manifest["row_group_rows"]), eos_id=int(manifest["tokenizer"]["eos"]))


# ---------------------------------------------------------------- the order, row by row


def unit_slots(plan: StagePlan, unit: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """A unit's interleave: (domains in sorted order, domain index [U], index within the
    domain's run [U]) in stage order."""
    domains = sorted(plan.composition)
    counts = np.array([plan.composition[d] for d in domains], dtype=np.int64)
    domain_of = np.repeat(np.arange(len(domains)), counts)
    within = np.concatenate([np.arange(n, dtype=np.int64) for n in counts])
    order = np.random.default_rng(_seed(plan.seed, "unit", unit)).permutation(plan.unit_rows)
    return domains, domain_of[order], within[order]


@functools.lru_cache(maxsize=4096)
def shard_row_order(seed: int, domain: str, pass_index: int, shard: int, rows: int, group: int) -> np.ndarray:
    """The order in which a pass reads one shard's rows: its row groups in a seeded order, the
    rows of each row group in a seeded order (reads stay within a few row groups)."""
    rng = np.random.default_rng(_seed(seed, domain, "shard", pass_index, shard))
    starts = np.arange(0, rows, group)
    pieces = [start + rng.permutation(min(group, rows - start)) for start in starts[rng.permutation(len(starts))]]
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


def domain_rows(plan: StagePlan, shards: DomainShards, domain: str, first: int, count: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Rows [first, first + count) of a domain's endless order -> (shard index [count], row
    within the shard [count])."""
    shard_out = np.empty(count, dtype=np.int64)
    row_out = np.empty(count, dtype=np.int64)
    done = 0
    while done < count:
        pass_index, offset = divmod(first + done, shards.total_rows)
        order, prefix = shards.pass_order(plan.seed, domain, pass_index)
        slot = int(np.searchsorted(prefix, offset, side="right")) - 1
        shard = int(order[slot])
        size = int(shards.rows[shard])
        start_in_shard = offset - int(prefix[slot])
        take = min(count - done, size - start_in_shard)
        rows = shard_row_order(plan.seed, domain, pass_index, shard, size, plan.row_group_rows)
        shard_out[done:done + take] = shard
        row_out[done:done + take] = rows[start_in_shard:start_in_shard + take]
        done += take
    return shard_out, row_out


def unit_rows(plan: StagePlan, shards: dict[str, DomainShards], unit: int, start: int = 0, stop: int | None = None
              ) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """The rows at positions [start, stop) of a unit (default: to its end), grouped by domain:
    per domain (domain, the positions within the unit [n], shard index [n], row [n]). Only what
    the positions need is computed (a resume starting mid-unit reads no row before its position)."""
    stop = plan.unit_rows if stop is None else stop
    if not 0 <= start <= stop <= plan.unit_rows:
        raise ValueError(f"unit positions [{start}, {stop}) outside [0, {plan.unit_rows})")
    domains, domain_of, within = unit_slots(plan, unit)
    positions = np.arange(start, stop)
    grouped = []
    for index, domain in enumerate(domains):
        mine = positions[domain_of[start:stop] == index]
        if len(mine) == 0:
            continue
        runs = within[mine]
        first_run = int(runs.min())
        shard, row = domain_rows(plan, shards[domain], domain, unit * plan.composition[domain] + first_run,
                                 int(runs.max()) - first_run + 1)
        grouped.append((domain, mine, shard[runs - first_run], row[runs - first_run]))
    return grouped
