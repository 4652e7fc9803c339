"""The chat format: conversations, their JSONL files, and how they become token ids and a loss mask.

A conversation is rendered as token ids (`encode_conversation`, the one rendering; the Hugging Face chat template,
`chat_template`, renders the same ids):

    <|endoftext|>  then, for each message,  <|ROLE|> content <|end|>

with ROLE one of system, user, assistant; a prompt for generation (`encode_prompt`) ends with <|assistant|>, which
the model answers with content and <|end|>. The four chat tokens are special tokens of the tokenizer, as
<|endoftext|> is (tokenizer.special_tokens), and have the same two locks: the tokenizer encodes a special-token
string in text as plain text, and content is neutralised first (llm/special_tokens.py: a U+2060 after the first
character of each literal special-token string), so that typed text never becomes a control token and the
Hugging Face template, which renders text that transformers then tokenizes matching special tokens, gives the same ids.

The loss mask (`EncodedConversation.trained`): the tokens of an assistant message's content and its closing
<|end|> are trained targets; everything else (the leading <|endoftext|>, role tokens, system and user messages) is
not. trained[i] is about token i as a target, predicted from the tokens before it.

Conversation files are JSONL, one conversation per line (OpenAI's and TRL's convention):

    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}

Other keys are ignored. A line that is not a valid conversation is counted under one reason (DROP_REASONS) and
skipped, never a crash; a file that cannot be read at all is an InputError naming it.
"""

import collections
import dataclasses
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from llm.config import EOT
from llm.errors import InputError
from llm.fileio import write_bytes_atomic
from llm.special_tokens import neutralise_special_tokens, neutralised

SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
CHAT_TOKENS = (SYSTEM, USER, ASSISTANT, END)
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
ROLES = tuple(ROLE_TOKENS)

# Why a conversation is dropped, in the order they are checked (a line is counted under the first that applies).
DROP_REASONS = {
    "bad_json": "the line is not valid JSON (or holds an unpaired surrogate escape, which is no text)",
    "not_an_object": 'not {"messages": [{"role": str, "content": str}, ...]}',
    "unknown_role": f"a role other than {', '.join(ROLES)}",
    "empty_content": "a message whose content is empty or only whitespace",
    "no_assistant": "no assistant message",
    "bad_order": "a system message only first; then user and assistant alternate, from user to assistant",
    "too_long": "more tokens than the context holds (block_size + 1)",
}


class BadConversation(ValueError):
    """A conversation that cannot be trained on; `reason` is a key of DROP_REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail or DROP_REASONS[reason]}")
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Message:
    role: str  # one of ROLES
    content: str


@dataclasses.dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]

    def to_json(self) -> dict[str, Any]:
        """The JSONL line's object (`parse_conversation` reads it back)."""
        return {"messages": [{"role": m.role, "content": m.content} for m in self.messages]}


@dataclasses.dataclass(frozen=True)
class EncodedConversation:
    ids: list[int]
    trained: list[bool]  # trained[i]: token i is a target the loss counts (an assistant's content or its <|end|>)

    def inputs_and_targets(self) -> tuple[list[int], list[int]]:
        """(x, y) for next-token training: x = ids[:-1], y[i] = ids[i + 1] where that token is trained, else -1
        (the model's loss ignores -1)."""
        targets = [t if keep else -1 for t, keep in zip(self.ids[1:], self.trained[1:], strict=True)]
        return self.ids[:-1], targets


@dataclasses.dataclass(frozen=True)
class ChatTokens:
    """The control-token ids a conversation is rendered with, read from a tokenizer."""

    eot: int
    system: int
    user: int
    assistant: int
    end: int
    specials: tuple[str, ...]  # every special-token string of the tokenizer, by id: what content is neutralised of

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, path: Path | str) -> "ChatTokens":
        """InputError naming `path` (the tokenizer's file) when a chat token is not one of its special tokens."""
        specials = _special_strings(tokenizer)
        missing = [token for token in (EOT, *CHAT_TOKENS) if token not in specials]
        if missing:
            raise InputError(f"{path}: the tokenizer has no chat token {', '.join(missing)}; add "
                             f"{', '.join(CHAT_TOKENS)} to tokenizer.special_tokens in params.yaml and rerun the "
                             "pipeline from the tokenizer stage (the base model is retrained: its vocabulary changes)")
        ids = {token: tokenizer.token_to_id(token) for token in (EOT, *CHAT_TOKENS)}
        return cls(eot=ids[EOT], system=ids[SYSTEM], user=ids[USER], assistant=ids[ASSISTANT], end=ids[END],
                   specials=specials)

    @staticmethod
    def present(tokenizer: Tokenizer) -> bool:
        """Whether the tokenizer has every chat token among its special tokens."""
        return set(_special_strings(tokenizer)) >= {EOT, *CHAT_TOKENS}

    def role(self, role: str) -> int:
        return {"system": self.system, "user": self.user, "assistant": self.assistant}[role]

    @property
    def control_ids(self) -> frozenset[int]:
        return frozenset((self.eot, self.system, self.user, self.assistant, self.end))


def _special_strings(tokenizer: Tokenizer) -> tuple[str, ...]:
    """The tokenizer's special tokens, by id (added tokens that are not special are matched in text)."""
    return tuple(token.content for _, token in sorted(tokenizer.get_added_tokens_decoder().items()) if token.special)


# --- parsing and reading ------------------------------------------------------------------------------------

def parse_conversation(obj: Any) -> Conversation:
    """A conversation from one JSONL line's parsed value; BadConversation naming the first reason it fails."""
    messages = obj.get("messages") if isinstance(obj, dict) else None
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    ):
        raise BadConversation("not_an_object")
    parsed = tuple(Message(m["role"], m["content"]) for m in messages)
    if not all(_is_text(m.content) for m in parsed):
        raise BadConversation("bad_json", "content holds an unpaired surrogate escape (\\ud800), which is no text")
    if any(m.role not in ROLE_TOKENS for m in parsed):
        raise BadConversation("unknown_role")
    if any(not m.content.strip() for m in parsed):
        raise BadConversation("empty_content")
    if not any(m.role == "assistant" for m in parsed):
        raise BadConversation("no_assistant")
    turns = parsed[1:] if parsed[0].role == "system" else parsed
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(turns))]
    if [m.role for m in turns] != expected or turns[-1].role != "assistant":
        raise BadConversation("bad_order")
    return Conversation(parsed)


def _is_text(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def parse_line(line: str) -> Conversation:
    """A conversation from one JSONL line; BadConversation when it is not one."""
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        raise BadConversation("bad_json") from None
    return parse_conversation(obj)


def read_conversations(paths: Iterable[Path]) -> tuple[list[Conversation], collections.Counter]:
    """Every valid conversation in the JSONL files `paths`, in order, and the lines dropped, counted by reason.
    Blank lines are skipped. InputError naming the file when one is missing, unreadable or not UTF-8."""
    conversations, dropped = [], collections.Counter()
    for path in paths:
        for line in _lines(Path(path)):
            if not line.strip():
                continue
            try:
                conversations.append(parse_line(line))
            except BadConversation as bad:
                dropped[bad.reason] += 1
    return conversations, dropped


def _lines(path: Path) -> Iterable[str]:
    try:
        with path.open("rb") as f:
            for number, raw in enumerate(f, 1):
                try:
                    yield raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise InputError(f"{path}: line {number} is not UTF-8 text; conversations are JSONL in "
                                     "UTF-8") from None
    except FileNotFoundError:
        raise InputError(f"{path}: conversation file not found") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read it ({err.strerror or err})") from None


def write_conversations(path: Path, conversations: Iterable[Conversation]) -> None:
    """A JSONL file of `conversations` that read_conversations reads back, written atomically."""
    text = "".join(json.dumps(c.to_json(), ensure_ascii=False) + "\n" for c in conversations)
    write_bytes_atomic(Path(path), text.encode())


# --- token ids and the loss mask -----------------------------------------------------------------------------

def encode_content(tokenizer: Tokenizer, tokens: ChatTokens, content: str) -> list[int]:
    """A message's content as token ids: neutralised, then encoded as plain text (never a control id)."""
    text, _ = neutralise_special_tokens(content, tokens.specials)
    return tokenizer.encode(text, add_special_tokens=False).ids


def encode_conversation(tokenizer: Tokenizer, tokens: ChatTokens, conversation: Conversation) -> EncodedConversation:
    """The conversation's token ids and which of them are trained targets: the one rendering and the one mask."""
    ids, trained = [tokens.eot], [False]
    for message in conversation.messages:
        content = encode_content(tokenizer, tokens, message.content)
        is_answer = message.role == "assistant"
        ids += [tokens.role(message.role), *content, tokens.end]
        trained += [False] + [is_answer] * (len(content) + 1)
    return EncodedConversation(ids, trained)


def fits_context(encoded: EncodedConversation, block_size: int) -> bool:
    """Whether a model of `block_size` trains on the whole conversation: block_size inputs and, shifted by one,
    as many targets, so block_size + 1 tokens (more: too_long)."""
    return len(encoded.ids) <= block_size + 1


def encode_conversations(tokenizer: Tokenizer, tokens: ChatTokens, conversations: Iterable[Conversation],
                         block_size: int) -> tuple[list[EncodedConversation], collections.Counter]:
    """Each conversation encoded, those that do not fit the context (fits_context) left out and counted under
    too_long."""
    encoded, dropped = [], collections.Counter()
    for conversation in conversations:
        one = encode_conversation(tokenizer, tokens, conversation)
        if not fits_context(one, block_size):
            dropped["too_long"] += 1
        else:
            encoded.append(one)
    return encoded, dropped


def encode_prompt(tokenizer: Tokenizer, tokens: ChatTokens, messages: Sequence[Message]) -> list[int]:
    """The conversation so far and the generation prompt <|assistant|>: what the model answers, ending its answer
    with <|end|>. The ids equal encode_conversation's up to where the next answer's content would start."""
    ids = encode_conversation(tokenizer, tokens, Conversation(tuple(messages))).ids
    return [*ids, tokens.assistant]


# --- the Hugging Face chat template --------------------------------------------------------------------------

def _jinja_string(text: str) -> str:
    """`text` as a Jinja string literal in ASCII: Jinja decodes its literals' \\u and \\U escapes."""
    out = []
    for char in text:
        if char.isascii() and char.isprintable() and char not in "'\\":
            out.append(char)
        elif ord(char) <= 0xFFFF:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(f"\\U{ord(char):08x}")
    return "'" + "".join(out) + "'"


def chat_template(tokens: ChatTokens) -> str:
    """The Jinja chat template for transformers' apply_chat_template that renders encode_conversation's text:
    the same control tokens, content neutralised by the same replacements in the same order, the assistant's
    content and <|end|> inside {% generation %} so that return_assistant_tokens_mask marks exactly the tokens
    `trained` marks; add_generation_prompt appends <|assistant|> (encode_prompt). The tokenizer must match
    special tokens in the rendered text (tokenizer_config split_special_tokens false)."""
    q = _jinja_string
    replaces = "".join(f" | replace({q(token)}, {q(neutralised(token))})" for token in tokens.specials)
    roles = ", ".join(f"{q(role)}: {q(token)}" for role, token in ROLE_TOKENS.items())
    return (
        "{#- llm chat format: <|endoftext|>, then <|ROLE|> content <|end|> per message (llm/chat.py) -#}\n"
        f"{{%- set role_tokens = {{{roles}}} -%}}\n"
        f"{{{{- {q(EOT)} -}}}}\n"
        "{%- for message in messages -%}\n"
        "  {%- if message['role'] not in role_tokens -%}\n"
        f"    {{{{- raise_exception({q('roles are ' + ', '.join(ROLES) + '; got ')} + message['role']) -}}}}\n"
        "  {%- endif -%}\n"
        "  {%- if message['content'] is not string -%}\n"
        f"    {{{{- raise_exception({q('message content must be a string')}) -}}}}\n"
        "  {%- endif -%}\n"
        f"  {{%- set content = message['content']{replaces} -%}}\n"
        "  {{- role_tokens[message['role']] -}}\n"
        "  {%- if message['role'] == 'assistant' -%}\n"
        f"    {{%- generation -%}}{{{{- content + {q(END)} -}}}}{{%- endgeneration -%}}\n"
        "  {%- else -%}\n"
        f"    {{{{- content + {q(END)} -}}}}\n"
        "  {%- endif -%}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}\n"
        f"  {{{{- {q(ASSISTANT)} -}}}}\n"
        "{%- endif -%}\n"
    )
