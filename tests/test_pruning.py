"""Pruning masks: exact count, deterministic ties, equality with a stable-sort reference."""

import pytest
import torch

import cl_tool.pruning as P
from cl_tool.errors import BadInputError, IncompatibleError, UsageError
from cl_tool.models import classifier_param_names
from cl_tool.pruning import (
    DEFAULT_EXCLUDE,
    apply_masks,
    global_masks,
    layer_masks,
    num_to_prune,
    select_prunable,
    sparsity_report,
)

SPARSITIES = [0.0, 0.1, 0.25, 0.5, 0.73, 0.9, 0.999]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a loaded machine OpenMP
    threads spin at barriers; run this module single-threaded and restore afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- reference


def reference_masks(scores, sparsity):
    """First k positions of a stable ascending sort of the concatenated scores are pruned."""
    flat = torch.cat([t.detach().reshape(-1).double() for t in scores.values()])
    k = num_to_prune(flat.numel(), sparsity)
    order = torch.sort(flat, stable=True).indices
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[order[:k]] = False
    out, pos = {}, 0
    for name, t in scores.items():
        out[name] = keep[pos : pos + t.numel()].view(t.shape)
        pos += t.numel()
    return out


def assert_masks_equal(got, want):
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == torch.bool
        assert got[name].shape == want[name].shape
        assert torch.equal(got[name], want[name]), name


def tie_scores(seed, shapes=((7, 9), (0,), (33,), (4, 3, 2, 2), (50, 11))):
    g = torch.Generator().manual_seed(seed)
    return {f"layer{i}.weight": torch.randint(0, 6, s, generator=g).float() for i, s in enumerate(shapes)}


@pytest.fixture(params=["direct", "sampled", "bisection"])
def small_cap(request, monkeypatch):
    """Run each selection three ways: candidates copied out at once (small inputs), and
    with a tiny candidate cap so the sample-guided probes, or pure bisection on the
    float keys (sampling off), narrow the threshold first."""
    if request.param != "direct":
        monkeypatch.setattr(P, "_MIN_CAP", 5)
    if request.param == "bisection":
        monkeypatch.setattr(P, "_SAMPLE", 0)
    return request.param


# ----------------------------------------------------------------------------- counts


@pytest.mark.parametrize(
    "n, s, k",
    [
        (10, 0.25, 3),
        (10, 0.24, 2),
        (4, 0.125, 1),
        (8, 0.0625, 1),
        (10, 0.0, 0),
        (1, 0.5, 1),
        (1, 0.49, 0),
        (86_567_656, 0.9, 77_910_890),
        (3, 0.999, 3),
        (0, 0.5, 0),
    ],
)
def test_num_to_prune_rounds_half_up_on_the_decimal(n, s, k):
    assert num_to_prune(n, s) == k


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.1, float("nan"), float("inf"), "0.5", None, True])
def test_bad_sparsity(bad):
    scores = tie_scores(0)
    for fn in (global_masks, layer_masks):
        with pytest.raises(UsageError, match=r"sparsity must be"):
            fn(scores, bad)


def test_bad_sparsity_message():
    with pytest.raises(UsageError) as exc:
        global_masks(tie_scores(0), 1.5)
    assert exc.value.message == "$sparsity must be in [0, 1), got 1.5."  # the CLI names the flag: --sparsity
    assert str(exc.value) == "sparsity must be in [0, 1), got 1.5."


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_global_matches_stable_sort_with_ties(seed, sparsity, small_cap):
    scores = tie_scores(seed)
    masks = global_masks(scores, sparsity)
    assert_masks_equal(masks, reference_masks(scores, sparsity))
    n = sum(t.numel() for t in scores.values())
    _, total = sparsity_report(masks)
    assert total.pruned == num_to_prune(n, sparsity)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_layer_matches_stable_sort_with_ties(seed, sparsity, small_cap):
    scores = tie_scores(seed)
    masks = layer_masks(scores, sparsity)
    for name, t in scores.items():
        assert_masks_equal({name: masks[name]}, reference_masks({name: t}, sparsity))
        assert int((~masks[name]).sum()) == num_to_prune(t.numel(), sparsity)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_continuous_signed_and_special_values(sparsity, small_cap):
    g = torch.Generator().manual_seed(7)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-45, -1e-45, 3.0, -3.0])
    scores = {
        "a": torch.randn(40, 13, generator=g),
        "b": special[torch.randint(0, 8, (200,), generator=g)],
        "c": torch.randn(17, generator=g).abs(),
        "d": torch.zeros(5, 5),
    }
    assert_masks_equal(global_masks(scores, sparsity), reference_masks(scores, sparsity))


def test_mixed_dtypes_and_non_contiguous(small_cap):
    g = torch.Generator().manual_seed(3)
    base = torch.randint(0, 4, (30, 20), generator=g)
    scores = {
        "t": base.float().t(),  # non-contiguous view
        "h": torch.randint(0, 4, (64,), generator=g).half(),
        "d": (torch.randint(0, 4, (25,), generator=g).double() + 1e-12),  # differs from 1.0f only in float64
        "i": torch.randint(0, 4, (9,), generator=g),  # integer scores
    }
    for s in (0.2, 0.5, 0.8):
        assert_masks_equal(global_masks(scores, s), reference_masks(scores, s))


def test_float64_distinctions_are_kept():
    # 1.0 and 1.0 + 1e-12 are equal in float32 but not in float64: float64 scores must see the difference.
    scores = {
        "a": torch.tensor([1.0 + 1e-12, 1.0 + 1e-12], dtype=torch.float64),
        "b": torch.tensor([1.0, 1.0], dtype=torch.float64),
    }
    m = global_masks(scores, 0.5)
    assert m["a"].tolist() == [True, True] and m["b"].tolist() == [False, False]


def test_all_equal_ties_prune_in_dict_then_index_order():
    scores = {"x": torch.ones(2, 3), "y": torch.ones(4)}
    m = global_masks(scores, 0.5)  # k = 5 of 10
    # k = floor(0.5 * 10 + 0.5) = 5: the first 5 in (dict, flat index) order.
    assert m["x"].flatten().tolist() == [False, False, False, False, False, True]
    assert m["y"].tolist() == [True, True, True, True]


def test_sparsity_zero_keeps_everything_and_shapes_devices():
    scores = tie_scores(1)
    m = global_masks(scores, 0.0)
    for name, t in scores.items():
        assert m[name].shape == t.shape and m[name].device == t.device and bool(m[name].all())


def test_empty_and_parameters():
    lin = torch.nn.Linear(6, 4)
    scores = {"w": lin.weight, "empty": torch.empty(0, 3), "b": lin.bias}  # Parameters requiring grad
    m = global_masks(scores, 0.5)
    assert m["empty"].shape == (0, 3)
    assert_masks_equal(m, reference_masks(scores, 0.5))


@pytest.mark.parametrize("fn", [global_masks, layer_masks])
def test_nan_scores_refused_naming_the_tensor(fn):
    scores = tie_scores(0)
    scores["layer3.weight"][1, 2, 0, 1] = float("nan")
    with pytest.raises(BadInputError, match="layer3.weight"):
        fn(scores, 0.5)


def test_large_input_is_never_concatenated_or_sorted_whole(monkeypatch):
    # Scale the limits down (cap 1000 elements, so the largest tensor's 2500; sample 2048) so a 100 k-element
    # input stands in for a large model: only the sample may be sorted, and nothing beyond the cap concatenated.
    import numpy as np

    monkeypatch.setattr(P, "_MIN_CAP", 1000)
    monkeypatch.setattr(P, "_SAMPLE", 2048)
    real_cat, real_sort = np.concatenate, np.sort
    seen = []

    def guarded_cat(arrays, *a, **kw):  # the sample, or the bracket's copies (at most the cap: the largest tensor)
        seen.append(sum(x.size for x in arrays))
        assert seen[-1] <= max(2048 + 40, 2500)
        return real_cat(arrays, *a, **kw)

    def guarded_sort(x, *a, **kw):
        assert x.size <= 2048 + 40
        return real_sort(x, *a, **kw)

    g = torch.Generator().manual_seed(5)
    scores = {f"l{i}": torch.rand(50, 50, generator=g) for i in range(40)}
    monkeypatch.setattr(np, "concatenate", guarded_cat)
    monkeypatch.setattr(np, "sort", guarded_sort)
    masks = global_masks(scores, 0.9)
    monkeypatch.undo()
    assert seen, "the sampled path was not taken"
    assert_masks_equal(masks, reference_masks(scores, 0.9))


def _counting_sources(scores):
    """numpy Sources over ``scores`` that count how often each is read."""

    reads = dict.fromkeys(scores, 0)

    def loader(name, array):
        def load():
            reads[name] += 1
            return array

        return load

    arrays = {n: t.numpy() for n, t in scores.items()}
    return [P.Source(n, tuple(a.shape), str(a.dtype), loader(n, a)) for n, a in arrays.items()], reads, arrays


def _plan_masks(sources, plan):
    return {src.name: torch.from_numpy(plan.mask(src)) for src in sources}


@pytest.mark.parametrize(
    "kind", ["continuous", "ties", "zeros", "signed-zeros-and-infinities", "two-values", "tail-heavy"]
)
@pytest.mark.parametrize("sample", [16, 64, 2048])
@pytest.mark.parametrize("sparsity", [0.05, 0.5, 0.9, 0.999])
def test_bracketing_edge_cases_match_the_stable_sort(monkeypatch, kind, sample, sparsity):
    # A tiny sample brackets badly (misses k, or holds too many ties for the cap), so the pass that
    # copies out candidates and the probe fallback behind it are both exercised against the reference.
    monkeypatch.setattr(P, "_MIN_CAP", 60)
    monkeypatch.setattr(P, "_SAMPLE", sample)
    g = torch.Generator().manual_seed(hash((kind, sample)) % 2**31)
    shapes = [(30, 7), (0,), (111,), (9, 4)]
    if kind == "continuous":
        scores = {f"t{i}": torch.randn(s, generator=g) for i, s in enumerate(shapes)}
    elif kind == "ties":
        scores = {f"t{i}": torch.randint(0, 3, s, generator=g).float() for i, s in enumerate(shapes)}
    elif kind == "zeros":  # 85 % zeros, the rest spread
        scores = {
            f"t{i}": torch.rand(s, generator=g) * (torch.rand(s, generator=g) > 0.85) for i, s in enumerate(shapes)
        }
    elif kind == "signed-zeros-and-infinities":
        special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-45, -1e-45])
        scores = {f"t{i}": special[torch.randint(0, 6, s, generator=g)] for i, s in enumerate(shapes)}
    elif kind == "two-values":
        scores = {f"t{i}": (torch.rand(s, generator=g) > 0.5).double() * 1e-300 for i, s in enumerate(shapes)}
    else:  # a few huge values and a dense body just under the cut
        scores = {f"t{i}": torch.rand(s, generator=g) ** 8 for i, s in enumerate(shapes)}
    assert_masks_equal(global_masks(scores, sparsity), reference_masks(scores, sparsity))


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_the_plan_reads_each_source_twice_or_once_when_observed(monkeypatch, scope):
    monkeypatch.setattr(P, "_MIN_CAP", 1000)
    monkeypatch.setattr(P, "_SAMPLE", 16384)
    g = torch.Generator().manual_seed(11)
    # 60 000 scores, cap 2 000: the sample's bracket at 90 % holds ~1 100 of them
    scores = {f"l{i}": torch.rand(40, 50, generator=g) for i in range(30)}
    want = reference_masks(scores, 0.9) if scope == "global" else None

    sources, reads, _ = _counting_sources(scores)
    plan = P.CutPlanner(sources, 0.9, scope).plan()
    assert set(reads.values()) == {2}
    masks = _plan_masks(sources, plan)

    sources, reads, arrays = _counting_sources(scores)
    planner = P.CutPlanner(sources, 0.9, scope)
    for name in reversed(arrays):  # pushed in any order, as a caller reading its own file would
        planner.observe(name, arrays[name])
    planner.observe("not-a-source", arrays["l0"])  # ignored
    plan = planner.plan()
    assert set(reads.values()) == {1}
    assert_masks_equal(_plan_masks(sources, plan), masks)
    if want is not None:
        assert_masks_equal(masks, want)
    else:
        for name, t in scores.items():
            assert_masks_equal({name: masks[name]}, reference_masks({name: t}, 0.9))


@pytest.mark.parametrize("piece", [1, 7, 64, 10_000])
@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.9])
def test_scores_read_in_pieces_give_the_same_masks(small_cap, piece, sparsity):
    # Ties straddle piece boundaries (integer scores), so the first ties met must be pruned across pieces.
    scores = tie_scores(3)
    arrays = {n: t.numpy() for n, t in scores.items()}
    reads = []

    def pieces(name):
        def gen():
            reads.append(name)
            flat = arrays[name].reshape(-1)
            for start in range(0, flat.size, piece):
                yield flat[start : start + piece]

        return gen

    sources = [
        P.Source(n, a.shape, str(a.dtype), lambda: pytest.fail("read whole"), pieces(n)) for n, a in arrays.items()
    ]
    for scope, ref in (("global", reference_masks(scores, sparsity)), ("layer", None)):
        planner = P.CutPlanner(sources, sparsity, scope)
        name = next(iter(arrays))
        flat = arrays[name].reshape(-1)
        for start in range(0, flat.size, piece):  # one source pushed in pieces, the others read by the plan
            planner.observe(name, flat[start : start + piece], start)
        masks = _plan_masks(sources, planner.plan())
        if ref is not None:
            assert_masks_equal(masks, ref)
        else:
            for n, t in scores.items():
                assert_masks_equal({n: masks[n]}, reference_masks({n: t}, sparsity))
    assert reads, "the pieces were not read"


def test_observed_nan_is_refused_naming_the_tensor():
    sources, _, arrays = _counting_sources({"a": torch.rand(5), "b": torch.tensor([1.0, float("nan")])})
    planner = P.CutPlanner(sources, 0.5, "global")
    with pytest.raises(BadInputError, match="'b'"):
        planner.observe("b", arrays["b"])


# ----------------------------------------------------------------------------- apply / report


def test_apply_masks_and_report():
    state = {"a": torch.arange(1.0, 7.0).view(2, 3), "b": torch.tensor([5.0, -1.0, 2.0, 0.5])}
    scores = {k: v.abs() for k, v in state.items()}
    masks = global_masks(scores, 0.5)  # k = 5 of 10: 0.5, 1, 1, 2, 2 -> a[0,0], a[0,1], b[1], b[2], b[3]
    frac = apply_masks(state, masks)
    assert state["a"].tolist() == [[0.0, 0.0, 3.0], [4.0, 5.0, 6.0]]
    assert state["b"].tolist() == [5.0, 0.0, 0.0, 0.0]
    assert frac == {"a": pytest.approx(2 / 6), "b": pytest.approx(3 / 4)}
    rows, total = sparsity_report(masks)
    assert [(r.name, r.numel, r.pruned) for r in rows] == [("a", 6, 2), ("b", 4, 3)]
    assert total == ("total", 10, 5, 0.5)


def test_apply_masks_on_model_state_dict_prunes_model():
    lin = torch.nn.Linear(8, 8)
    sd = lin.state_dict()
    masks = global_masks({"weight": sd["weight"].abs()}, 0.75)
    apply_masks(sd, masks)
    assert int((lin.weight == 0).sum()) == 48
    apply_masks(dict(lin.named_parameters()), masks)  # in place on Parameters too


def test_apply_masks_mismatch():
    with pytest.raises(IncompatibleError, match="'x'"):
        apply_masks({"a": torch.ones(2)}, {"x": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(IncompatibleError, match="shape"):
        apply_masks({"a": torch.ones(2)}, {"a": torch.ones(3, dtype=torch.bool)})


# ----------------------------------------------------------------------------- selection


@pytest.fixture(scope="module")
def vit():
    timm = pytest.importorskip("timm")
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=28, patch_size=4, in_chans=1, num_classes=10, pretrained=False
    )


@pytest.fixture(scope="module")
def resnet():
    timm = pytest.importorskip("timm")
    return timm.create_model("resnet10t", pretrained=False, num_classes=10)


def test_select_vit_defaults(vit):
    params = dict(vit.named_parameters())
    assert classifier_param_names(vit) == ("head.weight", "head.bias")
    want = [f"blocks.{i}.{n}.weight" for i in range(12) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    assert select_prunable(params, classifier_names=classifier_param_names(vit)) == want
    assert select_prunable(params) == want  # classifier guessed: last >= 2-D tensor and its bias
    with_cls = select_prunable(params, include_classifier=True)
    assert with_cls == want + ["head.weight"]
    with_bias = select_prunable(params, include_bias=True)
    assert (
        "blocks.0.attn.qkv.bias" in with_bias
        and "patch_embed.proj.bias" not in with_bias
        and "head.bias" not in with_bias
    )
    assert "norm.weight" not in with_bias
    with_norm = select_prunable(params, include_norm=True)
    assert "blocks.0.norm1.weight" in with_norm and "norm.weight" in with_norm and "norm.bias" not in with_norm


def test_select_vit_patterns(vit):
    params = dict(vit.named_parameters())
    # Explicit include wins over the defaults (embedding, classifier, biases).
    assert select_prunable(params, include=["patch_embed.*", "head.*"]) == [
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "head.weight",
        "head.bias",
    ]
    got = select_prunable(params, include=["blocks.*"], exclude=["*.bias", "*norm*", "blocks.1[01].*"])
    assert got == [f"blocks.{i}.{n}.weight" for i in range(10) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    got = select_prunable(params, exclude=["*.mlp.*"])
    assert got and all(".attn." in n for n in got)
    with pytest.raises(UsageError, match="include pattern 'blokcs.*'"):
        select_prunable(params, include=["blokcs.*"])
    with pytest.raises(UsageError, match="exclude"):
        select_prunable(params, exclude=["nope"])
    with pytest.raises(UsageError, match="No parameter"):
        select_prunable(params, exclude=["blocks.*"])
    assert "*embed*" in DEFAULT_EXCLUDE and "*cls_token*" in DEFAULT_EXCLUDE


def test_select_resnet_defaults(resnet):
    params = dict(resnet.named_parameters())
    assert classifier_param_names(resnet) == ("fc.weight", "fc.bias")
    want = [n for n, p in params.items() if p.ndim == 4]  # every conv kernel, incl. stem and downsample
    got = select_prunable(params, classifier_names=classifier_param_names(resnet))
    assert got == want and "conv1.0.weight" in got and "layer4.0.downsample.1.weight" in got
    assert select_prunable(params) == want
    # A full state dict: BN running statistics and num_batches_tracked are never selected.
    sd = resnet.state_dict()
    assert select_prunable(sd) == want
    everything = select_prunable(sd, include=["*"])
    assert not any(n.endswith(("running_mean", "running_var", "num_batches_tracked")) for n in everything)
    assert "fc.weight" in everything and "bn1.weight" in everything


def test_select_sequential_mlp():
    mlp = torch.nn.Sequential(
        torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)
    )
    params = dict(mlp.named_parameters())
    assert classifier_param_names(mlp) == ("4.weight", "4.bias")
    assert select_prunable(params) == ["0.weight", "2.weight"]
    assert select_prunable(params, classifier_names=()) == ["0.weight", "2.weight", "4.weight"]
    assert select_prunable(params, include_bias=True, include_classifier=True) == [
        "0.weight",
        "0.bias",
        "2.weight",
        "2.bias",
        "4.weight",
        "4.bias",
    ]


def test_end_to_end_on_selected_vit_params(vit):
    params = dict(vit.named_parameters())
    names = select_prunable(params, include=["blocks.0.*"])
    scores = {n: params[n].detach().abs() for n in names}
    masks = global_masks(scores, 0.9)
    assert_masks_equal(masks, reference_masks(scores, 0.9))
    lm = layer_masks(scores, 0.9)
    rows, total = sparsity_report(lm)
    assert all(r.pruned == num_to_prune(r.numel, 0.9) for r in rows)
