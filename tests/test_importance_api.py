"""Contract of the public importance API: results, finalisation, errors, side effects, signal."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cl_tool.errors import BadInputError, IncompatibleError, UsageError
from cl_tool.importance import METHODS, SIAccumulator, compute_importance, finalize_importance, importance_sums
from cl_tool.importance.checks import check_finite
from cl_tool.importance.reference import naive_sums
from cl_tool.models import ModelSpec, build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelSpec("mlp", {"sizes": "784,16,10"}))


def cnn() -> nn.Module:
    torch.manual_seed(0)
    model = build_model(ModelSpec("cnn", {"widths": "3,4,5"}))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(-1.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def vit() -> nn.Module:
    torch.manual_seed(0)
    return build_model(
        ModelSpec(
            "vit_tiny_patch16_224",
            {"img_size": 28, "patch_size": 7, "depth": 1, "embed_dim": 16, "num_heads": 2},
            source="timm",
        )
    )


def data(n=5, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def test_public_names():
    assert METHODS == ("fisher", "mas", "signal", "magnitude")
    assert callable(SIAccumulator)


@pytest.mark.parametrize("method", ["fisher", "mas"])
def test_finalize_is_mean_and_compute_is_finalize_of_sums(method):
    model = mlp()
    x, y = data()
    sums, count = importance_sums(model, [(x[:3], y[:3]), (x[3:], y[3:])], method)
    assert count == 5
    fin = finalize_importance(sums, count, method)
    for n in sums:
        assert torch.allclose(fin[n], sums[n] / 5)
        assert fin[n].dtype == torch.float32 and fin[n].device.type == "cpu"
    direct = compute_importance(model, [(x, y)], method)
    for n in sums:
        torch.testing.assert_close(direct[n], fin[n], rtol=1e-5, atol=1e-5 * float(fin[n].abs().max()))


def test_magnitude_needs_no_data():
    model = mlp()

    def no_batches():
        raise AssertionError("magnitude must not read data")
        yield  # pragma: no cover

    sums, count = importance_sums(model, no_batches(), "magnitude")
    assert count == 0
    fin = finalize_importance(sums, count, "magnitude")
    for n, p in model.named_parameters():
        assert torch.equal(fin[n], p.detach().abs())


def test_fisher_without_samples_is_an_error():
    sums, count = importance_sums(mlp(), [], "fisher")
    assert count == 0 and all(float(t.abs().max()) == 0 for t in sums.values())
    with pytest.raises(BadInputError):
        finalize_importance(sums, count, "fisher")


def test_invalid_options_are_usage_errors():
    model, (x, y) = mlp(), data()
    for kwargs in (
        {"method": "nope"},
        {"method": "si"},
        {"method": "fisher", "fisher_labels": "bogus"},
        {"method": "mas", "mas_output": "probs"},
        {"method": "fisher", "precision": "fp8"},
    ):
        with pytest.raises(UsageError):
            importance_sums(model, [(x, y)], **kwargs)


def test_labels_outside_classes_are_incompatible():
    x, y = data()
    with pytest.raises(IncompatibleError):
        importance_sums(mlp(), [(x, y + 10)], "fisher")


def test_non_finite_result_names_the_parameter():
    model = mlp()
    with torch.no_grad():
        model.net[1].bias[0] = float("inf")
    with pytest.raises(BadInputError, match=r"net\.1\.bias"):
        importance_sums(model, [], "magnitude")
    x, y = data()
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(BadInputError, match=r"net\.1\.weight"):
        importance_sums(mlp(), [(x, y)], "fisher")
    with pytest.raises(BadInputError, match="w2"):
        check_finite({"w1": torch.zeros(2), "w2": torch.tensor([0.0, float("nan")])})


@pytest.mark.parametrize("method", ["fisher", "mas", "signal"])
def test_modes_state_and_grads_are_restored(method):
    model = cnn()
    model.train()
    model.features[1].eval()  # a mixed state must come back exactly
    modes = {n: m.training for n, m in model.named_modules()}
    stats = {n: b.clone() for n, b in model.named_buffers()}
    x, y = data(4)
    seen = []
    importance_sums(model, [(x[:3], y[:3]), (x[3:], y[3:])], method, progress=seen.append)
    assert seen == [3, 1]
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(torch.equal(b, stats[n]) for n, b in model.named_buffers())
    assert all(p.grad is None for p in model.parameters())


def test_eval_mode_is_used_during_the_call():
    model = cnn().train()
    x, y = data(4)
    got, _ = importance_sums(model, [(x, y)], "fisher")
    want, _ = naive_sums(model.eval(), [(x, y)], "fisher")
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-4 * float(want[n].abs().max()))


# ---- signal ----------------------------------------------------------------------------------


def reference_signal(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Independent replay of paper §4: for a linear map y = W a, the signal of W is
    |W| ∘ ∂/∂W Σ (W |a|), i.e. |w_ji|·Σ|a_i|, via autograd on |input|; biases Σ|output|;
    norm layers |γ|·Σ|x̂| with x̂ from torch's functional norms; other parameters |θ|·N."""
    name = {id(p): n for n, p in model.named_parameters()}
    out = {n: p.detach().abs() * x.shape[0] for n, p in model.named_parameters()}
    touched = set()

    def add(p, value):
        n = name[id(p)]
        out[n] = (out[n] if n in touched else 0) + value
        touched.add(n)

    def hook(m, inputs, output):
        a = inputs[0].detach()
        channel = -1 if isinstance(m, (nn.Linear, nn.LayerNorm)) else 1
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            with torch.enable_grad():
                w = m.weight.detach().clone().requires_grad_()
                y = F.linear(a.abs(), w) if isinstance(m, nn.Linear) else m._conv_forward(a.abs(), w, None)
                (g,) = torch.autograd.grad(y.sum(), w)
            add(m.weight, m.weight.detach().abs() * g)
        elif isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            if isinstance(m, nn.LayerNorm):
                xhat = F.layer_norm(a, m.normalized_shape, eps=m.eps)
            else:
                xhat = F.batch_norm(a, m.running_mean, m.running_var, training=False, eps=m.eps)
            add(m.weight, m.weight.detach().abs() * xhat.abs().movedim(channel, 0).reshape(m.weight.numel(), -1).sum(1))
        else:
            return
        if m.bias is not None:
            add(m.bias, output.detach().abs().movedim(channel, 0).reshape(m.bias.numel(), -1).sum(1))

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return out


@pytest.mark.parametrize("make", [mlp, cnn, vit], ids=["mlp", "cnn", "vit"])
def test_signal_matches_independent_replay(make):
    model = make()
    x, y = data(5)
    got, count = importance_sums(model, [(x[:2], y[:2]), (x[2:], y[2:])], "signal", bias_score="pre-activation")
    assert count == 5
    want = reference_signal(model, x)
    fin = finalize_importance(got, count, "signal")
    for n in want:
        assert bool((fin[n] >= 0).all()) and bool(torch.isfinite(fin[n]).all())
        torch.testing.assert_close(fin[n], want[n].float(), rtol=1e-4, atol=1e-5 * float(want[n].abs().max()))


def test_signal_of_grouped_padded_convolution():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(4, 6, 3, stride=2, groups=2),
        nn.Flatten(),
        nn.Linear(6 * 13 * 13, 10),
    )
    x, y = data(3)
    got, _ = importance_sums(model, [(x, y)], "signal", bias_score="pre-activation")
    want = reference_signal(model, x)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-5 * float(want[n].abs().max()))


def test_vit_tokens_get_bias_like_signal():
    model = vit()
    x, y = data(3)
    got, _ = importance_sums(model, [(x, y)], "signal")
    assert torch.equal(got["cls_token"], model.cls_token.detach().abs() * 3)
    assert torch.equal(got["pos_embed"], model.pos_embed.detach().abs() * 3)


def _three_layer_mlp(inplace: bool = False) -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(16, 7),
        nn.ReLU(inplace=inplace),
        nn.Linear(7, 5),
        nn.LeakyReLU(0.1, inplace=inplace),
        nn.Linear(5, 3),
    )


@pytest.mark.parametrize("inplace", [False, True], ids=["relu", "relu-inplace"])
@pytest.mark.parametrize("bias_score", ["post-activation", "pre-activation"])
def test_signal_bias_scores_of_a_three_layer_mlp_by_hand(bias_score, inplace):
    """Biases: Σₙ|φ(z)| (ReLU, LeakyReLU, softmax for the classifier) or Σₙ|z|; weights: |w|·Σₙ|a| either way."""
    model = _three_layer_mlp(inplace)
    x = torch.randn(6, 1, 4, 4)
    got, count = importance_sums(model, [(x[:4], None), (x[4:], None)], "signal", bias_score=bias_score)
    assert count == 6
    l1, l2, l3 = model[1], model[3], model[5]
    with torch.no_grad():
        a0 = x.reshape(6, 16)
        z1 = a0 @ l1.weight.T + l1.bias
        a1 = z1.clamp(min=0)
        z2 = a1 @ l2.weight.T + l2.bias
        a2 = torch.where(z2 > 0, z2, 0.1 * z2)
        z3 = a2 @ l3.weight.T + l3.bias
        p3 = torch.softmax(z3, dim=1)
    post = bias_score == "post-activation"
    want = {
        "1.weight": l1.weight.abs() * a0.abs().sum(0)[None, :],
        "3.weight": l2.weight.abs() * a1.abs().sum(0)[None, :],
        "5.weight": l3.weight.abs() * a2.abs().sum(0)[None, :],
        "1.bias": (a1 if post else z1).abs().sum(0),
        "3.bias": (a2 if post else z2).abs().sum(0),
        "5.bias": (p3 if post else z3).abs().sum(0),
    }
    assert set(got) == set(want)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value.detach(), rtol=1e-5, atol=1e-6)
    if post:
        torch.testing.assert_close(got["5.bias"].sum(), torch.tensor(6.0))  # class probabilities: 1 per sample


def test_signal_post_activation_is_identity_where_no_activation_module_consumes_the_output():
    """A conv followed by BatchNorm, and a layer whose output goes through a functional activation, score Σ|z|."""

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 3, 3)
            self.bn = nn.BatchNorm2d(3)
            self.act = nn.GELU()
            self.fc = nn.Linear(3 * 4 * 4, 4)
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            h = self.act(self.bn(self.conv(x)))
            h = torch.tanh(self.fc(h.flatten(1)))  # functional: no module sees fc's output
            return self.out(h) * 1.0  # not the layer's own tensor: no softmax either

    torch.manual_seed(0)
    model = Functional().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
    x = torch.randn(5, 1, 6, 6)
    post, _ = importance_sums(model, [(x, None)], "signal", bias_score="post-activation")
    pre, _ = importance_sums(model, [(x, None)], "signal", bias_score="pre-activation")
    for name in ("conv.bias", "fc.bias", "out.bias"):
        torch.testing.assert_close(post[name], pre[name])
    with torch.no_grad():
        bn_out = model.bn(model.conv(x))
    torch.testing.assert_close(post["bn.bias"], nn.functional.gelu(bn_out).abs().sum(dim=(0, 2, 3)))
    torch.testing.assert_close(pre["bn.bias"], bn_out.abs().sum(dim=(0, 2, 3)))
    for name in post:
        if not name.endswith("bias"):
            assert torch.equal(post[name], pre[name])


def test_signal_bias_score_is_validated():
    with pytest.raises(UsageError, match="bias_score"):
        importance_sums(_three_layer_mlp(), [(torch.randn(2, 1, 4, 4), None)], "signal", bias_score="post")
