import math

import pytest
import torch

from llm.config import TrainConfig
from llm.model import GPT, GPTConfig
from llm.parallel import apply_activation_checkpointing
from llm.train import lr_at

ARCHS = ["gpt2", "llama"]


def tiny(arch: str, **overrides) -> GPTConfig:
    fields = {"arch": arch, "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, "dropout": 0.0,
              "vocab_size": 97, **overrides}
    return GPTConfig(**fields)


def make(arch: str, seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny(arch, **overrides))


@pytest.mark.parametrize("arch", ARCHS)
def test_a_future_token_never_changes_past_logits(arch):
    model = make(arch).eval()
    idx = torch.randint(0, 97, (2, 16))
    logits, _ = model(idx)
    for t in (0, 7, 14):
        changed = idx.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1) % 97
        new_logits, _ = model(changed)
        torch.testing.assert_close(new_logits[:, : t + 1], logits[:, : t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(new_logits[:, t + 1 :], logits[:, t + 1 :])


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_at_init_is_about_ln_vocab(arch):
    model = make(arch, vocab_size=512)
    idx, targets = torch.randint(0, 512, (8, 16)), torch.randint(0, 512, (8, 16))
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(512)) < 0.1


@pytest.mark.parametrize("arch", ARCHS)
def test_a_single_batch_is_overfit(arch):
    model = make(arch)
    idx, targets = torch.randint(0, 97, (4, 16)), torch.randint(0, 97, (4, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss = model(idx, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.2


def grads(model: GPT) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ARCHS)
def test_accumulating_4_micro_batches_of_2_equals_one_batch_of_8(arch):
    idx, targets = torch.randint(0, 97, (8, 16)), torch.randint(0, 97, (8, 16))
    whole = make(arch)
    whole(idx, targets)[1].backward()
    accumulated = make(arch)
    for micro in range(4):
        _, loss = accumulated(idx[2 * micro : 2 * micro + 2], targets[2 * micro : 2 * micro + 2])
        (loss / 4).backward()
    expected, got = grads(whole), grads(accumulated)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("arch", ARCHS)
def test_activation_checkpointing_gives_the_same_gradients(arch):
    idx, targets = torch.randint(0, 97, (4, 16)), torch.randint(0, 97, (4, 16))
    plain, checkpointed = make(arch), make(arch)
    apply_activation_checkpointing(checkpointed)
    plain(idx, targets)[1].backward()
    checkpointed(idx, targets)[1].backward()
    assert plain.state_dict().keys() == checkpointed.state_dict().keys()
    for name, grad in grads(plain).items():
        torch.testing.assert_close(grads(checkpointed)[name], grad, rtol=0, atol=1e-7)


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_autocast_forward_and_backward(arch):
    model = make(arch)
    idx, targets = torch.randint(0, 97, (4, 16)), torch.randint(0, 97, (4, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, targets)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.wte.weight.dtype == torch.float32, "weights stay float32 under autocast"


def test_variants_differ_as_named():
    gpt2, llama = make("gpt2"), make("llama")
    assert gpt2.lm_head.weight is gpt2.wte.weight and llama.lm_head.weight is not llama.wte.weight
    assert llama.wpe is None and gpt2.wpe is not None
    assert all(m.bias is None for m in llama.modules() if isinstance(m, torch.nn.Linear))
    assert isinstance(llama.ln_f, torch.nn.RMSNorm) and isinstance(gpt2.ln_f, torch.nn.LayerNorm)


def test_residual_projections_are_scaled_at_init():
    model = make("gpt2", n_layer=8, n_embd=256, n_head=4)
    assert abs(model.blocks[0].attn.c_attn.weight.std().item() - 0.02) < 0.002
    assert abs(model.blocks[0].mlp.c_proj.weight.std().item() - 0.02 / math.sqrt(16)) < 0.001


def test_sequences_longer_than_the_context_are_refused():
    with pytest.raises(ValueError, match="block_size"):
        make("gpt2")(torch.zeros(1, 17, dtype=torch.long))


def test_schedule_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # halfway through the cosine
    assert lr_at(110, cfg) == pytest.approx(0.1)
    decay = [lr_at(step, cfg) for step in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_maps_are_the_probabilities_forward_applies(arch):
    model = make(arch).eval()
    idx = torch.randint(0, 97, (1, 12))
    maps = model.attention_maps(idx)
    assert maps.shape == (2, 2, 12, 12)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 2, 12))
    assert torch.all(maps.triu(diagonal=1) == 0), "no attention to future positions"
    # Weighting the first layer's values by its map gives the attention output forward computes.
    block = model.blocks[0]
    x, rope = model.embed(idx)
    h = block.ln_1(x)
    _, _, v = block.attn.qkv(h, rope)
    y = (maps[0] @ v[0]).transpose(0, 1).reshape(12, -1)
    torch.testing.assert_close(block.attn.c_proj(y)[None], block.attn(h, rope), atol=1e-5, rtol=1e-5)
