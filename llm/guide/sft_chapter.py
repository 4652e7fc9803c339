"""Chapter 9: instruction tuning (the sft stage), from the reader's own run: which tokens of a conversation are
trained, the tuning's loss beside pretraining's, the accuracy of each held-out task before and after, and the tuned
model's answers to a few held-out questions. Without the sft stage's outputs it says how to make them."""

from pathlib import Path

from tokenizers import Tokenizer

from llm.chat import CHAT_TOKENS, Conversation, EncodedConversation, Message, encode_conversation, encode_prompt
from llm.guide import figures
from llm.guide.document import Chapter, Exercise, Figure, Pre, Table, Text, Tokens, literal
from llm.guide.inputs import Run, SFTRun
from llm.history import HistoryRow
from llm.sft_data import Question
from llm.tasks import MAX_ANSWER_TOKENS, SCORING, GPTAnswerer, answer_question
from llm.tokenizer import token_text

SLUG, TITLE = "sft", "Instruction tuning"

# What each task of llm/sft_data.py asks, by kind; a task not named here (a newer generator) is shown by name.
TASKS = {
    "first_speaker": ("reading", "a passage of consecutive speeches is in the prompt: which character speaks first"),
    "next_speaker": ("reading", "who speaks right after a named character in the passage"),
    "who_said": ("reading", "which character of the passage says a quoted line"),
    "speech_count": ("reading", "how many speeches the passage holds"),
    "play_of_line": ("knowledge", "which play a well-known line comes from: no passage, so the answer can only "
                                  "come from what pretraining taught"),
    "speaker_of_line": ("knowledge", "who speaks a well-known line of a named play, again with no passage"),
    "verse_in_voice": ("writing", "a few lines of verse in a named character's voice, scored for their format "
                                  "only (the heading naming the character, then exactly the lines asked for), "
                                  "never for taste"),
}


def kind(task: str) -> str:
    return TASKS.get(task, ("other", ""))[0]


def answered_conversation(question: Question) -> Conversation:
    """A held-out question with its right answer, as a training conversation holds one."""
    return Conversation((*question.messages, Message("assistant", question.answer)))


def shown_conversation(sft: SFTRun, tokenizer: Tokenizer) -> EncodedConversation | None:
    """The shortest held-out question with its answer, encoded as training encodes it (the loss mask shown)."""
    encoded = [encode_conversation(tokenizer, sft.tokens, answered_conversation(q))
               for questions in sft.questions.values() for q in questions]
    return min(encoded, key=lambda e: len(e.ids), default=None)


def mask_blocks(run: Run, sft: SFTRun) -> list:
    tokens = sft.tokens
    blocks: list = [Text(
        "Instruction tuning is the same training as pretraining: the same model predicts each next token and pays "
        "the same cross-entropy loss. Only the text changes: conversations instead of plays, and the loss counts "
        "only the tokens the model should learn to write, the assistant's answer and the `<|end|>` that closes it. "
        "The user's question, the role tokens and the leading `<|endoftext|>` are still read as context but are "
        "masked out of the loss (their target is -1, which the loss ignores), so the model learns to answer "
        "questions, not to write them.")]
    shown = shown_conversation(sft, run.tokenizer)
    if shown is None:
        return blocks + [Text("The run has no held-out question to show as a conversation.")]
    trained = sum(shown.trained)
    ids = ", ".join(f"`{name}` = {run.tokenizer.token_to_id(name)}" for name in CHAT_TOKENS)
    return blocks + [
        Text(f"A held-out question with its answer, as the stage encodes it (llm.chat.encode_conversation): "
             f"{len(shown.ids)} tokens, of which {trained} green ones are trained and {len(shown.ids) - trained} "
             "grey ones masked; the framed ones are control tokens."),
        Tokens([(token_text(run.tokenizer, i), i) for i in shown.ids], tokens.control_ids, tuple(shown.trained)),
        Text(f"The turn boundaries are special tokens ({ids}), reserved in `tokenizer.special_tokens` from the "
             "start, as `<|endoftext|>` is: the base model's vocabulary already holds them, so it is tuned "
             "without a new tokenizer or re-tokenized shards. No text can produce them: a `<|user|>` typed in a "
             "message is encoded as the plain characters it is made of, so no message can forge a turn."),
    ]


def loss_blocks(run: Run, sft: SFTRun, figure_dir: Path) -> list:
    base, tuned = run.history, sft.history
    offset = base[-1].step

    def lines(history: list[HistoryRow], name: str, shift: int, colour: str) -> list:
        val = [r for r in history if r.val_loss is not None]
        return [(f"{name}: train", [r.step + shift for r in history], [r.train_loss for r in history], f"{colour}-"),
                (f"{name}: val", [r.step + shift for r in val], [r.val_loss for r in val], f"{colour}o--")]

    figures.curves([("loss, pretraining then instruction tuning", "optimizer step", "nats per token",
                     lines(base, "pretraining", 0, "C0") + lines(tuned, "tuning", offset, "C1"))],
                   figure_dir / "sft_loss.png", columns=1)
    cfg = run.settings.sft
    return [
        Text(f"The tuning ran {sft.metrics['steps']:,} steps after pretraining's {offset:,}, starting from the "
             f"pretrained weights, at peak lr {cfg.lr} ({cfg.optimizer}) with {cfg.batch_size} rows of "
             f"{run.model.config.block_size} tokens per step, each row packed with whole conversations. Its train "
             f"loss went from {tuned[0].train_loss:.3f} to {tuned[-1].train_loss:.3f} nats per trained token; "
             "its val loss is the loss of the held-out questions' right answers. Pretraining's loss counts every "
             "token of the text and the tuning's only the answers', so the two curves measure different text."),
        Figure("figures/sft_loss.png", "Loss against optimizer steps: pretraining (plots/train.csv), then the "
                                       "instruction tuning that continued from its weights (plots/sft.csv)."),
    ]


def percent(value: float | None) -> str:
    return "not scored" if value is None else f"{100 * value:.1f} %"


def scoring_name(scoring: str) -> str:
    """The table's one word for how a task is scored (llm.tasks.SCORING: the paragraph above the table says each
    in full); a scoring of another name is shown whole."""
    return next((name for name, text in SCORING.items() if text == scoring), scoring)


def accuracy_blocks(run: Run, sft: SFTRun, figure_dir: Path) -> list:
    tasks, shots = sft.metrics["tasks"], run.settings.sft.shots
    names = list(tasks)
    source = run.settings.sft.source
    blocks: list = [Text(
        "Each task was asked of held-out plays only (`sft.heldout_fraction` of the plays, by a hash of their id, "
        "seeded by `sft.seed`): no built-in training conversation is about a play a question comes from"
        + ("" if source == "builtin" else f" (this run tuned on `{literal(source)}` instead of the built-in set)")
        + ". What each asks:")]
    blocks += [Text(f"`{task}` ({kind(task)}): {TASKS[task][1]}.") for task in names if task in TASKS]
    blocks.append(Text(
        "A question with candidates is scored by choice: each candidate answer is put after the prompt and the "
        "model's choice is the one it gives the highest probability (the summed log-likelihood of its tokens and "
        "`<|end|>`), so chance is one over the number of candidates. The writing task is scored on the greedy "
        f"answer's format, where chance is 0. The base model sees {shots} solved example{'' if shots == 1 else 's'} "
        "of the task before each question (few-shot), since it has never seen a conversation; the tuned model sees "
        "the question alone."))
    if not names:
        return blocks + [Text("No task had held-out questions to score.")]
    rows = [(task, kind(task), f"{s['n']:,}", percent(s["chance"]), percent(s.get("base_accuracy")),
             percent(s["sft_accuracy"]), scoring_name(s["scoring"])) for task, s in tasks.items()]
    figures.accuracy_bars(names, [tasks[t].get("base_accuracy") for t in names],
                          [tasks[t]["sft_accuracy"] for t in names], [tasks[t]["chance"] for t in names],
                          figure_dir / "sft_accuracy.png")
    return blocks + [
        Table(("task", "kind", "questions", "chance", "base model", "tuned model", "scoring"), rows),
        Figure("figures/sft_accuracy.png", "Accuracy on the held-out questions per task (metrics/sft.json): the "
                                           "base model few-shot, the tuned model zero-shot; the red mark is "
                                           "chance."),
        Text(verdict(tasks)),
    ]


def verdict(tasks: dict) -> str:
    """What the run's accuracy table says, in words."""
    compared = {t: s for t, s in tasks.items() if s.get("base_accuracy") is not None}
    better = [t for t, s in compared.items() if s["sft_accuracy"] > s["base_accuracy"]]
    not_better = [t for t in compared if t not in better]
    above = [t for t, s in tasks.items() if s["sft_accuracy"] > s["chance"]]
    gains = [s["sft_accuracy"] - s["base_accuracy"] for s in compared.values()]
    said = (f"The tuned model beats the base model on {len(better)} of the {len(compared)} tasks scored for both"
            + (f", by {100 * sum(gains) / len(gains):+.1f} points on average" if gains else ""))
    if not_better:
        said += f"; it does not on {', '.join(f'`{t}`' for t in not_better)}"
    said += f". It is above chance on {len(above)} of {len(tasks)} tasks."
    best = max(tasks, key=lambda t: tasks[t]["sft_accuracy"] - tasks[t]["chance"])
    return said + (f" Its best task against chance is `{best}`: {percent(tasks[best]['sft_accuracy'])} where "
                   f"guessing gets {percent(tasks[best]['chance'])}.")


def copying_label(copying: dict) -> str:
    """How much a model's second reading of a text gains on its first, in words: what the reading tasks need."""
    drop = 1 - copying["second_read"] / copying["first_read"]
    if drop >= 0.5:
        return "uses its context: the repeat costs it less than half"
    if drop >= 0.1:
        return "uses its context a little"
    return "barely uses its context: the repeat is almost as hard as the first reading"


def copying_meaning(base: dict, periodic_rows: float) -> str:
    """What the base model's copying figures mean for the reading tasks, and where the skill came from."""
    drop = 1 - base["second_read"] / base["first_read"]
    where = (f"This base model was pretrained with {100 * periodic_rows:.0f} % of its rows periodic "
             "(train.periodic_rows: a row's first 8 to 64 tokens repeated to its end), which rewards exactly this "
             "skill; natural text rewards it too seldom for a model this small to learn it in a few CPU minutes."
             if periodic_rows else
             "This base model saw natural text only (train.periodic_rows is 0), which rewards copying too seldom "
             "for a model this small to learn it in a few CPU minutes.")
    if drop < 0.03:
        return ("A model that barely uses its context cannot look a name up in a passage, however the tuning asks: "
                "its reading answers come from what it knows of the plays, not from the passage, and stay near "
                "chance on plays it was not tuned on. " + where)
    return ("The base model's second reading is cheaper: it has begun to copy, and the tuning can recruit that "
            "skill to look a name up in a passage (the accuracy table above, on plays it was never tuned on). "
            + where)


def copying_blocks(sft: SFTRun, periodic_rows: float) -> list:
    """Whether the models can find something in their context and say it again, which every reading task asks."""
    copying = sft.metrics.get("context_copying")
    if not copying:
        return []
    base, tuned = copying["base"], copying["tuned"]

    def drop(which: dict) -> str:
        return f"{100 * (1 - which['second_read'] / which['first_read']):.1f} %"

    return [
        Text(f"Can the model read at all? A reading question is answered by finding a name in the prompt and saying "
             f"it again. Here is that skill with no question asked: {base['texts']} of the held-out prompts, each "
             "given twice in a row. On the second reading every token follows exactly what it followed a moment "
             "ago, so a model that looks back (attend to where the current token came before, predict what "
             "followed it then: an induction head) finds the second reading nearly free."),
        Table(("model", "first reading (nats per token)", "second reading", "lower by", "so it"),
              [(name, f"{which['first_read']:.3f}", f"{which['second_read']:.3f}", drop(which),
                copying_label(which)) for name, which in (("base", base), ("tuned", tuned))]),
        Text(copying_meaning(base, periodic_rows)),
    ]


def name_spellings(tokenizer: Tokenizer, name: str) -> dict[str, list[int]]:
    """The token ids of `name` where a speech's heading has it (a line's start), after a space (as a sentence writes
    it: the space belongs to the name's first token, or is a token of its own where the vocabulary has no merge for
    it), and after a quote (as the questions write it; the quote is a token apart)."""
    quote = tokenizer.encode(' "').ids
    return {"heading": tokenizer.encode(name).ids, "space": tokenizer.encode(" " + name).ids,
            "quote": tokenizer.encode(f' "{name}').ids[len(quote):]}


def holds(ids: list[int], part: list[int]) -> bool:
    """Whether `part` is a run of `ids`."""
    return any(ids[i:i + len(part)] == part for i in range(len(ids) - len(part) + 1))


def name_blocks(run: Run, sft: SFTRun) -> list:
    """Why a question quotes the name it asks about, shown on a held-out verse question's name."""
    verse = sft.questions.get("verse_in_voice") or []
    if not verse:
        return []
    name = verse[0].answer.split("\n")[0].removesuffix(".")
    spelt = name_spellings(run.tokenizer, name)
    if holds(spelt["space"], spelt["heading"]):
        verdict = "Here the heading's tokens happen to be inside the other; for most names of the corpus they are not."
    else:
        verdict = ("Matching tokens cannot find one from the other; only a model that has learnt each name's two "
                   "spellings could.")
    quoted = ("has its heading's tokens" if spelt["quote"] == spelt["heading"] else
              "is still other tokens than its heading with this tokenizer")

    def spans(ids: list[int]) -> Tokens:
        return Tokens([(token_text(run.tokenizer, i), i) for i in ids])

    return [
        Text(f"Copying matches tokens, not letters. A byte-level BPE token carries the space before it, so a name "
             f"written after a space is, as a rule, other tokens than the same name heading a speech at a line's "
             f"start. {name} after a space:"),
        spans(spelt["space"]),
        Text("and as the heading of a speech:"),
        spans(spelt["heading"]),
        Text(f"{verdict} The questions therefore write the name they ask about in quotes (\"{name}\"): the quote is "
             f"a token apart, and the name after it {quoted}. Do the same in `python -m stages chat`: "
             "`Who speaks right after \"ROMEO\"?`, the name in capitals as the plays head speeches."),
    ]


def exercise_blocks(run: Run, sft: SFTRun) -> list:
    cfg = run.settings.sft
    return [
        Exercise(f"dvc exp run -S sft.max_steps={2 * cfg.max_steps}",
                 "this chapter's loss figure (the tuning's train and val curves) and its accuracy table",
                 "the train loss, on the training conversations, falls further; the val loss, on the held-out "
                 "questions' answers, does not fall with it, as it does not now (from "
                 f"{first_val(sft)} to {sft.history[-1].val_loss:.3f} here): more steps teach the training plays' "
                 "answers by heart, not reading. Only the sft stage and this guide rerun.",
                 (("sft.max_steps", str(2 * cfg.max_steps)),)),
        Exercise("dvc exp run -S train.periodic_rows=0",
                 "the copying table above, and the reading tasks' accuracy",
                 "pretraining on natural text only: a lower val bpb (no rows spent on repeats; 2.03 against 2.14 in "
                 "this project's run, docs/benchmarks.md), but a base model whose second reading costs about what "
                 "its first does (under 1 % cheaper there), and reading accuracies after tuning back near chance.",
                 (("train.periodic_rows", "0"),)),
    ]


def first_val(sft: SFTRun) -> str:
    val = [row.val_loss for row in sft.history if row.val_loss is not None]
    return f"{val[0]:.3f}" if val else "n/a"


def greedy_reply(answerer: GPTAnswerer, tokenizer: Tokenizer, sft: SFTRun, question: Question) -> str | None:
    """What the tuned model writes after the question, greedily, up to its <|end|>; None when it does not fit."""
    prompt = encode_prompt(tokenizer, sft.tokens, question.messages)
    budget = min(MAX_ANSWER_TOKENS, answerer.block_size + 1 - len(prompt))
    if budget < 1:
        return None
    ids = answerer.greedy(prompt, budget, sft.tokens.end, lambda generated: False)
    return tokenizer.decode([i for i in ids if i != sft.tokens.end], skip_special_tokens=True)


def sample_blocks(run: Run, sft: SFTRun) -> list:
    answerer = GPTAnswerer(sft.model)
    blocks: list = [Text(
        "The first held-out question of each task with the tuned model's answer: what it writes greedily "
        "(temperature 0) until it closes its turn, and, for a question with candidates, the candidate it scores "
        "highest (what the table counts). `python -m stages chat` talks to the same model.")]
    shown = [(task, questions[0]) for task, questions in sft.questions.items() if questions]
    for task, question in shown:
        answered = answer_question(answerer, run.tokenizer, sft.tokens, question)
        written = greedy_reply(answerer, run.tokenizer, sft, question)
        if answered is None or written is None:
            continue
        verdict_word = "right" if answered.correct else "wrong"
        lines = [f"tuned model (greedy): {written}"]
        if question.candidates is not None:
            lines.append(f"its choice among {', '.join(question.candidates)}: {answered.reply} ({verdict_word})")
        else:
            lines.append(f"format: {'passes' if answered.correct else 'fails'}")
        lines.append(f"{'right answer' if question.candidates is not None else 'an answer of the right format'}:"
                     f" {question.answer}")
        blocks += [Text(f"`{task}` ({kind(task)})"), Pre("user: " + question.messages[-1].content),
                   Pre("\n".join(lines))]
    return blocks


def absent_blocks(run: Run) -> list:
    return [Text(
        f"Instruction tuning trains the base model further on conversations, the loss on the assistant's answers "
        f"only, so that it answers questions instead of continuing text. This run has not been tuned yet: "
        f"`{literal(str(run.paths.sft_metrics))}` is not there. `dvc repro sft` (or `python -m stages sft`) tunes "
        f"`{literal(str(run.paths.model))}` into `{literal(str(run.paths.sft_model))}` and scores the held-out tasks "
        "before and after, in a few minutes on a CPU; `dvc repro guide` then rebuilds this guide with this chapter "
        "filled in.")]


def sft_chapter(run: Run, figure_dir: Path) -> Chapter:
    sft = run.sft
    if sft is None:
        return Chapter(SLUG, TITLE, absent_blocks(run))
    return Chapter(SLUG, TITLE, [*mask_blocks(run, sft), *loss_blocks(run, sft, figure_dir),
                                 *accuracy_blocks(run, sft, figure_dir),
                                 *copying_blocks(sft, run.settings.train.periodic_rows), *name_blocks(run, sft),
                                 *sample_blocks(run, sft), *exercise_blocks(run, sft)])
