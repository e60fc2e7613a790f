"""Masked-diffusion training objectives and MoE auxiliary losses (LLADA_SPEC sections 2 and 4).

Legend: B batch, L length, V vocab, D hidden, T tokens (B*L), M masked positions, E experts, K top-k.

Two forms of Eq. 2 and Eq. 5: from full logits [B, L, V] (:func:`pretrain_loss`, :func:`sft_loss`;
eval and tests), and from the final hidden states (:func:`pretrain_loss_from_hidden`,
:func:`sft_loss_from_hidden`; training), which applies the lm_head and the fp32 cross-entropy
only at the masked positions, in chunks, so that no [positions, V] fp32 tensor larger than a
chunk exists. At the released vocabulary (157,184) a 4k row's full fp32 logits are 2.6 GB;
only a fraction t of the positions (half on average) enters the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from llada_core.model import route

DEFAULT_EPS = 1e-3


@dataclass
class MaskedBatch:
    """The forward process applied to a batch: what the model sees and what it must predict."""

    noisy_ids: torch.Tensor  # [B, L] with MASK at masked positions
    masked: torch.Tensor  # [B, L] bool
    t: torch.Tensor  # [B] diffusion time (mask probability) per sequence


def forward_process(
    input_ids: torch.Tensor,
    mask_id: int,
    eps: float = DEFAULT_EPS,
    maskable: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> MaskedBatch:
    """Paper Eq. 1: t ~ U[eps, 1] per sequence; each (maskable) token is masked with prob t.

    ``maskable`` [B, L] bool restricts masking (SFT: response tokens only).
    """
    b, length = input_ids.shape
    device = input_ids.device
    t_B = eps + (1.0 - eps) * torch.rand(b, device=device, generator=generator)
    masked_BL = torch.rand(b, length, device=device, generator=generator) < t_B[:, None]
    if maskable is not None:
        masked_BL &= maskable.bool()
    noisy_BL = torch.where(masked_BL, torch.full_like(input_ids, mask_id), input_ids)
    return MaskedBatch(noisy_ids=noisy_BL, masked=masked_BL, t=t_B)


def masked_cross_entropy(logits_BLV: torch.Tensor, target_BL: torch.Tensor, masked_BL: torch.Tensor) -> torch.Tensor:
    """Per-position CE [B, L] in fp32, zero where not masked."""
    ce_BL = F.cross_entropy(logits_BLV.float().transpose(1, 2), target_BL, reduction="none")
    return ce_BL * masked_BL


def pretrain_loss(logits_BLV: torch.Tensor, input_ids: torch.Tensor, batch: MaskedBatch) -> torch.Tensor:
    """Paper Eq. 2: sum over masked positions of CE / t, normalised by B * L."""
    ce_BL = masked_cross_entropy(logits_BLV, input_ids, batch.masked)
    return (ce_BL / batch.t[:, None]).sum() / input_ids.numel()


def sft_loss(
    logits_BLV: torch.Tensor, input_ids: torch.Tensor, batch: MaskedBatch, response_mask: torch.Tensor
) -> torch.Tensor:
    """Paper Eq. 5: CE / t over masked response positions, each sequence normalised by its
    response length (EOS padding included, as it is trained on), then averaged over the batch."""
    ce_BL = masked_cross_entropy(logits_BLV, input_ids, batch.masked)
    response_len_B = response_mask.sum(-1).clamp(min=1)
    per_sequence_B = (ce_BL / batch.t[:, None]).sum(-1) / response_len_B
    return per_sequence_B.mean()


# Positions per lm_head + cross-entropy chunk: chunk x V fp32 logits stay under 2**27 floats
# (512 MB); at V = 4096 one chunk holds 32768 positions, at V = 157,184 it holds 853.
MAX_CHUNK_LOGITS = 2**27


def chunk_positions(vocab_size: int) -> int:
    return max(1, MAX_CHUNK_LOGITS // vocab_size)


def _chunk_nll(hidden_CD: torch.Tensor, lm_head_VD: torch.Tensor, target_C: torch.Tensor) -> torch.Tensor:
    logits_CV = F.linear(hidden_CD, lm_head_VD).float()
    return F.cross_entropy(logits_CV, target_C, reduction="none")


def masked_nll(hidden_BLD: torch.Tensor, lm_head_VD: torch.Tensor, target_BL: torch.Tensor,
               masked_BL: torch.Tensor, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy [M] (fp32) at the masked positions only, and each one's row [M].

    The lm_head runs on the masked hidden states, ``chunk`` positions at a time (default: the
    largest whose fp32 logits fit ``MAX_CHUNK_LOGITS``). With more than one chunk each chunk is
    recomputed in the backward pass (activation checkpointing), so only one chunk's logits ever
    exist; with one chunk nothing is recomputed.
    """
    row_M, position_M = masked_BL.nonzero(as_tuple=True)
    hidden_MD = hidden_BLD[row_M, position_M]
    target_M = target_BL[row_M, position_M]
    chunk = chunk or chunk_positions(lm_head_VD.shape[0])
    if hidden_MD.shape[0] <= chunk:
        return _chunk_nll(hidden_MD, lm_head_VD, target_M), row_M
    pieces = [checkpoint(_chunk_nll, hidden_MD[start:start + chunk], lm_head_VD, target_M[start:start + chunk],
                         use_reentrant=False)
              for start in range(0, hidden_MD.shape[0], chunk)]
    return torch.cat(pieces), row_M


def pretrain_loss_from_hidden(hidden_BLD: torch.Tensor, lm_head_VD: torch.Tensor, input_ids: torch.Tensor,
                              batch: MaskedBatch, chunk: int | None = None) -> torch.Tensor:
    """Eq. 2 as :func:`pretrain_loss`, from the final hidden states [B, L, D] and the lm_head
    weight [V, D]: sum over masked positions of CE / t, normalised by B * L."""
    nll_M, row_M = masked_nll(hidden_BLD, lm_head_VD, input_ids, batch.masked, chunk)
    return (nll_M / batch.t[row_M]).sum() / input_ids.numel()


def sft_loss_from_hidden(hidden_BLD: torch.Tensor, lm_head_VD: torch.Tensor, input_ids: torch.Tensor,
                         batch: MaskedBatch, response_mask: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Eq. 5 as :func:`sft_loss`, from the final hidden states and the lm_head weight."""
    nll_M, row_M = masked_nll(hidden_BLD, lm_head_VD, input_ids, batch.masked, chunk)
    response_len_B = response_mask.sum(-1).clamp(min=1)
    weight_M = 1.0 / (batch.t[row_M] * response_len_B[row_M])
    return (nll_M * weight_M).sum() / input_ids.shape[0]


LAYER_REDUCTIONS = ("mean", "sum")


def load_balance_loss(
    router_logits: tuple[torch.Tensor, ...] | list[torch.Tensor], top_k: int, token_mask: torch.Tensor | None = None,
    layers: str = "mean",
) -> torch.Tensor:
    """Switch-style load-balancing loss over the MoE layers (LLADA_SPEC section 4):

        L_LB = reduce over layers l of  E * sum_i f_i^l * P_i^l
        f_i^l = (1 / (T * K)) * sum_t 1[expert i in the top-K of token t]   (share of routed slots)
        P_i^l = (1 / T) * sum_t softmax(router logits of t)_i                (mean router probability)

    with T the (non-padding) tokens, K = ``top_k``, E the experts. f is normalised by T * K, so a
    perfectly balanced layer gives L = 1 whatever K is. ``layers="mean"`` averages the layers:
    the convention of megablocks and OLMoE (whose experts have LLaDA-MoE's exact shapes and which
    uses the same 0.01 / 0.001 weights), so the 0.01 weight means the same at any depth.
    ``layers="sum"`` adds them (Switch Transformer / HF Mixtral style), which makes the pressure to
    balance grow with depth: 16 times the mean's at the 7B model's 16 layers. Padding tokens
    (``token_mask`` [B, L] false) are left out.
    """
    if layers not in LAYER_REDUCTIONS:
        raise ValueError(f"layers: {layers!r} is not one of {LAYER_REDUCTIONS}")
    per_layer = []
    for router_logits_TE in router_logits:
        probs_TE = torch.softmax(router_logits_TE.float(), dim=-1)
        _, expert_idx_TK = torch.topk(probs_TE, top_k, dim=-1)
        num_experts = probs_TE.shape[-1]
        assigned_TE = torch.zeros_like(probs_TE).scatter_(1, expert_idx_TK, 1.0)
        weight_T = _token_weights(token_mask, probs_TE)
        num_tokens = weight_T.sum().clamp(min=1)
        f_E = (assigned_TE * weight_T[:, None]).sum(0) / (num_tokens * top_k)
        p_E = (probs_TE * weight_T[:, None]).sum(0) / num_tokens
        per_layer.append(num_experts * (f_E * p_E).sum())
    stacked = torch.stack(per_layer)
    return stacked.mean() if layers == "mean" else stacked.sum()


def router_z_loss(
    router_logits: tuple[torch.Tensor, ...] | list[torch.Tensor], token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """L_Z = mean over tokens of (logsumexp_j z_tj)^2 per layer, averaged over layers."""
    per_layer = []
    for router_logits_TE in router_logits:
        z_T = torch.logsumexp(router_logits_TE.float(), dim=-1).pow(2)
        weight_T = _token_weights(token_mask, router_logits_TE)
        per_layer.append((z_T * weight_T).sum() / weight_T.sum().clamp(min=1))
    return torch.stack(per_layer).mean()


def _token_weights(token_mask: torch.Tensor | None, like_TE: torch.Tensor) -> torch.Tensor:
    if token_mask is None:
        return like_TE.new_ones(like_TE.shape[0], dtype=torch.float32)
    return token_mask.reshape(-1).to(torch.float32)


def expert_load(router_logits_TE: torch.Tensor, top_k: int) -> torch.Tensor:
    """Slots routed to each expert [E] (for observability: max/mean is the load ratio)."""
    _, expert_idx_TK = route(router_logits_TE, top_k, normalize=False)
    return torch.bincount(expert_idx_TK.reshape(-1), minlength=router_logits_TE.shape[-1])


@dataclass
class LossTerms:
    total: torch.Tensor
    diffusion: torch.Tensor
    load_balance: torch.Tensor
    z_loss: torch.Tensor


def total_loss(
    diffusion: torch.Tensor,
    router_logits: tuple[torch.Tensor, ...],
    top_k: int,
    load_balance_coef: float = 0.01,
    z_loss_coef: float = 0.001,
    token_mask: torch.Tensor | None = None,
    load_balance_layers: str = "mean",
) -> LossTerms:
    """Diffusion loss + 0.01 L_LB + 0.001 L_Z (LLADA_SPEC section 4); ``load_balance_layers``:
    see :func:`load_balance_loss`."""
    lb = load_balance_loss(router_logits, top_k, token_mask, layers=load_balance_layers)
    z = router_z_loss(router_logits, token_mask)
    return LossTerms(total=diffusion + load_balance_coef * lb + z_loss_coef * z, diffusion=diffusion, load_balance=lb, z_loss=z)


def maybe_truncate_length(
    input_ids: torch.Tensor, probability: float = 0.01, min_length: int = 8, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Variable-length training: with ``probability`` truncate the batch to a random length
    l ~ U{min_length..L} (the paper does this in 1% of pretraining steps)."""
    length = input_ids.shape[1]
    if length <= min_length:
        return input_ids
    draw = torch.rand((), generator=generator).item()
    if draw >= probability:
        return input_ids
    new_length = int(torch.randint(min_length, length + 1, (), generator=generator).item())
    return input_ids[:, :new_length]


def select_sft_turn(
    input_ids: list[int], assistant_spans: list[tuple[int, int]], generator: torch.Generator | None = None
) -> tuple[list[int], int]:
    """Multi-turn SFT: pick one assistant turn [start, end) as the target; everything before it
    is the visible prompt and later turns are dropped. -> (token ids, prompt length)."""
    if not assistant_spans:
        raise ValueError("assistant_spans: a dialog needs at least one assistant turn")
    for start, end in assistant_spans:
        if not 0 <= start < end <= len(input_ids):
            raise ValueError(f"assistant_spans: span ({start}, {end}) is outside the {len(input_ids)} tokens")
    choice = int(torch.randint(len(assistant_spans), (), generator=generator).item())
    start, end = assistant_spans[choice]
    return list(input_ids[:end]), start


def pad_sft_batch(
    sequences: list[list[int]], prompt_lengths: list[int], eos_id: int, max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad prompt+response rows with EOS to the batch's length (capped at ``max_length``).
    -> (input_ids [B, L], response_mask [B, L]); the EOS padding is part of the response, so it
    is masked and trained on (that is how the model learns where to stop)."""
    if len(sequences) != len(prompt_lengths):
        raise ValueError("prompt_lengths: one per sequence")
    length = min(max(len(s) for s in sequences), max_length)
    ids_BL = torch.full((len(sequences), length), eos_id, dtype=torch.long)
    response_BL = torch.zeros(len(sequences), length, dtype=torch.bool)
    for row, (sequence, prompt_length) in enumerate(zip(sequences, prompt_lengths)):
        if prompt_length >= length:
            raise ValueError(f"prompt_lengths[{row}]: prompt of {prompt_length} tokens leaves no room for a response within {length}")
        clipped = sequence[:length]
        ids_BL[row, : len(clipped)] = torch.tensor(clipped, dtype=torch.long)
        response_BL[row, prompt_length:] = True
    return ids_BL, response_BL
