"""Fetching a served checkpoint (serve/checkpoint.py) from a local folder or S3 (the session's
S3-protocol server on 127.0.0.1): the replica gets the whole checkpoint, the ingress only the
config and tokenizer files."""

from __future__ import annotations

import pytest
import torch

from llada_core import LLaDAMoEModelLM, load_model, preset, save_model
from pipelines import storage
from pipelines.tokenizer import save_tokenizer, special_token_ids, train_bpe
from serve import checkpoint as serve_checkpoint
from serve.checkpoint import CheckpointNotFound, load_metadata, local_checkpoint


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt")
    tokenizer = train_bpe(["the cat sat on the mat", "a dog ran"] * 10, vocab_size=280, min_frequency=1)
    torch.manual_seed(0)
    config = preset("tiny", vocab_size=320, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                    num_key_value_heads=4, expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
    save_model(LLaDAMoEModelLM(config), directory)
    save_tokenizer(tokenizer, str(directory))
    return directory


def test_local_metadata_gives_the_tokenizer_and_model_facts(checkpoint_dir):
    tokenizer, info = load_metadata(str(checkpoint_dir))
    assert (info.vocab_size, info.mask_id, info.eos_id) == (320, 1, 0)
    assert info.eot_id == special_token_ids(tokenizer).role_end
    with local_checkpoint(f"file://{checkpoint_dir}") as directory:
        assert directory == str(checkpoint_dir)


def test_from_s3_the_ingress_reads_only_small_files_and_the_replica_everything(checkpoint_dir, s3_server,
                                                                               monkeypatch):
    uri = storage.join(s3_server.bucket("serve"), "tiny-cpu/stages/sft/checkpoints/checkpoint_000800/hf")
    storage.upload_dir(str(checkpoint_dir), uri)
    read: list[str] = []
    original = storage.read_bytes
    monkeypatch.setattr(serve_checkpoint.storage, "read_bytes",
                        lambda source, s3=None: read.append(source) or original(source, s3))
    _, info = load_metadata(uri)
    assert info.vocab_size == 320
    assert read and not any(name.endswith(".safetensors") for name in read)
    with local_checkpoint(uri) as directory:
        loaded = load_model(directory)
    expected = load_model(checkpoint_dir)
    for (name, tensor), (_, reference) in zip(loaded.state_dict().items(), expected.state_dict().items(), strict=True):
        assert torch.equal(tensor, reference), name


def test_a_folder_without_a_checkpoint_is_refused_clearly(tmp_path, s3_server):
    with pytest.raises(CheckpointNotFound, match="no config.json"):
        with local_checkpoint(str(tmp_path)):
            pass
    empty = s3_server.bucket("empty")
    storage.write_text(storage.join(empty, "x/readme.txt"), "hi")
    with pytest.raises(CheckpointNotFound, match="no config.json"):
        load_metadata(storage.join(empty, "x"))


@pytest.mark.parametrize(("uri", "label"), [
    ("s3://bucket/runs/tiny-cpu/stages/sft/checkpoints/checkpoint_000800/hf", "tiny-cpu/sft/checkpoint_000800"),
    ("./runs/tiny-cpu/stages/pretrain2/averages/top-000047-000094/hf", "tiny-cpu/pretrain2/top-000047-000094"),
    ("/models/llada-moe-7b/v3", "llada-moe-7b/v3"),
])
def test_answers_name_a_checkpoint_by_run_stage_and_folder_not_its_storage_uri(uri, label):
    from serve.checkpoint import checkpoint_label

    assert checkpoint_label(uri) == label
