"""Exactness of the per-sample importance engine against a naive per-sample autograd loop.

Every comparison uses ``max_rel_err``: max |engine − loop| / max |loop| per parameter (robust to
zeros), required below 1e-4. Models are tiny; data is random and made here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cl_tool.importance import importance_sums
from cl_tool.importance.engine import GradEngine
from cl_tool.importance.fallback import PerSampleFallback
from cl_tool.importance.losses import LossSpec, output_cotangents, per_sample_losses
from cl_tool.importance.reference import naive_sums
from cl_tool.importance.rules import ConvRule, logging_chunks, seen_column_runs
from cl_tool.models import ModelSpec, build_model

TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")
CASES = [
    ("fisher", {"fisher_labels": "empirical"}),
    ("fisher", {"fisher_labels": "sampled"}),
    ("fisher", {"fisher_labels": "exact"}),
    ("mas", {"mas_output": "logits"}),
    ("mas", {"mas_output": "softmax"}),
]
CASE_IDS = [f"{m}-{next(iter(kw.values()))}" for m, kw in CASES]


def max_rel_err(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], dtype=torch.float32) -> float:
    """max over parameters of max|got − want| / max|want|.

    The denominator has a floor of 1e-7 × the largest value of any parameter, so a parameter
    whose exact gradient is zero (e.g. a conv bias in front of a batch-statistics BatchNorm) is
    compared at float32 round-off level instead of dividing noise by noise.
    """
    assert set(got) == set(want)
    floor = 1e-7 * max(float(w.abs().max()) for w in want.values())
    worst = 0.0
    for name, w in want.items():
        g = got[name]
        assert g.shape == w.shape and g.dtype == dtype, name
        scale = max(float(w.abs().max()), floor)
        err = float((g.double() - w.double()).abs().max())
        worst = max(worst, err / scale if scale > 0 else err * 1e12)
    return worst


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm running statistics and norm affine parameters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            if (
                isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm))
                and getattr(m, "weight", None) is not None
            ):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=gen) - 0.5)
    return model


def tiny(arch: str) -> nn.Module:
    torch.manual_seed(0)
    specs = {
        "mlp": ModelSpec("mlp", {"sizes": "784,32,16,10"}),
        "cnn": ModelSpec("cnn", {"widths": "4,6,8"}),
        "resnet": ModelSpec("resnet10t", {"channels": (8, 8, 16, 16), "stem_width": 8}, source="timm"),
        "vit": ModelSpec(
            "vit_tiny_patch16_224",
            {"img_size": 28, "patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2},
            source="timm",
        ),
    }
    return randomize_norms(build_model(specs[arch]))


def image_batches(sizes=(3, 2), seed=1, classes=10):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 1, 28, 28, generator=gen), torch.randint(0, classes, (n,), generator=gen)) for n in sizes]


def compare(model, batches, method, **kw):
    got, n_got = importance_sums(model, batches, method, generator=torch.Generator().manual_seed(7), **kw)
    want, n_want = naive_sums(model, batches, method, generator=torch.Generator().manual_seed(7), **kw)
    assert n_got == n_want == sum(x.shape[0] for x, _ in batches)
    return max_rel_err(got, want)


@pytest.fixture(scope="module", params=["mlp", "cnn", "resnet", "vit"])
def model(request):
    return tiny(request.param)


@pytest.mark.parametrize("method,kw", CASES, ids=CASE_IDS)
def test_engine_matches_per_sample_loop(model, method, kw):
    assert compare(model, image_batches(), method, **kw) < TOL


@pytest.mark.parametrize("arch", ["mlp", "cnn", "resnet", "vit"])
def test_float64_engine_equals_loop_to_round_off(arch):
    """In float64 the engine and the loop agree to ~1e-12: the algorithm is exact, and the
    float32 tolerance above only absorbs round-off."""
    model = tiny(arch).double().eval()
    x, y = image_batches((3,))[0]
    x = x.double()
    for method, kw in (CASES[2], CASES[4]):
        spec = LossSpec(method, **kw)
        engine = GradEngine(model, spec)
        engine.add_batch(x, y)
        want, _ = naive_sums(model, [(x, y)], method, **kw)
        assert all(t.dtype == torch.float64 for t in engine.sums.values())
        assert max_rel_err(dict(engine.sums.items()), want, dtype=torch.float64) < 1e-10


@pytest.mark.parametrize("arch", ["mlp", "cnn", "resnet", "vit"])
def test_supported_models_need_no_fallback(arch):
    """Every parameter is served by a layer rule or an additive tap (the fast path)."""
    model = tiny(arch).eval()
    engine = GradEngine(model, LossSpec("fisher"))
    x, y = image_batches((4,))[0]
    engine.add_batch(x, y)
    assert engine.fallback_names == set()


@pytest.mark.parametrize("arch", ["resnet", "vit"])
def test_every_parameter_covered(arch):
    model = tiny(arch)
    x, y = image_batches((4,))[0]
    sums, _ = importance_sums(model, [(x, y)], "fisher")
    params = dict(model.named_parameters())
    assert set(sums) == set(params)
    loss = F.cross_entropy(model.eval()(x), y, reduction="sum")
    grads = torch.autograd.grad(loss, list(params.values()))
    for (name, p), g in zip(params.items(), grads):
        assert sums[name].shape == p.shape
        assert bool((sums[name] >= 0).all()) and bool(torch.isfinite(sums[name]).all())
        if bool(g.abs().gt(0).any()):
            assert bool(sums[name].gt(0).any()), f"{name} has a gradient but zero importance"


# ---- layers, configurations and fallbacks ------------------------------------------------------


class Head(nn.Module):
    """Flatten + Linear to 10 classes, whatever the feature shape."""

    def __init__(self, features: int):
        super().__init__()
        self.fc = nn.Linear(features, 10)

    def forward(self, h):
        return self.fc(torch.flatten(h, 1))


def conv_net(conv: nn.Module, in_shape=(2, 9, 9)) -> nn.Module:
    with torch.no_grad():
        features = conv(torch.zeros(1, *in_shape)).numel()
    return nn.Sequential(conv, nn.Tanh(), Head(features))


CONVS = {
    "groups-stride-dilation": lambda: nn.Conv2d(2, 4, 3, stride=2, padding=1, dilation=2, groups=2),
    "same-reflect": lambda: nn.Conv2d(2, 3, 3, padding="same", padding_mode="reflect"),
    "same-even-kernel": lambda: nn.Conv2d(2, 3, (2, 4), padding="same", bias=False),
    "circular-rect": lambda: nn.Conv2d(2, 4, (3, 1), stride=(1, 2), padding=(1, 0), padding_mode="circular"),
    "one-position": lambda: nn.Conv2d(2, 3, 9),
    "four-positions-groups": lambda: nn.Conv2d(2, 4, 5, stride=4, groups=2),  # position pairs (T <= 4)
    "depthwise": lambda: nn.Conv2d(2, 4, 3, groups=2, padding=1),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("name", list(CONVS))
@pytest.mark.parametrize("method,kw", [CASES[0], CASES[2], CASES[3]], ids=["fisher", "fisher-exact", "mas"])
def test_conv2d_configurations(name, method, kw):
    torch.manual_seed(0)
    model = conv_net(CONVS[name]())
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(4, 2, 9, 9, generator=gen), torch.randint(0, 10, (4,), generator=gen))]
    assert compare(model, batches, method, **kw) < TOL


@pytest.mark.parametrize("method,kw", [CASES[0], CASES[2]], ids=["fisher", "fisher-exact"])
def test_channels_last_inputs(method, kw):
    """Patches are built from a channels-last view; inputs and gradients that already are
    channels-last (strided differently) give the same result."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1, dilation=2, groups=2),
        nn.Tanh(),
        nn.Conv2d(4, 3, 3, padding=1),
        nn.Tanh(),
        Head(3 * 4 * 4),
    ).to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 2, 9, 9, generator=gen).contiguous(memory_format=torch.channels_last)
    assert compare(model, [(x, torch.randint(0, 10, (4,), generator=gen))], method, **kw) < TOL


def test_exact_label_cotangents_factor_the_softmax_hessian():
    """The K exact-label cotangents are the columns of S with S Sᵀ = diag(p) − ppᵀ, and equal (up
    to sign) the logit gradients of the K per-pass losses √p_y·(−log p_y) (√p detached)."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(5, 7, generator=gen, dtype=torch.float64) * 3
    spec = LossSpec("fisher", "exact")
    S = output_cotangents(z, torch.zeros(5, dtype=torch.int64), spec)  # (K, B, K)
    assert S.shape == (7, 5, 7)
    p = torch.softmax(z, -1)
    hessian = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    assert torch.allclose(torch.einsum("ynk,ynl->nkl", S, S), hessian, atol=1e-14)
    zz = z.clone().requires_grad_()
    losses = per_sample_losses(zz, torch.zeros(5, dtype=torch.int64), spec)
    for y in range(7):
        grad = torch.autograd.grad(losses[:, y].sum(), zz, retain_graph=True)[0]
        assert torch.allclose(grad, -S[y], atol=1e-14)


@pytest.mark.parametrize("method,kw", CASES, ids=CASE_IDS)
def test_output_cotangents_are_the_logit_gradients_of_the_losses(method, kw):
    """The closed-form cotangents the engine back-propagates equal autograd of the per-sample
    losses (up to sign for the exact Fisher, whose passes enter squared)."""
    gen = torch.Generator().manual_seed(0)
    z = (torch.randn(5, 7, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    targets = torch.randint(0, 7, (5,), generator=gen)
    spec = LossSpec(method, **kw)
    got = output_cotangents(z, targets, spec)
    losses = per_sample_losses(z, targets, spec)
    assert got.shape == (losses.shape[1], 5, 7)
    for k in range(losses.shape[1]):
        want = torch.autograd.grad(losses[:, k].sum(), z, retain_graph=True)[0]
        assert torch.allclose(got[k].abs(), want.abs(), atol=1e-14)
        assert torch.allclose(got[k], want, atol=1e-14) or torch.allclose(got[k], -want, atol=1e-14)


def test_chunks_and_threads_do_not_change_results():
    """Chunk sizes (memory budget, working set, a multiple of the torch threads) only regroup
    the same sums."""
    model = tiny("cnn")
    batches = image_batches((5,))
    a, _ = importance_sums(model, batches, "fisher", fisher_labels="exact")
    torch.set_num_threads(2)
    b, _ = importance_sums(model, batches, "fisher", fisher_labels="exact", memory_budget_mb=0.01)
    assert max_rel_err(b, a) < 1e-5


PADDED_FEW_POSITIONS = {  # ≤ 4 output positions where some kernel offsets see only zero padding
    "1x1-kernel3-pad1": (lambda: nn.Conv2d(2, 4, 3, padding=1), (2, 1, 1)),  # one position: the centre offset
    "1x1-stride2-pad1": (lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1), (2, 2, 2)),  # 4 of 9 offsets, 2 runs
    "2x2-kernel3-pad1": (lambda: nn.Conv2d(2, 4, 3, padding=1), (2, 2, 2)),
    "stride2-pad1-groups": (lambda: nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2), (2, 4, 4)),
    "dilated-rect": (lambda: nn.Conv2d(2, 3, (3, 2), padding=(2, 1), dilation=(2, 1), bias=False), (2, 1, 2)),
    "conv1d-same": (lambda: nn.Conv1d(2, 3, 3, padding="same"), (2, 3)),
    "reflect": (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), (2, 2, 2)),
}


@pytest.mark.parametrize("name", list(PADDED_FEW_POSITIONS))
@pytest.mark.parametrize("method,kw", [CASES[0], CASES[2]], ids=["fisher", "fisher-exact"])
def test_position_pairs_skip_zero_padding(name, method, kw):
    """With ≤ 4 positions the square of a sum over positions is summed over position pairs; a kernel
    offset whose input is zero padding at some positions contracts only over the pairs it sees (at one
    position: the offsets that see only padding are skipped and stay zero)."""
    torch.manual_seed(0)
    make, shape = PADDED_FEW_POSITIONS[name]
    conv = make()
    model = conv_net(conv, in_shape=shape)
    rule = ConvRule()
    seen = rule.seen(conv, [torch.zeros(1, *shape)])
    assert (seen is None) == (name == "reflect")  # reflect padding repeats the input: never zero
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(5, *shape, generator=gen), torch.randint(0, 10, (5,), generator=gen))]
    assert compare(model, batches, method, **kw) < TOL


def test_seen_column_runs_merge_adjacent_blocks():
    """Seen blocks of ``width`` columns become maximal column ranges; unseen blocks are skipped."""
    seen = torch.tensor([False, True, True, False, True, False, False, True, True])
    assert seen_column_runs(seen, 3) == [(3, 9), (12, 15), (21, 27)]
    assert seen_column_runs(torch.ones(3, dtype=torch.bool), 2) == [(0, 6)]
    assert seen_column_runs(torch.zeros(2, dtype=torch.bool), 2) == []


def test_seen_positions_of_a_padded_2x2_convolution():
    """3×3 kernel, padding 1 on a 2×2 input: the centre offset sees all 4 positions, an edge offset 2, a corner 1."""
    seen = ConvRule().seen(nn.Conv2d(1, 1, 3, padding=1), [torch.zeros(1, 1, 2, 2)])
    assert seen.shape == (4, 9)
    assert seen.sum(0).tolist() == [1, 2, 1, 2, 4, 2, 1, 2, 1]
    assert seen[:, 0].tolist() == [False, False, False, True]  # offset (−1, −1) reads the input at position (1, 1) only


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: nn.Conv2d(2, 3, 3, padding=1), (2, 5, 4)),
        (lambda: nn.Conv2d(2, 3, (2, 4), padding="same"), (2, 5, 6)),  # uneven: more padding on one side
        (lambda: nn.Conv2d(2, 3, 3, padding=(0, 2), dilation=2), (2, 7, 5)),
        (lambda: nn.Conv1d(2, 3, 4, padding="same"), (2, 6)),
        (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"), (2, 4, 4)),
        (lambda: nn.Conv2d(2, 3, 3), (2, 4, 4)),
    ],
    ids=["pad1", "same-uneven", "rows-only", "conv1d-same", "circular", "none"],
)
def test_channels_last_padding_equals_f_pad(make, shape):
    """The zeroed channels-last buffer with the input copied into its interior is the padded input."""
    conv, rule = make(), ConvRule()
    x = torch.randn(3, *shape)
    got = rule._padded_channels_last(conv, x)
    assert got.is_contiguous()
    assert torch.equal(got, rule._padded(conv, x).permute(0, 2, 3, 1))


@pytest.mark.parametrize("groups", [1, 2])
def test_position_pairs_in_chunks_of_samples(groups):
    """Position pairs (T ≤ 4) summed over the K exact-label passes, finished in chunks of samples
    when the memory budget holds only a few samples' pair products, equal the per-sample loop."""
    torch.manual_seed(0)
    model = conv_net(nn.Conv2d(2, 4, 5, stride=4, padding=1, groups=groups))  # 9×9 input, padded → 2×2 positions
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(7, 2, 9, 9, generator=gen), torch.randint(0, 10, (7,), generator=gen))]
    kw = {"fisher_labels": "exact", "generator": torch.Generator().manual_seed(7)}
    with logging_chunks() as log:
        got, _ = importance_sums(model, batches, "fisher", memory_budget_mb=0.002, **kw)
    assert any(chunk < batch for chunk, batch, *_ in log.rows.values())  # the budget did split the batch
    want, _ = naive_sums(model, batches, "fisher", fisher_labels="exact", generator=torch.Generator().manual_seed(7))
    assert max_rel_err(got, want) < TOL


def test_exact_labels_equal_backpack_diag_ggn_exact():
    """Independent check of the exact-label Fisher: BackPACK's DiagGGNExact of the summed
    cross-entropy is Σₙ diag(Jₙᵀ Hₙ Jₙ), the same quantity (optional dependency)."""
    pytest.importorskip("backpack")
    import copy
    import warnings

    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact

    for arch in ("mlp", "cnn"):
        model = tiny(arch).eval()
        seq = copy.deepcopy(model)
        seq = seq.net if arch == "mlp" else nn.Sequential(*seq.features, nn.Flatten(), seq.classifier)
        bp_model = extend(seq).eval()
        x, y = image_batches((6,))[0]
        with warnings.catch_warnings(), backpack(DiagGGNExact()):
            warnings.simplefilter("ignore")  # BackPACK's full backward hooks on a first layer whose input needs no grad
            extend(nn.CrossEntropyLoss(reduction="sum"))(bp_model(x), y).backward()
        want = {
            n: p.diag_ggn_exact.detach().clone() for (n, _), p in zip(model.named_parameters(), bp_model.parameters())
        }
        got, _ = importance_sums(model, [(x, y)], "fisher", fisher_labels="exact")
        assert max_rel_err(got, want) < TOL


def test_conv1d_and_norm_layers():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3, stride=2, padding=1, groups=2),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.Conv1d(4, 4, 2, padding="same", padding_mode="replicate"),
        nn.BatchNorm1d(4),
        nn.Tanh(),
        Head(4 * 6),
    )
    randomize_norms(model)
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(5, 2, 12, generator=gen), torch.randint(0, 10, (5,), generator=gen))]
    for method, kw in (CASES[0], CASES[2], CASES[3]):
        assert compare(model, batches, method, **kw) < TOL


class SequenceNet(nn.Module):
    """Embedding + LayerNorm + token-wise Linear (B, T, d) + mean pool + BatchNorm1d head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, 6, padding_idx=0)
        self.norm = nn.LayerNorm(6)
        self.mix = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.out = nn.Linear(8, 10)

    def forward(self, tokens):
        h = torch.tanh(self.mix(self.norm(self.emb(tokens))))
        return self.out(self.bn(h.mean(1)))


def test_embedding_layernorm_tokens():
    torch.manual_seed(0)
    model = randomize_norms(SequenceNet())
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randint(0, 12, (4, 7), generator=gen), torch.randint(0, 10, (4,), generator=gen))]
    for method, kw in CASES:
        assert compare(model, batches, method, **kw) < TOL


class Awkward(nn.Module):
    """Parameters no rule may take: custom module, tied and reused weights, functional use,
    additive parameters with alpha/sub, an in-place op after a layer, an unused and a frozen layer."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 5)
        self.scale = nn.Parameter(torch.randn(5))
        self.offset = nn.Parameter(torch.randn(1, 5))
        self.shift = nn.Parameter(torch.randn(5))
        self.reused = nn.Linear(5, 5)
        self.tied_a = nn.Linear(5, 5)
        self.tied_b = nn.Linear(5, 5)
        self.tied_b.weight = self.tied_a.weight
        self.side = nn.Linear(5, 5)
        self.unused = nn.Linear(5, 5)
        self.frozen = nn.Linear(5, 5)
        self.frozen.requires_grad_(False)
        self.out = nn.Linear(5, 10)

    def forward(self, x):
        h = torch.relu_(self.inp(x))  # in-place op overwrites the layer output
        h = h * self.scale - self.offset  # custom multiplicative and subtractive params
        h = torch.add(h, self.shift, alpha=0.5)
        h = torch.tanh(self.reused(torch.tanh(self.reused(h))))  # one module called twice
        h = torch.tanh(self.tied_b(torch.tanh(self.tied_a(h))))  # a weight shared by two modules
        h = torch.tanh(self.side(h) + F.linear(h, self.side.weight))  # module weight also used directly
        return self.out(self.frozen(h))


class InPlace(nn.Module):
    """In-place ops after layers: on a source layer's output, on a later layer's output (BatchNorm →
    ReLU(inplace) after a residual ``+=``) and on a layer's input after the layer read it (which
    autograd allows only where nothing saved that input: ``reads`` trains its bias alone)."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(6, 8)
        self.mid = nn.Linear(8, 8)
        self.norm = nn.BatchNorm1d(8)
        self.reads = nn.Linear(8, 8)
        self.reads.weight.requires_grad_(False)
        self.out = nn.Linear(8, 10)

    def forward(self, x):
        h = torch.relu_(self.first(x))  # a source's output overwritten
        r = self.norm(self.mid(h))
        r.add_(h).relu_()  # a later layer's output overwritten, twice
        s = r + 0
        y = self.reads(s)
        s.mul_(0.5)  # the input ``reads`` saw, overwritten after the call
        return self.out(torch.tanh(y) + s)


@pytest.mark.parametrize("method,kw", CASES, ids=CASE_IDS)
def test_in_place_ops_after_layers(method, kw):
    """Overwritten outputs need no copies (their gradient is taken at the node that made them); only a
    layer whose input was overwritten runs again with copies. All sums stay exact."""
    model = randomize_norms(InPlace()).eval()
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(5, 6, generator=gen), torch.randint(0, 10, (5,), generator=gen))] * 2
    assert compare(model, batches, method, **kw) < TOL
    engine = GradEngine(model, LossSpec(method, **kw))
    forwards = []
    model.register_forward_pre_hook(lambda *_: forwards.append(1))
    for x, y in batches:
        engine.add_batch(x, y)
    assert engine.copy == {model.reads} and not engine.fallback_names
    assert len(forwards) == 3  # the first batch once more, with the copy


def test_no_copies_for_a_resnet():
    """timm's ResNet overwrites BatchNorm outputs in place (ReLU(inplace), the residual ``+=``) and
    never a layer's input: one forward pass per batch, no copies."""
    model = tiny("resnet").eval()
    engine = GradEngine(model, LossSpec("fisher"))
    forwards = []
    model.register_forward_pre_hook(lambda *_: forwards.append(1))
    for x, y in image_batches((3, 2)):
        engine.add_batch(x, y)
    assert engine.copy == set() and not engine.fallback_names and len(forwards) == 2


@pytest.mark.parametrize("method,kw", CASES, ids=CASE_IDS)
def test_fallbacks_are_exact(method, kw):
    torch.manual_seed(0)
    model = Awkward()
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(4, 6, generator=gen), torch.randint(0, 10, (4,), generator=gen))]
    assert compare(model, batches, method, **kw) < TOL
    sums, _ = importance_sums(model, batches, method, **kw)
    assert "frozen.weight" not in sums and float(sums["unused.weight"].abs().max()) == 0.0


def test_loop_fallback_when_vmap_is_unavailable():
    torch.manual_seed(0)
    model = Awkward().eval()
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 6, generator=gen), torch.randint(0, 10, (4,), generator=gen)
    engine = GradEngine(model, LossSpec("fisher"))
    engine.fallback.use_vmap = False
    engine.add_batch(x, y)
    want, _ = naive_sums(model, [(x, y)], "fisher")
    assert engine.fallback_names >= {"scale", "tied_a.weight", "side.weight"}
    assert max_rel_err({n: t.cpu() for n, t in engine.sums.items()}, want) < TOL


def test_vmap_fallback_through_timm_attention():
    """The generic fallback is exact on a ViT too (attention run unfused inside vmap)."""
    model = tiny("vit").eval()
    x, y = image_batches((3,))[0]
    names = ["cls_token", "pos_embed", "blocks.0.attn.qkv.weight", "blocks.1.norm1.weight"]
    fallback = PerSampleFallback(model, LossSpec("fisher"))
    got = fallback.stats(names, x, y, passes=1)
    assert fallback.use_vmap, fallback.vmap_error
    assert all(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))
    want, _ = naive_sums(model, [(x, y)], "fisher")
    assert max_rel_err(got, {n: want[n] for n in names}) < TOL


def test_batchnorm_without_running_stats_uses_per_sample_fallback():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3, track_running_stats=False), nn.ReLU(), Head(3 * 6 * 6))
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(3, 1, 8, 8, generator=gen), torch.randint(0, 10, (3,), generator=gen))]
    assert compare(model, batches, "fisher") < TOL


def test_tiny_memory_budget_gives_same_result():
    model = tiny("vit")
    batches = image_batches((5,))
    a, _ = importance_sums(model, batches, "fisher", fisher_labels="exact")
    b, _ = importance_sums(model, batches, "fisher", fisher_labels="exact", memory_budget_mb=0.01)
    assert max_rel_err(b, a) < 1e-5


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_autocast_accumulates_float32(precision):
    model = tiny("mlp")
    batches = image_batches((6,))
    low, _ = importance_sums(model, batches, "fisher", precision=precision)
    ref, _ = importance_sums(model, batches, "fisher")
    assert all(t.dtype == torch.float32 for t in low.values())
    assert max_rel_err(low, ref) < 0.1
