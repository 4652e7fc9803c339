"""What a tuned model writes on its own (what `chat` prints), against the scored choice of metrics/sft.json: its
greedy answers to the held-out questions of the name tasks (exactly right; one of the candidates) and of the verse
task (a heading; the asked name's heading; the asked number of lines; both). The figures of docs/benchmarks.md,
"Names in quotes".

    python benchmarks/free_answers.py --model models/sft
    python benchmarks/free_answers.py --model /tmp/exp/sft --params /tmp/exp/params.yaml

The held-out questions are those the sft stage scores: generated from --clean with the params' sft.* and data.*.
"""

import argparse
import collections
from pathlib import Path

import torch

from llm.chat import ChatTokens, encode_prompt
from llm.configs.data import DataConfig
from llm.configs.sft import SFTConfig
from llm.model_io import load_model_dir
from llm.sft import read_tuning_data
from llm.tasks import MAX_ANSWER_TOKENS, GPTAnswerer
from stages.params import load_params

NAME_TASKS = ("first_speaker", "next_speaker", "who_said")


def lines_of(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/sft"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--clean", type=Path, default=Path("data/clean"))
    args = parser.parse_args()
    params = load_params(args.params, sft=SFTConfig, data=DataConfig)
    model, tokenizer = load_model_dir(args.model)
    model.eval()
    tokens = ChatTokens.from_tokenizer(tokenizer, args.model / "tokenizer.json")
    questions = read_tuning_data(params.sft, params.data, args.clean, tokenizer, tokens, model.config.block_size,
                                 None).sft_set.questions
    answerer = GPTAnswerer(model)
    for task in (*NAME_TASKS, "verse_in_voice"):
        counts = collections.Counter()
        for question in questions.get(task, ()):
            prompt = encode_prompt(tokenizer, tokens, question.messages)
            budget = min(MAX_ANSWER_TOKENS, model.config.block_size + 1 - len(prompt))
            with torch.no_grad():
                ids = answerer.greedy(prompt, budget, tokens.end, lambda generated: False)
            reply = lines_of(tokenizer.decode([i for i in ids if i != tokens.end], skip_special_tokens=True))
            if task in NAME_TASKS:
                counts["right"] += reply == [question.answer]
                counts["a candidate"] += len(reply) == 1 and reply[0] in question.candidates
            else:
                wanted = lines_of(question.answer)
                heading = bool(reply) and reply[0] == wanted[0]
                counts["a heading"] += bool(reply) and reply[0].endswith(".") and reply[0].isupper()
                counts["the asked name"] += heading
                counts["the asked lines"] += len(reply) == len(wanted)
                counts["both"] += heading and len(reply) == len(wanted)
        n = len(questions.get(task, ()))
        if n:
            print(f"{task} ({n} questions): " + ", ".join(f"{what} {count / n:.2f}" for what, count in counts.items()))


if __name__ == "__main__":
    main()
