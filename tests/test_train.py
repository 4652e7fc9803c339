import dataclasses
import logging

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from llm.checkpoint import checkpoint_dirs
from llm.configs.train import TrainConfig
from llm.data import PERIOD_TOKENS, TokenWindows
from llm.errors import InputError, TrainingDiverged
from llm.model import GPT, GPTConfig
from llm.shards import ShardWriter, SplitMeta, TokensMeta, read_meta, write_meta
from llm.throughput import ThroughputMeter, peak_flops
from llm.train import has_fast_bf16, resolve_dtype, train

VOCAB = 64


@pytest.fixture
def tokens_dir(tmp_path):
    """Learnable synthetic shards: a noisy cycle through the vocabulary, documents split by id 0."""
    rng = np.random.default_rng(0)
    out = tmp_path / "tokens"
    out.mkdir()
    splits = {}
    for split, size in (("train", 20_000), ("val", 4_000)):
        stream = (np.arange(size) * 3 + rng.integers(0, 2, size)) % (VOCAB - 1) + 1
        stream[::500] = 0
        writer = ShardWriter(out, split, np.dtype("<u2"), shard_tokens=7_000)
        writer.write(stream)
        names = [p.name for p in writer.close()]
        splits[split] = SplitMeta(documents=size // 500, tokens=size, bytes=size, shards=tuple(names))
    write_meta(out, TokensMeta(vocab_size=VOCAB, dtype="uint16", eot_id=0, tokenizer_sha256="test",
                               shard_tokens=7_000, splits=splits))
    return out


def model_config(arch="gpt2", **overrides) -> GPTConfig:
    return GPTConfig(**{"arch": arch, "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "dropout": 0.1,
                        "vocab_size": VOCAB, **overrides})


def train_config(**overrides) -> TrainConfig:
    fields = {"batch_size": 4, "grad_accum_steps": 2, "max_steps": 12, "lr": 3e-3, "min_lr": 3e-4,
              "warmup_steps": 2, "dtype": "float32", "eval_interval": 6, "eval_batches": 2, "log_interval": 1,
              "checkpoint_interval": 4, "keep_checkpoints": 5, "seed": 3, **overrides}
    return TrainConfig(**fields)


def run(tokens_dir, ckpt, cfg=None, model=None, **kwargs):
    return train(model or model_config(), cfg or train_config(), tokens_dir, ckpt, "cpu", **kwargs)


def test_windows_are_a_pure_function_of_seed_step_and_ranks_slice_the_global_batch(tokens_dir):
    data = TokenWindows(read_meta(tokens_dir).shard_paths(tokens_dir, "train"), block_size=32, vocab_size=VOCAB,
                        name="train")
    x1, y1 = data.batch(8, seed=1, step=5)
    x2, _ = data.batch(8, seed=1, step=5)
    x3, _ = data.batch(8, seed=1, step=6)
    assert x1.shape == (8, 32) and (x1 == x2).all() and not (x1 == x3).all()
    assert (x1[:, 1:] == y1[:, :-1]).all()
    halves = [data.batch(4, seed=1, step=5, rank=rank, world_size=2)[0] for rank in (0, 1)]
    assert (torch.cat(halves) == x1).all(), "2 ranks x 4 windows are the 8 windows of one process"


def test_periodic_rows_repeat_their_first_period_and_leave_the_other_windows_as_they_were(tokens_dir):
    paths = read_meta(tokens_dir).shard_paths(tokens_dir, "train")
    plain = TokenWindows(paths, block_size=32, vocab_size=VOCAB, name="train")
    mixed = TokenWindows(paths, block_size=32, vocab_size=VOCAB, name="train", periodic_rows=0.5)
    periodic = 0
    for step in range(20):
        x, y = plain.batch(8, seed=1, step=step)
        mx, my = mixed.batch(8, seed=1, step=step)
        assert (mx[:, 1:] == my[:, :-1]).all()
        for row, mrow, mlast in zip(x, mx, my[:, -1], strict=True):
            window = torch.cat([mrow, mlast[None]])
            if (mrow == row).all():
                continue
            periodic += 1
            # The row is its own first `period` tokens (those of the plain window) repeated to the end.
            period = next(p for p in range(PERIOD_TOKENS[0], PERIOD_TOKENS[1] + 1)
                          if (window[p:] == window[:-p]).all())
            assert (window[:period] == row[:period]).all()
    assert 40 <= periodic <= 120, f"{periodic} of 160 rows periodic, half expected"
    halves = [mixed.batch(4, seed=1, step=3, rank=rank, world_size=2)[0] for rank in (0, 1)]
    assert (torch.cat(halves) == mixed.batch(8, seed=1, step=3)[0]).all(), "ranks slice the same global batch"


def test_the_token_shift_adds_the_previous_tokens_embedding_only():
    cfg = model_config("modern", dropout=0.0)
    assert cfg.token_shift and not model_config("llama").token_shift
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    assert not model.token_shift.weight.any(), "starts at zero: a new model computes what it would without it"
    with torch.no_grad():
        model.token_shift.weight.normal_()
    idx = torch.randint(0, VOCAB, (1, 12))
    changed = idx.clone()
    changed[0, 5] = (idx[0, 5] + 1) % VOCAB
    x, _ = model.embed(idx)
    cx, _ = model.embed(changed)
    differs = (x != cx).any(dim=-1)[0].tolist()
    assert differs == [i in (5, 6) for i in range(12)], "token 5 reaches its own position and the next only"


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_both_variants_train_and_the_loss_falls(tokens_dir, tmp_path, arch, dtype):
    cfg = train_config(max_steps=60, dtype=dtype, eval_interval=60, checkpoint_interval=60)
    result = run(tokens_dir, tmp_path / "ckpt", cfg, model_config(arch, dropout=0.0))
    losses = result.step_losses
    assert len(losses) == 60
    assert np.mean(losses[-5:]) < losses[0] - 1.0
    assert result.metrics["val_loss"] < np.log(VOCAB) - 1.0
    assert result.metrics["tokens_seen"] == 60 * 4 * 2 * 32
    assert result.metrics["tokens_per_sec"] > 0 and 0 < result.metrics["mfu"] < 1


# modern: no biases or norm gains, so AdamW holds only the embeddings and the head beside Muon
@pytest.mark.parametrize(("optimizer", "arch"), [("adamw", "gpt2"), ("muon", "gpt2"), ("muon", "modern")])
def test_a_resumed_run_matches_an_uninterrupted_one(tokens_dir, tmp_path, optimizer, arch):
    cfg, model = train_config(optimizer=optimizer), model_config(arch)
    probe = [0, 5, 9, 12, 3]  # the attention on these tokens is recorded at each evaluation
    full = run(tokens_dir, tmp_path / "full", cfg, model, attention_ids=probe)
    interrupted_dir = tmp_path / "interrupted"
    first = run(tokens_dir, interrupted_dir, cfg, model, stop_after=6, attention_ids=probe)
    # Simulate a crash after step 6 but before its checkpoint landed: the newest is then step 4.
    [newest, *_] = checkpoint_dirs(interrupted_dir)
    assert newest.name == "step_00000006"
    newest.rename(newest.with_name(".crashed"))
    resumed = run(tokens_dir, interrupted_dir, cfg, model, attention_ids=probe)
    assert resumed.resumed_from == 4
    np.testing.assert_allclose(first.step_losses[:4] + resumed.step_losses, full.step_losses, rtol=0, atol=1e-6)
    assert resumed.metrics["val_loss"] == pytest.approx(full.metrics["val_loss"], abs=1e-6)
    assert resumed.metrics["tokens_seen"] == full.metrics["tokens_seen"]
    # What users read is the whole run's too: the history (plots/train.csv, MLflow) and the final train loss.
    assert [row.step for row in resumed.history] == [row.step for row in full.history]
    np.testing.assert_allclose([row.train_loss for row in resumed.history],
                               [row.train_loss for row in full.history], rtol=0, atol=1e-6)
    assert resumed.metrics["train_loss"] == pytest.approx(full.metrics["train_loss"], abs=1e-6)
    # The attention record too (the guide's evolution): step 0 and every evaluation, frames equal.
    assert resumed.attention.steps == full.attention.steps == [0, 6, 12]
    np.testing.assert_allclose(np.stack(resumed.attention.maps), np.stack(full.attention.maps), rtol=0, atol=1e-6)


def test_muon_lowers_the_loss_faster_than_adamw_at_the_same_steps(tokens_dir, tmp_path):
    def val_loss(optimizer: str) -> float:
        cfg = train_config(max_steps=40, optimizer=optimizer, eval_interval=40, checkpoint_interval=40,
                           log_interval=40)
        return run(tokens_dir, tmp_path / optimizer, cfg, model_config(dropout=0.0)).metrics["val_loss"]

    adamw, muon = val_loss("adamw"), val_loss("muon")
    assert muon < adamw - 0.03, (muon, adamw)  # 2.334 vs 2.393 measured


def test_an_incompatible_checkpoint_is_not_resumed(tokens_dir, tmp_path, caplog):
    ckpt = tmp_path / "ckpt"
    run(tokens_dir, ckpt, stop_after=4)
    with caplog.at_level(logging.WARNING):
        result = run(tokens_dir, ckpt, train_config(lr=1e-3))
    assert result.resumed_from == 0
    assert "different model, data, training config or code" in caplog.text
    with caplog.at_level(logging.WARNING):
        assert run(tokens_dir, ckpt, model=model_config(n_embd=64)).resumed_from == 0


def test_auto_dtype_follows_the_hardware_and_is_the_same_run_as_its_resolution(tokens_dir, tmp_path):
    cpu = torch.device("cpu")
    resolved = resolve_dtype("auto", cpu)
    assert resolved == ("bfloat16" if has_fast_bf16(cpu) else "float32")
    assert [resolve_dtype(dtype, cpu) for dtype in ("float32", "bfloat16")] == ["float32", "bfloat16"]
    ckpt = tmp_path / "ckpt"
    first = run(tokens_dir, ckpt, train_config(dtype="auto"), stop_after=4)
    assert first.metrics["dtype"] == resolved
    assert run(tokens_dir, ckpt, train_config(dtype=resolved)).resumed_from == 4


def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tokens_dir, tmp_path, caplog):
    ckpt = tmp_path / "ckpt"
    run(tokens_dir, ckpt, stop_after=8)
    newest = checkpoint_dirs(ckpt)[0]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        result = run(tokens_dir, ckpt)
    assert result.resumed_from == 4
    assert "damaged" in caplog.text


def test_checkpoints_are_pruned_and_hold_no_pickled_code(tokens_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    run(tokens_dir, ckpt, dataclasses.replace(train_config(), keep_checkpoints=2))
    kept = checkpoint_dirs(ckpt)
    assert [p.name for p in kept] == ["step_00000012", "step_00000008"]
    assert sorted(p.name for p in kept[0].iterdir()) == ["model.safetensors", "optimizer.pt", "state.json"]
    torch.load(kept[0] / "optimizer.pt", weights_only=True)  # loads without unpickling arbitrary objects


def test_rerunning_a_finished_run_resumes_at_its_end_and_reports_its_metrics(tokens_dir, tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    monkeypatch.setenv("LLM_PEAK_FLOPS", "2e11")
    first = run(tokens_dir, ckpt)
    monkeypatch.setenv("LLM_PEAK_FLOPS", "5e11")  # the machine measures another peak now: no step runs at it
    again = run(tokens_dir, ckpt)
    assert again.resumed_from == 12 and again.step_losses == []
    assert again.metrics["val_loss"] == pytest.approx(first.metrics["val_loss"], abs=1e-6)
    assert again.metrics["train_loss"] == pytest.approx(first.metrics["train_loss"])
    for key in ("tokens_per_sec", "mfu", "peak_flops"):
        assert again.metrics[key] == pytest.approx(first.metrics[key]), key
    assert first.metrics["peak_flops"] == pytest.approx(2e11)
    torch.testing.assert_close(again.model.state_dict(), first.model.state_dict())


def test_a_diverging_loss_stops_the_run_before_any_checkpoint_holds_it(tokens_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    with pytest.raises(TrainingDiverged, match=r"the loss became nan by step \d+;.*lower train.lr") as raised:
        run(tokens_dir, ckpt, train_config(lr=1e6, max_steps=40, log_interval=5, checkpoint_interval=2))
    kept = checkpoint_dirs(ckpt)
    assert kept and str(kept[0]) in str(raised.value), "names the last good checkpoint"
    for checkpoint in kept:
        assert all(t.isfinite().all() for t in load_file(str(checkpoint / "model.safetensors")).values())


def test_the_peak_flops_can_be_given_instead_of_measured(monkeypatch):
    monkeypatch.setenv("LLM_PEAK_FLOPS", "2.5e12")
    assert peak_flops(torch.device("cpu"), "float32") == (2.5e12, "LLM_PEAK_FLOPS (environment)")
    for bad in ("fast", "-1", "nan"):
        monkeypatch.setenv("LLM_PEAK_FLOPS", bad)
        with pytest.raises(InputError, match="LLM_PEAK_FLOPS"):
            peak_flops(torch.device("cpu"), "float32")


@pytest.mark.parametrize("laps", [1, 3])
def test_a_resumed_meter_reports_the_speed_and_mfu_its_laps_ran_at(laps):
    """Laps count against the peak of the machine they ran on; a meter restored on another one, before any lap
    of its own, reports the same run figures (with one lap, that lap is the run: no first lap is left out)."""
    first = ThroughputMeter(tokens_per_step=100, flops_per_token=10, peak_flops=2e4, device=torch.device("cpu"))
    for _ in range(laps):
        first.step()
        first.lap()
    restored = ThroughputMeter(tokens_per_step=100, flops_per_token=10, peak_flops=9e9, device=torch.device("cpu"))
    restored.load_state_dict(first.state_dict())
    assert restored.run_tokens_per_sec == first.run_tokens_per_sec > 0
    assert restored.run_peak == first.run_peak == 2e4
    assert restored.run_mfu == pytest.approx(first.run_mfu)


def test_history_rows_and_checkpoint_state_round_trip_through_their_files(tokens_dir, tmp_path):
    from llm.checkpoint import read_state
    from llm.history import read_history_csv, write_history_csv

    result = run(tokens_dir, tmp_path / "ckpt", stop_after=4)
    write_history_csv(tmp_path / "train.csv", result.history)
    assert read_history_csv(tmp_path / "train.csv") == result.history
    assert [row.val_loss is None for row in result.history] == [True, True, True, True]
    state = read_state(checkpoint_dirs(tmp_path / "ckpt")[0])
    assert state.step == 4 and list(state.history) == result.history
    assert state.tokens_seen == 4 * 4 * 2 * 32 and state.train_config["dtype"] == "float32"


def test_a_damaged_history_csv_names_the_file_and_the_line(tmp_path):
    from llm.history import read_history_csv

    path = tmp_path / "train.csv"
    path.write_text("step,tokens_seen,train_loss,val_loss,lr,grad_norm,tokens_per_sec,mfu\n"
                    "1,128,4.1,,0.001,1.0,100.0,0.1\n2,256,lots,,0.001,1.0,100.0,0.1\n")
    with pytest.raises(InputError, match=r"train\.csv, line 3: history field 'train_loss'"):
        read_history_csv(path)
