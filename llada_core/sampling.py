"""Masked-diffusion sampler for LLaDA-MoE: semi-autoregressive blocks, low-confidence remasking.

Legend: B batch, P prompt length, G gen_length, L = P + G, K block_length, N num_blocks,
S sampling steps per block, V vocab.

The reverse process of LLaDA (paper Eq. 6, LLADA_SPEC section 6): start from
``[prompt, MASK x G]``; at every sampling step predict every masked position of the current
block and commit (unmask) the most confident predictions, the rest stay masked. Blocks are
filled left to right; the number of commits per step follows a fixed schedule. The public
entry point, :func:`generate`, takes a :class:`~llada_core.options.SamplingOptions` (or its
fields as the keywords of the official LLaDA ``generate()``, same meaning) and a
``torch.Generator`` for reproducible sampling.

The loop is split per block (:func:`_denoise_block`) and per step (logits, predict, select).
The fast options of LLADA_SPEC section 6 (Fast-dLLM, dInfer) each replace one piece, and with
all of them off the loop is the reference loop, unchanged:

- ``threshold``: the select piece commits every masked position of the block whose confidence
  is >= threshold (at least the most confident one) instead of following the fixed schedule;
- ``cache``: the logits piece runs a full forward only at the block's first step and then
  recomputes just the block and everything after it (``"prefix"``) or just the block
  (``"dual"``) against cached keys/values of the rest;
- ``early_stop``: after each block, a row whose answer so far ends in EOS is filled with EOS to
  the end, and sampling stops once every row is.

Streaming (``on_block``): every answer token is handed out exactly once, in order, as soon as it
is final, in a :class:`CommittedBlocks` that carries the new tokens themselves; see its docstring.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from llada_core.guidance import guided, with_unconditional_rows
from llada_core.model import KVCache
from llada_core.options import FAST_OPTIONS, SamplingOptions

# The keyword arguments a model's forward needs for ``cache`` (llada_core.model.LLaDAMoEModelLM).
_CACHE_FORWARD_ARGS = ("use_cache", "past_key_values", "cache_start", "logits_slice")
# generate()'s keywords that are SamplingOptions fields, with the official defaults.
_OPTION_KEYWORDS = ("steps", "gen_length", "block_length", "temperature", "cfg_scale", "remasking",
                    "logits_eos_inf", "confidence_eos_eot_inf", "threshold", "cache", "early_stop")

# Kept for callers that spread the fast options as keywords; the same values as FAST_OPTIONS.
DEFAULT_FAST_OPTIONS = FAST_OPTIONS

# Confidence given to a prediction of EOS / end-of-turn when ``confidence_eos_eot_inf`` is on:
# below every probability (so it is committed only when nothing else is left in the block) but
# above the -inf that marks positions that may not be committed at all.
_DEMOTED_CONFIDENCE = -1.0


@dataclass(frozen=True)
class Resolved:
    """A SamplingOptions with the special token ids of the model it runs on (internal)."""

    options: SamplingOptions
    mask_id: int
    eos_id: int | None
    eot_id: int | None


@dataclass(frozen=True)
class CommittedBlocks:
    """What :func:`generate` hands ``on_block``: the answer blocks that became final since the
    previous call, with their tokens.

    The contract, for every caller: the ``blocks`` ranges of successive calls are contiguous,
    the first starts at 0 and the last ends at ``num_blocks``, so every answer token is handed
    out exactly once and in order; concatenating ``tokens_BT`` over the calls gives the answer
    part of generate()'s return value. Usually a call covers one block; after an early stop the
    last call covers every block left (they are final: EOS to the end of each row).

    blocks: the answer's block indices now final, e.g. ``range(1, 2)`` or, after an early stop
        in block 1 of 8, ``range(1, 8)``.
    answer_start: the position in the answer (0 = the first generated token) of ``tokens_BT[:, 0]``,
        ``blocks.start * block_length``.
    tokens_BT: a copy of the newly final answer tokens [B, len(blocks) * block_length].
    num_blocks: blocks in the whole answer (gen_length / block_length).
    """

    blocks: range
    answer_start: int
    tokens_BT: torch.Tensor
    num_blocks: int

    @property
    def final(self) -> bool:
        """True on the last call: the whole answer is out."""
        return self.blocks.stop == self.num_blocks


BlockCallback = Callable[[CommittedBlocks], None]


def num_transfer_tokens(num_masked_B: torch.Tensor, steps: int | torch.Tensor) -> torch.Tensor:
    """How many tokens to commit at each of ``steps`` sampling steps -> [B, S] int64.

    LLaDA's noise schedule is linear in t, so equal time intervals unmask equal expected counts:
    every step commits ``n // steps`` tokens and the first ``n % steps`` steps one more
    (e.g. 10 masks over 4 steps -> 3, 3, 2, 2). Each row sums to its ``n``.

    ``steps`` may differ per row (an int64 [B], for batches of requests with their own step
    counts): S is then the largest, and a row's steps past its own commit nothing.
    """
    num_masked_B = num_masked_B.long()
    steps_B1 = torch.as_tensor(steps, device=num_masked_B.device).long().expand(num_masked_B.shape)[:, None]
    base_B1 = num_masked_B[:, None] // steps_B1
    remainder_B1 = num_masked_B[:, None] % steps_B1
    step_index_1S = torch.arange(int(steps_B1.max()), device=num_masked_B.device)[None, :]
    return (base_B1 + (step_index_1S < remainder_B1).long()) * (step_index_1S < steps_B1).long()


def gumbel_max_scores(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Scores whose argmax is a sample at ``temperature`` (the logits themselves at 0).

    The official code samples with ``exp(logits) / (-log u) ** T`` in float64 (low precision
    Gumbel-max hurts generation quality, arXiv:2409.02908). We take the log of that expression,
    ``logits - T * log(-log u)``, which has the same argmax for the same noise ``u`` but cannot
    overflow ``exp`` on large logits.
    """
    if temperature == 0:
        return logits
    noise = torch.rand(logits.shape, generator=generator, dtype=torch.float64, device=logits.device)
    return logits.double() - temperature * torch.log(-torch.log(noise))


def predict(
    logits_BKV: torch.Tensor, run: Resolved, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted tokens and their confidences at every position of a block -> ([B, K], [B, K]).

    Confidence is the softmax probability of the predicted token (``low_confidence``) or a
    uniform random number (``random``). Random draws happen in this order: Gumbel noise
    [B, K, V] (if temperature > 0), then random confidences [B, K] (if ``random``).
    """
    options = run.options
    logits_BKV = logits_BKV.double()
    if options.logits_eos_inf:
        logits_BKV = logits_BKV.index_fill(-1, _ids(run.eos_id, logits_BKV.device), -math.inf)
    scores_BKV = gumbel_max_scores(logits_BKV, options.temperature, generator)
    # MASK is an input symbol, never an answer: committing it would leave the position masked.
    scores_BKV = scores_BKV.index_fill(-1, _ids(run.mask_id, logits_BKV.device), -math.inf)
    predicted_BK = scores_BKV.argmax(dim=-1)
    if options.remasking == "low_confidence":
        probs_BKV = F.softmax(logits_BKV, dim=-1)
        confidence_BK = probs_BKV.gather(-1, predicted_BK[..., None]).squeeze(-1)
    else:
        confidence_BK = torch.rand(
            predicted_BK.shape, generator=generator, dtype=torch.float64, device=predicted_BK.device
        )
    if options.confidence_eos_eot_inf:
        # Instruct models over-predict EOS early; committing it last keeps answers from being cut.
        stop_ids = [i for i in (run.eos_id, run.eot_id) if i is not None]
        is_stop_BK = torch.isin(predicted_BK, torch.tensor(stop_ids, device=predicted_BK.device))
        confidence_BK = confidence_BK.masked_fill(is_stop_BK, _DEMOTED_CONFIDENCE)
    return predicted_BK, confidence_BK


def select_top_k(confidence_BK: torch.Tensor, num_to_commit_B: torch.Tensor) -> torch.Tensor:
    """The ``num_to_commit[b]`` most confident positions of each row -> bool [B, K].

    Ties go to the leftmost position (stable sort), so the choice is deterministic. Positions
    with -inf confidence are never chosen while enough finite ones exist.
    """
    order_BK = torch.argsort(confidence_BK, dim=-1, descending=True, stable=True)
    positions_BK = torch.arange(confidence_BK.shape[-1], device=confidence_BK.device).expand_as(order_BK)
    rank_BK = torch.empty_like(order_BK).scatter_(-1, order_BK, positions_BK)
    return rank_BK < num_to_commit_B[:, None]


def threshold_counts(confidence_BK: torch.Tensor, threshold: float) -> torch.Tensor:
    """How many positions to commit per row under confidence-threshold decoding -> [B] int64.

    Every position whose confidence is >= threshold, and at least one in a row that still has a
    candidate (finite confidence; committed positions carry -inf), so every step makes progress.
    With :func:`select_top_k` this commits exactly the positions at or above the threshold, or
    the single most confident one.
    """
    num_above_B = (confidence_BK >= threshold).sum(-1)
    has_candidate_B = (confidence_BK > -math.inf).any(-1)
    return torch.maximum(num_above_B, has_candidate_B.long())


def model_logits(
    model: nn.Module,
    x_BL: torch.Tensor,
    attention_mask_BL: torch.Tensor | None,
    prompt: int | torch.Tensor,
    cfg_scale: float,
    mask_id: int,
) -> torch.Tensor:
    """Logits of the mask predictor [B, L, V], with classifier-free guidance when cfg_scale > 0
    (both passes in one forward; llada_core.guidance; ``prompt`` as it takes it)."""
    if cfg_scale == 0:
        return model(x_BL, attention_mask=attention_mask_BL).logits
    both_BL, both_mask = with_unconditional_rows(x_BL, attention_mask_BL, prompt, mask_id)
    return guided(model(both_BL, attention_mask=both_mask).logits, cfg_scale)


def _ids(token_id: int | None, device: torch.device) -> torch.Tensor:
    return torch.tensor([] if token_id is None else [token_id], dtype=torch.long, device=device)


@dataclass(frozen=True)
class RowBlocks:
    """Each row's current block at its own columns (continuous batching, :func:`next_blocks`):
    row b's block is ``[starts_B[b], starts_B[b] + length)``. Where every row's block is in the
    same columns, the sampler takes a ``slice`` instead."""

    starts_B: torch.Tensor
    length: int

    @property
    def columns_BK(self) -> torch.Tensor:
        return self.starts_B[:, None] + torch.arange(self.length, device=self.starts_B.device)


Block = slice | RowBlocks


def _read_block(x_BL: torch.Tensor, block: Block) -> torch.Tensor:
    """The block's positions of each row of ``x`` [B, L, ...] -> [B, K, ...] (ids or logits)."""
    if isinstance(block, slice):
        return x_BL[:, block]
    columns = block.columns_BK.view(*block.columns_BK.shape, *[1] * (x_BL.dim() - 2))
    return x_BL.gather(1, columns.expand(-1, -1, *x_BL.shape[2:]))


def _write_block(x_BL: torch.Tensor, block: Block, values_BK: torch.Tensor) -> None:
    if isinstance(block, slice):
        x_BL[:, block] = values_BK
    else:
        x_BL.scatter_(1, block.columns_BK, values_BK)


def cached_block_logits(
    model: nn.Module,
    x_BL: torch.Tensor,
    attention_mask_BL: torch.Tensor | None,
    block: Block,
    prompt: int | torch.Tensor,
    run: Resolved,
    kv_cache: KVCache | None,
) -> tuple[torch.Tensor, KVCache]:
    """Logits of the block's positions [B, K, V] under a KV cache, and the cache to pass next time.

    Without a cache (the block's first step) a full forward builds one. Later steps recompute
    [block.start, L) (``"prefix"``) or only the block (``"dual"``) against the cached keys/values
    of the other positions. Those were computed at the block's first step, so they have not seen
    the tokens committed since then: that staleness is the approximation, refreshed by the next
    block's full forward. Classifier-free guidance caches the unconditional rows as well; they
    differ from the conditional ones only in the prompt, which is never recomputed. Blocks at
    per-row columns (:class:`RowBlocks`) take the dual cache only.
    """
    options = run.options
    is_guided = options.cfg_scale > 0
    rows = 2 if is_guided else 1  # the unconditional copy follows the batch

    def per_row(value: torch.Tensor) -> torch.Tensor:
        return torch.cat([value] * rows)

    if kv_cache is None:
        ids_BL, mask_BL = x_BL, attention_mask_BL
        if is_guided:
            ids_BL, mask_BL = with_unconditional_rows(x_BL, attention_mask_BL, prompt, run.mask_id)
        where = block if isinstance(block, slice) else per_row(block.columns_BK)
        out = model(ids_BL, attention_mask=mask_BL, use_cache=True, logits_slice=where)
    elif isinstance(block, RowBlocks):
        if options.cache != "dual":
            raise ValueError(f"cache: blocks at per-row positions need the dual cache, not {options.cache!r}")
        out = model(per_row(_read_block(x_BL, block)), past_key_values=kv_cache, cache_start=per_row(block.starts_B),
                    logits_slice=slice(0, block.length))
    else:
        stop = x_BL.shape[1] if options.cache == "prefix" else block.stop
        out = model(per_row(x_BL[:, block.start:stop]), past_key_values=kv_cache, cache_start=block.start,
                    logits_slice=slice(0, block.stop - block.start))
    logits_BKV = guided(out.logits, options.cfg_scale) if is_guided else out.logits
    return logits_BKV, out.past_key_values


def _denoise_block(
    model: nn.Module,
    x_BL: torch.Tensor,
    attention_mask_BL: torch.Tensor | None,
    block: Block,
    prompt: int | torch.Tensor,
    run: Resolved,
    generator: torch.Generator | None,
    steps_per_block_B: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the sampling steps of one block, committing into ``x_BL`` in place -> the forwards
    each row needed [B] (those in which it still had masked positions in the block).

    Fixed schedule: ``steps_per_block`` steps, or each row's own ``steps_per_block_B`` (a row
    whose steps are over commits nothing more). Threshold: until no position of the block is
    masked (at most K steps, as each step commits at least one per row). ``block``: the same
    columns in every row (a slice), or each row's own (:class:`RowBlocks`). ``prompt``: the
    prompt's length, or its positions per row (bool [B, L]), for classifier-free guidance.
    """
    options = run.options
    schedule_BS = None
    if options.threshold is None:
        steps = options.steps_per_block if steps_per_block_B is None else steps_per_block_B
        schedule_BS = num_transfer_tokens((_read_block(x_BL, block) == run.mask_id).sum(-1), steps)
    kv_cache = None
    sampling_step = 0
    forwards_B = torch.zeros(x_BL.shape[0], dtype=torch.long, device=x_BL.device)
    while True:
        block_BK = _read_block(x_BL, block)
        still_masked_BK = block_BK == run.mask_id
        done = sampling_step == schedule_BS.shape[1] if schedule_BS is not None else not still_masked_BK.any()
        if done:
            return forwards_B
        forwards_B += still_masked_BK.any(-1).long()
        if options.cache is not None:
            logits_BKV, kv_cache = cached_block_logits(model, x_BL, attention_mask_BL, block, prompt, run, kv_cache)
        else:
            logits_BLV = model_logits(model, x_BL, attention_mask_BL, prompt, options.cfg_scale, run.mask_id)
            logits_BKV = _read_block(logits_BLV, block)
        predicted_BK, confidence_BK = predict(logits_BKV, run, generator)
        confidence_BK = confidence_BK.masked_fill(~still_masked_BK, -math.inf)
        if schedule_BS is not None:
            num_to_commit_B = schedule_BS[:, sampling_step]
        else:
            num_to_commit_B = threshold_counts(confidence_BK, options.threshold)
        commit_BK = select_top_k(confidence_BK, num_to_commit_B)
        assert not (commit_BK & ~still_masked_BK).any(), "asked for more commits than masks"
        _write_block(x_BL, block, torch.where(commit_BK, predicted_BK, block_BK))
        sampling_step += 1


def fill_after_eos(x_BL: torch.Tensor, answer_end: int, eos_id: int) -> bool:
    """Early stop: every row whose committed answer (all of ``x[:, :answer_end]``) ends in EOS is
    EOS from there on, so fill the rest of the row with EOS. -> True when every row is finished.

    An SFT model learns to pad its answer with EOS to the end (LLADA_SPEC section 4), so a
    block that closes on EOS is followed by EOS-only blocks; computing them would change nothing.
    """
    finished_B = x_BL[:, answer_end - 1] == eos_id
    x_BL[finished_B, answer_end:] = eos_id
    return bool(finished_B.all())


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    steps: int = 128,
    gen_length: int = 128,
    block_length: int = 128,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    mask_id: int | None = None,
    logits_eos_inf: bool = False,
    confidence_eos_eot_inf: bool = False,
    generator: torch.Generator | None = None,
    *,
    options: SamplingOptions | None = None,
    eos_id: int | None = None,
    eot_id: int | None = None,
    on_block: BlockCallback | None = None,
    threshold: float | None = None,
    cache: str | None = None,
    early_stop: bool = False,
) -> torch.Tensor:
    """Sample ``gen_length`` tokens after each prompt (LLaDA reverse process, paper Eq. 6).

    How to sample is a :class:`~llada_core.options.SamplingOptions` (its docstring defines every
    field): pass one as ``options``, or its fields as keywords (the arguments of the official
    LLaDA ``generate()``, same names, meaning and defaults, plus ``threshold``, ``cache`` and
    ``early_stop``), not both. With every fast option off this is the reference loop.

    Args besides the options:
        model: mask predictor, ``model(ids [B, L], attention_mask=[B, L] | None).logits`` [B, L, V];
            ``cache`` needs one whose forward takes ``use_cache``, ``past_key_values``,
            ``cache_start`` and ``logits_slice`` (llada_core's model).
        prompt: [B, P] token ids; rows of different lengths LEFT-padded (:func:`left_pad`).
        attention_mask: [B, P], 1 for prompt tokens, 0 for padding; None means no padding.
        mask_id: defaults to ``model.config.mask_token_id``.
        generator: the source of all random draws (must live on the prompt's device).
        eos_id: defaults to ``model.config.eos_token_id``; eot_id: end-of-turn id from the
            tokenizer (``<|role_end|>``), or None to demote EOS only.
        on_block: streaming; called with a :class:`CommittedBlocks` each time blocks become
            final (one block, or after an early stop all that are left): every answer token
            is handed out exactly once, in order, and the last call has ``final`` True.

    Returns [B, P + G]: the prompt (as given, padding included) followed by the answer.
    """
    keywords = dict(steps=steps, gen_length=gen_length, block_length=block_length, temperature=temperature,
                    cfg_scale=cfg_scale, remasking=remasking, logits_eos_inf=logits_eos_inf,
                    confidence_eos_eot_inf=confidence_eos_eot_inf, threshold=threshold, cache=cache,
                    early_stop=early_stop)
    run = resolve(model, _options_of(options, keywords), mask_id, eos_id, eot_id)
    options = run.options
    _check_inputs(prompt, attention_mask, generator, run.mask_id)
    batch_size, prompt_length = prompt.shape
    x_BL = torch.full((batch_size, prompt_length + options.gen_length), run.mask_id, dtype=torch.long,
                      device=prompt.device)
    x_BL[:, :prompt_length] = prompt
    attention_mask_BL = None
    if attention_mask is not None:
        # The generated part is real text for every row: ones, so each row keeps its own positions.
        answer_mask = attention_mask.new_ones(batch_size, options.gen_length)
        attention_mask_BL = torch.cat([attention_mask, answer_mask], dim=1)
    num_reported = 0  # answer blocks handed to on_block so far
    for block_index in range(options.num_blocks):
        start = prompt_length + block_index * options.block_length
        block = slice(start, start + options.block_length)
        _denoise_block(model, x_BL, attention_mask_BL, block, prompt_length, run, generator)
        finished = options.early_stop and fill_after_eos(x_BL, block.stop, run.eos_id)
        num_final = options.num_blocks if finished else block_index + 1
        if on_block is not None:
            on_block(_committed(x_BL, prompt_length, range(num_reported, num_final), options))
        num_reported = num_final
        if finished:
            break
    return x_BL


@dataclass(frozen=True)
class BlockRow:
    """An answer in progress for :func:`next_blocks`: its prompt, the answer blocks already final,
    and how long it will be.

    gen_length: the answer's whole length (a multiple of the batch's block_length).
    steps_per_block: its fixed schedule (ignored with a threshold).
    """

    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    gen_length: int
    steps_per_block: int


@torch.no_grad()
def next_blocks(model: nn.Module, rows: Sequence[BlockRow], run: Resolved,
                generator: torch.Generator | None = None) -> tuple[list[tuple[int, ...]], list[int]]:
    """Sample the next block of each row in one batch -> (each row's new block, the forwards each
    row needed), for continuous batching: rows may be at different blocks of answers of
    different lengths, after prompts of different lengths, so requests can join and leave a
    running batch at every block boundary.

    Every row keeps exactly what it sees alone in :func:`generate`: its prompt, its final blocks,
    the current block and its own masked tail, at its own positions; all else is padding that no
    query attends to. Row i is ``[prompt_i + answer_i, block_i, MASK x tail_i, pad]``: the
    batch is as wide as its longest row, and each row's block is at its own columns (the dual
    cache recomputes each row's own block). The prefix cache recomputes everything from the
    block on, so for it the rows are aligned on the block instead,
    ``[pad, prompt_i + answer_i, block, MASK x tail_i, pad]``, which is wider when rows are at
    different blocks. Of ``run.options`` the block length and every other setting apply to all
    rows; gen_length and steps come from each row. Early stop is the caller's (a row whose
    block ends in EOS is EOS to its end, as in generate()).
    """
    options = run.options
    width_K = options.block_length
    device = next(model.parameters()).device
    known = [row.prompt_ids + row.answer_ids for row in rows]
    tails = [row.gen_length - len(row.answer_ids) - width_K for row in rows]
    for row, tail in zip(rows, tails, strict=True):
        if len(row.answer_ids) % width_K or tail < 0 or row.gen_length % width_K:
            raise ValueError(f"rows: an answer of {len(row.answer_ids)} final tokens out of gen_length "
                             f"{row.gen_length} has no next block of {width_K}")
    block: Block
    if options.cache == "prefix" or len({len(ids) for ids in known}) == 1:  # every block in the same columns
        start = max(len(ids) for ids in known)
        firsts = [start - len(ids) for ids in known]
        width = start + width_K + max(tails)
        block = slice(start, start + width_K)
    else:
        firsts = [0] * len(rows)
        width = max(len(ids) + width_K + tail for ids, tail in zip(known, tails, strict=True))
        block = RowBlocks(torch.tensor([len(ids) for ids in known], dtype=torch.long, device=device), width_K)
    x_BL = torch.full((len(rows), width), model.config.pad_token_id, dtype=torch.long, device=device)
    real_BL = torch.zeros_like(x_BL, dtype=torch.bool)
    prompt_BL = torch.zeros_like(real_BL)
    for index, (ids, row, tail, first) in enumerate(zip(known, rows, tails, firsts, strict=True)):
        block_start = first + len(ids)
        x_BL[index, first:block_start] = torch.as_tensor(ids, dtype=torch.long, device=device)
        x_BL[index, block_start:block_start + width_K + tail] = run.mask_id
        real_BL[index, first:block_start + width_K + tail] = True
        prompt_BL[index, first:first + len(row.prompt_ids)] = True
    attention_mask_BL = None if bool(real_BL.all()) else real_BL.long()
    steps_B = torch.tensor([row.steps_per_block for row in rows], device=device)
    forwards_B = _denoise_block(model, x_BL, attention_mask_BL, block, prompt_BL, run, generator, steps_B)
    return [tuple(ids) for ids in _read_block(x_BL, block).tolist()], forwards_B.tolist()


def _committed(x_BL: torch.Tensor, prompt_length: int, blocks: range, options: SamplingOptions) -> CommittedBlocks:
    answer_start, answer_stop = blocks.start * options.block_length, blocks.stop * options.block_length
    tokens_BT = x_BL[:, prompt_length + answer_start: prompt_length + answer_stop].clone()
    return CommittedBlocks(blocks=blocks, answer_start=answer_start, tokens_BT=tokens_BT,
                           num_blocks=options.num_blocks)


def _options_of(options: SamplingOptions | None, keywords: dict[str, Any]) -> SamplingOptions:
    """The options object, from ``options`` or from generate()'s keywords (never a mix)."""
    if options is None:
        return SamplingOptions.checked(**keywords)
    if not isinstance(options, SamplingOptions):
        raise ValueError(f"options: expected a SamplingOptions, got {type(options).__name__}")
    defaults = inspect.signature(generate).parameters
    mixed = [name for name in _OPTION_KEYWORDS if keywords[name] != defaults[name].default]
    if mixed:
        raise ValueError(f"options: give the sampling settings either as `options` or as keywords, not both "
                         f"(also given: {mixed})")
    return options


def resolve(model: nn.Module, options: SamplingOptions, mask_id: int | None = None, eos_id: int | None = None,
            eot_id: int | None = None) -> Resolved:
    """The options with the model's special ids; checks what depends on the model (ValueError
    naming the argument): ids inside its vocabulary, EOS known when an option needs it, and a
    forward that takes a KV cache when ``cache`` is set."""
    if options.cache is not None:
        accepted = inspect.signature(model.forward).parameters
        missing = [name for name in _CACHE_FORWARD_ARGS if name not in accepted]
        if missing:
            raise ValueError(f"cache: {type(model).__name__}.forward does not take {missing}; use llada_core's LLaDAMoEModelLM")
    config = getattr(model, "config", None)
    mask_id = _special_id("mask_id", mask_id, config, "mask_token_id", required=True)
    eos_required = options.logits_eos_inf or options.confidence_eos_eot_inf or options.early_stop
    eos_id = _special_id("eos_id", eos_id, config, "eos_token_id", required=eos_required)
    eot_id = _special_id("eot_id", eot_id, config, "", required=False)
    assert mask_id is not None
    return Resolved(options=options, mask_id=mask_id, eos_id=eos_id, eot_id=eot_id)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int,
             device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompts of different lengths as generate() takes them: LEFT-padded to the longest ->
    (ids [B, P], attention mask [B, P], or None when no row is padded, the exact call a prompt
    alone makes). The model gives each row its own positions and no query attends to padding,
    so a row's answer equals the one it gets alone."""
    width = max((len(prompt) for prompt in prompts), default=0)
    prompt_BP = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask_BP = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            prompt_BP[row, width - len(prompt):] = torch.as_tensor(list(prompt), dtype=torch.long, device=device)
            mask_BP[row, width - len(prompt):] = 1
    if all(len(prompt) == width for prompt in prompts):
        return prompt_BP, None
    return prompt_BP, mask_BP


def _special_id(name: str, value: int | None, config: object, config_field: str, required: bool) -> int | None:
    """A special token id: the argument, else the model config's field; checked against the vocab."""
    if value is None and config is not None and config_field:
        value = getattr(config, config_field, None)
    if value is None:
        if required:
            raise ValueError(f"{name}: not given and the model has no config.{config_field}")
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}: must be a non-negative int token id, got {value!r}")
    vocab_size = getattr(config, "vocab_size", None)
    if vocab_size is not None and value >= vocab_size:
        raise ValueError(f"{name}: {value} is outside the vocabulary [0, {vocab_size})")
    return value


def _check_inputs(
    prompt: torch.Tensor, attention_mask: torch.Tensor | None, generator: torch.Generator | None, mask_id: int
) -> None:
    if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2:
        shape = tuple(prompt.shape) if isinstance(prompt, torch.Tensor) else type(prompt).__name__
        raise ValueError(f"prompt: expected a [batch, length] tensor (use prompt[None] for one row), got {shape}")
    if prompt.dtype.is_floating_point or prompt.dtype.is_complex or prompt.dtype == torch.bool or prompt.shape[0] == 0:
        raise ValueError(f"prompt: expected integer token ids and at least one row, got {prompt.dtype} {tuple(prompt.shape)}")
    real_BP = torch.ones_like(prompt, dtype=torch.bool)
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != prompt.shape:
            got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
            raise ValueError(f"attention_mask: expected the prompt's shape {tuple(prompt.shape)}, got {got}")
        if attention_mask.device != prompt.device:
            raise ValueError(f"attention_mask: on {attention_mask.device}, the prompt is on {prompt.device}")
        if not ((attention_mask == 0) | (attention_mask == 1)).all():
            raise ValueError("attention_mask: values must be 0 (padding) or 1 (token)")
        real_BP = attention_mask.bool()
    if (prompt[real_BP] == mask_id).any():
        raise ValueError(f"prompt: contains the mask token {mask_id}; the prompt is kept as given, so it may not have masks")
    if generator is not None and generator.device.type != prompt.device.type:
        raise ValueError(f"generator: on {generator.device}, the prompt is on {prompt.device}; create it on the same device")
