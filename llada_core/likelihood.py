"""Monte Carlo likelihood bound of an answer given a prompt, for multiple choice and perplexity.

Legend: N num_samples, B batch_size (samples per forward), P prompt length, A answer length,
S = P + A, C choices, V vocab.

LLaDA's ELBO (paper Eq. 2 with the prompt kept clean, as in SFT Eq. 5; its low-variance form
of Appendix B, LLADA_SPEC section 7): for l masked answer tokens out of A,

    -log p(answer | prompt) <= E_l E_mask [ (A / l) * sum over masked i of -log p(answer_i | x_masked) ]

with l uniform on 1..A. Each forward batch of B samples draws l evenly spaced over 1..A from a
random offset (stratified, as the official ``get_log_likelihood`` does), and the l positions
uniformly at random among the answer's. The prompt is never masked.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from llada_core.guidance import guided, with_unconditional_rows
from llada_core.losses import masked_nll

TokenIds = torch.Tensor | Sequence[int]


def stratified_mask_counts(answer_length: int, batch_size: int, generator: torch.Generator | None) -> torch.Tensor:
    """How many answer tokens each of B samples masks -> [B] int64 in 1..A.

    Evenly spaced over [offset, offset + A) with a uniform random offset in 1..A, then wrapped
    into 1..A: every count is uniform on 1..A, and a batch covers the range evenly, which
    lowers the variance of the estimate (with B = A the batch uses each count once).
    """
    device = generator.device if generator is not None else torch.device("cpu")
    offset = torch.randint(1, answer_length + 1, (), generator=generator, device=device).double()
    spaced_B = torch.round(offset + torch.arange(batch_size, device=device, dtype=torch.float64) * answer_length / batch_size)
    return (spaced_B.long() - 1) % answer_length + 1


def mask_answer(
    sequence_S: torch.Tensor, prompt_length: int, counts_B: torch.Tensor, mask_id: int,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """B copies of ``[prompt, answer]`` with ``counts[b]`` answer tokens masked, chosen uniformly.

    Returns (noisy ids [B, S], is_masked [B, S] bool), on the sequence's device.
    """
    batch_size, answer_length = counts_B.shape[0], sequence_S.shape[0] - prompt_length
    device = generator.device if generator is not None else torch.device("cpu")
    # The positions with the l smallest of A uniform keys form a uniformly random l-subset.
    keys_BA = torch.rand(batch_size, answer_length, generator=generator, device=device)
    rank_BA = keys_BA.argsort(dim=-1).argsort(dim=-1)
    answer_masked_BA = (rank_BA < counts_B.to(device)[:, None]).to(sequence_S.device)
    prompt_kept_BP = torch.zeros(batch_size, prompt_length, dtype=torch.bool, device=sequence_S.device)
    is_masked_BS = torch.cat([prompt_kept_BP, answer_masked_BA], dim=1)
    noisy_BS = torch.where(is_masked_BS, mask_id, sequence_S.expand(batch_size, -1))
    return noisy_BS, is_masked_BS


def weighted_masked_nll(
    model: nn.Module, noisy_BS: torch.Tensor, target_S: torch.Tensor, is_masked_BS: torch.Tensor,
    prompt_length: int, cfg_scale: float, mask_id: int,
) -> torch.Tensor:
    """Per sample ``(A / l) * sum over masked positions of cross-entropy`` -> [B] float32.

    With cfg_scale > 0 the logits are guided as in sampling: ``uncond + (cfg + 1) * (cond - uncond)``,
    the unconditional pass seeing the prompt as MASK.
    """
    if cfg_scale > 0:
        both_BS, _ = with_unconditional_rows(noisy_BS, None, prompt_length, mask_id)
        logits_BSV = guided(model(both_BS).logits, cfg_scale)
    else:
        logits_BSV = model(noisy_BS).logits
    sample_M, position_M = is_masked_BS.nonzero(as_tuple=True)
    # Only masked positions enter the loss: gather them before the float32 cross-entropy.
    nll_M = F.cross_entropy(logits_BSV[sample_M, position_M].float(), target_S[position_M], reduction="none")
    nll_sum_B = torch.zeros(noisy_BS.shape[0], device=nll_M.device).index_add(0, sample_M, nll_M)
    answer_length = noisy_BS.shape[1] - prompt_length
    num_masked_B = is_masked_BS.sum(-1).float()
    return nll_sum_B * answer_length / num_masked_B


@torch.no_grad()
def elbo_nll_choices(
    model: nn.Module,
    prompt_ids: TokenIds,
    choices_ids: Sequence[TokenIds],
    num_samples: int = 128,
    batch_size: int = 16,
    mask_id: int | None = None,
    cfg_scale: float = 0.0,
    generator: torch.Generator | None = None,
) -> list[float]:
    """Monte Carlo ELBO bound on -log p(choice | prompt) for each choice (LLADA_SPEC section 7).

    prompt_ids [P] and each choice [A_c] are 1-D token ids (a tensor or a list). Each choice gets
    ``num_samples`` samples in forwards of ``batch_size`` [B, P + A_c]; the random draws use
    ``generator`` choice after choice, so scoring choices one by one with the same generator
    gives the same numbers. Lower is better. Returns one float per choice (nats, whole answer).
    """
    mask_id = _resolve_mask_id(model, mask_id)
    _check_counts(num_samples, batch_size, cfg_scale)
    device = _device_of(model)
    prompt_P = _as_ids("prompt_ids", prompt_ids, device, mask_id, allow_empty=True)
    is_sequence = choices_ids.dim() == 2 if isinstance(choices_ids, torch.Tensor) else isinstance(choices_ids, Sequence)
    if not is_sequence or len(choices_ids) == 0:
        raise ValueError("choices_ids: expected a non-empty sequence of 1-D answers")
    answers = [_as_ids(f"choices_ids[{c}]", ids, device, mask_id, allow_empty=False) for c, ids in enumerate(choices_ids)]
    estimates = []
    for answer_A in answers:
        sequence_S = torch.cat([prompt_P, answer_A])
        total = 0.0
        for _ in range(num_samples // batch_size):
            counts_B = stratified_mask_counts(answer_A.numel(), batch_size, generator)
            noisy_BS, is_masked_BS = mask_answer(sequence_S, prompt_P.numel(), counts_B, mask_id, generator)
            nll_B = weighted_masked_nll(model, noisy_BS, sequence_S, is_masked_BS, prompt_P.numel(), cfg_scale, mask_id)
            total += float(nll_B.double().sum())
        estimates.append(total / num_samples)
    return estimates


def elbo_nll(
    model: nn.Module,
    prompt_ids: TokenIds,
    answer_ids: TokenIds,
    num_samples: int = 128,
    batch_size: int = 16,
    mask_id: int | None = None,
    cfg_scale: float = 0.0,
    generator: torch.Generator | None = None,
) -> float:
    """Monte Carlo ELBO bound on -log p(answer | prompt) in nats: prompt_ids [P], answer_ids [A].

    The official ``get_log_likelihood`` returns the negative of this number. See
    :func:`elbo_nll_choices` for the arguments.
    """
    return elbo_nll_choices(
        model, prompt_ids, [answer_ids], num_samples=num_samples, batch_size=batch_size,
        mask_id=mask_id, cfg_scale=cfg_scale, generator=generator,
    )[0]


def choose(
    model: nn.Module,
    prompt_ids: TokenIds,
    choices_ids: Sequence[TokenIds],
    num_samples: int = 128,
    batch_size: int = 16,
    mask_id: int | None = None,
    cfg_scale: float = 0.0,
    generator: torch.Generator | None = None,
) -> int:
    """Index of the choice with the lowest ELBO bound (the most likely answer); ties go to the first."""
    scores = elbo_nll_choices(
        model, prompt_ids, choices_ids, num_samples=num_samples, batch_size=batch_size,
        mask_id=mask_id, cfg_scale=cfg_scale, generator=generator,
    )
    return min(range(len(scores)), key=scores.__getitem__)


def _resolve_mask_id(model: nn.Module, mask_id: int | None) -> int:
    config = getattr(model, "config", None)
    if mask_id is None:
        mask_id = getattr(config, "mask_token_id", None)
        if mask_id is None:
            raise ValueError("mask_id: not given and the model has no config.mask_token_id")
    vocab_size = getattr(config, "vocab_size", None)
    if isinstance(mask_id, bool) or not isinstance(mask_id, int) or mask_id < 0 or (vocab_size and mask_id >= vocab_size):
        raise ValueError(f"mask_id: {mask_id!r} is not a token id of the model's vocabulary")
    return mask_id


def _check_counts(num_samples: int, batch_size: int, cfg_scale: float) -> None:
    for name, value in (("num_samples", num_samples), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: must be a positive int, got {value!r}")
    if num_samples % batch_size:
        raise ValueError(f"num_samples: {num_samples} must be a multiple of batch_size={batch_size}")
    if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float)) or not math.isfinite(cfg_scale) or cfg_scale < 0:
        raise ValueError(f"cfg_scale: must be a finite number >= 0, got {cfg_scale!r}")


def _device_of(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if device is None:
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
    return torch.device(device)


def _as_ids(name: str, ids: TokenIds, device: torch.device, mask_id: int, allow_empty: bool) -> torch.Tensor:
    """1-D long tensor of token ids on ``device``; [1, n] is accepted as one row."""
    tensor = torch.as_tensor(ids, device=device)
    if tensor.numel() == 0:
        tensor = tensor.long()  # an empty list converts to float
    if tensor.dim() == 2 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.dim() != 1 or tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise ValueError(f"{name}: expected 1-D integer token ids, got {tensor.dtype} {tuple(tensor.shape)}")
    if tensor.numel() == 0 and not allow_empty:
        raise ValueError(f"{name}: is empty; there is nothing to score")
    if (tensor == mask_id).any():
        raise ValueError(f"{name}: contains the mask token {mask_id}")
    return tensor.long()


@torch.no_grad()
def elbo_nll_batched(
    model: nn.Module,
    pairs: Sequence[tuple[TokenIds, TokenIds]],
    generators: Sequence[torch.Generator | None],
    num_samples: int = 128,
    batch_size: int = 16,
    rows_per_forward: int | None = None,
    mask_id: int | None = None,
    pad_id: int = 0,
) -> list[float]:
    """:func:`elbo_nll` of many ``(prompt_ids, answer_ids)`` pairs, their samples packed together.

    Pair i draws from ``generators[i]`` exactly what ``elbo_nll(model, *pairs[i],
    generator=generators[i])`` draws, so each estimate equals that call's up to float rounding,
    whatever the other pairs are. The samples of several pairs share a forward of up to
    ``rows_per_forward`` rows (default ``batch_size``), right-padded with ``pad_id`` under an
    attention mask (padding changes no row: the model masks padded keys and keeps positions).
    The lm_head and the fp32 cross-entropy run at the masked positions only
    (:func:`llada_core.losses.masked_nll`), so a forward never holds [rows, length, vocab]
    logits: at the released vocabulary (157,184) that tensor would be 10 GB for 16 rows of 2k.
    """
    mask_id = _resolve_mask_id(model, mask_id)
    _check_counts(num_samples, batch_size, 0.0)
    rows_per_forward = rows_per_forward or batch_size
    _check_counts(rows_per_forward, 1, 0.0)
    if len(generators) != len(pairs):
        raise ValueError(f"generators: {len(generators)} given for {len(pairs)} pairs; give one per pair")
    device = _device_of(model)
    sequences: list[tuple[torch.Tensor, int]] = []
    for index, (prompt_ids, answer_ids) in enumerate(pairs):
        prompt_P = _as_ids(f"pairs[{index}] prompt", prompt_ids, device, mask_id, allow_empty=True)
        answer_A = _as_ids(f"pairs[{index}] answer", answer_ids, device, mask_id, allow_empty=False)
        sequences.append((torch.cat([prompt_P, answer_A]), prompt_P.numel()))
    totals = [0.0] * len(pairs)
    rows: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (pair, noisy [S], is_masked [S])

    def flush() -> None:
        width = max(noisy.numel() for _, noisy, _ in rows)
        noisy_RS = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
        target_RS = torch.full_like(noisy_RS, pad_id)
        masked_RS = torch.zeros(len(rows), width, dtype=torch.bool, device=device)
        attention_RS = torch.zeros(len(rows), width, dtype=torch.long, device=device)
        for row, (pair, noisy_S, is_masked_S) in enumerate(rows):
            length = noisy_S.numel()
            noisy_RS[row, :length], masked_RS[row, :length] = noisy_S, is_masked_S
            target_RS[row, :length], attention_RS[row, :length] = sequences[pair][0], 1
        padded = bool((attention_RS == 0).any())
        hidden_RSD = model(noisy_RS, attention_mask=attention_RS if padded else None, hidden_only=True).hidden_states
        nll_M, row_M = masked_nll(hidden_RSD, model.lm_head.weight, target_RS, masked_RS)
        nll_R = torch.zeros(len(rows), dtype=torch.float64, device=device).index_add(0, row_M, nll_M.double())
        for row, (pair, noisy_S, is_masked_S) in enumerate(rows):
            answer_length = noisy_S.numel() - sequences[pair][1]
            totals[pair] += float(nll_R[row]) * answer_length / int(is_masked_S.sum())
        rows.clear()

    # Longest first: a forward's rows then have similar lengths and little padding.
    for pair in sorted(range(len(pairs)), key=lambda index: -sequences[index][0].numel()):
        sequence_S, prompt_length = sequences[pair]
        for _ in range(num_samples // batch_size):
            counts_B = stratified_mask_counts(sequence_S.numel() - prompt_length, batch_size, generators[pair])
            noisy_BS, is_masked_BS = mask_answer(sequence_S, prompt_length, counts_B, mask_id, generators[pair])
            for sample in range(batch_size):
                rows.append((pair, noisy_BS[sample], is_masked_BS[sample]))
                if len(rows) == rows_per_forward:
                    flush()
    if rows:
        flush()
    return [total / num_samples for total in totals]
