"""The instruction-tuned model (the sft stage's) as an MLflow pyfunc, logged "from code" as llm/mlflow_model.py is:
chat messages in, the assistant's message out, in MLflow's chat schema (what `mlflow models serve` takes as an
OpenAI-style chat request: {"messages": [...], "temperature": ..., "max_tokens": ...}). The seed, which that schema
has no field for, is a custom input: {"custom_inputs": {"seed": 7}}."""

import warnings
from typing import Any

import mlflow
from mlflow.pyfunc import ChatModel as MlflowChatModel
from mlflow.types.llm import ChatCompletionResponse, ChatMessage, ChatParams


class ChatModel(MlflowChatModel):
    """Answers a conversation as `python -m stages chat --prompt` answers one question: the messages rendered in
    the chat format (llm/chat.py), the answer sampled until the model ends its turn."""

    def load_context(self, context: Any) -> None:
        from llm.chat import ChatTokens
        from llm.model_registry import load_artifacts

        self.model, self.tokenizer, folder = load_artifacts(context.artifacts)
        self.tokens = ChatTokens.from_tokenizer(self.tokenizer, folder / "tokenizer.json")

    def predict(self, context: Any, messages: list[ChatMessage], params: ChatParams) -> ChatCompletionResponse:
        from llm.chat import Message
        from llm.chatbot import ChatSession
        from llm.configs.evaluate import EvaluateConfig
        from llm.generate import Sampling

        defaults, custom = EvaluateConfig(), params.custom_inputs or {}
        sampling = Sampling(max_new_tokens=params.max_tokens or defaults.max_new_tokens,
                            temperature=params.temperature,
                            top_k=defaults.top_k if params.top_k is None else params.top_k,
                            top_p=defaults.top_p if params.top_p is None else params.top_p,
                            seed=int(custom["seed"]) if custom.get("seed") is not None else None)
        system = [m.content for m in messages if m.role == "system"]
        session = ChatSession(self.model, self.tokenizer, self.tokens, sampling, system[0] if system else None)
        turns = [m for m in messages if m.role != "system"]
        if not turns or turns[-1].role != "user":
            raise ValueError("a conversation to answer ends with a user message")
        *history, last = turns
        session.turns = [Message(m.role, m.content) for m in history]
        answer = "".join(session.reply(last.content))
        return ChatCompletionResponse.from_dict({"choices": [{"index": 0, "finish_reason": "stop",
                                                              "message": {"role": "assistant", "content": answer}}]})


with warnings.catch_warnings():  # ChatModel is deprecated for agents (ResponsesAgent); a chat model is what this is
    warnings.simplefilter("ignore", FutureWarning)
    mlflow.models.set_model(ChatModel())
