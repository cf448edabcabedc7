"""The inverse coefficient-of-variation losses of dense-to-sparse distillation, against hand-computed values."""

import pytest
import torch

from moe_cli.moe.losses import batch_variation, expert_cv_loss, token_cv_loss

# 2 images x 2 tokens x 2 experts
GATE = torch.tensor([[[1.0, 0.0], [0.5, 0.5]],
                     [[0.0, 1.0], [0.5, 0.5]]])


def test_token_cv_hand_computed():
    # token [1, 0]: mean .5, var .25 -> .5 / .26 ; token [.5, .5]: var 0 -> .5 / .01
    expected = (2 * 0.5 / 0.26 + 2 * 0.5 / 0.01) / 4
    assert token_cv_loss(GATE, eps=0.01).item() == pytest.approx(expected, rel=1e-6)


def test_expert_cv_hand_computed():
    # s = [[1.5, .5], [.5, 1.5]]: each expert has mean 1 and var .25 over the two images
    assert expert_cv_loss(GATE, eps=0.01).item() == pytest.approx(1 / 0.26, rel=1e-6)
    assert batch_variation(GATE, eps=0.01).item() == pytest.approx(0.25 / 1.01, rel=1e-6)


def test_expert_cv_is_larger_when_use_does_not_vary():
    same = torch.full((2, 2, 2), 0.5)
    assert expert_cv_loss(same, eps=0.01) > expert_cv_loss(GATE, eps=0.01)


def test_minimising_token_cv_drives_gates_to_one_hot():
    torch.manual_seed(0)
    logits = (0.01 * torch.randn(32, 4)).requires_grad_()
    opt = torch.optim.Adam([logits], lr=0.1)
    for _ in range(200):
        opt.zero_grad()
        token_cv_loss(logits.softmax(-1)).backward()
        opt.step()
    assert logits.softmax(-1).max(-1).values.min() > 0.95
