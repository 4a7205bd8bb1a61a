"""Signal variants (--signal-norm sum|mean, --signal-stat l1|l2): the formulas per layer type, their record in the
sidecar, and prune refusing a stored signal sidecar of another variant."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cl_tool.importance import finalize_importance, importance_sums
from tests.test_importance_api import cnn, data, mlp, vit

pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = [(n, s) for n in ("sum", "mean") for s in ("l1", "l2")]


def reference_variant(model: nn.Module, x: torch.Tensor, norm: str, stat: str) -> dict[str, torch.Tensor]:
    """Independent replay with forward hooks: power(a) = |a| (l1) or a² (l2) of each layer's input, totalled over
    positions by autograd through the layer's own map (y = W·power(a)), divided by the positions per sample P
    (mean), times |w| (l1) or w² (l2); biases from power(output); LayerNorm/BatchNorm γ from x̂; other
    parameters power(θ)·N; l2 rooted at the end. Pre-activation bias scores."""
    power = torch.abs if stat == "l1" else torch.square
    name = {id(p): n for n, p in model.named_parameters()}
    out = {n: power(p.detach()) * x.shape[0] for n, p in model.named_parameters()}
    touched = set()

    def add(p, value):
        n = name[id(p)]
        out[n] = (out[n] if n in touched else 0) + value
        touched.add(n)

    def per_sample(t, positions):
        return t / positions if norm == "mean" else t

    def hook(m, inputs, output):
        a = inputs[0].detach()
        channel = -1 if isinstance(m, (nn.Linear, nn.LayerNorm)) else 1
        features = output.shape[channel]
        positions = output.numel() // (output.shape[0] * features)
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            with torch.enable_grad():
                w = m.weight.detach().clone().requires_grad_()
                y = F.linear(power(a), w) if isinstance(m, nn.Linear) else m._conv_forward(power(a), w, None)
                (g,) = torch.autograd.grad(y.sum(), w)
            add(m.weight, power(m.weight.detach()) * per_sample(g, positions))
        elif isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            if isinstance(m, nn.LayerNorm):
                xhat = F.layer_norm(a, m.normalized_shape, eps=m.eps)
            else:
                xhat = F.batch_norm(a, m.running_mean, m.running_var, training=False, eps=m.eps)
            total = power(xhat).movedim(channel, 0).reshape(m.weight.numel(), -1).sum(1)
            add(m.weight, power(m.weight.detach()) * per_sample(total, positions))
        else:
            return
        if m.bias is not None:
            total = power(output.detach()).movedim(channel, 0).reshape(m.bias.numel(), -1).sum(1)
            add(m.bias, per_sample(total, positions))

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return {n: t if stat == "l1" else t.sqrt() for n, t in out.items()}


def _signal(model, batches, norm, stat, bias_score="pre-activation"):
    sums, count = importance_sums(model, batches, "signal", bias_score=bias_score, signal_norm=norm, signal_stat=stat)
    return finalize_importance(sums, count, "signal", signal_stat=stat)


@pytest.mark.parametrize("norm,stat", VARIANTS)
@pytest.mark.parametrize("make", [mlp, cnn, vit], ids=["mlp", "cnn", "vit"])
def test_every_variant_matches_an_independent_replay_over_two_batches(make, norm, stat):
    """The l2 root is taken once over all batches, so two batches give the one-batch replay's numbers."""
    model = make()
    x, y = data(5)
    got = _signal(model, [(x[:2], y[:2]), (x[2:], y[2:])], norm, stat)
    want = reference_variant(model, x, norm, stat)
    for n in want:
        torch.testing.assert_close(got[n], want[n].float(), rtol=1e-4, atol=1e-5 * float(want[n].abs().max()))


def test_conv_mean_is_the_sum_over_positions_divided_by_their_number_by_hand():
    """A 3×3 conv (padding 1, stride 2) on 1×6×6 inputs has L = 3·3 = 9 output positions: mean = sum / 9 for the
    weight and the bias; the hook's own patches (F.unfold) give the sum."""
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 2, 3, padding=1, stride=2)
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(18, 3))
    x = torch.randn(4, 1, 6, 6)
    seen = {}
    handle = conv.register_forward_hook(lambda m, i, o: seen.update(x=i[0].detach(), y=o.detach()))
    model(x)
    handle.remove()
    patches = F.unfold(seen["x"], 3, padding=1, stride=2)  # (4, 9, L)
    assert patches.shape[2] == 9
    by_hand_sum = conv.weight.detach().abs() * patches.abs().sum(dim=(0, 2)).reshape(1, 1, 3, 3)
    got_sum = _signal(model, [(x, torch.zeros(4, dtype=torch.long))], "sum", "l1")
    got_mean = _signal(model, [(x, torch.zeros(4, dtype=torch.long))], "mean", "l1")
    torch.testing.assert_close(got_sum["0.weight"], by_hand_sum)
    torch.testing.assert_close(got_mean["0.weight"], by_hand_sum / 9)
    torch.testing.assert_close(got_mean["0.bias"], seen["y"].abs().sum(dim=(0, 2, 3)) / 9)
    # the Linear layer sees one position per sample: mean and sum agree there
    torch.testing.assert_close(got_mean["2.weight"], got_sum["2.weight"])
    # l2, sum: Wanda's |w|·‖X‖₂ over samples and positions
    got_l2 = _signal(model, [(x, torch.zeros(4, dtype=torch.long))], "sum", "l2")
    norms = patches.square().sum(dim=(0, 2)).sqrt().reshape(1, 1, 3, 3)
    torch.testing.assert_close(got_l2["0.weight"], conv.weight.detach().abs() * norms)


def test_default_variant_is_the_papers():
    model = cnn()
    x, y = data(3)
    default, _ = importance_sums(model, [(x, y)], "signal")
    paper, _ = importance_sums(model, [(x, y)], "signal", signal_norm="sum", signal_stat="l1")
    assert all(torch.equal(default[n], paper[n]) for n in default)


def test_unknown_variant_is_a_usage_error():
    from cl_tool.errors import UsageError

    x, y = data(2)
    with pytest.raises(UsageError, match="signal_norm"):
        importance_sums(mlp(), [(x, y)], "signal", signal_norm="median")
    with pytest.raises(UsageError, match="signal_stat"):
        importance_sums(mlp(), [(x, y)], "signal", signal_stat="l3")


# ---- CLI: the record in the sidecar and what prune does with it ----------------------------------------------------


@pytest.fixture(scope="module")
def signal_sidecars(tmp_path_factory, small_mlp, demo_dir):
    """The small MLP's signal sidecars: paper (sum, l1), (mean, l2), and a paper one whose record is stripped (as
    written before the options existed)."""
    from cl_tool.cli import main
    from cl_tool.sidecar import load_sidecar, save_sidecar

    d = tmp_path_factory.mktemp("sig")
    paths = {}
    for norm, stat in (("sum", "l1"), ("mean", "l2")):
        paths[norm, stat] = d / f"{norm}_{stat}.importance.safetensors"
        argv = ["importance", small_mlp, "--method", "signal", "--data", f"{demo_dir}::limit=64", "--device", "cpu"]
        argv += ["--signal-norm", norm, "--signal-stat", stat, "-o", paths[norm, stat]]
        with pytest.raises(SystemExit) as exc:
            main([str(a) for a in argv])
        assert exc.value.code == 0
    old = load_sidecar(paths["sum", "l1"])
    old.options = {"bias_score": "post-activation"}
    paths["old"] = d / "old.importance.safetensors"
    save_sidecar(paths["old"], old)
    return paths


def test_importance_records_the_variant_and_l2_is_the_root_of_summed_squares(signal_sidecars):
    from cl_tool.sidecar import load_sidecar

    paper, l2 = load_sidecar(signal_sidecars["sum", "l1"]), load_sidecar(signal_sidecars["mean", "l2"])
    assert paper.options == {"bias_score": "post-activation", "signal_norm": "sum", "signal_stat": "l1"}
    assert l2.options == {"bias_score": "post-activation", "signal_norm": "mean", "signal_stat": "l2"}
    # an MLP's layers see one position per sample, so mean = sum there; l2 ≤ l1 element-wise (‖a‖₂ ≤ ‖a‖₁)
    w = "net.1.weight"
    assert bool((l2.tensors[w] <= paper.tensors[w] * (1 + 1e-5) + 1e-12).all())
    assert not torch.equal(l2.tensors[w], paper.tensors[w])


@pytest.mark.parametrize("stored", ["sum_l1", "old"])
def test_prune_refuses_a_signal_sidecar_of_another_variant(cli, small_mlp, signal_sidecars, tmp_path, stored):
    """An explicit variant must match the stored one (exit 4, nothing written); a sidecar without a record holds the
    paper's sum/l1; the same variant, or none given, ranks as stored."""
    side = signal_sidecars["old"] if stored == "old" else signal_sidecars["sum", "l1"]
    out = tmp_path / "p.safetensors"
    common = ["--importance", side, "--sparsity", "0.5", "-o", out]
    r = cli("prune", small_mlp, "--by", "signal", "--signal-norm", "mean", *common)
    assert r.code == 4 and "--signal-norm mean" in r.error_line and "sum" in r.error_line, r.err
    assert not out.exists()
    r = cli("prune", small_mlp, "--by", "importance", "--signal-stat", "l2", *common)
    assert r.code == 4 and "--signal-stat l2" in r.error_line, r.err
    assert not out.exists()
    r = cli("prune", small_mlp, "--by", "signal", "--signal-norm", "sum", "--signal-stat", "l1", *common)
    assert r.code == 0, r.err
    r = cli("prune", small_mlp, "--by", "signal", *common, "--force")
    assert r.code == 0, r.err


def test_prune_on_data_computes_the_asked_variant(cli, small_mlp, signal_sidecars, demo_dir, tmp_path):
    """prune --by signal --score-data with a variant prunes as the stored sidecar of that variant does."""
    from safetensors.torch import load_file

    common = ["--sparsity", "0.7", "--device", "cpu"]
    on_data, stored = tmp_path / "d.safetensors", tmp_path / "s.safetensors"
    r = cli(
        "prune", small_mlp, "--by", "signal", "--signal-norm", "mean", "--signal-stat", "l2",
        "--score-data", f"{demo_dir}::limit=64", *common, "-o", on_data, "--json",
    )  # fmt: skip
    assert r.code == 0, r.err
    import json

    assert json.loads(r.out)["source"]["signal_stat"] == "l2"
    r = cli(
        "prune", small_mlp, "--by", "importance", "--importance", signal_sidecars["mean", "l2"], *common, "-o", stored
    )
    assert r.code == 0, r.err
    w1, w2 = load_file(on_data), load_file(stored)
    assert all(torch.equal(w1[n], w2[n]) for n in w1)


def test_accumulate_needs_the_same_signal_variant_and_adds_l2_in_squares(
    cli, small_mlp, signal_sidecars, demo_dir, tmp_path
):
    from cl_tool.sidecar import load_sidecar

    data = ["--data", f"{demo_dir}::limit=64", "--device", "cpu", "--method", "signal"]
    out = tmp_path / "acc.safetensors"
    r = cli(
        "importance", small_mlp, *data, "--accumulate", signal_sidecars["sum", "l1"], "--signal-stat", "l2", "-o", out
    )
    assert r.code == 4 and "--accumulate" in r.error_line, r.err
    assert not out.exists()
    r = cli("importance", small_mlp, *data, "--signal-norm", "mean", "--signal-stat", "l2", "-o", out,
            "--accumulate", signal_sidecars["mean", "l2"])  # fmt: skip
    assert r.code == 0, r.err
    one, acc = load_sidecar(signal_sidecars["mean", "l2"]).tensors, load_sidecar(out).tensors
    for n in one:  # the same data twice: √(Ω² + Ω²) = √2·Ω
        torch.testing.assert_close(acc[n], one[n] * 2**0.5)
