"""DeepSpeed-MoE expert parallelism (ep=2, two gloo processes) equals the native MoE on the same
weights: outputs, router logits, and gradients. No Ray here: plain torch.multiprocessing."""

import copy
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from llada_core.config import preset
from llada_core.losses import forward_process, pretrain_loss, total_loss
from llada_core.model import LLaDAMoEModelLM

WORLD = 2


def small_config():
    return preset("tiny", num_hidden_layers=2, vocab_size=64, hidden_size=32, num_attention_heads=4,
                  num_key_value_heads=4, expert_intermediate_size=16, num_experts=8, num_experts_per_tok=3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def training_loss(model, ids, seed):
    """The stage objective on one batch: Eq. 2 plus both aux losses."""
    batch = forward_process(ids, model.config.mask_token_id, generator=torch.Generator().manual_seed(seed))
    out = model(batch.noisy_ids)
    diffusion = pretrain_loss(out.logits, ids, batch)
    return total_loss(diffusion, out.router_logits, model.config.num_experts_per_tok).total, out


def _parity_worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    import deepspeed

    from jobs.training.expert_parallel import ExpertParallelMoE, enable_expert_parallel, native_state_dict

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    torch.manual_seed(0)
    native = LLaDAMoEModelLM(small_config())
    parallel = enable_expert_parallel(copy.deepcopy(native), ep_size=WORLD)
    assert all(isinstance(layer.mlp, ExpertParallelMoE) for layer in parallel.model.layers)
    assert parallel.model.layers[0].mlp.deepspeed_moe.experts.gate_proj.shape[0] == 8 // WORLD
    g = torch.Generator().manual_seed(7)
    batches = [torch.randint(2, 64, (2, 12), generator=g) for _ in range(WORLD)]

    loss, out = training_loss(parallel, batches[rank], seed=rank)
    loss_ref, out_ref = training_loss(native, batches[rank], seed=rank)
    torch.testing.assert_close(out.logits, out_ref.logits, rtol=1e-5, atol=1e-5)
    for got, want in zip(out.router_logits, out_ref.router_logits):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)

    loss.backward()
    # Expert weights see the tokens of every rank; everything else only this rank's batch.
    own = dict(zip(dict(native.named_parameters()), torch.autograd.grad(loss_ref, list(native.parameters()))))
    both_loss = sum(training_loss(native, b, seed=r)[0] for r, b in enumerate(batches))
    both = dict(zip(dict(native.named_parameters()), torch.autograd.grad(both_loss, list(native.parameters()))))
    local = slice(rank * 4, (rank + 1) * 4)
    for index, layer in enumerate(parallel.model.layers):
        prefix = f"model.layers.{index}.mlp."
        for name in ("gate_proj", "up_proj", "down_proj"):
            got = getattr(layer.mlp.deepspeed_moe.experts, name).grad
            torch.testing.assert_close(got, both[prefix + f"experts.{name}"][local], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(layer.mlp.deepspeed_moe.gate.wg.weight.grad, own[prefix + "gate.weight"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(parallel.lm_head.weight.grad, own["lm_head.weight"], rtol=1e-4, atol=1e-6)

    # DeepSpeed sees one entry per local expert (its MoE checkpoint files), and they load back.
    keys = parallel.state_dict().keys()
    assert "model.layers.0.mlp.deepspeed_moe.experts.deepspeed_experts.3.down_proj" in keys
    assert "model.layers.0.mlp.deepspeed_moe.experts.gate_proj" not in keys
    torch.manual_seed(1)  # different weights, so only a working load makes them equal
    reloaded = enable_expert_parallel(LLaDAMoEModelLM(small_config()), ep_size=WORLD)
    assert not torch.equal(reloaded.model.layers[0].mlp.deepspeed_moe.experts.up_proj,
                           parallel.model.layers[0].mlp.deepspeed_moe.experts.up_proj)
    reloaded.load_state_dict(parallel.state_dict())
    for key, value in parallel.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value)

    # The gathered state dict is the native layout with every expert, equal to the start weights.
    state = native_state_dict(parallel)
    assert state.keys() == native.state_dict().keys()
    for key, value in native.state_dict().items():
        torch.testing.assert_close(state[key], value)


def test_expert_parallel_ep2_equals_native_moe_outputs_and_gradients():
    mp.spawn(_parity_worker, args=(free_port(),), nprocs=WORLD, join=True)


def _checkpointing_worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    import deepspeed

    from jobs.training.expert_parallel import enable_expert_parallel

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    torch.manual_seed(0)
    parallel = enable_expert_parallel(LLaDAMoEModelLM(small_config()), ep_size=WORLD).train()
    ids = torch.randint(2, 64, (2, 12), generator=torch.Generator().manual_seed(rank))
    results = []
    for checkpointing in (False, True):  # the all-to-alls run again in backward, on every rank alike
        parallel.activation_checkpointing = checkpointing
        parallel.zero_grad(set_to_none=True)
        loss, _ = training_loss(parallel, ids, seed=rank)
        loss.backward()
        results.append((loss.detach(), {name: p.grad.clone() for name, p in parallel.named_parameters()
                                        if p.grad is not None}))
    (loss_plain, grads_plain), (loss_ckpt, grads_ckpt) = results
    torch.testing.assert_close(loss_ckpt, loss_plain)
    assert grads_ckpt.keys() == grads_plain.keys() and len(grads_plain) > 0
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_activation_checkpointing_with_expert_parallelism_gives_the_same_gradients():
    mp.spawn(_checkpointing_worker, args=(free_port(),), nprocs=WORLD, join=True)


def test_expert_parallel_rejects_sizes_that_do_not_divide():
    from jobs.training.expert_parallel import ExpertParallelMoE

    native = LLaDAMoEModelLM(small_config())
    with pytest.raises(ValueError, match="expert_parallel_size"):
        ExpertParallelMoE(native.model.layers[0].mlp, ep_size=3, ep_rank=0)
