"""The LLaDA-MoE forward pass, top to bottom (LLADA_SPEC sections 1-3).

Legend: B batch, L length, T tokens (B*L), D hidden, H heads, Hk KV heads, Dh head dim,
E experts, K top-k, F expert FFN, V vocab, S routed slots (T*K), C slots per expert (padded), R = E*C buffer rows,
Lk keys attended (the cached sequence's length when a KV cache is used).

Block: h = h + Attn(RMSNorm(h)); h = h + MoE(RMSNorm(h)); final RMSNorm; lm_head at every
position (no shift: position i predicts token i). Attention is bidirectional.

KV cache (for fast diffusion sampling, LLADA_SPEC section 6): a full forward with
``use_cache=True`` returns every layer's keys (RoPE applied at their absolute positions) and
values. A later forward of a contiguous span of that sequence (``past_key_values=cache,
cache_start=i``) recomputes only the span: its keys/values overwrite the cache's entries there
and its queries attend over the whole cached sequence (``cache_start`` may also be one start
per row, an int64 [B], for batches whose rows recompute spans at different positions).
Because attention is bidirectional,
this equals a full forward only while nothing outside the span has changed since the cache
was built; the sampler decides when that approximation is good enough.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llada_core.config import LLaDAMoEConfig

log = logging.getLogger(__name__)
_LOGGED_PATHS: set[tuple[str, str]] = set()  # (device type, expert path): each is logged once


@functools.lru_cache(maxsize=64)  # asked by every MoE layer on every call
def grouped_mm_supported(device: torch.device, dtype: torch.dtype, *widths: int) -> bool:
    """Whether ``torch._grouped_mm`` runs for these tensors: CUDA from Hopper (sm90) on in bf16, or
    the CPU (bf16, fp32), and every matrix row a multiple of 16 bytes (its stride rule)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cuda":
        if dtype != torch.bfloat16 or torch.cuda.get_device_capability(device) < (9, 0):
            return False
    elif device.type != "cpu" or dtype not in (torch.bfloat16, torch.float32):
        return False
    return all(width * dtype.itemsize % 16 == 0 for width in widths)


def _log_path_once(device: torch.device, path: str) -> None:
    if (device.type, path) not in _LOGGED_PATHS:
        _LOGGED_PATHS.add((device.type, path))
        log.info("MoE experts on %s: %s path", device.type, path)


@dataclass
class KVCache:
    """Keys and values of every layer for one whole sequence of length Lk.

    ``keys[n]``, ``values[n]``: [B, Hk, Lk, Dh], keys with RoPE applied at their absolute
    positions. ``key_mask_B11L`` (None: no padding) and ``position_ids`` [B, Lk] are those of the
    forward that built the cache; a cached forward reuses them, so padded rows keep their own
    positions. A cached forward writes its span's keys/values into these tensors in place.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    key_mask_B11L: torch.Tensor | None
    position_ids: torch.Tensor

    @property
    def length(self) -> int:
        return self.position_ids.shape[1]


@dataclass
class ModelOutput:
    """``logits`` [B, L, V] (or [B, len(logits_slice), V]; None with ``hidden_only``);
    ``router_logits`` one fp32 [T, E] per layer (for the aux losses); ``past_key_values`` when a
    cache was asked for or used; ``hidden_states`` [B, L, D] after the final norm, with
    ``hidden_only`` (the lm_head input: training applies it only where the loss needs it)."""

    logits: torch.Tensor | None
    router_logits: tuple[torch.Tensor, ...]
    past_key_values: KVCache | None = None
    hidden_states: torch.Tensor | None = None


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, cast back to the input dtype (weight applied after the cast)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_fp32 = x.float()
        x_fp32 = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x_fp32.to(x.dtype)


def rope_cos_sin(
    position_ids_BL: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, L, Dh] in fp32 for the rotate-half (NeoX) layout over the full head_dim."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids_BL.device).float() / head_dim))
    angles_BLh = position_ids_BL.float()[..., None] * inv_freq  # [B, L, Dh/2]
    angles_BLD = torch.cat([angles_BLh, angles_BLh], dim=-1)
    return angles_BLD.cos(), angles_BLD.sin()


def apply_rope(x_BHLD: torch.Tensor, cos_BLD: torch.Tensor, sin_BLD: torch.Tensor) -> torch.Tensor:
    x = x_BHLD.float()
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    cos, sin = cos_BLD[:, None], sin_BLD[:, None]  # broadcast over heads
    return (x * cos + rotated * sin).to(x_BHLD.dtype)


class Attention(nn.Module):
    """Bidirectional multi-head attention; per-head QK RMSNorm after projection, before RoPE."""

    def __init__(self, config: LLaDAMoEConfig) -> None:
        super().__init__()
        d, dh = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, dh
        self.q_proj = nn.Linear(d, self.num_heads * dh, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv_heads * dh, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv_heads * dh, bias=False)
        self.o_proj = nn.Linear(self.num_heads * dh, d, bias=False)
        self.q_norm = RMSNorm(dh, config.rms_norm_eps) if config.qk_layernorm else nn.Identity()
        self.k_norm = RMSNorm(dh, config.rms_norm_eps) if config.qk_layernorm else nn.Identity()

    def forward(
        self, x_BLD: torch.Tensor, cos_BLD: torch.Tensor, sin_BLD: torch.Tensor,
        key_mask_B11L: torch.Tensor | None,
        cached_kv: tuple[torch.Tensor, torch.Tensor, int | torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (output [B, L, D], keys [B, Hk, L, Dh] with RoPE, values [B, Hk, L, Dh]).

        ``cached_kv`` = (keys [B, Hk, Lk, Dh], values, start): x is the span [start, start + L)
        of the cached sequence (start: an int, or one per row [B]); its keys/values are written
        there and the queries attend to all Lk.
        """
        b, length, _ = x_BLD.shape
        q_BHLD = self.q_norm(self.q_proj(x_BLD).view(b, length, self.num_heads, self.head_dim)).transpose(1, 2)
        k_BHLD = self.k_norm(self.k_proj(x_BLD).view(b, length, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v_BHLD = self.v_proj(x_BLD).view(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q_BHLD, k_BHLD = apply_rope(q_BHLD, cos_BLD, sin_BLD), apply_rope(k_BHLD, cos_BLD, sin_BLD)
        keys_BHLD, values_BHLD = k_BHLD, v_BHLD  # Lk = L without a cache
        if cached_kv is not None:
            keys_BHLD, values_BHLD, start = cached_kv
            if isinstance(start, torch.Tensor):  # per row: [B, 1] x [B, L] index the (B, Lk) dims
                rows_B1 = torch.arange(b, device=start.device)[:, None]
                span_BL = start[:, None] + torch.arange(length, device=start.device)
                keys_BHLD[rows_B1, :, span_BL] = k_BHLD.transpose(1, 2)
                values_BHLD[rows_B1, :, span_BL] = v_BHLD.transpose(1, 2)
            else:
                keys_BHLD[:, :, start:start + length] = k_BHLD
                values_BHLD[:, :, start:start + length] = v_BHLD
        if self.num_kv_heads != self.num_heads:
            repeat = self.num_heads // self.num_kv_heads
            keys_BHLD, values_BHLD = keys_BHLD.repeat_interleave(repeat, 1), values_BHLD.repeat_interleave(repeat, 1)
        out_BHLD = F.scaled_dot_product_attention(q_BHLD, keys_BHLD, values_BHLD, attn_mask=key_mask_B11L)
        return self.o_proj(out_BHLD.transpose(1, 2).reshape(b, length, -1)), k_BHLD, v_BHLD


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored stacked, computed per expert group after one sort of the routed
    slots (never a loop over tokens).

    Two equivalent paths: with balanced routing, one batched matmul over a padded [E, C, D]
    buffer (C = the largest group); when padding would add more than ``max_padding`` times the
    useful work (routing is often very uneven early in training: max/mean load 7 was seen), a
    matmul per expert on its contiguous slice of the sorted tokens. Measured on CPU (T=2048,
    E=64, K=8, D=512, F=256, forward+backward): padded 0.36 s vs per-group 0.99 s at max/mean
    load 1.1, 2.53 s vs 1.08 s at 7.7; the crossover is near max/mean 3.

    Parameters are [E, F, D] / [E, D, F]; checkpoint I/O converts to and from the released
    per-expert keys (``experts.{e}.gate_proj.weight``).
    """

    max_padding = 2.0
    # None: the grouped GEMM (torch._grouped_mm: no padding, no loop over experts) wherever it runs
    # (grouped_mm_supported: CUDA from sm90 in bf16, the CPU in bf16/fp32, 16-byte rows), else the
    # two paths above; False: never (True: the same as None, for tests). On 2 CPU cores it is 1.23x
    # the padded path's tokens/s at balanced routing (benchmarks/RESULTS.md, "MoE layer").
    use_grouped_mm: bool | None = None

    def __init__(self, num_experts: int, hidden_size: int, ffn_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(num_experts, ffn_size, hidden_size))
        self.up_proj = nn.Parameter(torch.empty(num_experts, ffn_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_size))

    def forward(self, x_TD: torch.Tensor, expert_idx_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        """sum_k weights[t, k] * Expert_{idx[t, k]}(x[t]) for every token, dropless. -> [T, D]."""
        num_experts = self.gate_proj.shape[0]
        # Sort the S = T*K routed slots by expert: each expert's slots become one contiguous group.
        expert_S = expert_idx_TK.reshape(-1)
        slot_sorted_S = torch.argsort(expert_S, stable=True)
        counts_E = torch.bincount(expert_S, minlength=num_experts)
        if self._grouped_gemm(x_TD):
            _log_path_once(x_TD.device, "grouped GEMM")
            return self._grouped(x_TD, expert_idx_TK, weights_TK, slot_sorted_S, counts_E)
        capacity = int(counts_E.max()) if expert_S.numel() else 0  # dropless: the largest group
        if num_experts * capacity > (1 + self.max_padding) * expert_S.numel():
            _log_path_once(x_TD.device, "per-expert")
            return self._per_group(x_TD, expert_idx_TK, weights_TK, slot_sorted_S, counts_E)
        _log_path_once(x_TD.device, "padded batched matmul")
        return self._padded(x_TD, expert_idx_TK, weights_TK, slot_sorted_S, counts_E, capacity)

    def _grouped_gemm(self, x_TD: torch.Tensor) -> bool:
        if self.use_grouped_mm is False:
            return False
        dtypes = {x_TD.dtype, self.gate_proj.dtype}
        return len(dtypes) == 1 and grouped_mm_supported(x_TD.device, x_TD.dtype, *self.gate_proj.shape[1:])

    def _grouped(self, x_TD, expert_idx_TK, weights_TK, slot_sorted_S, counts_E) -> torch.Tensor:
        """One grouped GEMM per projection over the expert-sorted slots; ``offs`` ends each group."""
        top_k = expert_idx_TK.shape[1]
        token_S = slot_sorted_S // top_k
        x_SD = x_TD.index_select(0, token_S)
        weights_S1 = weights_TK.reshape(-1).index_select(0, slot_sorted_S)[:, None].to(x_TD.dtype)
        offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
        gate_SF = torch._grouped_mm(x_SD, self.gate_proj.transpose(1, 2), offs=offs_E)
        up_SF = torch._grouped_mm(x_SD, self.up_proj.transpose(1, 2), offs=offs_E)
        h_SF = F.silu(gate_SF) * up_SF * weights_S1
        y_SD = torch._grouped_mm(h_SF, self.down_proj.transpose(1, 2), offs=offs_E)
        return x_TD.new_zeros(x_TD.shape).index_add(0, token_S, y_SD)

    def _padded(self, x_TD, expert_idx_TK, weights_TK, slot_sorted_S, counts_E, capacity: int) -> torch.Tensor:
        num_tokens, top_k = expert_idx_TK.shape
        num_experts, hidden = self.gate_proj.shape[0], x_TD.shape[-1]
        expert_S = expert_idx_TK.reshape(-1)
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        expert_sorted_S = expert_S[slot_sorted_S]
        row_S = expert_sorted_S * capacity + torch.arange(expert_S.numel(), device=x_TD.device) - starts_E[expert_sorted_S]
        # Which slot fills each row of the padded [E*C] buffer; padding rows name slot S, whose
        # token is T: an appended zero row of x (and a zero routing weight).
        slot_of_row_R = torch.full((num_experts * capacity,), expert_S.numel(), dtype=torch.long, device=x_TD.device)
        slot_of_row_R[row_S] = slot_sorted_S
        token_of_row_R = slot_of_row_R // top_k
        x_padded = torch.cat([x_TD, x_TD.new_zeros(1, hidden)])
        x_ECD = x_padded.index_select(0, token_of_row_R).view(num_experts, capacity, hidden)
        weights_R = torch.cat([weights_TK.reshape(-1), weights_TK.new_zeros(1)]).index_select(0, slot_of_row_R)
        h_ECF = F.silu(torch.bmm(x_ECD, self.gate_proj.transpose(1, 2))) * torch.bmm(x_ECD, self.up_proj.transpose(1, 2))
        # The routing weight scales the F-wide hidden rather than the D-wide output: the down
        # projection is linear, so the result is the same with less memory traffic.
        h_ECF = h_ECF * weights_R.view(num_experts, capacity, 1).to(h_ECF.dtype)
        y_RD = torch.bmm(h_ECF, self.down_proj.transpose(1, 2)).view(-1, hidden)
        out_TD = x_TD.new_zeros(num_tokens + 1, hidden).index_add(0, token_of_row_R, y_RD)
        return out_TD[:num_tokens]

    def _per_group(self, x_TD, expert_idx_TK, weights_TK, slot_sorted_S, counts_E) -> torch.Tensor:
        top_k = expert_idx_TK.shape[1]
        token_S = slot_sorted_S // top_k
        x_SD = x_TD.index_select(0, token_S)  # one gather, in expert order
        weights_S1 = weights_TK.reshape(-1).index_select(0, slot_sorted_S)[:, None].to(x_TD.dtype)
        # unbind once: indexing a parameter per expert would build a full-size gradient each time.
        gates, ups, downs = self.gate_proj.unbind(0), self.up_proj.unbind(0), self.down_proj.unbind(0)
        pieces, start = [], 0
        for expert, count in enumerate(counts_E.tolist()):  # a matmul per expert, not per token
            if count:
                xe = x_SD[start:start + count]
                he = F.silu(xe @ gates[expert].T) * (xe @ ups[expert].T) * weights_S1[start:start + count]
                pieces.append(he @ downs[expert].T)
                start += count
        y_SD = torch.cat(pieces) if pieces else x_SD
        return x_TD.new_zeros(x_TD.shape).index_add(0, token_S, y_SD)


def route(router_logits_TE: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Paper Eq. 3-4: fp32 softmax over all experts, top-k, weights kept as they are unless
    ``normalize``. -> (weights [T, K] fp32, expert indices [T, K])."""
    probs_TE = torch.softmax(router_logits_TE.float(), dim=-1)
    weights_TK, expert_idx_TK = torch.topk(probs_TE, top_k, dim=-1)
    if normalize:
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
    return weights_TK, expert_idx_TK


class MoE(nn.Module):
    """Router (``gate``) plus dropless grouped experts; every token reaches its top-k experts."""

    def __init__(self, config: LLaDAMoEConfig) -> None:
        super().__init__()
        self.top_k, self.normalize = config.num_experts_per_tok, config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = GroupedExperts(config.num_experts, config.hidden_size, config.expert_intermediate_size)

    def forward(self, x_BLD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_TD = x_BLD.reshape(-1, x_BLD.shape[-1])
        router_logits_TE = F.linear(x_TD.float(), self.gate.weight.float())  # fp32 router
        weights_TK, expert_idx_TK = route(router_logits_TE, self.top_k, self.normalize)
        out_TD = self.experts(x_TD, expert_idx_TK, weights_TK)
        return out_TD.view_as(x_BLD), router_logits_TE


class DecoderLayer(nn.Module):
    def __init__(self, config: LLaDAMoEConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config)

    def forward(self, h_BLD, cos_BLD, sin_BLD, key_mask_B11L, cached_kv=None):
        """-> (h [B, L, D], router logits [T, E], keys [B, Hk, L, Dh], values [B, Hk, L, Dh])."""
        attn_out_BLD, k_BHLD, v_BHLD = self.self_attn(
            self.input_layernorm(h_BLD), cos_BLD, sin_BLD, key_mask_B11L, cached_kv
        )
        h_BLD = h_BLD + attn_out_BLD
        moe_out_BLD, router_logits_TE = self.mlp(self.post_attention_layernorm(h_BLD))
        return h_BLD + moe_out_BLD, router_logits_TE, k_BHLD, v_BHLD


class LLaDAMoEBackbone(nn.Module):
    """Embedding, decoder layers and final norm (the ``model.`` prefix of the released keys)."""

    def __init__(self, config: LLaDAMoEConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LLaDAMoEModelLM(nn.Module):
    """LLaDA-MoE mask predictor: ``model(input_ids, attention_mask=None)`` -> ModelOutput."""

    # Per decoder layer: keep its input only and recompute its activations in the backward pass
    # (training only; set by the stage's scaling.activation_checkpointing). Same loss and gradients.
    activation_checkpointing: bool = False

    def __init__(self, config: LLaDAMoEConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LLaDAMoEBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.reset_parameters()

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) for matrices, ones for norms; output projections scaled
        down by sqrt(2 * layers) so the residual stream does not grow with depth."""
        std = self.config.initializer_range
        out_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, param in self.named_parameters():
            if param.device.type == "meta":
                continue
            if param.dim() == 1:
                param.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj")):
                param.normal_(0.0, out_std)
            else:
                param.normal_(0.0, std)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        *,
        use_cache: bool = False,
        past_key_values: KVCache | None = None,
        cache_start: int | torch.Tensor | None = None,
        logits_slice: slice | torch.Tensor | None = None,
        hidden_only: bool = False,
    ) -> ModelOutput:
        """input_ids [B, L]; attention_mask [B, L] (1 = token, 0 = padding, which no query attends
        to); position_ids [B, L] default to cumsum(mask) - 1, so a left-padded row sees the same
        positions as the row alone.

        use_cache: also return the keys/values of every layer as ``past_key_values`` (a KVCache).
        past_key_values, cache_start: input_ids are the span [cache_start, cache_start + L) of
            the cached sequence; only the span is computed, against the cache's keys/values
            elsewhere (padding mask and positions come from the cache, so attention_mask must be
            None). The span's keys/values are written into the cache, which is returned.
            cache_start may be one start per row (int64 [B]).
        logits_slice: compute logits only at these positions of input_ids (the final norm and
            lm_head are the largest per-token cost at a large vocabulary): a slice, or the
            positions of each row (int64 [B, X]).
        hidden_only: return the final hidden states instead of logits (training computes the
            lm_head and cross-entropy only at the masked positions, llada_core.losses).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected [batch, length], got shape {tuple(input_ids.shape)}")
        if past_key_values is not None:
            key_mask_B11L, position_ids = self._cached_mask_and_positions(
                input_ids, attention_mask, position_ids, past_key_values, cache_start
            )
        elif cache_start is not None:
            raise ValueError("cache_start: only meaningful with past_key_values")
        else:
            key_mask_B11L, position_ids = self._mask_and_positions(input_ids, attention_mask, position_ids)
        cos_BLD, sin_BLD = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)
        h_BLD = self.model.embed_tokens(input_ids)
        router_logits, keys, values = [], [], []
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled() and not use_cache
        for index, layer in enumerate(self.model.layers):
            cached_kv = None
            if past_key_values is not None:
                cached_kv = (past_key_values.keys[index], past_key_values.values[index], cache_start)
            if recompute and cached_kv is None:
                # Keep only the layer's input; its activations are recomputed in the backward pass.
                h_BLD, router_logits_TE, k_BHLD, v_BHLD = checkpoint(
                    layer, h_BLD, cos_BLD, sin_BLD, key_mask_B11L, None, use_reentrant=False)
            else:
                h_BLD, router_logits_TE, k_BHLD, v_BHLD = layer(h_BLD, cos_BLD, sin_BLD, key_mask_B11L, cached_kv)
            router_logits.append(router_logits_TE)
            if use_cache and past_key_values is None:
                keys.append(k_BHLD)
                values.append(v_BHLD)
        if isinstance(logits_slice, torch.Tensor):
            h_BLD = h_BLD.gather(1, logits_slice[..., None].expand(-1, -1, h_BLD.shape[-1]))
        elif logits_slice is not None:
            h_BLD = h_BLD[:, logits_slice]
        cache = past_key_values
        if cache is None and use_cache:
            cache = KVCache(keys=keys, values=values, key_mask_B11L=key_mask_B11L, position_ids=position_ids)
        if hidden_only:
            return ModelOutput(logits=None, router_logits=tuple(router_logits), past_key_values=cache,
                               hidden_states=self.model.norm(h_BLD))
        logits_BLV = self.lm_head(self.model.norm(h_BLD))
        return ModelOutput(logits=logits_BLV, router_logits=tuple(router_logits), past_key_values=cache)

    @staticmethod
    def _mask_and_positions(
        input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """-> (key mask [B, 1, 1, L] or None, position ids [B, L])."""
        key_mask_B11L = None
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask: shape {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}"
                )
            mask_BL = attention_mask.bool()
            # A row that is all padding would attend to nothing (NaN); let it attend everywhere.
            key_mask_B11L = (mask_BL | ~mask_BL.any(-1, keepdim=True))[:, None, None, :]
            if position_ids is None:
                position_ids = (mask_BL.long().cumsum(-1) - 1).clamp(min=0)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        return key_mask_B11L, position_ids

    @staticmethod
    def _cached_mask_and_positions(
        input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
        cache: KVCache, cache_start: int | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The cache's key mask [B, 1, 1, Lk] and the span's position ids [B, L]."""
        batch, length = input_ids.shape
        if attention_mask is not None:
            raise ValueError("attention_mask: with past_key_values the cache's padding mask is used; pass None")
        if cache.position_ids.shape[0] != batch:
            raise ValueError(f"past_key_values: cached batch {cache.position_ids.shape[0]} != input batch {batch}")
        if isinstance(cache_start, torch.Tensor):
            if cache_start.shape != (batch,) or cache_start.dtype != torch.long:
                raise ValueError(f"cache_start: per-row starts must be int64 [{batch}], got "
                                 f"{cache_start.dtype} {tuple(cache_start.shape)}")
            if bool((cache_start < 0).any()) or int(cache_start.max()) + length > cache.length:
                raise ValueError(f"cache_start: a span of {length} from {cache_start.tolist()} is outside the "
                                 f"cached {cache.length} positions")
            if position_ids is None:
                span_BL = cache_start[:, None] + torch.arange(length, device=cache_start.device)
                position_ids = cache.position_ids.expand(batch, -1).gather(1, span_BL)
            return cache.key_mask_B11L, position_ids
        if isinstance(cache_start, bool) or not isinstance(cache_start, int):
            raise ValueError(f"cache_start: an int is required with past_key_values, got {cache_start!r}")
        if cache_start < 0 or cache_start + length > cache.length:
            raise ValueError(
                f"cache_start: span [{cache_start}, {cache_start + length}) is outside the cached {cache.length} positions"
            )
        if position_ids is None:
            position_ids = cache.position_ids[:, cache_start:cache_start + length]
        return cache.key_mask_B11L, position_ids
