"""How to sample an answer: one typed, self-validating object that every sampler caller passes
around (generate(), the eval suite, `llada generate`, the server).

The fields are the arguments of the official LLaDA ``generate()`` with the same names and
meaning (LLADA_SPEC section 6), plus the fast options of Fast-dLLM / dInfer. The token ids
(mask, EOS, end of turn) are not sampling options: they come from the model and tokenizer.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

REMASKING_STRATEGIES = ("low_confidence", "random")
CACHE_MODES = ("prefix", "dual")

# The fast options the eval suite, the server and `llada generate` use unless told otherwise,
# chosen by measurement (benchmarks/sampler.py; benchmarks/RESULTS.md "## Sampler"): on a trained
# tiny model (gen 256, block 32, 64 prompts) 116x the reference's tokens/s at equal exact match
# (53.1%); dual beat prefix at equal quality (its step is 6.5x cheaper at gen 512, ``small``
# preset), and thresholds 0.7-0.9 needed the same number of forwards, so the most conservative
# of them was kept.
FAST_OPTIONS: dict[str, Any] = {"threshold": 0.9, "cache": "dual", "early_stop": True}


class SamplingOptions(BaseModel):
    """The sampler's settings, checked once when built (a bad value raises ValueError naming it).

    gen_length: answer tokens to generate, a multiple of ``block_length``.
    block_length: tokens per semi-autoregressive block; left out, ``gen_length`` (one block).
    steps: sampling steps in total, split evenly over the blocks; at most ``gen_length``
        (unused with a ``threshold``); left out, ``gen_length`` (one commit per step).
    temperature: 0 is greedy (argmax); > 0 samples by Gumbel-max in float64.
    cfg_scale: classifier-free guidance weight; 0 turns it off.
    remasking: ``low_confidence`` or ``random``: which predictions to commit first.
    logits_eos_inf: never predict EOS. confidence_eos_eot_inf: commit EOS / end-of-turn last.
    threshold: None (the fixed schedule of ``steps``) or tau in (0, 1]: every step commits each
        masked position of the block whose confidence >= tau, and at least the most confident.
    cache: None, ``prefix`` or ``dual`` KV cache (a full forward at each block start, then only
        the block and after it, or only the block, against cached keys/values).
    early_stop: after each block, rows whose answer so far ends in EOS are EOS to the end, and
        sampling stops once every row is.

    The defaults are the official generate()'s (the reference loop); :meth:`fast` adds
    ``FAST_OPTIONS``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    gen_length: int = Field(128, ge=1)
    block_length: int = Field(128, ge=1)
    steps: int = Field(128, ge=1)
    temperature: float = Field(0.0, ge=0.0, allow_inf_nan=False)
    cfg_scale: float = Field(0.0, ge=0.0, allow_inf_nan=False)
    remasking: Literal["low_confidence", "random"] = "low_confidence"
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False
    threshold: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    cache: Literal["prefix", "dual"] | None = None
    early_stop: bool = False

    @model_validator(mode="before")
    @classmethod
    def _lengths_default_to_gen_length(cls, values: Any) -> Any:
        """block_length and steps left out follow gen_length (one block, one commit per step);
        with every length left out this is the official default, 128 / 128 / 128."""
        if isinstance(values, dict) and isinstance(values.get("gen_length"), int):
            values = {"block_length": values["gen_length"], "steps": values["gen_length"], **values}
        return values

    @model_validator(mode="after")
    def _check(self) -> "SamplingOptions":
        if self.gen_length % self.block_length:
            raise ValueError(f"block_length: {self.block_length} must divide gen_length={self.gen_length}")
        if self.threshold is None and self.steps % self.num_blocks:
            raise ValueError(f"steps: {self.steps} must be divisible by the number of blocks "
                             f"({self.num_blocks} = gen_length / block_length)")
        if self.threshold is None and self.steps > self.gen_length:
            raise ValueError(f"steps: {self.steps} exceeds gen_length={self.gen_length}; a step must commit "
                             "at least one token")
        if self.threshold is not None and self.remasking != "low_confidence":
            raise ValueError(f"threshold: needs remasking='low_confidence' (a {self.remasking} confidence is "
                             "not a probability)")
        return self

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    @property
    def stochastic(self) -> bool:
        """Whether the answer depends on random draws (a seed then matters)."""
        return self.temperature > 0 or self.remasking == "random"

    @classmethod
    def checked(cls, **fields: Any) -> "SamplingOptions":
        """Build from keyword values; a bad one raises ValueError ``"<field>: <problem>"``."""
        try:
            return cls(**fields)
        except ValidationError as error:
            raise ValueError(describe_error(error)) from None

    @classmethod
    def fast(cls, **fields: Any) -> "SamplingOptions":
        """``FAST_OPTIONS`` under ``fields`` (which win), checked."""
        return cls.checked(**{**FAST_OPTIONS, **fields})

    def replace(self, **fields: Any) -> "SamplingOptions":
        """A copy with ``fields`` changed, checked again."""
        return self.checked(**{**self.model_dump(), **fields})


def describe_error(error: ValidationError) -> str:
    """The first problem of a SamplingOptions validation error as ``"<field>: <problem>"``."""
    problem = error.errors()[0]
    message = str(problem["msg"]).removeprefix("Value error, ")
    field = ".".join(str(part) for part in problem["loc"])
    if not field:  # a cross-field check: its message already names the field
        return message
    return f"{field}: {message}, got {problem.get('input')!r}"
