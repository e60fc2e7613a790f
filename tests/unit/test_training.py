"""Stage-training pieces that need no Ray: schedules, rotation, resources, config, one step."""

import numpy as np
import pytest
import torch

from jobs.checkpoints import plan_rotation
from jobs.stage_config import StageConfig
from jobs.training.stage import worker_resources
from jobs.training.loop import deepspeed_config, learning_rate_factor, train_step
from llada_core.config import preset
from llada_core.model import LLaDAMoEModelLM
from pipelines.reader import DataError


def config(**overrides) -> StageConfig:
    base = dict(name="s", kind="pretrain", model={"preset": "tiny"}, data_uri="/d", output_uri="/o", num_steps=100,
                micro_batch_size=2, checkpoint_every=10, optimizer={"lr": 1e-3},
                schedule={"kind": "warmup_cosine", "warmup_steps": 10, "min_lr_ratio": 0.1})
    return StageConfig.model_validate({**base, **overrides})


def test_warmup_then_cosine_to_the_floor():
    c = config()
    factors = [learning_rate_factor(step, c) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))  # monotone decay after warmup
    assert factors[-1] == pytest.approx(0.1)
    assert factors[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 46 / 90)))


def test_warmup_stable_decay():
    c = config(schedule={"kind": "wsd", "warmup_steps": 5, "decay_fraction": 0.2, "min_lr_ratio": 0.0})
    factors = [learning_rate_factor(step, c) for step in range(100)]
    assert factors[4] == 1.0 and set(factors[5:80]) == {1.0}
    assert factors[80] == pytest.approx(1 - 1 / 20) and factors[99] == pytest.approx(0.0)


def test_rotation_keeps_the_newest_and_never_a_selected_checkpoint():
    ckpts = [(step, f"s3://b/run/checkpoints/checkpoint_{step:06d}") for step in (10, 20, 30, 40)]
    assert plan_rotation(ckpts, 2, set()) == [ckpts[0][1], ckpts[1][1]]
    assert plan_rotation(ckpts, 2, {ckpts[0][1]}) == [ckpts[1][1]]
    assert plan_rotation(ckpts, 10, set()) == []
    with pytest.raises(ValueError, match="keep_last"):
        plan_rotation(ckpts, 0, set())


def test_worker_resources_leave_cpu_for_ray_data_and_fail_fast():
    c = config(scaling={"num_workers": 2})
    assert worker_resources(c, {"CPU": 2.0}) == {"CPU": 0.5}
    with pytest.raises(DataError, match="num_workers"):
        worker_resources(config(scaling={"num_workers": 4}), {"CPU": 1.2})
    with pytest.raises(DataError, match="use_gpu"):
        worker_resources(config(scaling={"num_workers": 2, "use_gpu": True}), {"CPU": 8.0, "GPU": 1.0})
    with pytest.raises(DataError, match="cpus_per_worker"):
        worker_resources(config(scaling={"num_workers": 2, "cpus_per_worker": 1.0}), {"CPU": 2.0})


@pytest.mark.parametrize("overrides, field", [
    ({"scaling": {"num_workers": 3, "expert_parallel_size": 2}}, "expert_parallel_size"),
    ({"scaling": {"num_workers": 2, "expert_parallel_size": 2}, "model": {"preset": "tiny", "overrides": {"num_experts": 5, "num_experts_per_tok": 2}}}, "expert_parallel_size"),
    ({"schedule": {"warmup_steps": 100}}, "warmup_steps"),
    ({"model": {"preset": "tiny", "overrides": {"num_experts_per_tok": 99}}}, "model"),
    ({"scaling": {"data_cpus": 0.5}}, "data_cpus"),
    ({"scaling": {"torch_threads": 0}}, "torch_threads"),
    ({"kind": "finetune"}, "kind"),
    ({"unknown_field": 1}, "unknown_field"),
])
def test_bad_stage_configs_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        config(**overrides)


def test_deepspeed_config_follows_the_stage():
    ds = deepspeed_config(config(grad_accumulation_steps=4, scaling={"zero_stage": 2}))
    assert ds["gradient_accumulation_steps"] == 4 and ds["zero_optimization"] == {"stage": 2}
    assert ds["bf16"] == {"enabled": False} and ds["gradient_clipping"] == 1.0


class StubEngine:
    """Just enough of a DeepSpeed engine for one train_step; records what the model saw."""

    def __init__(self, model):
        self.module, self.device, self.seen = model, torch.device("cpu"), []

    def __call__(self, ids, **kwargs):
        self.seen.append(ids.clone())
        return self.module(ids, **kwargs)

    def backward(self, loss):
        loss.backward()

    def step(self):
        pass


def test_sft_step_never_masks_the_prompt_and_trains_the_response():
    model = LLaDAMoEModelLM(preset("tiny", num_hidden_layers=1, vocab_size=64))
    engine = StubEngine(model)
    ids = np.random.default_rng(0).integers(5, 64, size=(4, 24))
    loss_mask = np.zeros((4, 24), dtype=bool)
    loss_mask[:, 9:] = True
    generator = torch.Generator().manual_seed(0)
    for _ in range(10):
        batch = {"input_ids": ids, "loss_mask": loss_mask, "num_tokens": np.full(4, 24)}
        result = train_step(engine, batch, config(kind="sft", max_seq_len=20), generator)
        assert torch.isfinite(result["terms"].total)
    seen = torch.stack(engine.seen)
    assert seen.shape[-1] == 20  # the SFT cap
    assert (seen[..., :9] == torch.from_numpy(ids[:, :9])).all()  # prompt never masked
    assert (seen[..., 9:] == model.config.mask_token_id).any()  # responses are
    assert model.lm_head.weight.grad is not None


def test_sft_batches_are_cut_to_their_longest_row():
    """LLADA_SPEC section 4: SFT rows are EOS-padded to the batch's length, not the shards'."""
    model = LLaDAMoEModelLM(preset("tiny", num_hidden_layers=1, vocab_size=64))
    engine = StubEngine(model)
    ids = np.zeros((3, 32), dtype=np.int64)  # EOS (0) padding past each row's num_tokens
    num_tokens = np.array([9, 15, 12])
    for row, length in enumerate(num_tokens):
        ids[row, :length] = np.arange(5, 5 + length)
    loss_mask = np.zeros((3, 32), dtype=bool)
    loss_mask[:, 4:] = True
    batch = {"input_ids": ids, "loss_mask": loss_mask, "num_tokens": num_tokens}
    result = train_step(engine, batch, config(kind="sft"), torch.Generator().manual_seed(0))
    assert engine.seen[0].shape == (3, 15) and result["seq_len"] == 15 and result["num_tokens"] == 45
    assert (engine.seen[0][:, :4] == torch.from_numpy(ids[:, :4])).all()
    # Pretraining rows are packed: never cut.
    pretrain = {"input_ids": ids, "num_tokens": num_tokens}
    assert train_step(engine, pretrain, config(variable_length_prob=0.0), torch.Generator())["seq_len"] == 32
    with pytest.raises(ValueError, match="num_tokens"):
        train_step(engine, {**batch, "num_tokens": np.array([9, 40, 12])}, config(kind="sft"), torch.Generator())
