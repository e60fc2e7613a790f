"""Classifier-free guidance (LLADA_SPEC section 6), written once for the sampler and the
likelihood estimator: a second pass with the prompt replaced by MASK, then
``logits = uncond + (cfg + 1) * (cond - uncond)``.

Legend: B batch, L length, X positions whose logits are kept, V vocab.
"""

from __future__ import annotations

import torch


def with_unconditional_rows(
    ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor | None, prompt: int | torch.Tensor, mask_id: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The batch followed by its unconditional copy (prompt positions set to MASK) -> ([2B, L],
    mask [2B, L] or None), so both passes run in one forward.

    ``prompt`` is the prompt's length (the first columns of every row) or a bool [B, L] of the
    prompt positions, for batches whose rows have their prompts at different columns.
    """
    unconditional_BL = ids_BL.clone()
    if isinstance(prompt, torch.Tensor):
        unconditional_BL[prompt] = mask_id
    else:
        unconditional_BL[:, :prompt] = mask_id
    both_mask = None if attention_mask_BL is None else torch.cat([attention_mask_BL, attention_mask_BL])
    return torch.cat([ids_BL, unconditional_BL]), both_mask


def guided(logits_2BXV: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """Conditional rows first, unconditional rows second -> the guided logits [B, X, V] in float32."""
    conditional_BXV, unconditional_BXV = logits_2BXV.float().chunk(2, dim=0)
    return unconditional_BXV + (cfg_scale + 1) * (conditional_BXV - unconditional_BXV)
