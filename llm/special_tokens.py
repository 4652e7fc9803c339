"""Literal special-token strings in text: defused so that text never encodes to a control token.

One rule, used by clean (on the corpus) and by the chat encoder (on conversation content), and rendered by the
Hugging Face chat template (llm/chat.py) as the same replacements, so that all three give the same text.
"""

from collections.abc import Iterable

# Inserted after the first character of a literal special token found in text, so that it reads the
# same but can never match the token (U+2060 WORD JOINER: invisible, no line break, not a control char).
NEUTRALISER = "\u2060"


def neutralised(token: str) -> str:
    """What a literal occurrence of `token` becomes in text."""
    return token[0] + NEUTRALISER + token[1:]


def neutralise_special_tokens(text: str, special_tokens: Iterable[str]) -> tuple[str, int]:
    """Defuse every literal occurrence of a special token so it stays plain text downstream."""
    total = 0
    for token in special_tokens:
        count = text.count(token)
        if count:
            text = text.replace(token, neutralised(token))
            total += count
    return text, total
