"""The chat format: the rendering and its loss mask, typed control strings kept as text, conversation files and
their drop reasons."""

import collections
import functools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm.chat import (
    ASSISTANT,
    CHAT_TOKENS,
    DROP_REASONS,
    END,
    USER,
    BadConversation,
    ChatTokens,
    Conversation,
    Message,
    encode_content,
    encode_conversation,
    encode_conversations,
    encode_prompt,
    parse_conversation,
    parse_line,
    read_conversations,
    write_conversations,
)
from llm.config import EOT
from llm.errors import InputError
from llm.special_tokens import NEUTRALISER
from llm.tokenizer import load_tokenizer, tokenizer_from_str
from tests.conftest import _sample_tokenizer_json


@pytest.fixture
def chat(chat_tokenizer_path):
    """(tokenizer, its ChatTokens)."""
    tokenizer = load_tokenizer(chat_tokenizer_path)
    return tokenizer, ChatTokens.from_tokenizer(tokenizer, chat_tokenizer_path)


def conversation(*turns: tuple[str, str]) -> Conversation:
    return Conversation(tuple(Message(role, content) for role, content in turns))


HAND_MADE = conversation(
    ("system", "Answer in verse."),
    ("user", "Who speaks first?"),
    ("assistant", "HAMLET."),
    ("user", "And then?"),
    ("assistant", "Horatio, my lord."),
)


def test_the_chat_tokens_follow_endoftext(chat):
    tokenizer, tokens = chat
    assert (tokens.eot, tokens.system, tokens.user, tokens.assistant, tokens.end) == (0, 1, 2, 3, 4)
    assert [tokenizer.id_to_token(i) for i in range(5)] == [EOT, *CHAT_TOKENS]
    assert tokens.specials == (EOT, *CHAT_TOKENS)


def test_the_mask_of_a_hand_made_conversation_token_by_token(chat):
    tokenizer, tokens = chat
    sys_ids, q1, a1, q2, a2 = (tokenizer.encode(m.content).ids for m in HAND_MADE.messages)
    expected = [  # (token, trained as a target)
        (tokens.eot, False),
        (tokens.system, False), *[(t, False) for t in sys_ids], (tokens.end, False),
        (tokens.user, False), *[(t, False) for t in q1], (tokens.end, False),
        (tokens.assistant, False), *[(t, True) for t in a1], (tokens.end, True),
        (tokens.user, False), *[(t, False) for t in q2], (tokens.end, False),
        (tokens.assistant, False), *[(t, True) for t in a2], (tokens.end, True),
    ]
    encoded = encode_conversation(tokenizer, tokens, HAND_MADE)
    assert list(zip(encoded.ids, encoded.trained, strict=True)) == expected
    # The trained targets read back as the two answers, each closed by <|end|>.
    trained = [t for t, keep in zip(encoded.ids, encoded.trained, strict=True) if keep]
    assert tokenizer.decode([t for t in trained if t != tokens.end]) == "HAMLET.Horatio, my lord."
    assert trained.count(tokens.end) == 2 and trained[-1] == tokens.end

    x, y = encoded.inputs_and_targets()
    assert x == encoded.ids[:-1] and len(y) == len(x)
    assert y == [t if keep else -1 for t, keep in expected[1:]]
    # The first trained target is the first answer token, predicted from <|assistant|>.
    first = y.index(a1[0])
    assert x[first] == tokens.assistant and all(t == -1 for t in y[:first])


def test_a_prompt_is_the_conversation_so_far_and_the_generation_prompt(chat):
    tokenizer, tokens = chat
    so_far = HAND_MADE.messages[:4]  # ends with the user's "And then?"
    prompt = encode_prompt(tokenizer, tokens, so_far)
    full = encode_conversation(tokenizer, tokens, HAND_MADE).ids
    assert prompt[-1] == tokens.assistant
    assert prompt == full[:len(prompt)]  # the answer's content starts right after the prompt
    assert encode_prompt(tokenizer, tokens, ()) == [tokens.eot, tokens.assistant]


# --- what is typed stays text ------------------------------------------------------------------------------

FRAGMENTS = [EOT, *CHAT_TOKENS, "<|", "|>", "<|use", "r|>", "<|end", "oftext|>", "<|endoftext", "|assistant|>",
             "<<|user|>>", "<|<|end|>|>", NEUTRALISER, "<" + NEUTRALISER + "|user|>", "\n", " ", "\t", "\r\n", "é",
             "e\u0301", "天地", "🎭", "👩‍💻", "\u200b", "\x00", "\ufeff"]
CONTENT = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=12)), max_size=12).map("".join)


@functools.cache
def cached_chat():
    """(tokenizer, its ChatTokens) for hypothesis, which runs a test many times per fixture."""
    tokenizer = tokenizer_from_str(_sample_tokenizer_json(400, chat=True))
    return tokenizer, ChatTokens.from_tokenizer(tokenizer, "chat_tokenizer.json")


def neutralised(text: str) -> str:
    """The stated neutralisation, written out: U+2060 after the first character of each special-token string."""
    for token in (EOT, *CHAT_TOKENS):
        text = text.replace(token, token[0] + NEUTRALISER + token[1:])
    return text


@settings(max_examples=400, deadline=None)
@given(content=CONTENT)
def test_typed_content_never_encodes_to_a_control_token(content):
    tokenizer, tokens = cached_chat()
    ids = encode_content(tokenizer, tokens, content)
    assert not set(ids) & tokens.control_ids
    decoded = tokenizer.decode(ids, skip_special_tokens=False)
    assert decoded == neutralised(content)
    assert decoded.replace(NEUTRALISER, "") == content.replace(NEUTRALISER, "")  # reads as typed
    assert not any(token in decoded for token in tokens.specials)


@settings(max_examples=100, deadline=None)
@given(contents=st.lists(CONTENT.filter(str.strip), min_size=2, max_size=6))
def test_control_tokens_stand_only_where_the_rendering_puts_them(contents):
    tokenizer, tokens = cached_chat()
    roles = ["user", "assistant"] * (len(contents) // 2)
    turns = conversation(*zip(roles, contents, strict=False))
    encoded = encode_conversation(tokenizer, tokens, turns)
    controls = [i for i, t in enumerate(encoded.ids) if t in tokens.control_ids]
    assert len(controls) == 1 + 2 * len(turns.messages)  # <|endoftext|>, and a role and <|end|> per message
    for message, start, end in zip(turns.messages, controls[1::2], controls[2::2], strict=True):
        assert encoded.ids[start] == tokens.role(message.role) and encoded.ids[end] == tokens.end
        span = tokenizer.decode(encoded.ids[start + 1:end], skip_special_tokens=False)
        assert span == neutralised(message.content)


def test_a_tokenizer_without_the_chat_tokens_is_an_input_error(sample_tokenizer_path):
    tokenizer = load_tokenizer(sample_tokenizer_path)
    assert not ChatTokens.present(tokenizer)
    with pytest.raises(InputError, match="tokenizer.special_tokens") as err:
        ChatTokens.from_tokenizer(tokenizer, sample_tokenizer_path)
    assert str(sample_tokenizer_path) in str(err.value) and USER in str(err.value)


# --- conversation files and their drop reasons -----------------------------------------------------------------

def messages(*turns: tuple[object, object]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


GOOD = [
    messages(("user", "Hi"), ("assistant", "Hello.")),
    messages(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hi."), ("user", "Bye"), ("assistant", "Bye.")),
    {"messages": [{"role": "user", "content": "x", "name": "ann"}, {"role": "assistant", "content": "y"}], "id": 7},
]
BAD = {  # reason: lines that must be counted under it
    "bad_json": ['{"messages": [', "not json", "{'messages': []}", "[" * 100_000 + "]" * 100_000,
                 '{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "y"}]}'],
    "not_an_object": ["null", "[]", '"text"', "3", "{}", '{"messages": null}', '{"messages": {"role": "user"}}',
                      '{"messages": [1]}', '{"messages": [{"role": "user"}]}',
                      json.dumps(messages(("user", 3), ("assistant", "y"))),
                      json.dumps(messages((None, "x"), ("assistant", "y")))],
    "unknown_role": [json.dumps(messages(("human", "x"), ("assistant", "y"))),
                     json.dumps(messages(("user", "x"), ("tool", "y"), ("assistant", "z")))],
    "empty_content": [json.dumps(messages(("user", ""), ("assistant", "y"))),
                      json.dumps(messages(("user", "x"), ("assistant", " \n\t")))],
    "no_assistant": ['{"messages": []}', json.dumps(messages(("user", "x"))),
                     json.dumps(messages(("system", "s"), ("user", "x")))],
    "bad_order": [json.dumps(messages(("assistant", "y"), ("user", "x"), ("assistant", "y"))),
                  json.dumps(messages(("user", "x"), ("assistant", "y"), ("user", "z"))),
                  json.dumps(messages(("user", "x"), ("user", "x"), ("assistant", "y"))),
                  json.dumps(messages(("user", "x"), ("system", "s"), ("assistant", "y"))),
                  json.dumps(messages(("system", "s"), ("system", "s"), ("user", "x"), ("assistant", "y"))),
                  json.dumps(messages(("user", "x"), ("assistant", "y"), ("assistant", "y")))],
}


def test_every_bad_conversation_is_counted_by_its_reason_and_none_crashes(tmp_path):
    path = tmp_path / "chats.jsonl"
    lines = [json.dumps(GOOD[0]), *(line for reason in BAD for line in BAD[reason]), "", "  ",
             *(json.dumps(obj) for obj in GOOD[1:])]
    path.write_text("\n".join(lines) + "\n")
    conversations, dropped = read_conversations([path])
    assert dropped == collections.Counter({reason: len(bad) for reason, bad in BAD.items()})
    assert [c.to_json() for c in conversations] == [
        GOOD[0], GOOD[1], messages(("user", "x"), ("assistant", "y"))]  # other keys are not kept
    for reason, bad in BAD.items():
        for line in bad:
            with pytest.raises(BadConversation) as err:
                parse_line(line)
            assert err.value.reason == reason, line[:80]
    assert set(DROP_REASONS) == {*BAD, "too_long"}


def test_too_long_conversations_are_counted(chat):
    tokenizer, tokens = chat
    short = conversation(("user", "Hi"), ("assistant", "Yes."))
    long = conversation(("user", "To be, or not to be " * 20), ("assistant", "That is the question."))
    block_size = len(encode_conversation(tokenizer, tokens, short).ids) - 1  # just fits: its inputs fill the context
    encoded, dropped = encode_conversations(tokenizer, tokens, [short, long, short], block_size=block_size)
    assert dropped == {"too_long": 1}
    assert [e.ids for e in encoded] == [encode_conversation(tokenizer, tokens, short).ids] * 2
    assert len(encoded[0].inputs_and_targets()[0]) == block_size
    _, dropped = encode_conversations(tokenizer, tokens, [short], block_size=block_size - 1)
    assert dropped == {"too_long": 1}


def test_conversations_written_are_read_back(tmp_path):
    written = [parse_conversation(obj) for obj in GOOD]
    written.append(conversation(("user", f"a literal {USER} and {END}, 天地 🎭\n"), ("assistant", f"{ASSISTANT}.")))
    write_conversations(tmp_path / "c.jsonl", written)
    assert read_conversations([tmp_path / "c.jsonl"]) == (written, collections.Counter())


@pytest.mark.parametrize("problem", ["missing", "a folder", "not UTF-8"])
def test_a_file_that_cannot_be_read_is_an_input_error_naming_it(tmp_path, problem):
    path = tmp_path / "chats.jsonl"
    if problem == "a folder":
        path.mkdir()
    elif problem == "not UTF-8":
        path.write_bytes(json.dumps(GOOD[0]).encode() + b"\n" + b'{"messages": "\xff\xfe"}\n')
    with pytest.raises(InputError, match=str(path)):
        read_conversations([path])

