"""Muon: its orthogonalisation, which weights it trains, and its step under FSDP2's row shards."""

import pytest
import torch

from llm.configs.train import TrainConfig
from llm.model import GPT, GPTConfig
from llm.optim import Muon, configure_optimizers, orthogonalize, set_lr


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(matrix.double())


@pytest.mark.parametrize(("rows", "cols"), [(64, 64), (48, 128), (128, 48)])
def test_newton_schulz_keeps_the_singular_vectors_and_brings_every_singular_value_near_1(rows, cols):
    torch.manual_seed(0)
    rank = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, rank))
    v, _ = torch.linalg.qr(torch.randn(cols, rank))
    spread = torch.logspace(-2, 0, rank)  # singular values over a 100x range
    update = u @ torch.diag(spread) @ v.T
    ortho = orthogonalize(update, steps=5)
    assert ortho.shape == update.shape and ortho.dtype == update.dtype
    in_basis = u.T @ ortho @ v  # diagonal if the singular vectors are kept
    torch.testing.assert_close(in_basis, torch.diag(torch.diagonal(in_basis)), atol=1e-5, rtol=0)
    sv = torch.diagonal(in_basis)
    assert sv.min() > 0.6 and sv.max() < 1.25, sv  # all near 1: every direction moves alike
    torch.testing.assert_close(orthogonalize(update.T, steps=5), ortho.T)


def test_newton_schulz_in_bf16_matches_float32_within_bf16_precision():
    torch.manual_seed(1)
    update = torch.randn(64, 96)
    plain, fast = orthogonalize(update, 5, torch.float32), orthogonalize(update, 5, torch.bfloat16)
    assert fast.dtype == torch.float32
    assert (fast - plain).norm() / plain.norm() < 0.05


def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(arch="modern", n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=97))


def test_muon_trains_the_matrices_inside_the_blocks_and_the_token_shift_and_adamw_the_rest():
    model = tiny_model()
    adamw, muon = configure_optimizers(model, TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.02), torch.device("cpu"))
    assert isinstance(muon, Muon) and isinstance(adamw, torch.optim.AdamW)
    by_muon = {id(p) for group in muon.param_groups for p in group["params"]}
    by_adamw = {id(p) for group in adamw.param_groups for p in group["params"]}
    names = {id(p): name for name, p in model.named_parameters()}
    assert by_muon.isdisjoint(by_adamw) and by_muon | by_adamw == set(names)
    matrices = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    assert sorted(names[i] for i in by_muon) == sorted(
        ["token_shift.weight", *(f"blocks.{i}.{m}.weight" for i in range(2) for m in matrices)])
    set_lr([adamw, muon], 0.5)
    assert len(adamw.param_groups) == 1, "no empty group: the modern model has no 1-D weights"
    assert adamw.param_groups[0]["lr"] == 5e-4 and muon.param_groups[0]["lr"] == 0.01
    [only_adamw] = configure_optimizers(model, TrainConfig(optimizer="adamw"), torch.device("cpu"))
    assert sum(len(g["params"]) for g in only_adamw.param_groups) == len(names)


def test_a_muon_step_moves_each_matrix_by_its_orthogonalised_nesterov_momentum():
    torch.manual_seed(2)
    weight = torch.nn.Parameter(torch.randn(32, 16))
    start = weight.detach().clone()
    muon = Muon([weight], lr=0.1, weight_decay=0.5, momentum=0.9, ns_steps=5)
    grad = torch.randn(32, 16)
    weight.grad = grad.clone()
    muon.step()
    momentum = 0.1 * grad  # the buffer after one step: lerp from zero towards the gradient by 1 - momentum
    expected = start * (1 - 0.1 * 0.5) - 0.1 * (32 / 16) ** 0.5 * orthogonalize(grad.lerp(momentum, 0.9), 5)
    torch.testing.assert_close(weight.detach(), expected)
    torch.testing.assert_close(muon.state[weight]["momentum_buffer"], momentum)
