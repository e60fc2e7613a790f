"""Request validation on the ingress (serve/protocol.py, serve/validation.py), without Ray:
defaults and rounding of the diffusion parameters, caps, prompts, and the 4xx messages."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from llada_core.tokens import format_chat
from pipelines.tokenizer import special_token_ids, train_bpe
from serve.config import ServeConfig
from serve.protocol import ChatCompletionRequest, CompletionRequest
from serve.validation import (
    ModelInfo,
    RequestError,
    chat_prompt,
    check_model_name,
    check_prompt_ids,
    completion_prompts,
    resolve_sampling,
    sample_requests,
)

MODEL = ModelInfo(vocab_size=512, max_position_embeddings=64, mask_id=1, eos_id=0, eot_id=4)
REFERENCE = {"threshold": None, "cache": None, "early_stop": False}
CONFIG = ServeConfig.model_validate({
    "sampling": {"max_tokens": 10, "block_length": 4, **REFERENCE},
    "limits": {"max_tokens": 32, "max_prompt_tokens": 40, "max_steps": 24, "max_cfg_scale": 3.0,
               "max_prompts_per_request": 3},
})


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(["the cat sat on the mat", "a dog ran in the park", "HUMAN ASSISTANT SYSTEM"] * 10,
                     vocab_size=300, min_frequency=1)


def completion(**fields) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "llada-moe", "prompt": "the cat", **fields})


def resolve(**fields):
    body = completion(**fields)
    return resolve_sampling(body, body.max_tokens, CONFIG)


def error_of(call, *args, **kwargs) -> RequestError:
    with pytest.raises(RequestError) as caught:
        call(*args, **kwargs)
    return caught.value


def test_defaults_round_max_tokens_up_to_whole_blocks_with_one_commit_per_step():
    sampling = resolve()
    options = sampling.options
    assert sampling.max_tokens == 10 and sampling.seed is None
    assert (options.gen_length, options.block_length, options.steps) == (12, 4, 12)
    assert (options.temperature, options.cfg_scale, options.remasking) == (0.0, 0.0, "low_confidence")
    assert (options.threshold, options.cache, options.early_stop) == (None, None, False)


def test_request_fields_override_defaults_and_steps_per_block_default_applies():
    options = resolve(max_tokens=5, block_length=8, steps=4, temperature=0.7, cfg_scale=1.5, remasking="random").options
    assert (options.gen_length, options.steps, options.temperature, options.cfg_scale, options.remasking) == \
        (8, 4, 0.7, 1.5, "random")
    config = ServeConfig.model_validate({"sampling": {"block_length": 8, "steps_per_block": 2, **REFERENCE}})
    body = completion(max_tokens=20)
    assert resolve_sampling(body, 20, config).options.steps == 6  # 3 blocks x 2


@pytest.mark.parametrize("fields,param", [
    (dict(max_tokens=33), "max_tokens"),
    (dict(block_length=64), "block_length"),
    (dict(max_tokens=8, steps=3), "steps"),
    (dict(max_tokens=8, block_length=8, steps=16), "steps"),
    (dict(max_tokens=32, block_length=1, steps=32), "steps"),
    (dict(cfg_scale=3.5), "cfg_scale"),
    (dict(threshold=0.9, remasking="random"), "threshold"),
    (dict(cache="prefix-ish"), "cache"),
])
def test_bad_sampling_parameters_are_400_naming_the_field(fields, param):
    error = error_of(resolve, **fields)
    assert error.status == 400 and error.param == param and error.message.startswith(f"{param}:")


def test_fast_options_pass_through_and_the_seed_only_matters_when_sampling():
    sampling = resolve(threshold=0.9, seed=7)
    assert sampling.options.threshold == 0.9 and sampling.seed is None  # greedy: no seed
    assert resolve(temperature=0.5, seed=7).seed == 7


def test_config_defaults_apply_and_a_request_turns_an_option_off_with_null():
    fast = ServeConfig.model_validate({"sampling": {"max_tokens": 8, "block_length": 4}})
    options = resolve_sampling(completion(), None, fast).options
    assert (options.threshold, options.cache, options.early_stop) == (0.9, "dual", True)
    body = completion(threshold=None, cache=None, early_stop=False)
    options = resolve_sampling(body, None, fast).options
    assert (options.threshold, options.cache, options.early_stop) == (None, None, False)


def test_cache_modes_are_checked_before_they_reach_a_batch():
    error = error_of(resolve, cache="sideways")
    assert error.param == "cache" and "sideways" in error.message


def test_unknown_model_is_404():
    error = error_of(check_model_name, "gpt-4", "llada-moe")
    assert error.status == 404 and error.code == "model_not_found" and "gpt-4" in error.message


@pytest.mark.parametrize("ids,message", [
    (list(range(5, 46)), "41 tokens exceed"),
    ([5, 600], "token id 600 is outside"),
    ([5, 1], "mask token"),
    (list(range(5, 45)), "exceed the model's context"),  # 40 + gen 32 > 64
])
def test_bad_prompt_ids_are_400(ids, message):
    error = error_of(check_prompt_ids, ids, "prompt", MODEL, 32, 40)
    assert error.status == 400 and message in error.message and error.message.startswith(("prompt:", "max_tokens:"))


def test_every_prompt_form_is_tokenized(tokenizer):
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert completion_prompts(completion(prompt="the cat"), tokenizer, CONFIG) == [encode("the cat")]
    assert completion_prompts(completion(prompt=["a", "the dog"]), tokenizer, CONFIG) == \
        [encode("a"), encode("the dog")]
    assert completion_prompts(completion(prompt=[7, 8]), tokenizer, CONFIG) == [[7, 8]]
    assert completion_prompts(completion(prompt=[[7], [8, 9]]), tokenizer, CONFIG) == [[7], [8, 9]]
    assert error_of(completion_prompts, completion(prompt=["a"] * 4), tokenizer, CONFIG).param == "prompt"
    assert "characters" in error_of(completion_prompts, completion(prompt="x" * 5000), tokenizer, CONFIG).message


def test_chat_messages_use_the_tokenizers_template_in_the_released_shape(tokenizer):
    from pipelines.tokenizer import chat_template

    tokenizer.chat_template = chat_template()
    body = ChatCompletionRequest.model_validate({"model": "llada-moe", "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "the "}, {"type": "text", "text": "cat"}]},
        {"role": "assistant", "content": "sat", "refusal": None, "tool_calls": None},
        {"role": "user", "content": "on"}]})
    expected = format_chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat"},
                            {"role": "assistant", "content": "sat"}, {"role": "user", "content": "on"}])
    ids = chat_prompt(body, tokenizer, CONFIG)
    assert ids == tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert special_token_ids(tokenizer).role_end in ids


def test_sample_requests_check_every_prompt_and_share_one_deadline():
    sampling = resolve(max_tokens=4)
    requests = sample_requests([[5, 6], [7]], sampling, MODEL, CONFIG, "prompt")
    assert [r.prompt_ids for r in requests] == [(5, 6), (7,)] and requests[0].deadline == requests[1].deadline
    assert requests[0].request_id != requests[1].request_id
    assert requests[0].options == sampling.options and requests[0].eot_id == MODEL.eot_id
    assert error_of(sample_requests, [[5], [1]], sampling, MODEL, CONFIG, "prompt").status == 400


@pytest.mark.parametrize("fields,needle", [
    (dict(n=2), "n: only n=1"),
    (dict(top_p=0.5), "top_p: nucleus sampling"),
    (dict(logprobs=3), "logprobs"),
    (dict(echo=True), "echo"),
    (dict(frequency_penalty=1.0), "penalties"),
    (dict(logit_bias={"5": 1.0}), "logit_bias"),
    (dict(stop=["a", "b", "c", "d", "e"]), "at most 4 stop sequences"),
    (dict(temperature=-1), "temperature"),
    (dict(temperature="0.5"), "temperature"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(prompt=[]), "must not be an empty list"),
    (dict(prompt=["a", 5]), "expected a string, a list of strings"),
    (dict(prompt="\ud800"), "lone surrogate"),
    (dict(remasking="top_k"), "remasking"),
    (dict(surprise=1), "surprise"),
    (dict(stream_options={"include_usage": True}), "stream_options: only allowed when stream is true"),
])
def test_unsupported_or_malformed_openai_fields_fail_validation(fields, needle):
    with pytest.raises(ValidationError) as caught:
        completion(**fields)
    assert needle in str(caught.value)


def test_no_op_values_of_openai_options_are_accepted():
    body = completion(n=1, top_p=1.0, frequency_penalty=0, presence_penalty=0.0, logit_bias={}, echo=False,
                      logprobs=None, best_of=1, user="me", stream=True, stream_options={"include_usage": True})
    assert body.n == 1 and completion(stream_options=None).stream_options is None
    chat = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                 "tools": None, "response_format": {"type": "text"},
                                                 "max_completion_tokens": 5})
    assert chat.requested_max_tokens() == 5
    with pytest.raises(ValidationError, match="tool calling"):
        ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                              "tools": [{"type": "function"}]})


def test_model_level_errors_name_their_field_for_error_param():
    """pydantic locates a model validator's error at the model; the field goes in its context."""
    for fields, param in ((dict(n=2), "n"), (dict(stream_options={}), "stream_options")):
        with pytest.raises(ValidationError) as caught:
            completion(**fields)
        assert caught.value.errors()[0]["ctx"]["param"] == param


def test_assistant_messages_may_carry_openai_response_fields_which_are_ignored(tokenizer):
    copied = {"role": "assistant", "content": "sat", "refusal": None, "annotations": [], "tool_calls": None}
    body = ChatCompletionRequest.model_validate({"model": "m", "messages": [
        {"role": "user", "content": "the cat"}, copied, {"role": "user", "content": "on"}]})
    plain = ChatCompletionRequest.model_validate({"model": "m", "messages": [
        {"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat"},
        {"role": "user", "content": "on"}]})
    assert chat_prompt(body, tokenizer, CONFIG) == chat_prompt(plain, tokenizer, CONFIG)
    with pytest.raises(ValidationError, match="only assistant messages carry annotations"):
        ChatCompletionRequest.model_validate({"model": "m", "messages": [
            {"role": "user", "content": "x", "annotations": []}]})
