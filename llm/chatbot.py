"""A conversation with a tuned model (the chat command): the messages so far rendered in the chat format
(llm/chat.py), trimmed from the oldest turn to fit the context, and each answer sampled token by token (with the
KV cache of llm/generate.py) until the model closes its turn."""

from collections.abc import Iterator

from tokenizers import Tokenizer

from llm.chat import ChatTokens, Message, encode_prompt
from llm.generate import Sampling, generate, stream_text
from llm.model import GPT


class ChatSession:
    """The messages of one conversation (a system message first, if given) and the model answering them."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, tokens: ChatTokens, sampling: Sampling,
                 system: str | None = None) -> None:
        self.model, self.tokenizer, self.tokens, self.sampling = model, tokenizer, tokens, sampling
        self.system = [Message("system", system)] if system else []
        self.turns: list[Message] = []  # user and assistant messages, alternating
        self.answers = 0  # answers given, for their seeds

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.turns = []

    def prompt(self) -> list[int]:
        """The conversation as the model reads it, ending with the generation prompt: the oldest user/assistant
        pairs are left out until it leaves room for an answer of up to max_new_tokens (at least half of the
        context), the system message and the newest user message always kept."""
        block = self.model.config.block_size
        room = block - min(self.sampling.max_new_tokens, block // 2)
        turns = self.turns
        ids = encode_prompt(self.tokenizer, self.tokens, [*self.system, *turns])
        while len(ids) > room and len(turns) > 1:
            turns = turns[2:]
            ids = encode_prompt(self.tokenizer, self.tokens, [*self.system, *turns])
        return ids

    def reply(self, text: str) -> Iterator[str]:
        """Answer the user message `text`, streaming the answer's text; the answer joins the conversation once
        whole (or cut at max_new_tokens)."""
        self.turns.append(Message("user", text))
        seed = None if self.sampling.seed is None else self.sampling.seed + self.answers
        self.answers += 1
        control = self.tokens.control_ids

        def answer_ids() -> Iterator[int]:
            for token in generate(self.model, self.prompt(), self.sampling.max_new_tokens,
                                  temperature=self.sampling.temperature, top_k=self.sampling.top_k,
                                  top_p=self.sampling.top_p, seed=seed, eot_id=self.tokens.end):
                if token in control:  # the end of the turn (or a control token out of place: an end too)
                    return
                yield token

        pieces = []
        for piece in stream_text(self.tokenizer, answer_ids()):
            pieces.append(piece)
            yield piece
        self.turns.append(Message("assistant", "".join(pieces)))
