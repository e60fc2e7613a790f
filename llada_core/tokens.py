"""Special tokens of LLaDA-MoE and the chat format of the released instruct model.

Only the token *strings* live here; their ids always come from a tokenizer or a config
(LLADA_SPEC sections 1 and 8).
"""

EOS_TOKEN = "<|endoftext|>"  # also the pad token
MASK_TOKEN = "<|mask|>"
ROLE_START = "<role>"
ROLE_CLOSE = "</role>"
ROLE_END = "<|role_end|>"  # end of a turn

# In this order the demo tokenizer gives them ids 0..4 (so EOS = pad = 0, mask = 1).
SPECIAL_TOKENS: tuple[str, ...] = (EOS_TOKEN, MASK_TOKEN, ROLE_START, ROLE_CLOSE, ROLE_END)

ROLE_NAMES = {"system": "SYSTEM", "user": "HUMAN", "assistant": "ASSISTANT"}


def format_chat(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """Render messages in the released shape:
    ``<role>SYSTEM</role>{system}<|role_end|><role>HUMAN</role>{user}<|role_end|><role>ASSISTANT</role>``.
    """
    parts = []
    for number, message in enumerate(messages):
        role = message.get("role")
        if role not in ROLE_NAMES:
            raise ValueError(f"messages[{number}].role: {role!r} is not one of {sorted(ROLE_NAMES)}")
        content = message.get("content")
        if not isinstance(content, str):
            raise ValueError(f"messages[{number}].content: expected a string")
        parts.append(f"{ROLE_START}{ROLE_NAMES[role]}{ROLE_CLOSE}{content}{ROLE_END}")
    if add_generation_prompt:
        parts.append(f"{ROLE_START}{ROLE_NAMES['assistant']}{ROLE_CLOSE}")
    return "".join(parts)
