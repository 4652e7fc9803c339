"""Task accuracy: the held-out questions of llm/sft_data.py scored deterministically, per task.

How each question is scored (SCORING says it in metrics/sft.json):

- A question with candidates (every reading-comprehension and knowledge task): each candidate is put after the
  prompt as the assistant's answer, and scored by the log-likelihood the model gives the answer's tokens and the
  closing <|end|> (the tokens llm/chat.py trains), summed over them. The sum, not the mean per token: the sum is
  log P(answer | prompt), the probability that the model writes exactly this answer and stops, so the choice is
  the model's most probable answer among the candidates; a mean per token rewards long answers whose later tokens
  follow from the first (a two-word name, a long title) and is the probability of nothing. The highest score is
  the model's choice (a tie goes to the earlier candidate; candidates are in a seeded order); it is right when it
  is the answer. Chance is 1 / the number of candidates, averaged over the task's questions.
- A question without candidates (writing: verse_in_voice): the model's greedy answer (temperature 0, until
  <|end|>) passes when it has the reference answer's shape (format_ok): its non-empty lines, stripped, are the
  heading "NAME." naming the asked character, then exactly as many lines as were asked for. No taste is judged.
  Chance is 0: there is no guessing a format.

The base model is prompted with solved examples first (few-shot: training conversations of the same task, in the
same chat format, before the question), the tuned model with the question alone. A prompt with its longest
answer must fit the context (block_size + 1 tokens, as training's too_long): shots are dropped, the longest first,
until it does; a question that does not fit even alone is left out and counted (TaskScore.too_long).

Each question costs two forward passes: the prompt once (into a KV cache), then all its candidates together as
one batch continuing it.

A reading task is answered from the prompt: the model must find a name in its context and say it again.
`context_copying` measures whether a model can do that at all, with no question asked: its loss on a text read
once, and on the same text read again right after it. A model that uses its context (an "induction head": attend
to where the current token came before, predict what followed it then) predicts the second reading far better;
one that does not predicts it no better than the first.
"""

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from llm.chat import ChatTokens, Conversation, Message, encode_content, encode_prompt
from llm.generate import generate
from llm.model import GPT
from llm.sft_data import Question

MAX_ANSWER_TOKENS = 128  # a greedy answer stops here if <|end|> has not come (a 4-line answer is ~60 tokens)

SCORING = {
    "choice": "choice among the candidates by the summed log-likelihood of each answer's tokens and <|end|>",
    "format": "format of the greedy answer: the heading 'NAME.' of the asked character, then exactly the "
              "number of non-empty lines asked for",
}


class Answerer(Protocol):
    """What scoring needs of a model; GPTAnswerer is the real one, tests pass stubs."""

    block_size: int

    def logprobs(self, prompt: list[int], answers: list[list[int]]) -> list[float]:
        """Summed log-probability of each answer's tokens, each continuing `prompt`."""
        ...

    def greedy(self, prompt: list[int], max_new_tokens: int, stop: int,
               give_up: Callable[[list[int]], bool]) -> list[int]:
        """Greedy continuation of `prompt`, up to and including `stop`, or max_new_tokens tokens, or until
        give_up(the tokens so far) is true."""
        ...


class GPTAnswerer:
    """A GPT as an Answerer: a prompt's forward pass once, then its answers in one batch from a copy of its cache."""

    def __init__(self, model: GPT) -> None:
        self.model = model.eval()
        self.block_size = model.config.block_size

    @torch.no_grad()
    def logprobs(self, prompt: list[int], answers: list[list[int]]) -> list[float]:
        model, device = self.model, self.model.device
        if len(prompt) + max(map(len, answers)) - 1 > self.block_size:
            raise ValueError(f"prompt and answer exceed block_size {self.block_size}")
        cache = model.new_cache(len(answers))
        if len(prompt) > 1:  # the prompt's last token is fed with the answers: it predicts their first token
            once = model.new_cache(1)
            model(torch.tensor([prompt[:-1]], device=device), cache=once)
            cache.fill_from(once)
        width = max(map(len, answers))
        # Each row: the prompt's last token, then the answer; padding comes after an answer, so it cannot change
        # the logits of the answer's own positions (causal attention), and its targets are masked out.
        inputs = torch.tensor([[prompt[-1], *a[:-1]] + [0] * (width - len(a)) for a in answers], device=device)
        targets = torch.tensor([a + [0] * (width - len(a)) for a in answers], device=device)
        counted = torch.tensor([[i < len(a) for i in range(width)] for a in answers], device=device)
        logits, _ = model(inputs, cache=cache)  # (answers, width, vocab)
        token_logprobs = F.log_softmax(logits.float(), dim=-1).gather(2, targets[:, :, None]).squeeze(2)
        return token_logprobs.masked_fill(~counted, 0.0).sum(dim=1).tolist()

    def greedy(self, prompt: list[int], max_new_tokens: int, stop: int,
               give_up: Callable[[list[int]], bool]) -> list[int]:
        generated = []
        for token in generate(self.model, prompt, max_new_tokens, temperature=0.0, eot_id=stop):
            generated.append(token)
            if token == stop or give_up(generated):
                break
        return generated


@dataclasses.dataclass(frozen=True)
class TaskScore:
    n: int  # questions scored
    chance: float  # the accuracy of guessing: mean of 1 / candidates; 0 for a format check
    accuracy: float  # share of questions answered right, in [0, 1]
    scoring: str  # how (SCORING)
    too_long: int = 0  # questions left out: longer than the context even without shots


@dataclasses.dataclass(frozen=True)
class Answered:
    """One question as the model answered it."""

    question: Question
    reply: str  # the chosen candidate, or the greedy answer
    correct: bool
    shots: int  # solved examples the prompt held


@dataclasses.dataclass(frozen=True)
class Copying:
    """A model's loss (nats per token) on texts read once, and read again at once after themselves."""

    first_read: float
    second_read: float
    texts: int

    def to_dict(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


@torch.no_grad()
def context_copying(model: GPT, texts: Sequence[list[int]]) -> Copying:
    """Copying over `texts` (token ids, each cut to half the context so that two readings fit): the mean loss of
    each text's tokens after its first, on the first reading and on the second. The repeat is what the second
    reading can use: every token there follows the same tokens it followed a text earlier."""
    half = (model.config.block_size + 1) // 2
    texts = [text[:half] for text in texts if len(text) >= 2]
    if not texts:
        raise ValueError("context_copying needs at least one text of two tokens or more")
    was_training = model.training
    model.eval()
    first = second = 0.0
    for text in texts:
        ids = torch.tensor([text + text], device=model.device)
        logits, _ = model(ids[:, :-1])
        losses = F.cross_entropy(logits[0].float(), ids[0, 1:], reduction="none")
        n = len(text)
        first += losses[:n - 1].mean().item()  # predicting tokens 1..n-1 of the first reading
        second += losses[n:].mean().item()  # tokens 1..n-1 of the second reading (n-1 predicts its first token)
    model.train(was_training)
    return Copying(first / len(texts), second / len(texts), len(texts))


def format_ok(reply: str, reference: str) -> bool:
    """Whether `reply` has the shape of the reference answer "NAME.\\nline\\n...": its non-empty lines, stripped,
    are the same heading line, then as many lines as the reference has after it."""
    wanted = [line.strip() for line in reference.splitlines() if line.strip()]
    got = [line.strip() for line in reply.splitlines() if line.strip()]
    return len(got) == len(wanted) and got[:1] == wanted[:1]


def format_failed(partial: str, reference: str) -> bool:
    """Whether a reply that begins with `partial` fails format_ok however it goes on: it already holds more
    non-empty lines than the reference, or a finished first line that is not the heading. Generation stops
    there: the verdict is the one the whole reply would get, for a fraction of the tokens."""
    wanted = [line.strip() for line in reference.splitlines() if line.strip()]
    *finished, last = partial.split("\n")
    got = [line.strip() for line in finished if line.strip()]
    return len(got) + bool(last.strip()) > len(wanted) or bool(got) and got[0] != wanted[0]


def _answer_ids(tokenizer: Tokenizer, tokens: ChatTokens, answer: str) -> list[int]:
    """An answer's trained tokens: its content and the closing <|end|>."""
    return [*encode_content(tokenizer, tokens, answer), tokens.end]


def prompt_with_shots(tokenizer: Tokenizer, tokens: ChatTokens, question: Question, shots: Sequence[Conversation],
                      longest_answer: int, block_size: int) -> tuple[list[int], int] | None:
    """The prompt ids (as many of `shots` first as fit, the longest dropped first; shots are given shortest
    first) and how many shots it holds; None when the question with an answer of `longest_answer` tokens does not
    fit block_size + 1 tokens even alone."""
    for used in range(len(shots), -1, -1):
        messages: list[Message] = [m for shot in shots[:used] for m in shot.messages]
        prompt = encode_prompt(tokenizer, tokens, [*messages, *question.messages])
        if len(prompt) + longest_answer <= block_size + 1:
            return prompt, used
    return None


def answer_question(model: Answerer, tokenizer: Tokenizer, tokens: ChatTokens, question: Question,
                    shots: Sequence[Conversation] = ()) -> Answered | None:
    """The model's answer to one question, scored as its task is (module docstring); None when it does not fit."""
    if question.candidates is not None:
        answers = [_answer_ids(tokenizer, tokens, candidate) for candidate in question.candidates]
    else:
        answers = [_answer_ids(tokenizer, tokens, question.answer)]
    fitted = prompt_with_shots(tokenizer, tokens, question, shots, max(map(len, answers)), model.block_size)
    if fitted is None:
        return None
    prompt, used = fitted
    if question.candidates is not None:
        scores = model.logprobs(prompt, answers)
        reply = question.candidates[max(range(len(scores)), key=lambda i: (scores[i], -i))]
        return Answered(question, reply, reply == question.answer, used)
    budget = min(MAX_ANSWER_TOKENS, model.block_size + 1 - len(prompt))
    give_up = lambda ids: format_failed(tokenizer.decode(ids, skip_special_tokens=True), question.answer)  # noqa: E731
    generated = [t for t in model.greedy(prompt, budget, tokens.end, give_up) if t != tokens.end]
    reply = tokenizer.decode(generated, skip_special_tokens=True)
    return Answered(question, reply, format_ok(reply, question.answer), used)


def score_tasks(model: GPT | Answerer, tokenizer: Tokenizer, tokens: ChatTokens,
                questions: Mapping[str, Sequence[Question]],
                shots: Mapping[str, Sequence[Conversation]] | None = None) -> dict[str, TaskScore]:
    """{task: TaskScore} over the held-out questions; `shots` (by task, shortest first: SFTSet.shots) prompt the
    base model few-shot, None scores zero-shot. Tasks without questions are left out."""
    answerer = GPTAnswerer(model) if isinstance(model, GPT) else model
    scores, shots = {}, shots or {}
    for task, task_questions in questions.items():
        answered = [answer_question(answerer, tokenizer, tokens, q, shots.get(task, ())) for q in task_questions]
        scored = [a for a in answered if a is not None]
        if not scored:
            continue
        choice = [a.question.candidates for a in scored if a.question.candidates is not None]
        chance = sum(1 / len(c) for c in choice) / len(scored) if choice else 0.0
        scores[task] = TaskScore(n=len(scored), chance=chance, accuracy=sum(a.correct for a in scored) / len(scored),
                                 scoring=SCORING["choice" if choice else "format"],
                                 too_long=len(answered) - len(scored))
    return scores
