"""Expert parallelism: swap the native MoE layers for DeepSpeed-MoE layers that route the same way.

Legend: T tokens, D hidden, E experts, El local experts (E / ep), K top-k, F expert FFN,
C capacity (slots per expert), G expert-parallel group size (ep).

DeepSpeed's own top-k gate renormalises the k weights, drops tokens past a capacity and computes
its own balance loss; LLaDA-MoE does none of that (LLADA_SPEC section 2). ``MOELayer`` accepts
any gate that returns its route tuple, so ``LLaDAGate`` plugs LLaDA routing (fp32 softmax, top-k,
no renormalisation, no dropped token) into DeepSpeed's all-to-all dispatch. The gate hands the
router logits back through the slot DeepSpeed uses for its aux loss (``MOELayer.l_aux``); the
platform computes its own load-balance and z-losses from them, as the native model does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from deepspeed.moe.sharded_moe import MOELayer
from deepspeed.utils import groups
from torch import nn

from llada_core.model import LLaDAMoEModelLM, MoE, route


def expert_group_name(ep_size: int) -> str:
    return f"ep_size_{ep_size}"  # DeepSpeed's own naming, so its engine finds the group


class LLaDAGate(nn.Module):
    """Router with LLaDA-MoE semantics, in DeepSpeed ``TopKGate``'s sparse-route interface."""

    def __init__(self, weight_ED: torch.Tensor, top_k: int, normalize: bool) -> None:
        super().__init__()
        self.wg = nn.Linear(weight_ED.shape[1], weight_ED.shape[0], bias=False)
        with torch.no_grad():
            self.wg.weight.copy_(weight_ED)
        self.top_k, self.normalize = top_k, normalize
        self.ep_group = None

    def _set_ep_group(self, ep_group) -> None:  # called by DeepSpeed (possibly more than once)
        self.ep_group = ep_group

    def forward(self, x_TD: torch.Tensor, used_token=None, sparse_routes: bool = True, use_tutel: bool = False):
        if not sparse_routes or use_tutel or used_token is not None:
            raise NotImplementedError("LLaDAGate supports DeepSpeed's sparse-route dispatch only")
        router_logits_TE = F.linear(x_TD.float(), self.wg.weight.float())
        weights_TK, expert_idx_TK = route(router_logits_TE, self.top_k, self.normalize)
        num_experts = router_logits_TE.shape[1]
        assigned_TE = torch.zeros_like(router_logits_TE, dtype=torch.bool).scatter_(1, expert_idx_TK, True)
        counts_E = assigned_TE.sum(0)
        # Dropless: every expert's buffer holds its largest group across the expert-parallel ranks.
        capacity = counts_E.max().reshape(1)
        if self.ep_group is not None and dist.get_world_size(self.ep_group) > 1:
            dist.all_reduce(capacity, op=dist.ReduceOp.MAX, group=self.ep_group)
        slot_TE = torch.cumsum(assigned_TE.long(), 0) - 1  # position of each token in its expert's buffer
        slot_TK = slot_TE.gather(1, expert_idx_TK)
        return (
            router_logits_TE,  # travels in DeepSpeed's l_aux slot: the platform computes its own aux losses
            capacity[0],
            num_experts,
            expert_idx_TK.t().to(torch.int32).contiguous(),
            slot_TK.t().to(torch.int32).contiguous(),
            weights_TK.t().contiguous(),
            counts_E,
        )


class LocalGroupedExperts(nn.Module):
    """This rank's El experts, stacked; DeepSpeed hands them [G, El, C, D] after its all-to-all."""

    def __init__(self, gate_proj: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor, group_name: str) -> None:
        super().__init__()
        self.gate_proj = nn.Parameter(gate_proj.detach().clone())
        self.up_proj = nn.Parameter(up_proj.detach().clone())
        self.down_proj = nn.Parameter(down_proj.detach().clone())
        for param in self.parameters():
            # DeepSpeed's markers for expert parameters: reduced over the expert-data-parallel
            # group only, never over all data-parallel ranks.
            param.allreduce = False
            param.group_name = group_name
        # DeepSpeed checkpoints MoE layers one file per expert, finding experts by the key
        # pattern ``deepspeed_experts.{i}.``: show the stacked weights that way in state dicts.
        self.register_state_dict_post_hook(_unstack_experts)
        self.register_load_state_dict_pre_hook(_restack_experts)

    def forward(self, x_GECD: torch.Tensor) -> torch.Tensor:
        g, num_local, capacity, hidden = x_GECD.shape
        x_ETD = x_GECD.transpose(0, 1).reshape(num_local, g * capacity, hidden)
        h_ETF = F.silu(torch.bmm(x_ETD, self.gate_proj.transpose(1, 2))) * torch.bmm(x_ETD, self.up_proj.transpose(1, 2))
        y_ETD = torch.bmm(h_ETF, self.down_proj.transpose(1, 2))
        return y_ETD.view(num_local, g, capacity, hidden).transpose(0, 1)


_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _unstack_experts(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for name in _PROJECTIONS:
        stacked = state_dict.pop(prefix + name)
        for index in range(stacked.shape[0]):
            state_dict[f"{prefix}deepspeed_experts.{index}.{name}"] = stacked[index]


def _restack_experts(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    for name in _PROJECTIONS:
        keys = [f"{prefix}deepspeed_experts.{i}.{name}" for i in range(getattr(module, name).shape[0])]
        if all(key in state_dict for key in keys):
            state_dict[prefix + name] = torch.stack([state_dict.pop(key) for key in keys])


class ExpertParallelMoE(DeepSpeedMoE):
    """A DeepSpeed ``MoE`` (so the engine sets up its groups and expert gradients) that behaves
    like the native ``llada_core.model.MoE``: ``forward(x) -> (out, router_logits)``."""

    def __init__(self, native: MoE, ep_size: int, ep_rank: int) -> None:
        nn.Module.__init__(self)  # DeepSpeedMoE.__init__ would build its own gate and experts
        num_experts = native.experts.gate_proj.shape[0]
        if num_experts % ep_size:
            raise ValueError(f"expert_parallel_size: {ep_size} does not divide num_experts={num_experts}")
        self.use_residual, self.enable_expert_tensor_parallelism = False, False
        self.ep_size, self.num_experts = ep_size, num_experts
        self.num_local_experts = num_experts // ep_size
        self.expert_group_name = expert_group_name(ep_size)
        local = slice(ep_rank * self.num_local_experts, (ep_rank + 1) * self.num_local_experts)
        experts = native.experts
        self.deepspeed_moe = MOELayer(
            LLaDAGate(native.gate.weight.detach(), native.top_k, native.normalize),
            LocalGroupedExperts(experts.gate_proj[local], experts.up_proj[local], experts.down_proj[local], self.expert_group_name),
            self.expert_group_name, ep_size, self.num_local_experts,
        )
        self.ep_rank = ep_rank

    def forward(self, x_BLD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out_BLD = self.deepspeed_moe(x_BLD, None)
        return out_BLD, self.deepspeed_moe.l_aux


def enable_expert_parallel(model: LLaDAMoEModelLM, ep_size: int) -> LLaDAMoEModelLM:
    """Replace every layer's MoE with an ``ExpertParallelMoE`` holding this rank's experts.

    Needs torch.distributed initialised (``deepspeed.init_distributed``) with a world size that
    ``ep_size`` divides. Expert-parallel groups are DeepSpeed's: consecutive ranks.
    """
    if ep_size == 1:
        return model
    if not dist.is_initialized():
        raise RuntimeError("expert_parallel_size > 1 needs torch.distributed to be initialised first")
    world = dist.get_world_size()
    if world % ep_size:
        raise ValueError(f"expert_parallel_size: {ep_size} does not divide the number of workers ({world})")
    name = expert_group_name(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    ep_group = groups._get_expert_parallel_group(name)
    ep_rank = dist.get_rank(group=ep_group)
    for layer in model.model.layers:
        layer.mlp = ExpertParallelMoE(layer.mlp, ep_size, ep_rank)
        layer.mlp.deepspeed_moe._set_ep_group(ep_group)
    return model


@torch.no_grad()
def native_state_dict(model: LLaDAMoEModelLM) -> dict[str, torch.Tensor]:
    """The full native state dict (``llada_core`` key layout, all E experts) from an
    expert-parallel model, gathering each layer's experts over its expert-parallel group.
    Every rank of the group must call it (it is a collective)."""
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if ".mlp.deepspeed_moe." not in key:
            state[key] = value
    for index, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        prefix = f"model.layers.{index}.mlp."
        if not isinstance(mlp, ExpertParallelMoE):
            continue
        state[prefix + "gate.weight"] = mlp.deepspeed_moe.gate.wg.weight.detach().clone()
        group = mlp.deepspeed_moe.ep_group
        for name in ("gate_proj", "up_proj", "down_proj"):
            local = getattr(mlp.deepspeed_moe.experts, name).detach().contiguous()
            parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, local, group=group)
            state[prefix + f"experts.{name}"] = torch.cat(parts, 0)
    return state
