"""SIAccumulator: the path integral W and Ω against a hand computation on a quadratic."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cl_tool.errors import IncompatibleError, UsageError
from cl_tool.importance import SIAccumulator

A = torch.tensor([1.0, 3.0, 0.5])
C = torch.tensor([2.0, -1.0, 0.25])


def quadratic_loss(theta):
    """L(θ) = ½ Σ aᵢ (θᵢ − cᵢ)²."""
    return 0.5 * (A * (theta - C) ** 2).sum()


def run(steps, momentum=0.0, xi=0.1, acc=None, theta=None, opt_state=None):
    theta = theta if theta is not None else nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([theta], lr=0.2, momentum=momentum)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    acc = acc if acc is not None else SIAccumulator({"theta": theta}, xi=xi)
    for _ in range(steps):
        opt.zero_grad()
        quadratic_loss(theta).backward()
        acc.pre_step()
        opt.step()
        acc.post_step()
    return theta, acc, opt


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_matches_hand_computation(momentum):
    theta, acc, _ = run(6, momentum=momentum)
    # by hand: g = a(θ − c), Δθ from the SGD update rule with a velocity buffer
    t, v, W = torch.zeros(3), torch.zeros(3), torch.zeros(3)
    for step in range(6):
        g = A * (t - C)
        v = g if step == 0 else momentum * v + g
        new = t - 0.2 * v
        W -= g * (new - t)
        t = new
    torch.testing.assert_close(theta.detach(), t)
    torch.testing.assert_close(acc.W["theta"], W)
    omega = acc.omega()["theta"]
    torch.testing.assert_close(omega, W.clamp(min=0) / (t**2 + 0.1))
    assert omega.dtype == torch.float32 and omega.device.type == "cpu"


def test_negative_path_integral_is_clamped():
    theta = nn.Parameter(torch.zeros(3))
    acc = SIAccumulator({"theta": theta}, xi=0.5)
    theta.grad = torch.tensor([1.0, -1.0, 0.0])
    acc.pre_step()
    with torch.no_grad():
        theta += torch.tensor([0.5, 0.5, 0.0])  # first component moves up the gradient: W < 0
    acc.post_step()
    assert acc.W["theta"].tolist() == [-0.5, 0.5, 0.0]
    torch.testing.assert_close(acc.omega()["theta"], torch.tensor([0.0, 0.5 / (0.25 + 0.5), 0.0]))


def test_state_dict_round_trip_and_resume():
    theta, full, _ = run(8, momentum=0.5)
    theta2, part, opt = run(3, momentum=0.5)
    sd = part.state_dict()
    assert all(t.device.type == "cpu" for t in sd.values())
    resumed = SIAccumulator({"theta": theta2}, xi=0.3)
    resumed.load_state_dict(sd)
    assert resumed.xi == pytest.approx(0.1)
    run(5, momentum=0.5, acc=resumed, theta=theta2, opt_state=opt.state_dict())
    torch.testing.assert_close(resumed.omega()["theta"], full.omega()["theta"])


def test_explicit_gradients_replace_p_grad():
    theta = nn.Parameter(torch.zeros(2))
    acc = SIAccumulator({"theta": theta})
    theta.grad = torch.tensor([10.0, 10.0])  # e.g. task + penalty gradient
    acc.pre_step(grads={"theta": torch.tensor([1.0, -2.0])})  # the task gradient alone
    with torch.no_grad():
        theta -= torch.tensor([0.5, 0.25])
    acc.post_step()
    torch.testing.assert_close(acc.W["theta"], torch.tensor([0.5, -0.5]))


def test_frozen_and_gradless_parameters():
    model = nn.Linear(2, 2)
    model.bias.requires_grad_(False)
    acc = SIAccumulator(dict(model.named_parameters()))
    assert set(acc.omega()) == {"weight"}
    acc.pre_step()
    acc.post_step()  # no gradient yet: nothing accumulated
    assert float(acc.W["weight"].abs().max()) == 0.0


def test_incompatible_state_and_bad_xi():
    acc = SIAccumulator({"w": nn.Parameter(torch.zeros(2))})
    other = SIAccumulator({"w": nn.Parameter(torch.zeros(3))}).state_dict()
    with pytest.raises(IncompatibleError):
        acc.load_state_dict(other)
    with pytest.raises(IncompatibleError):
        acc.load_state_dict({"xi": torch.tensor(0.1)})
    with pytest.raises(UsageError):
        SIAccumulator({"w": nn.Parameter(torch.zeros(2))}, xi=0.0)


def test_gradient_is_the_one_present_at_pre_step():
    """train-next calls pre_step right after the task loss's backward pass; a penalty gradient (or clipping)
    applied to p.grad afterwards must not enter W (Zenke et al. integrate the unregularised loss)."""
    theta = nn.Parameter(torch.zeros(2))
    acc = SIAccumulator({"theta": theta})
    theta.grad = torch.tensor([1.0, -2.0])  # task loss
    acc.pre_step()
    theta.grad += torch.tensor([100.0, 100.0])  # the penalty's gradient, added later
    with torch.no_grad():
        theta -= torch.tensor([0.5, 0.25])
    acc.post_step()
    torch.testing.assert_close(acc.W["theta"], torch.tensor([0.5, -0.5]))
