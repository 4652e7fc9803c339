"""Instruction tuning (llm/sft.py, the sft stage): packed conversation batches, the Trainer reused with them, and
the stage's outputs on a tiny project."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llm.chat import ChatTokens, Conversation, Message, encode_conversation
from llm.configs.data import DataConfig
from llm.configs.mlflow import MlflowConfig
from llm.configs.sft import SFTConfig
from llm.distributed import Runtime
from llm.documents import DocumentShardWriter
from llm.model import IGNORE
from llm.model_io import load_model_dir
from llm.sft import ConversationBatches, SFTPaths, run_sft
from llm.tokenizer import load_tokenizer
from llm.train import Trainer, TrainingData
from tests.conftest import make_model_dir, only_mlflow_run

NAMES = ["HAMLET", "OPHELIA", "POLONIUS", "LAERTES", "HORATIO", "GERTRUDE", "CLAUDIUS", "OSRIC"]
WORDS = ["the", "king", "my", "lord", "sweet", "night", "day", "love", "death", "heaven", "grief", "honour",
         "sword", "crown", "ghost", "father"]


def play_text(index: int) -> str:
    """An invented play: a title, then speeches ("NAME.\\n" and a line or two of verse), seeded by `index`."""
    rng = np.random.default_rng(index)
    speeches = [f"THE TRAGEDY OF PLAY{index}\n\nACT I.\n\nSCENE I. A room.\n"]
    for _ in range(60):
        name = NAMES[rng.integers(len(NAMES))]
        lines = [" ".join(rng.choice(WORDS, size=6)).capitalize() + "," for _ in range(rng.integers(1, 3))]
        speeches.append(f"{name}.\n" + "\n".join(lines) + "\n")
    return "\n".join(speeches)


def write_plays(folder: Path) -> Path:
    """A cleaned corpus (data/clean's format) of eight invented plays, for the built-in conversations."""
    folder.mkdir()
    writer = DocumentShardWriter(folder, shard_bytes=1 << 20)
    for i in range(8):
        text = play_text(i)
        writer.add(f"play{i}.txt", f"play{i}.txt", text, len(text.encode()))
    writer.close()
    return folder


def conversations(tokenizer, tokens, count: int = 12) -> list:
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        turns = [Message("user", f"Who speaks {i}?"), Message("assistant", NAMES[rng.integers(len(NAMES))])]
        if i % 3 == 0:
            turns = [Message("system", "Be brief."), *turns]
        out.append(encode_conversation(tokenizer, tokens, Conversation(tuple(turns))))
    return out


@pytest.fixture
def chat(chat_tokenizer_path):
    tokenizer = load_tokenizer(chat_tokenizer_path)
    return tokenizer, ChatTokens.from_tokenizer(tokenizer, chat_tokenizer_path)


def test_a_batch_packs_whole_conversations_and_trains_only_their_answers(chat):
    tokenizer, tokens = chat
    encoded = conversations(tokenizer, tokens)
    batches = ConversationBatches(encoded, block_size=64, pad_id=tokens.eot, name="test")
    x, y = batches.batch(6, seed=1, step=3)
    assert x.shape == y.shape == (6, 64)
    x2, y2 = batches.batch(6, seed=1, step=3)
    assert torch.equal(x, x2) and torch.equal(y, y2), "a pure function of seed and step"
    trained_targets = {tuple(t for t, keep in zip(c.ids[1:], c.trained[1:], strict=True) if keep) for c in encoded}
    for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
        assert row_x[0] == tokens.eot, "a row starts with a conversation"
        kept = [t for t in row_y if t != IGNORE]
        assert kept and all(t not in (tokens.user, tokens.system, tokens.assistant, tokens.eot) for t in kept)
        # The trained targets of a row are the answers (each closed by <|end|>) of the conversations it packs.
        answers, current = [], []
        for t in kept:
            current.append(t)
            if t == tokens.end:
                answers.append(tuple(current))
                current = []
        assert not current and all(answer in trained_targets for answer in answers)
    # Ranks take slices of the one global batch.
    halves = [batches.batch(3, seed=1, step=3, rank=r, world_size=2) for r in (0, 1)]
    assert torch.equal(torch.cat([h[0] for h in halves]), x) and torch.equal(torch.cat([h[1] for h in halves]), y)


def test_tuning_resumed_from_a_checkpoint_equals_an_uninterrupted_tuning(chat, chat_tokenizer_path, tmp_path):
    tokenizer, tokens = chat
    base_dir = make_model_dir(tmp_path / "base", chat_tokenizer_path, arch="modern", block_size=64)
    base, _ = load_model_dir(base_dir)
    weights = {k: v.clone() for k, v in base.state_dict().items()}
    encoded = conversations(tokenizer, tokens)
    data = TrainingData(ConversationBatches(encoded, 64, tokens.eot, "train"),
                        ConversationBatches(encoded[:4], 64, tokens.eot, "val"), {"test": 1})
    cfg = SFTConfig(max_steps=6, batch_size=2, warmup_steps=1, eval_interval=3, eval_batches=1, log_interval=1,
                    checkpoint_interval=2, dtype="float32", lr=1e-3).training()

    def tune(checkpoints: Path, stop_after: int | None = None):
        trainer = Trainer(base.config, cfg, data, checkpoints, Runtime(), initial_weights=weights)
        progress, _ = trainer.resume()
        return trainer.fit(progress, stop_after=stop_after)

    full = tune(tmp_path / "full")
    tune(tmp_path / "cut", stop_after=4)
    resumed = tune(tmp_path / "cut")
    assert resumed.resumed_from == 4
    assert [row.train_loss for row in resumed.history] == pytest.approx([row.train_loss for row in full.history],
                                                                        abs=1e-6)
    for name, tensor in full.weights.items():
        torch.testing.assert_close(resumed.weights[name], tensor, rtol=0, atol=1e-6)
    assert full.history[0].train_loss > full.history[-1].train_loss, "the answers are learnt"


def test_the_sft_run_writes_a_model_metrics_and_a_loss_table(chat_tokenizer_path, tmp_path):
    base_dir = make_model_dir(tmp_path / "base", chat_tokenizer_path, arch="modern", block_size=256)
    clean = write_plays(tmp_path / "clean")
    cfg = SFTConfig(train_conversations=60, questions_per_task=3, shots=1, max_steps=4, batch_size=2,
                    warmup_steps=1, eval_interval=2, eval_batches=1, log_interval=2, checkpoint_interval=2,
                    dtype="float32")
    paths = SFTPaths(base_dir, clean, None, tmp_path / "ckpt", tmp_path / "sft", tmp_path / "sft.json",
                     tmp_path / "sft.csv")
    mlflow = MlflowConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="sft-test")
    metrics = run_sft(cfg, DataConfig(val_fraction=0.25), mlflow, paths, {"sft": {"max_steps": 4}},
                      changes={"sft.max_steps": (300, 4)})
    assert json.loads(paths.metrics.read_text())["tasks"] == metrics["tasks"]
    assert metrics["tasks"], "at least one task was scored"
    for task, score in metrics["tasks"].items():
        assert score["n"] > 0 and 0 <= score["chance"] < 1, task
        for which in ("base_accuracy", "sft_accuracy"):
            assert score[which] is None or 0 <= score[which] <= 1, (task, which)
    assert metrics["steps"] == 4
    # The tuning's MLflow run is named and tagged after what differs from the committed params, and carded, as a
    # training's run is.
    client, run = only_mlflow_run(mlflow.tracking_uri, "sft-test")
    assert run.info.run_name == "max_steps=4" and run.data.tags["params_changed.sft.max_steps"] == "300 -> 4"
    assert run.data.tags["stage"] == "sft" and float(run.data.tags["card.wall_seconds.sft"]) > 0
    assert run.data.tags["card.cpu_cores"] and "run_card.md" in [a.path for a in client.list_artifacts(run.info.run_id)]
    copying = json.loads(paths.metrics.read_text())["context_copying"]
    for which in ("base", "tuned"):  # the held-out reading prompts, each read twice by each model
        assert copying[which]["texts"] > 0 and copying[which]["first_read"] > 0 and copying[which]["second_read"] > 0
    assert copying["base"] != copying["tuned"]
    tuned, tokenizer = load_model_dir(paths.out)
    assert tuned.config == load_model_dir(base_dir)[0].config
    assert paths.plots.read_text().splitlines()[0].startswith("step,")


def prose_corpus(folder: Path) -> Path:
    """A cleaned corpus with no play in it (a user's own prose)."""
    folder.mkdir()
    writer = DocumentShardWriter(folder, shard_bytes=1 << 20)
    for i in range(6):
        text = f"Chapter {i}. " + "It was a bright cold day in April, and the clocks were striking. " * 20
        writer.add(f"doc{i}.txt", f"doc{i}.txt", text, len(text.encode()))
    writer.close()
    return folder


TINY = {"max_steps": 2, "batch_size": 2, "warmup_steps": 1, "eval_interval": 2, "eval_batches": 1, "log_interval": 1,
        "checkpoint_interval": 2, "dtype": "float32"}


def test_the_builtin_set_on_a_corpus_without_plays_says_what_to_do(chat_tokenizer_path, tmp_path):
    from llm.errors import ConfigError

    base_dir = make_model_dir(tmp_path / "base", chat_tokenizer_path, arch="modern", block_size=128)
    paths = SFTPaths(base_dir, prose_corpus(tmp_path / "clean"), None, tmp_path / "ckpt", tmp_path / "sft",
                     tmp_path / "sft.json", tmp_path / "sft.csv")
    with pytest.raises(ConfigError, match=r"sft\.source: the built-in conversations are made from plays"):
        run_sft(SFTConfig(**TINY), DataConfig(val_fraction=0.25), MlflowConfig(tracking_uri="http://127.0.0.1:9"),
                paths, {})
    assert not paths.out.exists() and not paths.metrics.exists()


def test_own_conversations_on_a_corpus_without_plays_are_tuned_on_with_a_val_slice_and_no_tasks(
        chat_tokenizer_path, tmp_path):
    base_dir = make_model_dir(tmp_path / "base", chat_tokenizer_path, arch="modern", block_size=128)
    conversations = tmp_path / "sft_data"
    conversations.mkdir()
    lines = [json.dumps({"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content":
                                                                                   f"{i}."}]}) for i in range(40)]
    (conversations / "mine.jsonl").write_text("\n".join([*lines, "not json", '{"messages": []}']) + "\n")
    paths = SFTPaths(base_dir, prose_corpus(tmp_path / "clean"), conversations, tmp_path / "ckpt", tmp_path / "sft",
                     tmp_path / "sft.json", tmp_path / "sft.csv")
    metrics = run_sft(SFTConfig(source="mine", **TINY), DataConfig(val_fraction=0.25),
                      MlflowConfig(tracking_uri="http://127.0.0.1:9"), paths, {})
    assert metrics["tasks"] == {} and metrics["steps"] == 2
    assert metrics["train_conversations"] == 38, "every 20th of the 40 conversations is the val set"
    assert metrics["dropped"] == {"bad_json": 1, "no_assistant": 1}
    assert (paths.out / "model.safetensors").is_file()
