"""Checkpoint I/O in the released HF layout (LLADA_SPEC section 3) and the transformers Auto classes.

The "released" checkpoints here are written by the test itself, key by key, from the spec's
table, so the loader is checked against the spec and not against its own writer.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import llada_core.checkpoint as checkpoint
import llada_core.hf  # noqa: F401  (registers the Auto classes)
from llada_core.checkpoint import CheckpointError, load_config, load_model, save_model
from llada_core.config import preset
from llada_core.model import LLaDAMoEModelLM

N, D, H, F, E, V = 2, 32, 4, 16, 4, 96  # layers, hidden, heads, expert FFN, experts, vocab
MASK_ID, EOS_ID = 1, 0


def small_config(**overrides):
    return preset("tiny", **{**dict(
        num_hidden_layers=N, vocab_size=V, hidden_size=D, num_attention_heads=H, num_key_value_heads=H,
        expert_intermediate_size=F, num_experts=E, num_experts_per_tok=2, rope_theta=50_000.0,
    ), **overrides})


def make_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = LLaDAMoEModelLM(small_config())
    with torch.no_grad():
        for param in model.parameters():  # norms too, so that every tensor is distinctive
            param.normal_(0.0, 0.3)
    return model.to(dtype)


def tokens():
    return torch.randint(2, V, (2, 7), generator=torch.Generator().manual_seed(1))


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def spec_tensors(model):
    """Released key -> tensor, built literally from LLADA_SPEC section 3."""
    out = {"model.embed_tokens.weight": model.model.embed_tokens.weight,
           "model.norm.weight": model.model.norm.weight, "lm_head.weight": model.lm_head.weight}
    for n, layer in enumerate(model.model.layers):
        p = f"model.layers.{n}."
        out[p + "input_layernorm.weight"] = layer.input_layernorm.weight
        out[p + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
            out[p + f"self_attn.{name}.weight"] = getattr(layer.self_attn, name).weight
        out[p + "mlp.gate.weight"] = layer.mlp.gate.weight
        for e in range(E):
            for name in ("gate_proj", "up_proj", "down_proj"):
                out[p + f"mlp.experts.{e}.{name}.weight"] = getattr(layer.mlp.experts, name)[e]
    return {key: value.detach().clone().contiguous() for key, value in out.items()}


def spec_shapes():
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
    for n in range(N):
        p = f"model.layers.{n}."
        shapes.update({p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                       p + "self_attn.q_norm.weight": (D // H,), p + "self_attn.k_norm.weight": (D // H,),
                       p + "mlp.gate.weight": (E, D)})
        shapes.update({p + f"self_attn.{name}.weight": (D, D) for name in ("q_proj", "k_proj", "v_proj", "o_proj")})
        for e in range(E):
            shapes.update({p + f"mlp.experts.{e}.gate_proj.weight": (F, D), p + f"mlp.experts.{e}.up_proj.weight": (F, D),
                           p + f"mlp.experts.{e}.down_proj.weight": (D, F)})
    return shapes


def released_config(model_type="llada"):
    """Shaped like the released config.json: released-only fields at their plain values, an
    auto_map to remote code that is not there, and no mask_token_id (the tokenizer has it)."""
    return {
        "architectures": ["LLaDAMoEModelLM"], "model_type": model_type,
        "auto_map": {"AutoConfig": "configuration_lladamoe.LLaDAConfig",
                     "AutoModel": "modeling_lladamoe.LLaDAMoEModelLM",
                     "AutoModelForCausalLM": "modeling_lladamoe.LLaDAMoEModelLM"},
        "vocab_size": V, "hidden_size": D, "num_hidden_layers": N, "num_attention_heads": H,
        "num_key_value_heads": H, "dense_intermediate_size": 8 * D, "expert_intermediate_size": F,
        "shared_expert_intermediate_size": None, "num_experts": E, "num_experts_per_tok": 2,
        "moe_layer_freq": [1] * N, "hidden_act": "silu", "max_position_embeddings": 1024,
        "initializer_range": 0.02, "rms_norm_eps": 1e-5, "use_cache": False, "pad_token_id": EOS_ID,
        "bos_token_id": None, "eos_token_id": EOS_ID, "tie_word_embeddings": False, "rope_theta": 50_000,
        "partial_rotary_factor": 1.0, "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0,
        "clip_qkv": None, "output_router_logits": False, "router_aux_loss_coef": 0.01, "norm_topk_prob": False,
        "qk_layernorm": True, "moe_router_enable_expert_bias": False, "moe_router_score_function": "softmax",
        "routed_scaling_factor": 1, "router_num_group": None, "router_topk_group": None,
        "torch_dtype": "bfloat16", "transformers_version": "4.46.3",
    }


def write_released(directory: Path, model, config=None, tensors=None):
    """Two bf16 shards + index (layer 0 | the rest) and tokenizer_config.json, by hand."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = spec_tensors(model) if tensors is None else tensors
    first = {k: v for k, v in tensors.items() if k.startswith("model.layers.0.")}
    rest = {k: v for k, v in tensors.items() if k not in first}
    names = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    for name, part in zip(names, (first, rest)):
        save_file(part, directory / name, {"format": "pt"})
    weight_map = {**dict.fromkeys(first, names[0]), **dict.fromkeys(rest, names[1])}
    (directory / checkpoint.INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(released_config() if config is None else config))
    decoder = {str(EOS_ID): {"content": "<|endoftext|>", "special": True},
               str(MASK_ID): {"content": "<|mask|>", "special": True}}
    (directory / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": decoder}))
    return directory


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_then_load_is_bit_exact_with_identical_logits(tmp_path, dtype):
    model = make_model(dtype)
    loaded = load_model(save_model(model, tmp_path / "ckpt"))
    assert_same_state(model, loaded)
    assert loaded.config == model.config and loaded.dtype == dtype
    assert torch.equal(model(tokens()).logits, loaded(tokens()).logits)


def test_save_casts_to_dtype_and_load_casts_back(tmp_path):
    model = make_model(torch.float32)
    directory = save_model(model, tmp_path / "ckpt", dtype=torch.bfloat16)
    assert json.loads((directory / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_model(directory).dtype == torch.bfloat16
    as_fp32 = load_model(directory, dtype=torch.float32)
    assert as_fp32.dtype == torch.float32
    assert torch.equal(as_fp32.lm_head.weight, model.lm_head.weight.to(torch.bfloat16).float())


def test_sharding_above_max_shard_bytes_and_loads_back(tmp_path):
    model = make_model()
    max_bytes = 40_000
    directory = save_model(model, tmp_path / "ckpt", max_shard_bytes=max_bytes)
    shards = sorted(directory.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (directory / "model.safetensors").exists()
    assert [s.name for s in shards] == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    index = json.loads((directory / checkpoint.INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(spec_shapes())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    total = 0
    for shard in shards:
        with safe_open(shard, "pt") as handle:
            sizes = [handle.get_tensor(k).nbytes for k in handle.keys()]
            assert all(index["weight_map"][k] == shard.name for k in handle.keys())
        assert sum(sizes) <= max_bytes or len(sizes) == 1
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total
    assert_same_state(model, load_model(directory))


def test_small_model_is_one_file_without_index(tmp_path):
    directory = save_model(make_model(), tmp_path / "ckpt")
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]


def test_files_on_disk_carry_the_released_keys_shapes_and_values(tmp_path):
    model = make_model(torch.bfloat16)
    directory = save_model(model, tmp_path / "ckpt")
    expected = spec_tensors(model)
    with safe_open(directory / "model.safetensors", "pt") as handle:
        assert set(handle.keys()) == set(spec_shapes())
        for key, shape in spec_shapes().items():
            tensor = handle.get_tensor(key)
            assert tuple(tensor.shape) == shape and tensor.dtype == torch.bfloat16, key
            assert torch.equal(tensor, expected[key]), key
        assert handle.metadata() == {"format": "pt"}
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "llada" and config["architectures"] == ["LLaDAMoEModelLM"]
    assert config["expert_intermediate_size"] == F and config["num_experts"] == E and config["mask_token_id"] == MASK_ID
    assert config["moe_layer_freq"] == [1] * N and config["shared_expert_intermediate_size"] is None


# --------------------------------------------------------------------------- released layout and transformers


@pytest.mark.parametrize("model_type", ["llada", "lladamoe"])
def test_released_checkpoint_loads_with_load_model_and_transformers_auto_classes(tmp_path, model_type):
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

    source = make_model(torch.bfloat16)
    directory = write_released(tmp_path / "released", source, released_config(model_type))
    loaded = load_model(directory)
    assert loaded.config.mask_token_id == MASK_ID  # from the tokenizer: the released config has none
    assert loaded.dtype == torch.bfloat16
    assert_same_state(source, loaded)
    reference = loaded(tokens()).logits
    assert torch.equal(reference, source(tokens()).logits)

    hf_config = AutoConfig.from_pretrained(directory)
    assert hf_config.model_type == model_type and hf_config.num_experts == E
    assert hf_config.mask_token_id == MASK_ID and hf_config.to_llada_config() == loaded.config
    for auto_class in (AutoModel, AutoModelForMaskedLM):
        hf_model = auto_class.from_pretrained(directory)
        assert hf_model.dtype == torch.bfloat16
        assert torch.equal(hf_model(tokens()).logits, reference)


def test_transformers_save_pretrained_and_from_config(tmp_path):
    from transformers import AutoConfig, AutoModel

    source = make_model()
    hf_model = AutoModel.from_pretrained(save_model(source, tmp_path / "a"))
    hf_model.save_pretrained(tmp_path / "b")
    with safe_open(tmp_path / "b" / "model.safetensors", "pt") as handle:
        assert set(handle.keys()) == set(spec_shapes())
    assert_same_state(source, load_model(tmp_path / "b"))
    fresh = AutoModel.from_config(AutoConfig.from_pretrained(tmp_path / "b"))
    assert fresh.llada_model.config == source.config
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in source.state_dict().items()}
    # An in-memory model wrapped for transformers shares its weights instead of copying them.
    wrapped = llada_core.hf.LLaDAMoEModelLM(llada_core.hf.LLaDAMoEHFConfig.from_llada_config(source.config), source)
    assert wrapped.config.to_llada_config() == source.config
    assert wrapped.lm_head.weight is source.lm_head.weight
    assert torch.equal(wrapped(tokens()).logits, source(tokens()).logits)


def test_plain_import_of_llada_core_registers_the_auto_classes(tmp_path):
    """The promise to users: ``import llada_core`` is enough, no trust_remote_code."""
    directory = write_released(tmp_path / "released", make_model(torch.bfloat16))
    script = (
        "import sys, llada_core\n"
        "from transformers import AutoConfig\n"
        "config = AutoConfig.from_pretrained(sys.argv[1])\n"
        "assert type(config).__module__ == 'llada_core.hf', type(config)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(directory)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


# --------------------------------------------------------------------------- bad checkpoints


def test_missing_unexpected_and_misshaped_keys_are_listed_in_one_error(tmp_path):
    tensors = spec_tensors(make_model())
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    tensors["model.layers.0.mlp.shared_expert.gate_proj.weight"] = torch.zeros(F, D)
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(D, D + 1)
    directory = write_released(tmp_path / "bad", make_model(), tensors=tensors)
    with pytest.raises(CheckpointError) as caught:
        load_model(directory)
    message = str(caught.value)
    assert f"model.layers.1.mlp.experts.3.up_proj.weight [{F}, {D}]" in message
    assert "model.layers.0.mlp.shared_expert.gate_proj.weight" in message
    assert f"model.layers.0.self_attn.k_proj.weight: expected [{D}, {D}], found [{D}, {D + 1}]" in message


@pytest.mark.parametrize("kind", ["missing", "unexpected", "shape"])
def test_each_key_problem_alone_names_the_key(tmp_path, kind):
    tensors = spec_tensors(make_model())
    key = "model.layers.0.mlp.experts.2.down_proj.weight"
    if kind == "missing":
        del tensors[key]
    elif kind == "unexpected":
        key = "model.layers.0.mlp.experts.4.down_proj.weight"  # one expert too many
        tensors[key] = torch.zeros(D, F)
    else:
        tensors[key] = torch.zeros(F, D)  # transposed
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_model(write_released(tmp_path / kind, make_model(), tensors=tensors))


def test_dense_llada_config_is_rejected_clearly(tmp_path):
    from transformers import AutoConfig

    dense = {"architectures": ["LLaDAModelLM"], "model_type": "llada", "d_model": 4096, "n_heads": 32,
             "n_layers": 32, "mlp_ratio": 4, "mlp_hidden_size": 12288, "vocab_size": 126464,
             "mask_token_id": 126336, "eos_token_id": 126081, "pad_token_id": 126081}
    (tmp_path / "config.json").write_text(json.dumps(dense))
    with pytest.raises(CheckpointError, match="dense LLaDA checkpoint, not LLaDA-MoE"):
        load_config(tmp_path)
    with pytest.raises(CheckpointError, match="dense LLaDA checkpoint, not LLaDA-MoE"):
        AutoConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("field, value", [
    ("shared_expert_intermediate_size", 1024),
    ("moe_layer_freq", [0] + [1] * (N - 1)),
    ("partial_rotary_factor", 0.5),
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}),
    ("moe_router_enable_expert_bias", True),
    ("clip_qkv", 8.0),
    ("moe_router_score_function", "sigmoid"),
])
def test_released_fields_that_change_the_architecture_are_rejected(tmp_path, field, value):
    config = {**released_config(), field: value}
    (tmp_path / "config.json").write_text(json.dumps({**config, "mask_token_id": MASK_ID}))
    with pytest.raises(CheckpointError, match=field):
        load_config(tmp_path)


def test_unknown_model_type_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**released_config(), "model_type": "olmoe"}))
    with pytest.raises(CheckpointError, match="model_type 'olmoe'"):
        load_config(tmp_path)


def test_truncated_safetensors_is_an_error_naming_the_file(tmp_path):
    directory = save_model(make_model(), tmp_path / "ckpt", max_shard_bytes=40_000)
    shard = sorted(directory.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=shard.name):
        load_model(directory)


def test_garbage_weights_and_corrupt_or_missing_config_name_the_file(tmp_path):
    directory = save_model(make_model(), tmp_path / "ckpt")
    (directory / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(directory)
    (directory / "config.json").write_text("{\"model_type\": \"llada\", ")
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(directory)
    (directory / "config.json").unlink()
    with pytest.raises(CheckpointError, match="missing config.json"):
        load_model(directory)


def test_index_pointing_at_a_missing_shard_names_it(tmp_path):
    directory = save_model(make_model(), tmp_path / "ckpt", max_shard_bytes=40_000)
    shard = sorted(directory.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        load_model(directory)


# --------------------------------------------------------------------------- atomic writes


def test_a_failed_save_leaves_the_existing_checkpoint_intact(tmp_path, monkeypatch):
    old = make_model(seed=0)
    directory = save_model(old, tmp_path / "ckpt", max_shard_bytes=40_000)
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    calls = []

    def save_file_then_fail(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:  # the first shard is on disk, the second write dies
            Path(path).write_bytes(b"half")
            raise OSError("disk full")
        save_file(tensors, path, metadata)

    monkeypatch.setattr(checkpoint, "save_file", save_file_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_model(make_model(seed=1), directory, max_shard_bytes=40_000)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary directory left behind
    assert_same_state(old, load_model(directory))


def test_overwriting_replaces_weights_and_keeps_other_files(tmp_path):
    directory = save_model(make_model(seed=0), tmp_path / "ckpt", max_shard_bytes=40_000)
    (directory / "tokenizer.json").write_text("{}")
    new = make_model(seed=1)
    save_model(new, directory)  # one file now: the old shards and index must be gone
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert_same_state(new, load_model(directory))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_extra_config_is_written_but_may_not_change_the_model(tmp_path):
    model = make_model()
    directory = save_model(model, tmp_path / "ckpt", extra_config={"llada_stage": "sft"})
    assert json.loads((directory / "config.json").read_text())["llada_stage"] == "sft"
    assert load_config(directory) == model.config
    with pytest.raises(ValueError, match="extra_config"):
        save_model(model, tmp_path / "other", extra_config={"num_experts": 8})
    with pytest.raises(CheckpointError, match="shared_expert_intermediate_size"):
        save_model(model, tmp_path / "other", extra_config={"shared_expert_intermediate_size": 64})
    assert not (tmp_path / "other").exists()
