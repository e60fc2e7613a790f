"""A tiny LLaDA-MoE that really answers and really stops: trained in the test session (seconds on
a CPU) to answer a few chat questions, each answer followed by ``<|role_end|>`` and EOS padding
(LLADA_SPEC section 4), the way an SFT model ends its answers.

Random test models never commit EOS inside a block, so they cannot show what happens to an answer
that ends mid-block or crosses a block boundary under early stop; this one does. The answers have
different lengths so that, at block_length 4, some end inside the first block and others run over
one, two or three block boundaries.

Legend: B batch, L length (prompt + answer), G answer positions.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llada_core import LLaDAMoEModelLM, preset, save_model
from llada_core.losses import forward_process, sft_loss
from llada_core.tokens import ROLE_END, format_chat
from pipelines.tokenizer import save_tokenizer, special_token_ids, train_bpe

# question -> answer. With <|role_end|>, the answers are 5 to 25 tokens long (the byte-level BPE
# below has few merges), so at block_length 4 an answer ends in block 1 to 6, at block_length 8
# inside block 0 to 3, and at block_length 16 inside block 0 or 1 of 2.
QUESTIONS = {
    "where is the cat?": "on the mat.",
    "what does the dog do?": "the dog runs in the park all day long.",
    "who sells shells?": "she does.",
    "count to five.": "one two three four five.",
    "what is red?": "the hen.",
    "where does the fox sleep?": "the red fox sleeps in the barn by the old mill.",
}
ANSWER_POSITIONS = 32  # training rows are padded with EOS to this many answer positions
# 200 AdamW steps over the six rows repeated 4 times: about 8 s on 2 CPU cores, and every answer
# right under the reference sampler and the fast options at block lengths 4 to 32 (seed 0).
TRAIN_STEPS = 200
REPEAT = 4
LR = 3e-3
VOCAB = 300
TEXTS = [f"{q} {a}" for q, a in QUESTIONS.items()] * 20


def chat_prompt(question: str) -> str:
    return format_chat([{"role": "user", "content": question}])


def _rows(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    """Every question as prompt + answer + <|role_end|> + EOS padding -> (ids [B, L], response [B, L]).
    Prompts are left-padded with EOS to one width; padding is attended like text, which is
    harmless here because the model only has to tell these six prompts apart."""
    ids = special_token_ids(tokenizer)
    prompts = [tokenizer.encode(chat_prompt(q), add_special_tokens=False) for q in QUESTIONS]
    answers = [tokenizer.encode(a + ROLE_END, add_special_tokens=False) for a in QUESTIONS.values()]
    width = max(len(p) for p in prompts)
    rows, response = [], []
    for prompt, answer in zip(prompts, answers, strict=True):
        assert len(answer) < ANSWER_POSITIONS
        padded_answer = answer + [ids.eos] * (ANSWER_POSITIONS - len(answer))
        rows.append([ids.eos] * (width - len(prompt)) + prompt + padded_answer)
        response.append([False] * width + [True] * ANSWER_POSITIONS)
    return torch.tensor(rows), torch.tensor(response)


def train_answering_model(seed: int = 0) -> tuple[LLaDAMoEModelLM, object]:
    """-> (trained model in eval mode, its tokenizer). Deterministic for a seed."""
    tokenizer = train_bpe(TEXTS, vocab_size=VOCAB, min_frequency=1)
    ids = special_token_ids(tokenizer)
    torch.manual_seed(seed)
    config = preset("tiny", vocab_size=VOCAB + 20, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4, expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                    max_position_embeddings=256, mask_token_id=ids.mask, eos_token_id=ids.eos,
                    pad_token_id=ids.pad)
    model = LLaDAMoEModelLM(config)
    ids_BL, response_BL = _rows(tokenizer)
    ids_BL, response_BL = ids_BL.repeat(REPEAT, 1), response_BL.repeat(REPEAT, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(TRAIN_STEPS):
        batch = forward_process(ids_BL, ids.mask, maskable=response_BL, generator=generator)
        loss = sft_loss(model(batch.noisy_ids).logits, ids_BL, batch, response_BL)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval(), tokenizer


def save_answering_checkpoint(directory: Path, seed: int = 0) -> str:
    """Train and write the model in the exported HF layout with its tokenizer -> the folder."""
    model, tokenizer = train_answering_model(seed)
    save_model(model, directory)
    save_tokenizer(tokenizer, str(directory))  # type: ignore[arg-type]
    return str(directory)
