"""The built-in conversation set (llm/sft_data.py) on a small invented corpus: plays parsed into speeches, the
held-out split, determinism, and every answer right by construction."""

import dataclasses
import json
import re
from pathlib import Path

import pytest

from llm.chat import Conversation
from llm.config import EOT
from llm.configs.sft import SFTConfig
from llm.configs.tokenizer import TokenizerConfig
from llm.documents import DocumentShardWriter, iter_documents
from llm.errors import ConfigError
from llm.sft_data import (
    KNOWLEDGE_TASKS,
    MAX_SPEECHES,
    MIN_SPEECHES,
    READING_TASKS,
    TASKS,
    build_sft_set,
    is_heldout,
    parse_play,
    speaker_heading,
)
from llm.tasks import format_ok
from llm.tokenizer import train_tokenizer

WORDS = ("gentle", "noble", "bitter", "golden", "silent", "weary", "merry", "sullen", "proud", "pale", "sweet", "wild")
FAMILIES = ("ASH", "BAY", "COLE", "DALE", "ELM", "FENN", "GALE", "HART", "IVES", "JUDD", "KEMP", "LARK")
NOUNS = ("moon", "crown", "sword", "river", "garden", "tempest", "letter", "hour", "heart", "ghost", "feast", "field")


def line_text(play: int, speech: int, line: int) -> str:
    """A verse line unique to (play, speech, line), and 7-9 words long, so that the well-known rule can take it."""
    return (f"{WORDS[(speech + line) % 12].capitalize()} {NOUNS[play % 12]} of play {play} "
            f"speech {speech} line {line}" + " indeed" * (speech % 2))


def play_text(play: int, heading_style: str = "upper") -> tuple[str, list[str]]:
    """An invented play: a title, a list of persons, acts and scenes, stage directions, and speeches by five
    speakers (one of them a line "Farewell." that looks like a heading but heads only one paragraph)."""
    speakers = [f"{name} {FAMILIES[play]}" for name in ("ALDO", "BRIN", "CORA", "DUNSTAN", "ESME")]
    if heading_style == "mixed":
        speakers = [name.title() for name in speakers]
    parts = [f"THE TRAGEDY OF PLAY {play}", "by Nobody", "PERSONS REPRESENTED.\n\n" + "\n".join(
        f"{name}, a person." for name in speakers), "ACT I.", "SCENE I. A room."]
    for speech in range(60):
        if speech % 13 == 12:
            parts.append("[Enter others.]")
        if speech == 30:
            parts += ["ACT II.", "SCENE I. A field."]
        speaker = speakers[(speech * 7 + speech // 5) % 5] if speech % 3 else speakers[speech % 2]
        heading = speaker if heading_style == "bare" else f"{speaker}."
        lines = [line_text(play, speech, line) for line in range(1 + speech % 3)]
        parts.append(heading + "\n" + "\n".join(lines))
        if speech == 40:
            parts.append("Farewell.\nThe rest is silence here.")
    return "\n\n".join(parts) + "\n", speakers


POEM = "THE SONNETS\n\nI\n\nFrom fairest creatures we desire increase,\nThat thereby beauty's rose might never die.\n"


def write_corpus(clean: Path, plays: int = 12) -> dict[str, tuple[str, list[str]]]:
    """A cleaned corpus of `plays` invented plays (headings in the three styles the real corpus has) and one poem;
    returns {doc_id: (text, speakers)}."""
    clean.mkdir(parents=True, exist_ok=True)
    writer = DocumentShardWriter(clean, 1 << 20)
    corpus = {}
    for play in range(plays):
        text, speakers = play_text(play, ("upper", "mixed", "bare")[play % 3])
        corpus[f"play_{play}.txt"] = (text, speakers)
    corpus["sonnets.txt"] = (POEM, [])
    for doc_id, (text, _) in corpus.items():
        writer.add(doc_id, "test", text, len(text.encode()))
    writer.close()
    return corpus


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[list[tuple[str, str]], dict[str, tuple[str, list[str]]]]:
    plays = write_corpus(tmp_path / "clean")
    return list(iter_documents(tmp_path / "clean")), plays


CFG = SFTConfig(seed=3, heldout_fraction=0.3, train_conversations=140, questions_per_task=8, shots=2)


def contents(conversation: Conversation) -> str:
    return "\n".join(message.content for message in conversation.messages)


def test_a_play_is_read_as_speeches_and_a_poem_as_none() -> None:
    text, speakers = play_text(0)
    play = parse_play("p", text)
    assert play is not None and play.title == "THE TRAGEDY OF PLAY 0"
    assert len(play.speeches) == 60
    assert {speech.speaker for speech in play.speeches} == set(speakers)
    assert play.speeches[0].lines == (line_text(0, 0, 0),)
    assert play.speeches[2].lines == tuple(line_text(0, 2, line) for line in range(3))
    # a stage direction, an act heading or another paragraph ends a run of consecutive speeches
    runs = [speech.run for speech in play.speeches]
    assert runs[11] == runs[0] and runs[12] != runs[11] and runs[30] != runs[29] and runs[41] != runs[40]
    for style in ("mixed", "bare"):
        text, speakers = play_text(1, style)
        assert {speech.speaker for speech in parse_play("p", text).speeches} == set(speakers)
    assert parse_play("sonnets", POEM) is None


def test_headings_that_are_no_speakers() -> None:
    assert speaker_heading("Ham.") == "Ham" and speaker_heading("MRS. PAGE.") == "MRS. PAGE"
    assert speaker_heading("ANTIPHOLUS OF SYRACUSE.") == "ANTIPHOLUS OF SYRACUSE"
    assert speaker_heading("THESEUS") == "THESEUS" and speaker_heading("1 Clown.") == "1 Clown"
    for line in ("ACT I.", "SCENE II. A room.", "PROLOGUE.", "II", "Farewell", "No more.", "O, help!",
                 "Beauty, truth, and rarity.", "A VERY LONG NAME THAT IS SURELY NO SPEAKER AT ALL."):
        assert speaker_heading(line) is None, line


def test_no_heldout_play_is_in_training(corpus) -> None:
    documents, plays = corpus
    sft = build_sft_set(documents, CFG)
    heldout = [doc_id for doc_id in plays if doc_id != "sonnets.txt" and is_heldout(doc_id, CFG)]
    assert heldout and len(heldout) < len(plays) - 1
    assert sft.counts["heldout_plays"] == len(heldout) and sft.counts["other_documents"] == 1
    training_text = "\n".join(contents(c) for c in sft.train)
    question_text = "\n".join(q.messages[0].content for qs in sft.questions.values() for q in qs)
    for doc_id, (_, speakers) in plays.items():
        play_number = doc_id.removeprefix("play_").removesuffix(".txt")
        marker = f" of play {play_number} speech "
        if doc_id in heldout:
            assert marker not in training_text, doc_id
            assert not any(f"\n{name}." in training_text or training_text.startswith(f"{name}.")
                           for name in speakers), doc_id
        elif doc_id != "sonnets.txt":
            assert marker not in question_text, doc_id
    shot_text = "\n".join(contents(c) for shots in sft.shots.values() for c in shots)
    assert all(f" of play {doc_id[5:-4]} speech " not in shot_text for doc_id in heldout)


def test_the_same_seed_gives_the_same_set_byte_for_byte(corpus) -> None:
    documents, _ = corpus

    def dump(sft) -> str:
        return json.dumps({"train": [c.to_json() for c in sft.train],
                           "questions": {t: [[q.messages[0].content, q.answer, q.candidates] for q in qs]
                                         for t, qs in sft.questions.items()},
                           "shots": {t: [c.to_json() for c in cs] for t, cs in sft.shots.items()},
                           "counts": sft.counts})

    first = dump(build_sft_set(documents, CFG))
    assert first == dump(build_sft_set(list(documents), CFG))
    assert first != dump(build_sft_set(documents, dataclasses.replace(CFG, seed=4)))


def test_sizes_and_the_task_mix(corpus) -> None:
    documents, _ = corpus
    sft = build_sft_set(documents, CFG)
    assert len(sft.train) == CFG.train_conversations == sft.counts["train_conversations"]
    assert set(sft.questions) == set(TASKS) and all(len(qs) == CFG.questions_per_task for qs in sft.questions.values())
    for conversation in sft.train:
        assert [m.role for m in conversation.messages] == ["user", "assistant"]
    assert all(len(shots) == CFG.shots for shots in sft.shots.values())
    # the shots of a task are training conversations of its own kind, with different answers
    counts = [c.messages[1].content for c in sft.shots["speech_count"]]
    assert len(set(counts)) == len(counts) and all(c in sft.train for cs in sft.shots.values() for c in cs)


def speeches_in(prompt: str, speakers: list[str]) -> list[tuple[str, list[str]]]:
    """(speaker, lines) of the passage in a reading prompt, read back by the test's own rule."""
    found: list[tuple[str, list[str]]] = []
    for line in prompt.rsplit("\n\n", 1)[0].split("\n"):
        if line.endswith(".") and line[:-1] in speakers:
            found.append((line[:-1], []))
        elif found and line.strip() and " speech " in line:
            found[-1][1].append(line)
    return found


def test_every_answer_is_right_by_construction(corpus) -> None:
    documents, plays = corpus
    sft = build_sft_set(documents, CFG)
    titles = {text.split("\n")[0]: doc_id for doc_id, (text, _) in plays.items()}
    heldout_titles = {title for title, doc_id in titles.items() if is_heldout(doc_id, CFG)}
    for task, questions in sft.questions.items():
        for q in questions:
            prompt = q.messages[0].content
            if q.candidates is not None:
                assert q.answer in q.candidates and len(set(q.candidates)) == len(q.candidates)
                assert len(q.candidates) == (MAX_SPEECHES - MIN_SPEECHES + 1 if task == "speech_count"
                                             else min(CFG.candidates, len(heldout_titles)) if task == "play_of_line"
                                             else CFG.candidates)
            if task in READING_TASKS:
                doc_id = re.search(r" of play (\d+) speech ", prompt).group(1)
                speakers = plays[f"play_{doc_id}.txt"][1]
                passage = speeches_in(prompt, speakers)
                names = [name for name, _ in passage]
                assert MIN_SPEECHES <= len(passage) <= MAX_SPEECHES
                question_part = prompt.rsplit("\n\n", 1)[1]
                if task == "first_speaker":
                    assert q.answer == names[0]
                elif task == "next_speaker":
                    asked = [name for name in set(names) if name in question_part]
                    assert len(asked) == 1 and names.count(asked[0]) == 1
                    assert names[names.index(asked[0]) + 1] == q.answer
                elif task == "who_said":
                    quoted = re.search(r'"(.*)"', question_part).group(1)
                    assert [name for name, lines in passage if quoted in lines] == [q.answer]
                else:
                    assert q.answer == str(len(passage))
            elif task in KNOWLEDGE_TASKS:
                quoted = re.search(r'"(.*)"', prompt).group(1)
                holders = [doc_id for doc_id, (text, _) in plays.items() if quoted in text]
                assert len(holders) == 1
                text, speakers = plays[holders[0]]
                if task == "play_of_line":
                    assert titles[q.answer] == holders[0] and q.answer not in prompt
                    # Tuning teaches training titles as answers: a held-out question offers held-out ones only.
                    assert set(q.candidates) <= heldout_titles
                else:
                    assert text.split("\n")[0] in prompt and q.answer not in prompt
                    assert set(q.candidates) <= set(speakers)
                    heading = text[:text.index(quoted)].rstrip("\n").rsplit("\n\n", 1)[1].split("\n")[0]
                    assert heading.removesuffix(".") == q.answer
            else:
                heading, *lines = q.answer.split("\n")
                assert heading.endswith(".") and heading[:-1] in prompt
                text, speakers = next(plays[d] for d in plays if heading[:-1] in plays[d][1])
                assert text.split("\n")[0] in prompt and all(line in text for line in lines)
                asked = re.search(r"\b(\d|two|three|four) lines\b", prompt).group(1)
                assert {"two": 2, "three": 3, "four": 4}.get(asked, asked) in (len(lines), str(len(lines)))
                assert format_ok(q.answer, q.answer) and q.candidates is None


def test_a_name_a_question_asks_about_has_the_tokens_of_its_heading(corpus) -> None:
    """The asked name (next_speaker, verse_in_voice) is quoted, so that a byte-level tokenizer gives it the tokens the
    speaker's heading has at a line's start; written after a space, its first token would carry the space."""
    documents, plays = corpus
    tokenizer = train_tokenizer((text for _, text in documents),
                                TokenizerConfig(vocab_size=600, min_frequency=2, special_tokens=(EOT,)))
    sft = build_sft_set(documents, CFG)
    for task in ("next_speaker", "verse_in_voice"):
        assert sft.questions[task]
        for q in sft.questions[task]:
            question = q.messages[0].content.rsplit("\n\n", 1)[-1]  # after the passage, if there is one
            if task == "verse_in_voice":
                name = q.answer.split("\n")[0].removesuffix(".")
            else:
                speakers = next(speakers for _, speakers in plays.values() if q.answer in speakers)
                name = next(name for name in speakers if name in question)
            name_ids, asked = tokenizer.encode(name).ids, tokenizer.encode(question).ids  # the name as a heading has it
            assert any(asked[i:i + len(name_ids)] == name_ids for i in range(len(asked))), (name, question)


def test_what_does_not_fit_is_dropped_and_counted(corpus) -> None:
    documents, _ = corpus
    limit = 260  # characters: passages of several speeches do not fit

    def fits(conversation: Conversation) -> bool:
        return len(contents(conversation)) <= limit

    sft = build_sft_set(documents, CFG, fits=fits)
    assert sum(v for k, v in sft.counts.items() if k.startswith("too_long.")) > 0
    assert all(fits(c) for c in sft.train)
    for questions in sft.questions.values():
        for q in questions:
            longest = max(q.candidates or (q.answer,), key=len)
            assert len(q.messages[0].content) + 1 + len(longest) <= limit


def test_knowledge_questions_only_on_plays_the_base_model_trained_on(corpus) -> None:
    documents, plays = corpus
    heldout = sorted(doc_id for doc_id in plays if doc_id != "sonnets.txt" and is_heldout(doc_id, CFG))
    unseen = heldout[0]
    sft = build_sft_set(documents, CFG, pretrained=lambda doc_id: doc_id != unseen)
    assert sft.counts["heldout_plays_pretrained"] == len(heldout) - 1
    marker = f" of play {unseen[5:-4]} speech "
    assert all(marker not in q.messages[0].content for task in KNOWLEDGE_TASKS for q in sft.questions[task])
    assert any(marker in q.messages[0].content for task in READING_TASKS for q in sft.questions[task])


@pytest.mark.parametrize("fraction", [0.001, 0.999])
def test_a_split_with_an_empty_side_names_the_key(corpus, fraction: float) -> None:
    documents, _ = corpus
    with pytest.raises(ConfigError, match=r"sft\.heldout_fraction"):
        build_sft_set(documents, SFTConfig(heldout_fraction=fraction))
