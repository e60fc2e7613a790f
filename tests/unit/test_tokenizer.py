"""The demo tokenizer (byte-level BPE, special tokens at 0..4, released-shape chat template),
saving/loading HF tokenizer directories (local and S3), and special ids read from the tokenizer."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from llada_core import tokens
from llada_core.config import preset
from pipelines.demo.corpus import CorpusSpec, write_demo_corpus
from pipelines.tokenizer import (TokenizerError, check_matches_config, load_tokenizer, save_tokenizer,
                                 special_token_ids, tokenizer_hash, train_demo_tokenizer)

SPEC = CorpusSpec(num_text_docs=300, num_math_docs=200, num_code_docs=150, num_anneal_docs=50,
                  num_sft_chats=200, num_eval_items=10, files_per_split=1)


@pytest.fixture(scope="module")
def demo_tokenizer_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("tok")
    write_demo_corpus(str(root / "corpus"), SPEC)
    train_demo_tokenizer(str(root / "corpus"), str(root / "tokenizer"), vocab_size=4096)
    return str(root / "tokenizer")


def test_special_tokens_at_ids_0_to_4_and_match_tiny_preset(demo_tokenizer_dir) -> None:
    tokenizer = load_tokenizer(demo_tokenizer_dir)
    assert [tokenizer.convert_tokens_to_ids(t) for t in tokens.SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    ids = special_token_ids(tokenizer)
    assert (ids.eos, ids.pad, ids.mask, ids.role_start, ids.role_close, ids.role_end) == (0, 0, 1, 2, 3, 4)
    assert check_matches_config(tokenizer, preset("tiny")) == ids
    assert 300 < len(tokenizer) <= 4096
    with pytest.raises(TokenizerError, match="vocab_size: the tokenizer has .* tokens but the model config"):
        check_matches_config(tokenizer, preset("tiny", vocab_size=300))
    with pytest.raises(TokenizerError, match="mask_token_id: the model config says 7"):
        check_matches_config(tokenizer, preset("tiny", mask_token_id=7))


def test_roundtrip_digits_and_special_tokens(demo_tokenizer_dir) -> None:
    tokenizer = load_tokenizer(demo_tokenizer_dir)
    text = "alice has 12 pens. 45+67=112\nfor i in range(3):\n    print(i)\n# output: 0 1 2"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(tokenizer("alice goes to the park with bob.")["input_ids"]) == 8  # one token per word
    digit_pieces = tokenizer.convert_ids_to_tokens(tokenizer("45+67=112")["input_ids"])
    assert digit_pieces == ["4", "5", "+", "6", "7", "=", "1", "1", "2"]
    with_markers = tokenizer(f"{tokens.ROLE_START}HUMAN{tokens.ROLE_CLOSE}hi{tokens.ROLE_END}{tokens.EOS_TOKEN}")
    assert with_markers["input_ids"][0] == 2 and with_markers["input_ids"][-2:] == [4, 0]


def test_chat_template_matches_format_chat(demo_tokenizer_dir) -> None:
    tokenizer = load_tokenizer(demo_tokenizer_dir)
    config = json.load(open(f"{demo_tokenizer_dir}/tokenizer_config.json"))
    assert config["chat_template"] == tokenizer.chat_template
    conversations = [
        [{"role": "user", "content": "what is 2+3?"}],
        [{"role": "system", "content": "you are a helpful assistant."}, {"role": "user", "content": "what is 2+3?"},
         {"role": "assistant", "content": "2+3=5"}, {"role": "user", "content": "and plus 4?"}],
    ]
    for messages in conversations:
        for generation_prompt in (True, False):
            rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
            assert rendered == tokens.format_chat(messages, add_generation_prompt=generation_prompt)


def test_save_load_keeps_hash_and_is_deterministic(demo_tokenizer_dir, tmp_path) -> None:
    tokenizer = load_tokenizer(demo_tokenizer_dir)
    save_tokenizer(tokenizer, str(tmp_path / "copy"))
    assert tokenizer_hash(load_tokenizer(str(tmp_path / "copy"))) == tokenizer_hash(tokenizer)
    train_demo_tokenizer(str(tmp_path / ".." / "tok0" / "corpus"), str(tmp_path / "again"))
    assert tokenizer_hash(load_tokenizer(str(tmp_path / "again"))) == tokenizer_hash(tokenizer)


def _foreign_tokenizer(tmp_path, with_role_end: bool = True) -> str:
    """An HF tokenizer directory shaped like the released one: special tokens after the vocab."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(["hello world"] * 10, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    specials = [t for t in tokens.SPECIAL_TOKENS if with_role_end or t != tokens.ROLE_END]
    backend.add_special_tokens(specials)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=tokens.EOS_TOKEN,
                                      mask_token=tokens.MASK_TOKEN)
    path = tmp_path / ("foreign" if with_role_end else "broken")
    wrapped.save_pretrained(str(path))
    return str(path)


def test_foreign_tokenizer_ids_come_from_the_tokenizer(tmp_path) -> None:
    tokenizer = load_tokenizer(_foreign_tokenizer(tmp_path))
    ids = special_token_ids(tokenizer)
    base = tokenizer.convert_tokens_to_ids(tokens.EOS_TOKEN)
    assert base > 250
    assert (ids.eos, ids.pad, ids.mask, ids.role_end) == (base, base, base + 1, base + 4)
    with pytest.raises(TokenizerError, match=r"has no '<\|role_end\|>' token"):
        special_token_ids(load_tokenizer(_foreign_tokenizer(tmp_path, with_role_end=False)))


def test_missing_or_broken_directory_errors(tmp_path) -> None:
    with pytest.raises(TokenizerError, match="no such directory"):
        load_tokenizer(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "vocab.txt").write_text("a\n")
    with pytest.raises(TokenizerError, match=r"no tokenizer.json in the directory \(found \['vocab.txt'\]\)"):
        load_tokenizer(str(tmp_path / "empty"))
    (tmp_path / "empty" / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot load"):
        load_tokenizer(str(tmp_path / "empty"))


def test_tokenizer_on_s3(demo_tokenizer_dir, s3_server) -> None:
    bucket = s3_server.bucket()
    save_tokenizer(load_tokenizer(demo_tokenizer_dir), f"{bucket}/tokenizer")
    loaded = load_tokenizer(f"{bucket}/tokenizer")
    assert tokenizer_hash(loaded) == tokenizer_hash(load_tokenizer(demo_tokenizer_dir))
    assert special_token_ids(loaded).mask == 1
