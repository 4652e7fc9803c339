"""The chat command (stages/chat.py, llm/chatbot.py): one question with --prompt, a conversation on stdin, the
context kept by leaving out the oldest turns."""

from pathlib import Path

import pytest

from llm.chat import ChatTokens, Message, encode_prompt
from llm.chatbot import ChatSession
from llm.generate import Sampling
from llm.model_io import load_model_dir
from tests.conftest import make_model_dir, run_stage

GREEDY = ("--temperature", "0", "--max-new-tokens", "12")


@pytest.fixture
def tuned(tmp_path, chat_tokenizer_path) -> Path:
    """A model folder whose tokenizer has the chat tokens (random weights: what matters is the command)."""
    return make_model_dir(tmp_path / "sft", chat_tokenizer_path, arch="modern", block_size=64)


def test_prompt_prints_only_the_answer_and_a_seed_repeats_it(tmp_path, tuned):
    first = run_stage(tmp_path, "chat", "--model", tuned, "--prompt", "Who speaks first?", *GREEDY)
    assert first.returncode == 0, first.stderr
    assert first.stdout.endswith("\n") and first.stdout.count("\n") >= 1
    again = run_stage(tmp_path, "chat", "--model", tuned, "--prompt", "Who speaks first?", *GREEDY)
    assert again.stdout == first.stdout
    sampled = [run_stage(tmp_path, "chat", "--model", tuned, "--prompt", "Hi", "--seed", "7", "--temperature", "1",
                         "--max-new-tokens", "12").stdout for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_a_conversation_on_stdin_answers_each_message_and_reset_starts_over(tmp_path, tuned):
    dialogue = "Who speaks first?\n\n/reset\nWho speaks first?\n/quit\nnever read\n"
    result = run_stage(tmp_path, "chat", "--model", tuned, *GREEDY, stdin=dialogue)
    assert result.returncode == 0, result.stderr
    # Each answer ends with a newline (an answer may hold newlines itself: the model is random). Two messages, the
    # same question in the same (greedy) state after /reset: the same answer twice, and nothing else.
    half = len(result.stdout) // 2
    answer = result.stdout[:half]
    assert answer.endswith("\n") and len(answer) > 1 and result.stdout == answer * 2, \
        "one answer per message; the blank line and what follows /quit are not messages"
    assert "starts over" in result.stderr


def test_without_a_tuned_model_it_says_how_to_make_one(tmp_path):
    result = run_stage(tmp_path, "chat", "--model", tmp_path / "nothing", "--prompt", "hi")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "dvc repro sft" in result.stderr


def test_a_model_without_chat_tokens_is_refused_in_one_line(tmp_path, sample_tokenizer_path):
    base = make_model_dir(tmp_path / "base", sample_tokenizer_path)
    result = run_stage(tmp_path, "chat", "--model", base, "--prompt", "hi")
    assert result.returncode == 2 and "tokenizer.special_tokens" in result.stderr


def test_the_conversation_is_trimmed_from_its_oldest_turns_to_leave_room_for_an_answer(tuned):
    model, tokenizer = load_model_dir(tuned)
    tokens = ChatTokens.from_tokenizer(tokenizer, tuned / "tokenizer.json")
    session = ChatSession(model, tokenizer, tokens, Sampling(16, 0.0, 0, 1.0, None), system="Be brief.")
    for i in range(6):
        session.turns += [Message("user", f"question number {i} about the play"), Message("assistant", f"ans {i}")]
    session.turns.append(Message("user", "and the last one?"))
    prompt = session.prompt()
    assert len(prompt) <= model.config.block_size - 16
    system = [Message("system", "Be brief.")]
    kept = [n for n in range(len(session.turns), 0, -2)
            if encode_prompt(tokenizer, tokens, [*system, *session.turns[-n:]]) == prompt]
    assert kept and kept[0] < len(session.turns), "whole user/assistant pairs left out, the newest message kept"
    assert prompt[:3] == encode_prompt(tokenizer, tokens, [Message("system", "Be brief.")])[:3], "system kept"
