"""Answers from a checkpoint in one process (`llada generate`, the demo's samples): the model and
tokenizer of an HF-layout folder (local or s3://), prompts left-padded into one generate() call."""

from __future__ import annotations

from llada_core.options import SamplingOptions
from pipelines import storage


def sample_answers(checkpoint_uri: str, prompts: list[str], options: SamplingOptions, chat: bool = True,
                   temperature_seed: int = 0, s3: storage.S3Settings | None = None) -> list[str]:
    """One answer per prompt (a user message in the chat template, or raw text with ``chat``
    False), cut at the first end of turn / EOS and decoded without special tokens."""
    import torch

    from llada_core import generate, left_pad, load_model
    from llada_core.tokens import format_chat
    from pipelines.tokenizer import load_tokenizer, special_token_ids

    with storage.local_copy(checkpoint_uri, s3, prefix="llada-generate-") as folder:
        model = load_model(folder, dtype=torch.float32).eval()
        tokenizer = load_tokenizer(folder)
    ids = special_token_ids(tokenizer)
    texts = [format_chat([{"role": "user", "content": p}]) if chat else p for p in prompts]
    prompt_BP, mask_BP = left_pad([tokenizer.encode(text, add_special_tokens=False) for text in texts], ids.pad)
    generator = torch.Generator().manual_seed(temperature_seed)
    out_BL = generate(model, prompt_BP, attention_mask=mask_BP, options=options, eot_id=ids.role_end,
                      generator=generator)
    answers = []
    for row in out_BL[:, prompt_BP.shape[1]:].tolist():
        end = next((i for i, token in enumerate(row) if token in (ids.role_end, ids.eos)), len(row))
        answers.append(tokenizer.decode(row[:end], skip_special_tokens=True).strip())
    return answers
