"""LLaDA-MoE as an lm-evaluation-harness model, registered as ``llada``.

Importing this module registers the model with lm-eval's registry (lm-eval 0.4 discovers no
third-party models by itself: its registry has no plugin entry-point group, so a model is
registered by importing it). ``llada lm-eval ARGS`` is lm-eval's own command line with this
module imported first::

    llada lm-eval --model llada --model_args pretrained=runs/demo/stages/sft/checkpoint_000040/hf \\
        --tasks arc_easy --limit 50

and from Python: ``import jobs.evaluation.lm_eval_model`` then ``lm_eval.simple_evaluate(model="llada",
model_args=...)``, or pass an :class:`LLaDAEvalLM` built on a loaded model as ``model=``.

What each request type computes (a masked diffusion model has no left-to-right factorisation):

- ``loglikelihood(context, continuation)``: minus the Monte Carlo ELBO bound of the continuation
  given the context (LLADA_SPEC section 7; the official LLaDA estimator: stratified mask counts,
  ``mc_num`` samples, ``mc_batch_size`` per draw), a lower bound on log p. Each request draws
  from its own generator seeded by ``seed`` and its token ids, so its number does not depend on
  the batch it ran in or on the other requests. The second value, *is greedy*, is not defined
  for an MDM (there is no single greedy continuation of a fixed length); by default it is
  False, and with ``check_greedy=true`` it is whether the sampler, greedy, one token per step,
  fills exactly the continuation's tokens (what the official LLaDA evaluation does).
- ``loglikelihood_rolling(text)``: minus the ELBO of the whole text with an empty prompt; a
  text longer than ``max_length`` is scored in chunks of ``max_length // 2`` tokens, each given
  the ``max_length // 2`` tokens before it as its prompt (chain rule over chunks).
- ``generate_until(context, gen_kwargs)``: :func:`llada_core.generate` with the fast options
  by default (threshold 0.9, dual cache, early stop; ``fast=false`` for the reference loop),
  ``max_gen_toks`` tokens rounded up to whole blocks (or ``gen_length``), cut at the first
  EOS / end of turn, then at the first ``until`` string. ``do_sample`` with a ``temperature``
  samples; otherwise greedy. Prompts are left-padded into batches of ``batch_size``.

Model arguments (``--model_args k=v,...``): ``pretrained`` (an HF-layout folder, local or
s3://; our checkpoints' ``hf/`` exports and the released LLaDA-MoE folder), ``device``
(default: CUDA when present; a CUDA device where there is none falls back to the CPU, as
lm-eval's own --device defaults to cuda), ``dtype`` (float32 | bfloat16 | float16; default float32 on CPU,
bfloat16 on CUDA), ``batch_size`` (prompts per generate call, 16), ``mc_num`` (128),
``mc_batch_size`` (16), ``max_rows`` (likelihood rows per forward, across requests: 64),
``seed`` (0), ``block_length`` (32), ``gen_length``, ``steps``, ``threshold`` (0.9),
``cache`` (dual | prefix | none), ``early_stop`` (true), ``fast`` (true), ``check_greedy``
(false), ``max_length`` (the model's ``max_position_embeddings``).
An unknown argument is an error that names it.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Sequence

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from jobs.evaluation.tasks import decode_answer, split_context
from llada_core import elbo_nll_batched, generate, left_pad, load_model
from llada_core.options import FAST_OPTIONS, SamplingOptions
from llada_core.tokens import format_chat
from pipelines import storage
from pipelines.tokenizer import check_matches_config, load_tokenizer, tokenizer_hash

log = logging.getLogger(__name__)

MODEL_NAME = "llada"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's own default when a task gives none


def request_seed(seed: int, prompt_ids: Sequence[int], answer_ids: Sequence[int]) -> int:
    """The seed of one likelihood request's generator: from the run's seed and the request's
    token ids, so its estimate is the same in any batch and any order."""
    digest = hashlib.sha256(f"{seed}|{list(prompt_ids)}|{list(answer_ids)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the earliest of the ``until`` strings (lm-eval's contract: no stripping)."""
    return text[:min((index for index in (text.find(stop) for stop in stops) if index >= 0), default=len(text))]


@register_model(MODEL_NAME)
class LLaDAEvalLM(LM):
    """lm-eval's ``LM`` over a LLaDA-MoE checkpoint (module docstring)."""

    def __init__(self, pretrained: str | None = None, *, model: torch.nn.Module | None = None,
                 tokenizer: Any = None, device: str | None = None, dtype: str | None = None,
                 batch_size: int | str | None = 16, max_batch_size: int | None = None, mc_num: int = 128,
                 mc_batch_size: int = 16, max_rows: int = 64, seed: int = 0, block_length: int = 32,
                 gen_length: int | None = None, steps: int | None = None, threshold: float | None = 0.9,
                 cache: str | None = "dual", early_stop: bool = True, fast: bool = True,
                 check_greedy: bool = False, max_length: int | None = None,
                 s3: storage.S3Settings | None = None, **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"llada model_args: unknown argument(s) {sorted(unknown)}; see "
                             "jobs/evaluation/lm_eval_model.py for the accepted ones")
        if (pretrained is None) == (model is None):
            raise ValueError("llada model_args: give pretrained=<HF-layout folder> (or, from Python, a loaded "
                             "model and tokenizer)")
        for name, value in (("mc_num", mc_num), ("mc_batch_size", mc_batch_size), ("max_rows", max_rows),
                            ("block_length", block_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"llada model_args: {name} must be a positive integer, got {value!r}")
        if mc_num % mc_batch_size:
            raise ValueError(f"llada model_args: mc_num={mc_num} must be a multiple of mc_batch_size={mc_batch_size}")
        del max_batch_size  # lm-eval's command line passes it to every model; it bounds an automatic search
        if batch_size in (None, "auto") or (isinstance(batch_size, str) and batch_size.startswith("auto")):
            batch_size = 16  # no automatic search: a diffusion sampler's memory depends on gen_length
        batch_size = int(batch_size)
        if batch_size < 1:
            raise ValueError(f"llada model_args: batch_size must be >= 1, got {batch_size}")
        if cache not in ("dual", "prefix", "none", None):
            raise ValueError(f"llada model_args: cache must be dual, prefix or none, got {cache!r}")
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line passes --device (default cuda) to every model; like its HF model,
            # run on the CPU where there is no CUDA rather than fail.
            log.warning("llada: device %s requested but CUDA is not available; using the CPU", device)
            device = "cpu"
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"llada model_args: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        torch_dtype = DTYPES[dtype] if dtype else (torch.bfloat16 if self._device.type == "cuda" else torch.float32)
        if model is None:
            with storage.local_copy(str(pretrained), s3, prefix="llada-lm-eval-") as local:
                model = load_model(local, dtype=torch_dtype, device=self._device)
                tokenizer = load_tokenizer(local)
        elif tokenizer is None:
            raise ValueError("llada: a loaded model needs its tokenizer")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.special = check_matches_config(tokenizer, model.config)
        self.batch_size, self.mc_num, self.mc_batch_size, self.max_rows = batch_size, mc_num, mc_batch_size, max_rows
        self.seed, self.check_greedy = seed, check_greedy
        self.max_length = max_length or int(model.config.max_position_embeddings)
        self.gen_length = gen_length
        sampling: dict[str, Any] = dict(FAST_OPTIONS) if fast else {}
        if fast:
            sampling.update(threshold=threshold, cache=None if cache in ("none", None) else cache,
                            early_stop=early_stop)
        self._sampling, self._steps, self.block_length = sampling, steps, block_length
        self.options_for(block_length)  # a bad combination fails here, before any request

    # ----------------------------------------------------------------- lm-eval's interface

    @property
    def tokenizer_name(self) -> str:
        return f"llada-{tokenizer_hash(self.tokenizer)[:16]}"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tokenizer, "chat_template", None) or ""

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return format_chat(chat_history, add_generation_prompt=add_generation_prompt)

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = []
        for request in requests:
            context, continuation = request.args[0], request.args[1]
            prompt_ids, answer_ids = self._encode_pair(context, continuation)
            pairs.append((prompt_ids, answer_ids))
        nlls = self._elbo(pairs)
        greedy = self._greedy_matches(pairs) if self.check_greedy else [False] * len(pairs)
        results = []
        for request, nll, is_greedy in zip(requests, nlls, greedy):
            results.append((-nll, bool(is_greedy)))
            self.cache_hook.add_partial("loglikelihood", request.args, (-nll, bool(is_greedy)))
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        results = []
        for request in requests:
            ids = self._encode(request.args[0])
            if not ids:
                raise ValueError("loglikelihood_rolling: the text is empty after tokenisation")
            pairs = self.rolling_chunks(ids)
            total = -sum(self._elbo(pairs))
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return results

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        groups: dict[tuple[int, float], list[int]] = {}
        stops: list[tuple[str, ...]] = []
        for index, request in enumerate(requests):
            gen_length, temperature, until = self._generation_settings(request.args[1])
            stops.append(until)
            groups.setdefault((gen_length, temperature), []).append(index)
        for (gen_length, temperature), indices in groups.items():
            options = self.options_for(gen_length, temperature)
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                prompts = [self._encode(requests[i].args[0])[-(self.max_length - gen_length):] for i in batch]
                for index, text in zip(batch, self._sample(prompts, options)):
                    results[index] = cut_at_stops(text, stops[index])
                    self.cache_hook.add_partial("generate_until", requests[index].args, results[index])
        return [text if text is not None else "" for text in results]

    # ----------------------------------------------------------------- helpers

    def options_for(self, gen_length: int, temperature: float = 0.0) -> SamplingOptions:
        """The SamplingOptions of a generation of ``gen_length`` tokens (a multiple of the block)."""
        block_length = min(self.block_length, gen_length)
        fields = {**self._sampling, "gen_length": gen_length, "block_length": block_length,
                  "temperature": temperature}
        if self._steps is not None:
            fields["steps"] = self._steps
        try:
            return SamplingOptions.checked(**fields)
        except ValueError as error:
            raise ValueError(f"llada model_args: {error}") from None

    def rolling_chunks(self, ids: list[int]) -> list[tuple[list[int], list[int]]]:
        """(prompt, answer) pairs covering ``ids`` once (module docstring)."""
        if len(ids) <= self.max_length:
            return [([], ids)]
        half = self.max_length // 2
        return [(ids[max(0, start - half):start], ids[start:start + half]) for start in range(0, len(ids), half)]

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        prompt, answer = split_context(context, continuation)
        answer_ids = self._encode(answer)
        if not answer_ids:
            raise ValueError(f"loglikelihood: the continuation {continuation!r} is empty after tokenisation")
        prompt_ids = self._encode(prompt)
        # Keep the whole continuation and as much of the context as fits, nearest first.
        return prompt_ids[max(0, len(prompt_ids) + len(answer_ids) - self.max_length):], answer_ids[-self.max_length:]

    def _elbo(self, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
        generators = [torch.Generator(device=self._device).manual_seed(request_seed(self.seed, p, a)) for p, a in pairs]
        return elbo_nll_batched(self.model, pairs, generators, num_samples=self.mc_num, batch_size=self.mc_batch_size,
                                rows_per_forward=max(self.mc_batch_size, self.max_rows), mask_id=self.special.mask,
                                pad_id=self.special.pad)

    def _greedy_matches(self, pairs: list[tuple[list[int], list[int]]]) -> list[bool]:
        matches = []
        for prompt_ids, answer_ids in pairs:
            length = len(answer_ids)
            options = SamplingOptions.checked(gen_length=length, block_length=length, steps=length)
            prompt = torch.tensor([prompt_ids], dtype=torch.long, device=self._device)
            out = generate(self.model, prompt, options=options, mask_id=self.special.mask, eos_id=self.special.eos)
            matches.append(out[0, len(prompt_ids):].tolist() == list(answer_ids))
        return matches

    def _generation_settings(self, gen_kwargs: dict[str, Any]) -> tuple[int, float, tuple[str, ...]]:
        kwargs = dict(gen_kwargs or {})
        until = kwargs.pop("until", None) or ()
        until = (until,) if isinstance(until, str) else tuple(until)
        max_gen_toks = int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        if kwargs:
            log.warning("llada: ignoring generation arguments %s (not options of the diffusion sampler)", sorted(kwargs))
        gen_length = self.gen_length or max_gen_toks
        block = min(self.block_length, gen_length)
        gen_length = -(-gen_length // block) * block
        if gen_length >= self.max_length:
            raise ValueError(f"generate_until: {gen_length} answer tokens leave no room for a prompt in the model's "
                             f"{self.max_length}-token context; lower max_gen_toks or gen_length")
        return gen_length, temperature if do_sample else 0.0, tuple(s for s in until if s)

    @torch.inference_mode()
    def _sample(self, prompts: list[list[int]], options: SamplingOptions) -> list[str]:
        prompt_BP, mask_BP = left_pad(prompts, self.special.pad, self._device)
        generator = torch.Generator(device=self._device).manual_seed(self.seed)
        out_BL = generate(self.model, prompt_BP, attention_mask=mask_BP, options=options, mask_id=self.special.mask,
                          eos_id=self.special.eos, eot_id=self.special.role_end, generator=generator)
        stop_ids = (self.special.eos, self.special.role_end)
        return [decode_answer(self.tokenizer, row, stop_ids) for row in out_BL[:, prompt_BP.shape[1]:].tolist()]
