import dataclasses
import math

import pytest
import torch

from llm.config import from_mapping
from llm.configs.model import ARCHS, PRESETS
from llm.configs.train import TrainConfig
from llm.errors import ConfigError
from llm.model import GPT, IGNORE, ROPE_THETA, ChunkedHeadLoss, GPTConfig, apply_rope, rope_tables
from llm.optim import lr_at
from llm.parallel import apply_activation_checkpointing, apply_compile


def tiny(arch: str, **overrides) -> GPTConfig:
    fields = {"arch": arch, "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, "dropout": 0.0,
              "vocab_size": 97, **overrides}
    return GPTConfig(**fields)


def make(arch: str, seed: int = 0, perturb: bool = True, **overrides) -> GPT:
    """A tiny model; `perturb` moves every weight off its init (zero-initialised projections and heads
    included), as training would, so that every part shapes the output."""
    torch.manual_seed(seed)
    model = GPT(tiny(arch, **overrides))
    if perturb:
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.05 * torch.randn_like(param))
    return model


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
    model = make(arch, vocab_size=512, perturb=False)
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


def test_compiled_blocks_give_the_loss_and_gradients_of_eager_ones():
    """The fast path (train.compile: each block compiled, its elementwise work fused) equals the plain one within
    float32 rounding; the default preset, whose norms, rotary and squared ReLU are what compile fuses."""
    idx, targets = torch.randint(0, 97, (4, 16)), torch.randint(0, 97, (4, 16))
    plain, compiled = make("modern"), make("modern")
    apply_compile(compiled)
    plain_loss, compiled_loss = plain(idx, targets)[1], compiled(idx, targets)[1]
    plain_loss.backward()
    compiled_loss.backward()
    assert plain.state_dict().keys() == compiled.state_dict().keys()
    torch.testing.assert_close(compiled_loss, plain_loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads(plain).items():
        torch.testing.assert_close(grads(compiled)[name], grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_autocast_forward_and_backward(arch):
    model = make(arch)
    idx, targets = torch.randint(0, 97, (4, 16)), torch.randint(0, 97, (4, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(idx)
        _, loss = model(idx, targets)
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
    model = make("gpt2", n_layer=8, n_embd=256, n_head=4, perturb=False)
    assert abs(model.blocks[0].attn.c_attn.weight.std().item() - 0.02) < 0.002
    assert abs(model.blocks[0].mlp.c_proj.weight.std().item() - 0.02 / math.sqrt(16)) < 0.001


def test_sequences_longer_than_the_context_are_refused():
    with pytest.raises(ValueError, match="block_size"):
        make("gpt2")(torch.zeros(1, 17, dtype=torch.long))


def test_rotary_tables_turn_by_the_one_base_the_export_declares():
    assert ROPE_THETA == 10_000.0  # Llama's base: transformers computes our rotary tables from it
    for table, by_base in zip(rope_tables(8, 16), rope_tables(8, 16, ROPE_THETA), strict=True):
        assert torch.equal(table, by_base)
    cos, _ = rope_tables(8, 16)
    assert cos[1, 1].item() == pytest.approx(math.cos(1 / ROPE_THETA ** (2 / 8)))  # pair 1 at position 1


def test_the_model_reports_the_device_of_its_weights():
    model = make("llama", perturb=False)
    assert model.device == torch.device("cpu")
    assert model.to("meta").device == torch.device("meta")
    assert model.new_cache().keys[0].device == model.device


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


# --- the named parts -----------------------------------------------------------------------------------------

def test_presets_resolve_every_part_and_an_explicit_part_overrides_its_preset():
    for arch in ARCHS:
        cfg = tiny(arch)
        assert {name: getattr(cfg, name) for name in PRESETS[arch]} == PRESETS[arch]
        assert cfg.n_kv_head == cfg.n_head
    mixed = tiny("gpt2", mlp="relu2", head="untied")
    assert (mixed.mlp, mixed.head, mixed.positions) == ("relu2", "untied", "learned")
    model = GPT(mixed)
    assert model.lm_head.weight is not model.wte.weight


def test_a_config_json_without_the_parts_loads_as_its_preset():
    """config.json files written before the parts existed name only the arch."""
    old = {"arch": "llama", "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, "dropout": 0.0,
           "vocab_size": 97}
    assert from_mapping(GPTConfig, old, "config.json") == tiny("llama")


def test_a_modern_model_saved_before_the_token_shift_loads_without_one(tmp_path, sample_tokenizer_path):
    """Its config.json names every part but token_shift, and its weights hold no token_shift.weight: the preset's
    shift (on for modern) would not fit them."""
    import json

    from llm.model_io import load_model_dir
    from tests.conftest import make_model_dir

    folder = make_model_dir(tmp_path / "old", sample_tokenizer_path, arch="modern", token_shift=False)
    config = json.loads((folder / "config.json").read_text())
    del config["token_shift"]
    (folder / "config.json").write_text(json.dumps(config))
    model, _ = load_model_dir(folder)
    assert model.config.token_shift is False and model.token_shift is None


@pytest.mark.parametrize(("override", "key"), [
    ({"mlp": "tanh"}, "model.mlp"), ({"positions": "alibi"}, "model.positions"), ({"norm": "batchnorm"}, "model.norm"),
    ({"head": "shared"}, "model.head"), ({"n_kv_head": 3, "n_head": 4}, "model.n_kv_head"),
    ({"logit_softcap": -1.0}, "model.logit_softcap"), ({"logit_softcap": math.inf}, "model.logit_softcap"),
    ({"arch": "mamba"}, "model.arch"),
])
def test_a_bad_part_is_refused_naming_its_key(override, key):
    fields = {"arch": "modern", **override}
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        tiny(fields.pop("arch"), **fields)


def test_rotary_attention_scores_depend_only_on_the_distance_between_positions():
    cos, sin = rope_tables(8, 32)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(i: int, j: int) -> torch.Tensor:
        return (apply_rope(q, cos[i:i + 1], sin[i:i + 1]) * apply_rope(k, cos[j:j + 1], sin[j:j + 1])).sum()

    torch.testing.assert_close(score(5, 2), score(20, 17))
    assert not torch.allclose(score(5, 2), score(5, 4))


def test_norms_without_gains_have_no_parameters_and_normalise():
    model = make("modern", perturb=False)
    assert not any("ln_" in name or "norm" in name for name, _ in model.named_parameters())
    x = 3 + 5 * torch.randn(4, 32)
    rms = model.ln_f(x).pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones(4), atol=1e-4, rtol=0)
    layernorm = make("gpt2", perturb=False).ln_f
    torch.testing.assert_close(layernorm(x).mean(-1), torch.zeros(4), atol=1e-5, rtol=0)


def test_qk_norm_gives_every_query_and_key_unit_rms():
    attn = make("modern", positions="learned").blocks[0].attn  # no rotation: the norm's output itself
    q, k, _ = attn.qkv(torch.randn(2, 5, 32), rope=None)
    for t in (q, k):
        torch.testing.assert_close(t.pow(2).mean(-1).sqrt(), torch.ones(t.shape[:-1]), atol=1e-3, rtol=0)


@pytest.mark.parametrize(("mlp", "hidden"), [("gelu", 128), ("relu2", 128), ("swiglu", 128)])
def test_each_mlp_computes_its_activation(mlp, hidden):
    model = make("modern", mlp=mlp)
    block_mlp = model.blocks[0].mlp
    assert model.config.mlp_hidden == hidden  # swiglu: 8/3 x 32 = 85.3, rounded up to a multiple of 64
    x = torch.randn(3, 32)
    if mlp == "swiglu":
        expected = block_mlp.down(torch.nn.functional.silu(block_mlp.gate(x)) * block_mlp.up(x))
    else:
        h = block_mlp.c_fc(x)
        h = torch.relu(h) ** 2 if mlp == "relu2" else 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) *
                                                                              (h + 0.044715 * h**3)))
        expected = block_mlp.c_proj(h)
    torch.testing.assert_close(block_mlp(x), expected, atol=1e-5, rtol=1e-5)


def test_without_bias_no_layer_has_one():
    for arch, has_bias in (("gpt2", True), ("llama", False), ("modern", False)):
        names = [name for name, _ in make(arch).named_parameters()]
        assert any(name.endswith(".bias") for name in names) == has_bias, arch


def test_logit_softcap_squashes_the_logits_below_the_cap():
    capped = make("modern", logit_softcap=2.0)
    with torch.no_grad():
        capped.lm_head.weight.mul_(10)
    plain = GPT(dataclasses.replace(capped.config, logit_softcap=0.0))
    plain.load_state_dict(capped.state_dict())
    idx = torch.randint(0, 97, (2, 16))
    logits, uncapped = capped(idx)[0], plain(idx)[0]
    assert uncapped.abs().max() > 4.0, "the test needs logits well beyond the cap"
    torch.testing.assert_close(logits, 2.0 * torch.tanh(uncapped / 2.0))
    assert logits.abs().max() < 2.0


def test_zero_init_makes_every_block_the_identity_and_the_logits_uniform():
    model = make("modern", perturb=False)
    x = torch.randn(2, 16, 32)
    rope = (model.rope_cos[:16], model.rope_sin[:16])
    for block in model.blocks:
        torch.testing.assert_close(block(x, rope), x, atol=0, rtol=0)
    logits, _ = model(torch.randint(0, 97, (2, 16)))
    assert torch.all(logits == 0)
    assert make("llama", perturb=False).blocks[0].attn.c_proj.weight.abs().sum() > 0, "llama does not zero-init"


def test_grouped_query_attention_equals_full_attention_with_shared_key_value_heads():
    """n_kv_head=1 of 4 heads: the same model as 4 key/value heads whose weights are copies of the one."""
    gqa = make("llama", n_head=4, n_kv_head=1)
    full = make("llama", n_head=4)
    state = gqa.state_dict()
    head_dim = 8
    for name, weight in list(state.items()):
        if name.endswith("attn.c_attn.weight"):  # rows: q (4 heads), k (1 head), v (1 head)
            q, k, v = weight.split([4 * head_dim, head_dim, head_dim])
            state[name] = torch.cat([q, k.repeat(4, 1), v.repeat(4, 1)])
    full.load_state_dict(state)
    assert gqa.num_params() < full.num_params()
    idx = torch.randint(0, 97, (2, 16))
    torch.testing.assert_close(gqa(idx)[0], full(idx)[0], atol=1e-5, rtol=1e-5)
    # ... and the cache holds the one key/value head, continuing the sequence exactly
    cache = gqa.new_cache(2)
    assert cache.keys[0].shape[1] == 1
    stepwise = torch.cat([gqa(idx[:, :10], cache=cache)[0], gqa(idx[:, 10:], cache=cache)[0]], dim=1)
    torch.testing.assert_close(stepwise, gqa(idx)[0], atol=1e-5, rtol=1e-5)
    maps = gqa.attention_maps(idx[:1])
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 4, 16))


def plain_loss(model: GPT, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The reference: whole-batch logits (forward without targets), then F.cross_entropy in float32 (a target
    of IGNORE, -1, counts for nothing)."""
    logits, _ = model(idx)
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


@pytest.mark.parametrize("arch", ARCHS)  # gpt2: tied head; llama: untied; modern: untied with a softcap
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])  # True: some targets are IGNORE, as fine-tuning's are
def test_the_chunked_training_loss_and_its_gradients_equal_the_plain_ones(arch, dtype, masked, monkeypatch):
    monkeypatch.setattr(ChunkedHeadLoss, "CHUNK_ELEMENTS", 97 * 10)  # chunks of 10 rows: 7 chunks, the last short
    idx, targets = torch.randint(0, 97, (4, 16)), torch.randint(0, 97, (4, 16))
    if masked:
        targets[:, :9] = IGNORE  # whole chunks and part of one
        targets[3, 12] = IGNORE
    cap = 3.0 if arch == "modern" else None  # low enough that the softcap's tanh bends the perturbed logits
    fused, plain = make(arch, logit_softcap=cap), make(arch, logit_softcap=cap)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        logits, fused_loss = fused(idx, targets)
        reference = plain_loss(plain, idx, targets)
    assert logits is None, "training keeps no logits"
    fused_loss.backward()
    reference.backward()
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-3}
    torch.testing.assert_close(fused_loss, reference, **tolerance)
    for name, grad in grads(plain).items():
        torch.testing.assert_close(grads(fused)[name], grad, **tolerance, msg=lambda m, n=name: f"{n}: {m}")


def test_a_batch_whose_targets_are_all_masked_has_loss_zero_and_no_gradient(monkeypatch):
    monkeypatch.setattr(ChunkedHeadLoss, "CHUNK_ELEMENTS", 97 * 10)
    hidden, weight = torch.randn(40, 16, requires_grad=True), torch.randn(97, 16, requires_grad=True)
    loss = ChunkedHeadLoss.apply(hidden, weight, torch.full((40,), IGNORE), 0.0)
    loss.backward()
    assert loss.item() == 0.0 and not hidden.grad.any() and not weight.grad.any()
