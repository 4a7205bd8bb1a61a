"""Batch engines: one forward pass, hooks, one backward pass per loss pass, rules, fallback.

``GradEngine`` (fisher, mas): for a batch x (B samples) it
1. runs the model once with forward hooks on every layer a rule handles (``record_calls``),
2. forms the logit cotangents V (P, B, K) of the P per-sample loss passes (``output_cotangents``;
   P = 1, or for exact-label Fisher the K columns of the symmetric factor of the softmax
   Hessian) and back-propagates each V[p] from the logits to the recorded layer outputs (not to
   the parameters) — row n of an output gradient is sample n's, because the loss is a sum of
   per-sample terms and eval-mode layers do not mix samples,
3. hands each (input, output-gradient) pair to the layer's rule from a hook as soon as
   the gradient exists (so output gradients do not pile up), and in the last pass lets each
   rule finish what it summed over the passes (one GEMM per batch for one-position layers);
   additive taps serve ViT-style token/position parameters, and the exact
   ``PerSampleFallback`` gets everything else.

Cost: about one forward pass per batch and one backward pass per loss pass, the per-sample
weight gradients taking the place of the usual weight-gradient GEMMs (materialised, where
needed, in cache-sized chunks and squared there). Memory: one batch's activations plus a
budget-bounded chunk of per-sample gradients. On a CPU a batch runs on all of torch's threads or
on one, whichever the timing of recent batches says is faster (``threads``: one wins when another
process keeps a core busy).

The K passes of exact-label Fisher run one after another, not as one backward pass vmapped over V
(same numbers, slower: the batching rules of the conv, batch-norm and attention backward ops copy
layouts; README "Benchmarks", exact labels).

A layer rule is trusted for a parameter only if (a) the parameter belongs to that one module,
(b) every call of the module this batch had a tensor input/output with B rows and an output
in the graph, and (c) the graph uses the parameter exactly once per recorded call (no other,
hidden use such as weight tying through a functional call). Otherwise the fallback is used.
Models whose BatchNorm layers have no running statistics mix samples even in eval mode; all
their parameters go through the fallback (statistic of each sample run on its own).

fp16 (``scale_cotangents``): fp16 has no exponent below 2⁻²⁴, and the backward pass from the logits
to the layer outputs runs in the forward pass's fp16, so the gradients of a confident model
(p − e_y ~ 1e-6) lose their digits or become 0 there. Each batch's cotangents are multiplied by
S = 2^−e, e the exponent of their largest magnitude m (m = f·2^e, f ∈ [½, 1)), so the largest is in
[½, 1) — a per-batch loss scale that also scales a large cotangent down — and the rules'
statistics are divided by S² (square) or S (abs) in float32 (exact: S is a power of two). The
rules widen every output gradient to float32 before they form a per-sample statistic. The fallback
computes its own per-sample losses and is not scaled.

``SignalEngine``: forward only, the rules' ``signal`` contributions summed over calls.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.autograd.graph import GradientEdge

from cl_tool.errors import IncompatibleError, UsageError
from cl_tool.importance import BIAS_SCORES, SIGNAL_NORMS, SIGNAL_STATS
from cl_tool.importance.capture import first_tensor, record_calls
from cl_tool.importance.fallback import PerSampleFallback
from cl_tool.importance.graph import AdditiveTap, GraphIndex, without_hooked_ancestors
from cl_tool.importance.losses import LossSpec, make_targets, output_cotangents, stat_fn, wide, wide_dtype
from cl_tool.importance.rules import Rule, SignalVariant, is_activation, rule_for, set_chunk_layer
from cl_tool.importance.threads import BatchThreads


@dataclass
class RuleModule:
    """A module handled by a rule; ``names`` maps its local parameter names to model names."""

    module: nn.Module
    rule: Rule
    names: dict[str, str]


@dataclass
class Plan:
    """Static view of a model: trainable parameters and the modules rules can handle."""

    params: dict[str, nn.Parameter]
    rule_modules: list[RuleModule]
    exclusive: list[RuleModule]  # rule modules whose trainable parameters no other module owns
    mixes_samples: bool
    signal_owned: set[str] = field(default_factory=set)


def make_plan(model: nn.Module) -> Plan:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    name_of = {id(p): n for n, p in params.items()}
    owners: dict[int, set[int]] = defaultdict(set)
    modules: dict[int, nn.Module] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        modules[id(m)] = m
        for _, p in m.named_parameters(recurse=False):
            owners[id(p)].add(id(m))
    rule_modules, exclusive = [], []
    for m in modules.values():
        rule = rule_for(m)
        local = {ln: name_of[id(p)] for ln, p in m.named_parameters(recurse=False) if id(p) in name_of}
        if rule is None or not local:
            continue
        rm = RuleModule(m, rule, local)
        rule_modules.append(rm)
        if all(len(owners[id(params[n])]) == 1 for n in local.values()):
            exclusive.append(rm)
    mixes = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None for m in modules.values())
    owned = {n for rm in rule_modules for n in rm.names.values()}
    return Plan(params, rule_modules, exclusive, mixes, owned)


def _check_logits(logits, batch: int) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != batch:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise IncompatibleError(f"The model must return logits of shape (batch, classes) but returned {shape}.")
    return wide(logits)


def _usable(calls, batch: int) -> bool:
    return bool(calls) and all(
        c is not None
        and c.inp.shape[0] == batch
        and c.out.dim() > 0
        and c.out.shape[0] == batch
        and c.out.requires_grad
        for c in calls
    )


class GradEngine:
    """Accumulates Σₙ Σₖ f(∂ℓₙ⁽ᵏ⁾/∂θ) over batches for every trainable parameter.

    Sums are float32, or float64 for float64 parameters (used to check exactness without
    float32 round-off); ``importance_sums`` always returns float32.
    """

    def __init__(
        self,
        model: nn.Module,
        spec: LossSpec,
        *,
        autocast=nullcontext,
        budget_bytes: int = 512 << 20,
        generator: torch.Generator | None = None,
        scale_cotangents: bool = False,
        tune_threads: bool = False,
    ):
        self.model, self.spec, self.autocast = model, spec, autocast
        self.threads = BatchThreads(enabled=tune_threads)
        self.scale_cotangents, self._unscale = scale_cotangents, None
        self.budget_bytes, self.generator = budget_bytes, generator
        self.plan = make_plan(model)
        self.sums = {
            n: torch.zeros(p.shape, device=p.device, dtype=wide_dtype(p.dtype)) for n, p in self.plan.params.items()
        }
        self.copy: set[nn.Module] = set()
        self.fallback = PerSampleFallback(model, spec, autocast, budget_bytes)
        self.fallback_names: set[str] = set()  # for reporting: parameters that needed the fallback

    def add_batch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.threads.start_batch()
        try:
            with self.threads.running():
                self._add_batch(x, y)
        finally:
            self.threads.end_batch(x.shape[0])

    def _add_batch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.plan.mixes_samples:
            self._add_all_fallback(x, y)
            return
        batch = x.shape[0]
        calls, logits = self._forward(x)
        z = _check_logits(logits, batch)
        targets = make_targets(z.detach(), y, self.spec, self.generator)
        if not z.requires_grad:
            return
        if z.grad_fn is None:
            z = z.view_as(z)  # logits that are a parameter: give the graph a root node
        cotangents = output_cotangents(z, targets, self.spec)
        if self.scale_cotangents:
            cotangents, self._unscale = scale_to_unit(cotangents, self.spec.stat)
        graph = GraphIndex(z.grad_fn)
        ruled, rest = self._split(calls, graph, batch)
        taps = {n: t for n in rest if (t := AdditiveTap.find(graph.consumers(self.plan.params[n]))) is not None}
        fallback = [n for n in rest if n not in taps]
        del graph
        failed = self._backward_passes(z, cotangents, ruled, taps, batch)
        fallback += failed
        self.fallback_names.update(fallback)
        for n, s in self.fallback.stats(fallback, x, targets, cotangents.shape[0]).items():
            self.sums[n] += s

    def _forward(self, x):
        """The recorded calls and the logits. The modules with a call whose input a later in-place op
        overwrote are run again, for this and later batches, with copies (an overwritten output needs
        none: its gradient is taken where the graph's node for it receives it)."""
        modules = [rm.module for rm in self.plan.exclusive]
        for _ in range(2):
            with record_calls(modules, self.copy) as calls, torch.enable_grad(), self.autocast():
                logits = self.model(x)
            lost = {m for m, cs in calls.items() if any(c is not None and c.input_overwritten() for c in cs)}
            if not lost - self.copy:
                return calls, logits
            self.copy |= lost
        return calls, logits

    def _split(self, calls, graph: GraphIndex, batch: int):
        """(rule modules whose calls cover their parameters, other used parameter names)."""
        ruled, covered = [], set()
        for rm in self.plan.exclusive:
            cs = calls[rm.module]
            uses = {n: len(graph.consumers(self.plan.params[n])) for n in rm.names.values()}
            if not any(uses.values()):
                covered.update(rm.names.values())  # not used this batch: exactly zero
            elif _usable(cs, batch) and all(u == len(cs) for u in uses.values()):
                ruled.append((rm, cs))
                covered.update(rm.names.values())
        rest = [n for n, p in self.plan.params.items() if n not in covered and graph.consumers(p)]
        return ruled, rest

    def _backward_passes(self, z, cotangents, ruled, taps, batch: int) -> list[str]:
        """Run the P backward passes; add rule and tap statistics; return taps that failed.

        Hooks on the recorded layer outputs hand each output gradient to its rule as soon as the
        backward pass produces it (once all calls of that layer have one), so at most a few output
        gradients are alive at a time. Autograd is asked only for the outputs without a recorded
        ancestor ("sources") and for the tap parameters. An output that a later in-place op
        overwrote is asked for, or hooked, as its node's input (the gradient of the value the layer
        returned, not of the overwritten one).
        """
        tap_params = [self.plan.params[n] for n in taps]
        passes = cotangents.shape[0]
        states = [{} for _ in ruled]  # per layer: what its rule sums over the passes
        pending = [[None] * len(cs) for _, cs in ruled]
        last = [passes == 1]  # the running pass is the last one: rules finish at once
        hooks = {
            (j, k): (c, self._grad_hook(ruled, states, pending, last, j, k))
            for j, (_, cs) in enumerate(ruled)
            for k, c in enumerate(cs)
        }
        sources = without_hooked_ancestors(list(hooks), node_of=lambda jk: hooks[jk][0].node)
        if not sources and not tap_params:
            return []
        returned = {jk for jk in sources if hooks[jk][0].output_overwritten()}  # autograd's result is their gradient
        inputs = [GradientEdge(c.node, c.nr) if c.output_overwritten() else c.out for c, _ in map(hooks.get, sources)]
        handles = [_hook_output_grad(c, hook) for jk, (c, hook) in hooks.items() if jk not in returned]
        tap_sums: dict[str, torch.Tensor] = {}
        failed: set[str] = set()
        for t in taps.values():
            t.attach()
        f = stat_fn(self.spec.stat)
        try:
            for k in range(passes):
                last[0] = k + 1 == passes
                grads = torch.autograd.grad(
                    z, inputs + tap_params, cotangents[k], retain_graph=not last[0], allow_unused=True
                )
                for jk, g in zip(sources, grads):
                    if jk in returned and g is not None:
                        hooks[jk][1](g)
                del grads
                self._flush(ruled, states, pending, last[0])
                for n, t in taps.items():
                    g = t.take(self.plan.params[n].shape, batch)
                    if g is None:
                        failed.add(n)
                    elif n not in failed:
                        s = f(g).sum(0)
                        tap_sums[n] = s if n not in tap_sums else tap_sums[n].add_(s)
        finally:
            for h in handles:
                h.remove()
            for t in taps.values():
                t.detach()
        for j, state in enumerate(states):
            if state:  # (layers finish in their last pass's hook; this is only a safety net)
                self._finish(ruled[j], state)
        for n, s in tap_sums.items():
            if n not in failed:
                self.sums[n] += s if self._unscale is None else s * self._unscale
        return sorted(failed)

    def _grad_hook(self, ruled, states, pending, last, j: int, k: int):
        def hook(grad):
            pending[j][k] = grad
            if all(g is not None for g in pending[j]):
                self._apply_rule(ruled[j], states[j], pending[j], last[0])
                pending[j] = [None] * len(pending[j])

        return hook

    def _flush(self, ruled, states, pending, last: bool) -> None:
        """After a pass: layers with some calls outside the loss's graph (zero gradient there)."""
        for j, grads in enumerate(pending):
            if any(g is not None for g in grads):
                cs = ruled[j][1]
                self._apply_rule(
                    ruled[j], states[j], [torch.zeros_like(c.out) if g is None else g for c, g in zip(cs, grads)], last
                )
                pending[j] = [None] * len(grads)

    def _apply_rule(self, ruled_module, state, grads, last: bool) -> None:
        rm, cs = ruled_module
        set_chunk_layer(next(iter(rm.names.values()), "?").rpartition(".")[0])
        pairs = [(c.inp, g) for c, g in zip(cs, grads)]
        self._add(rm, rm.rule.grad_stat(rm.module, pairs, self.spec.stat, self.budget_bytes, state))
        if last and state:
            self._finish(ruled_module, state)

    def _finish(self, ruled_module, state: dict) -> None:
        """What the rule summed over the passes, turned into statistics; ``state`` is emptied."""
        rm, cs = ruled_module
        set_chunk_layer(next(iter(rm.names.values()), "?").rpartition(".")[0])
        self._add(rm, rm.rule.finish(rm.module, [c.inp for c in cs], self.spec.stat, self.budget_bytes, state))
        state.clear()

    def _add(self, rm: RuleModule, stats: dict[str, torch.Tensor]) -> None:
        for local, s in stats.items():
            self.sums[rm.names[local]] += s if self._unscale is None else s * self._unscale

    def _add_all_fallback(self, x, y) -> None:
        logits = _check_logits(self.fallback.logits(x), x.shape[0])
        targets = make_targets(logits, y, self.spec, self.generator)
        names = list(self.plan.params)
        self.fallback_names.update(names)
        for n, s in self.fallback.stats(names, x, targets, self.spec.passes(logits.shape[1])).items():
            self.sums[n] += s


def _hook_output_grad(call, hook):
    """Call ``hook(gradient of the layer's output)`` in each backward pass: a hook on the output tensor,
    or, where a later in-place op overwrote it, a prehook on the node that made it (the tensor's
    gradient would be that of the overwritten value)."""
    if not call.output_overwritten():
        return call.out.register_hook(hook)
    nr = call.nr

    def prehook(grad_outputs):
        if grad_outputs[nr] is not None:
            hook(grad_outputs[nr])

    return call.node.register_prehook(prehook)


def scale_to_unit(cotangents: torch.Tensor, stat: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(S·V, 1/S² for ``sq`` or 1/S for ``abs``) with S = 2^−e, e the exponent of max|V| (max|V| = f·2^e,
    f ∈ [½, 1); S = 1 for V = 0; e clamped to [−60, 60]): the largest cotangent becomes f. Stays on the device."""
    _, e = torch.frexp(cotangents.detach().abs().amax())
    e = e.clamp(-60, 60)  # S and 1/S² stay normal float32 numbers
    scale = torch.ldexp(torch.ones((), dtype=cotangents.dtype, device=cotangents.device), -e)
    unscale = torch.ldexp(torch.ones((), dtype=torch.float32, device=cotangents.device), e * (2 if stat == "sq" else 1))
    return cotangents * scale, unscale


class SignalEngine:
    """Accumulates the paper's signal statistic (forward only); see ``rules`` for each layer.

    Parameters of no supported layer get |θ|·N (N samples seen): the linear rule for a weight
    whose input is the constant 1 in every sample (a bias-like, additive parameter). A supported
    layer that never ran gets 0 (no signal reached it); a weight shared by several supported
    layers gets the sum of their contributions.

    Bias score (``bias_score``): the signal a bias b_j sends on is its unit's output, Σₙ |φ(yₙⱼ)|
    with y the layer's output and φ the activation applied to it (``post-activation``, the
    authors' code): φ is the activation *module* (ReLU, LeakyReLU, GELU, …: ``is_activation``)
    whose input is the very tensor the layer returned, the softmax when that tensor is the model's
    output (the classifier's units are class probabilities), and the identity otherwise (a conv
    followed by a norm layer, a functional activation, a residual sum). ``pre-activation``:
    Σₙ |yₙⱼ| always. Only the bias scores differ between the two; weights are the same.

    ``signal_norm``/``signal_stat`` choose the :class:`~cl_tool.importance.rules.SignalVariant`. The sums are the
    additive parts (l2: squared); :meth:`SignalVariant.finish` (``finalize_importance``) turns them into the statistic.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        autocast=nullcontext,
        bias_score: str = "post-activation",
        signal_norm: str = "sum",
        signal_stat: str = "l1",
    ):
        if bias_score not in BIAS_SCORES:
            raise UsageError(f"$bias_score {bias_score} is unknown; use one of {', '.join(BIAS_SCORES)}.")
        if signal_norm not in SIGNAL_NORMS:
            raise UsageError(f"$signal_norm {signal_norm} is unknown; use one of {', '.join(SIGNAL_NORMS)}.")
        if signal_stat not in SIGNAL_STATS:
            raise UsageError(f"$signal_stat {signal_stat} is unknown; use one of {', '.join(SIGNAL_STATS)}.")
        self.model, self.autocast, self.bias_score = model, autocast, bias_score
        self.variant = SignalVariant(signal_norm, signal_stat)
        self.plan = make_plan(model)
        self.sums = {
            n: torch.zeros(p.shape, device=p.device, dtype=wide_dtype(p.dtype)) for n, p in self.plan.params.items()
        }
        self.count = 0

    def add_batch(self, x: torch.Tensor) -> None:
        by_module = {rm.module: rm for rm in self.plan.rule_modules}
        post = self.bias_score == "post-activation"
        # a layer's output whose bias score waits for the activation that may consume it:
        # id(output) → (weak reference to the output, the layer, the pre-activation bias score)
        waiting: dict[int, tuple[weakref.ref, RuleModule, torch.Tensor]] = {}

        def add(rm: RuleModule, local: str, s: torch.Tensor) -> None:
            if local in rm.names:
                self.sums[rm.names[local]] += s

        def layer_hook(module, args, kwargs, output):
            x_in = first_tensor(args, kwargs)
            if x_in is None or not isinstance(output, torch.Tensor):
                return
            rm = by_module[module]
            for local, s in rm.rule.signal(module, x_in.detach(), output.detach(), self.variant).items():
                if post and local == "bias":
                    earlier = waiting.pop(id(output), None)
                    if earlier is not None:  # a freed output whose id is reused: no activation took it
                        add(earlier[1], "bias", earlier[2])
                    waiting[id(output)] = (weakref.ref(output), rm, s)
                else:
                    add(rm, local, s)

        def activation_hook(module, args, kwargs, output):
            x_in = first_tensor(args, kwargs)
            entry = waiting.get(id(x_in)) if x_in is not None else None
            if entry is not None and entry[0]() is x_in and isinstance(output, torch.Tensor):
                del waiting[id(x_in)]
                rm = entry[1]
                add(rm, "bias", rm.rule.bias_signal(rm.module, output.detach(), self.variant))

        activations = [m for m in self.model.modules() if is_activation(m)] if post else []
        handles = [m.register_forward_hook(layer_hook, with_kwargs=True) for m in by_module]
        handles += [m.register_forward_hook(activation_hook, with_kwargs=True) for m in activations]
        try:
            with torch.no_grad(), self.autocast():
                result = self.model(x)
        finally:
            for h in handles:
                h.remove()
        for ref, rm, pre in waiting.values():
            t = ref()
            if t is not None and t is result:  # the classifier's output: class probabilities
                add(rm, "bias", rm.rule.bias_signal(rm.module, torch.softmax(wide(t), dim=-1), self.variant))
            else:
                add(rm, "bias", pre)
        self.count += x.shape[0]

    def result(self) -> dict[str, torch.Tensor]:
        """The additive sums (before :meth:`SignalVariant.finish`); an unsupported parameter θ: power(θ)·N."""
        out = dict(self.sums)
        for n, p in self.plan.params.items():
            if n not in self.plan.signal_owned:
                out[n] = self.variant.weight(p) * float(self.count)
        return out
