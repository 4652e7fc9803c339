"""Task accuracy (llm/tasks.py): the choice by log-likelihood, chance, the writing format check, few-shot prompts
that fit the context, and the batched log-likelihoods of a real model against a plain forward pass."""

import functools

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from llm.chat import CHAT_TOKENS, ChatTokens, Conversation, Message, encode_content, encode_prompt
from llm.config import EOT
from llm.configs.tokenizer import TokenizerConfig
from llm.model import GPT, IGNORE, GPTConfig
from llm.sft_data import Question
from llm.tasks import (
    GPTAnswerer,
    answer_question,
    context_copying,
    format_failed,
    format_ok,
    prompt_with_shots,
    score_tasks,
)
from llm.tokenizer import train_tokenizer

TEXTS = ["HAMLET.\nTo be, or not to be, that is the question:\n", "Who speaks first? How many speeches?\n",
         "ROMEO.\nBut soft, what light through yonder window breaks?\n"] * 3


@functools.cache
def chat_tokenizer() -> tuple[Tokenizer, ChatTokens]:
    cfg = TokenizerConfig(vocab_size=300, min_frequency=1, special_tokens=(EOT, *CHAT_TOKENS))
    tokenizer = train_tokenizer(TEXTS, cfg)
    return tokenizer, ChatTokens.from_tokenizer(tokenizer, "test tokenizer")


def choice(prompt: str, answer: str, candidates: tuple[str, ...], task: str = "first_speaker") -> Question:
    return Question(task, (Message("user", prompt),), answer, candidates)


class StubAnswerer:
    """A model that likes the candidate `pick(question prompt, candidates)` best and writes fixed replies."""

    def __init__(self, questions: list[Question], pick, replies: dict[str, str] | None = None,
                 block_size: int = 256) -> None:
        self.tokenizer, self.tokens = chat_tokenizer()
        self.questions, self.pick, self.replies, self.block_size = questions, pick, replies or {}, block_size
        self.prompts: list[list[int]] = []

    def _question(self, prompt: list[int]) -> Question:
        text = self.tokenizer.decode(prompt, skip_special_tokens=True)
        return next(q for q in self.questions if text.endswith(q.messages[-1].content))

    def logprobs(self, prompt: list[int], answers: list[list[int]]) -> list[float]:
        self.prompts.append(prompt)
        question = self._question(prompt)
        liked = self.pick(question)
        texts = [self.tokenizer.decode(answer[:-1]) for answer in answers]
        assert all(answer[-1] == self.tokens.end for answer in answers)
        return [0.0 if text == liked else -5.0 - i for i, text in enumerate(texts)]

    def greedy(self, prompt: list[int], max_new_tokens: int, stop: int, give_up) -> list[int]:
        self.prompts.append(prompt)
        reply = self.replies[self._question(prompt).messages[-1].content]
        return [*encode_content(self.tokenizer, self.tokens, reply), stop][:max_new_tokens]


QUESTIONS = [
    choice("HAMLET.\nTo be.\n\nROMEO.\nBut soft.\n\nWho speaks first?", "HAMLET",
           ("ROMEO", "HAMLET", "JULIET", "KING")),
    choice("ROMEO.\nBut soft.\n\nHAMLET.\nTo be.\n\nWho speaks first?", "ROMEO", ("ROMEO", "HAMLET")),
    choice("KING.\nWho's there?\n\nWho speaks first?", "KING", ("HAMLET", "KING", "ROMEO")),
]


def test_a_model_that_prefers_the_right_answer_scores_one_and_chance_is_one_over_candidates() -> None:
    tokenizer, tokens = chat_tokenizer()
    right = StubAnswerer(QUESTIONS, lambda q: q.answer)
    scores = score_tasks(right, tokenizer, tokens, {"first_speaker": QUESTIONS})
    assert scores["first_speaker"].accuracy == 1.0 and scores["first_speaker"].n == 3
    assert scores["first_speaker"].chance == pytest.approx((1 / 4 + 1 / 2 + 1 / 3) / 3)
    assert "log-likelihood" in scores["first_speaker"].scoring
    wrong = StubAnswerer(QUESTIONS, lambda q: next(c for c in q.candidates if c != q.answer))
    assert score_tasks(wrong, tokenizer, tokens, {"first_speaker": QUESTIONS})["first_speaker"].accuracy == 0.0
    second = StubAnswerer(QUESTIONS, lambda q: q.answer if q is QUESTIONS[1] else "none of them")
    # nothing liked: every candidate scores by its place, the first highest: right for question 2 only
    assert score_tasks(second, tokenizer, tokens, {"t": QUESTIONS})["t"].accuracy == pytest.approx(1 / 3)


def test_a_tie_goes_to_the_earlier_candidate() -> None:
    tokenizer, tokens = chat_tokenizer()

    class Flat(StubAnswerer):
        def logprobs(self, prompt, answers):
            return [-1.0] * len(answers)

    answered = answer_question(Flat(QUESTIONS, None), tokenizer, tokens, QUESTIONS[0])
    assert answered.reply == "ROMEO" and not answered.correct


REFERENCE = "HAMLET.\nTo be, or not to be,\nthat is the question."


@pytest.mark.parametrize(("reply", "ok"), [
    ("HAMLET.\nTo be, or not to be,\nthat is the question.", True),
    ("HAMLET.\nAny words at all\nwill do here", True),
    ("  HAMLET.  \n\nOne line\n\n  and another  \n\n", True),  # blank lines and outer spaces do not count
    ("HAMLET.\nOne line only", False),
    ("HAMLET.\nOne\nTwo\nThree", False),
    ("ROMEO.\nOne line\nand another", False),  # another character
    ("HAMLET\nOne line\nand another", False),  # not the heading
    ("One line\nand another\nand a third", False),
    ("", False),
])
def test_the_writing_format_check(reply: str, ok: bool) -> None:
    assert format_ok(reply, REFERENCE) is ok
    # stopping the generation early never changes the verdict: a prefix that has failed stays failed
    for end in range(len(reply) + 1):
        if format_failed(reply[:end], REFERENCE):
            assert not ok


def test_format_failed_gives_up_as_soon_as_the_verdict_is_known() -> None:
    assert not format_failed("HAMLET.\nTo be", REFERENCE)
    assert format_failed("ROMEO.\n", REFERENCE)
    assert format_failed("HAMLET.\na\nb\nc", REFERENCE)
    assert not format_failed("HAMLET.\na\nb\n", REFERENCE)  # a newline alone is no line yet


def test_writing_is_scored_by_the_format_of_the_greedy_answer() -> None:
    tokenizer, tokens = chat_tokenizer()
    questions = [Question("verse_in_voice", (Message("user", f"Write 2 lines as HAMLET, take {i}."),), REFERENCE, None)
                 for i in range(4)]
    replies = {q.messages[0].content: reply for q, reply in zip(questions, [
        "HAMLET.\nOne\nTwo", "HAMLET.\nOne", "ROMEO.\nOne\nTwo", "HAMLET.\n\nA line\nAnother line\n"], strict=True)}
    scores = score_tasks(StubAnswerer(questions, None, replies), tokenizer, tokens, {"verse_in_voice": questions})
    assert scores["verse_in_voice"].accuracy == 0.5 and scores["verse_in_voice"].chance == 0.0
    assert "format" in scores["verse_in_voice"].scoring


def test_shots_come_first_in_the_chat_format_and_are_dropped_until_the_prompt_fits() -> None:
    tokenizer, tokens = chat_tokenizer()
    shots = [Conversation((Message("user", f"Who speaks first? ({i})"), Message("assistant", "KING")))
             for i in range(3)]
    question = QUESTIONS[0]
    longest = max(len(encode_content(tokenizer, tokens, c)) + 1 for c in question.candidates)
    full = encode_prompt(tokenizer, tokens, [*shots[0].messages, *shots[1].messages, *shots[2].messages,
                                             *question.messages])
    assert prompt_with_shots(tokenizer, tokens, question, shots, longest, 1024) == (full, 3)
    alone = encode_prompt(tokenizer, tokens, question.messages)
    two = encode_prompt(tokenizer, tokens, [*shots[0].messages, *shots[1].messages, *question.messages])
    assert prompt_with_shots(tokenizer, tokens, question, shots, longest, len(two) + longest - 1) == (two, 2)
    assert prompt_with_shots(tokenizer, tokens, question, shots, longest, len(alone) + longest - 1) == (alone, 0)
    assert prompt_with_shots(tokenizer, tokens, question, shots, longest, len(alone) + longest - 2) is None

    stub = StubAnswerer(QUESTIONS, lambda q: q.answer, block_size=len(alone) + longest - 1)
    scores = score_tasks(stub, tokenizer, tokens, {"first_speaker": [question]}, {"first_speaker": shots})
    assert stub.prompts == [alone] and scores["first_speaker"].n == 1
    short = StubAnswerer(QUESTIONS, lambda q: q.answer, block_size=len(alone) + longest - 2)
    scores = score_tasks(short, tokenizer, tokens, {"first_speaker": [question], "other": QUESTIONS[1:]})
    assert "first_speaker" not in scores and scores["other"].too_long == 0  # a task with nothing scored is left out


@pytest.mark.parametrize("arch", ["gpt2", "modern"])  # learned positions, rotary positions
def test_batched_logprobs_equal_a_plain_forward_pass(arch: str) -> None:
    tokenizer, tokens = chat_tokenizer()
    torch.manual_seed(0)
    cfg = GPTConfig(arch=arch, n_layer=2, n_head=2, n_embd=32, block_size=24, vocab_size=tokenizer.get_vocab_size())
    model = GPT(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)  # far from uniform, so that a wrong position or mask shows
    prompt = [0, 5, 17, 33, 2, 9, 41]
    answers = [[7, 4], [12, 60, 61, 62, 8], [3]]
    got = GPTAnswerer(model).logprobs(prompt, answers)
    for answer, score in zip(answers, got, strict=True):
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logits, _ = model(ids[:, :-1])
        expected = F.log_softmax(logits[0, len(prompt) - 1:], dim=-1).gather(1, ids[0, len(prompt):, None]).sum()
        assert score == pytest.approx(float(expected), abs=1e-4)
    with pytest.raises(ValueError, match="block_size"):
        GPTAnswerer(model).logprobs(prompt, [[1] * (cfg.block_size - len(prompt) + 2)])


def test_a_real_model_is_scored_deterministically() -> None:
    tokenizer, tokens = chat_tokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig(arch="modern", n_layer=1, n_head=2, n_embd=16, block_size=96,
                          vocab_size=tokenizer.get_vocab_size()))
    writing = Question("verse_in_voice", (Message("user", "Write 2 lines as HAMLET."),), REFERENCE, None)
    questions = {"first_speaker": QUESTIONS, "verse_in_voice": [writing]}
    first = score_tasks(model, tokenizer, tokens, questions)
    assert first == score_tasks(model, tokenizer, tokens, questions)
    assert first["first_speaker"].n == 3 and 0.0 <= first["first_speaker"].accuracy <= 1.0
    assert first["verse_in_voice"].n == 1


def test_context_copying_is_the_loss_of_each_reading_as_the_model_computes_it() -> None:
    """Recomputed through the model's own masked loss (targets IGNORE outside the reading measured): the first
    reading's tokens after its first, and the same tokens of the second reading."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(arch="modern", n_layer=2, n_head=2, n_embd=32, block_size=40, vocab_size=50)).eval()
    texts = [list(range(3, 13)), [7, 9, 11, 7, 9, 11, 7], list(range(1, 40))]  # the last is cut to half the context
    copying = context_copying(model, texts)
    first, second = [], []
    for text in texts:
        text = text[:20]
        n, ids = len(text), torch.tensor([text + text])
        for span, out in (((0, n - 1), first), ((n, 2 * n - 1), second)):
            targets = torch.full((1, 2 * n - 1), IGNORE)
            targets[0, span[0]:span[1]] = ids[0, 1:][span[0]:span[1]]
            with torch.no_grad():
                out.append(model(ids[:, :-1], targets)[1].item())
    assert copying.texts == 3
    assert copying.first_read == pytest.approx(sum(first) / 3, rel=1e-5)
    assert copying.second_read == pytest.approx(sum(second) / 3, rel=1e-5)
    with pytest.raises(ValueError):
        context_copying(model, [[5]])
