"""Batch engines: one forward pass, hooks, one backward pass, rules, fallback.

``GradEngine`` (fisher, mas): for a batch x (B samples) it
1. runs the model once with forward hooks on every layer a rule handles (``record_calls``),
2. forms the logit cotangents V (P, B, K) of the P per-sample loss passes (``output_cotangents``)
   and back-propagates each V[p] from the logits to the recorded layer outputs (not to the
   parameters) — row n of an output gradient is sample n's, because the loss is a sum of
   per-sample terms and eval-mode layers do not mix samples. With several passes (exact-label
   Fisher: the K columns of the softmax Hessian's symmetric factor) one backward pass carries a
   group of them at once, vmapped over V (``torch.func.vmap`` of ``autograd.grad``): every
   backward op then runs once on P·B rows instead of P times on B rows. If the model's backward
   cannot be vmapped, the passes run one after another (same result),
3. hands each (input, output-gradient) pair to the layer's rule from a tensor hook as soon as
   the gradient exists (so output gradients do not pile up); additive taps serve ViT-style
   token/position parameters, and the exact ``PerSampleFallback`` gets everything else.

Cost: about one forward and one backward pass per batch, the per-sample weight gradients taking
the place of the usual weight-gradient GEMMs (materialised, when needed, in cache-sized chunks
and squared there). Memory: one batch's activations plus a budget-bounded chunk of per-sample
gradients; a group of passes is sized so that its output gradients fit the budget.

A layer rule is trusted for a parameter only if (a) the parameter belongs to that one module,
(b) every call of the module this batch had a tensor input/output with B rows and an output
in the graph, and (c) the graph uses the parameter exactly once per recorded call (no other,
hidden use such as weight tying through a functional call). Otherwise the fallback is used.
Models whose BatchNorm layers have no running statistics mix samples even in eval mode; all
their parameters go through the fallback (statistic of each sample run on its own).

``SignalEngine``: forward only, the rules' ``signal`` contributions summed over calls.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field

import warnings

import torch
from torch import nn

from cl_tool.errors import IncompatibleError
from cl_tool.importance.capture import on_forward, record_calls
from cl_tool.importance.fallback import PerSampleFallback
from cl_tool.importance.graph import AdditiveTap, GraphIndex, unbatched, without_hooked_ancestors
from cl_tool.importance.losses import LossSpec, make_targets, output_cotangents, stat_fn, wide, wide_dtype
from cl_tool.importance.rules import Rule, rule_for

#: Output gradients of a group of batched passes may be alive this many at a time (per pass,
#: the size of the largest recorded layer output): the group size is budget // (this × size).
_LIVE_GRADS = 3


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


def _add_to(sums: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    if name in sums:
        sums[name] += value
    else:
        sums[name] = value


def _batched_grad(z: torch.Tensor, inputs: list[torch.Tensor], cotangents: torch.Tensor) -> None:
    """One backward pass from ``z`` for all rows of ``cotangents`` (P, *z.shape) (hooks fire once)."""

    def one(v):
        torch.autograd.grad(z, inputs, v, retain_graph=True, allow_unused=True)
        return v.sum()

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*batching rule.*")
        torch.func.vmap(one)(cotangents)


def _usable(calls, batch: int) -> bool:
    return bool(calls) and all(
        c is not None and c.inp.shape[0] == batch and c.out.dim() > 0 and c.out.shape[0] == batch and c.out.requires_grad
        for c in calls)


class GradEngine:
    """Accumulates Σₙ Σₖ f(∂ℓₙ⁽ᵏ⁾/∂θ) over batches for every trainable parameter.

    Sums are float32, or float64 for float64 parameters (used to check exactness without
    float32 round-off); ``importance_sums`` always returns float32.
    """

    def __init__(self, model: nn.Module, spec: LossSpec, *, autocast=nullcontext, budget_bytes: int = 512 << 20,
                 generator: torch.Generator | None = None):
        self.model, self.spec, self.autocast = model, spec, autocast
        self.budget_bytes, self.generator = budget_bytes, generator
        self.plan = make_plan(model)
        self.sums = {n: torch.zeros(p.shape, device=p.device, dtype=wide_dtype(p.dtype)) for n, p in self.plan.params.items()}
        self.copy: set[nn.Module] = set()
        self.fallback = PerSampleFallback(model, spec, autocast, budget_bytes)
        self.fallback_names: set[str] = set()  # for reporting: parameters that needed the fallback
        self.batched_passes = True  # several passes in one vmapped backward; off after a failure
        self.batched_error: Exception | None = None

    def add_batch(self, x: torch.Tensor, y: torch.Tensor) -> None:
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
        modules = [rm.module for rm in self.plan.exclusive]
        for _ in range(2):
            with record_calls(modules, self.copy) as calls, torch.enable_grad(), self.autocast():
                logits = self.model(x)
            overwritten = {m for m, cs in calls.items() if any(c is not None and c.overwritten() for c in cs)}
            if not overwritten - self.copy:
                return calls, logits
            self.copy |= overwritten  # an in-place op overwrote a layer's output: redo with copies
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
        """Back-propagate the P cotangents; add rule and tap statistics; return taps that failed.

        Several passes go through one vmapped backward pass per group (see the module
        docstring); their statistics are collected apart and added only once all groups
        succeeded, so that a model whose backward cannot be vmapped is redone pass by pass.
        """
        tap_params = [self.plan.params[n] for n in taps]
        sources = without_hooked_ancestors([c.out for _, cs in ruled for c in cs])
        if not sources and not tap_params:
            return []
        inputs = sources + tap_params
        group = self._pass_group(cotangents.shape[0], ruled)
        if group > 1 and self.batched_passes:
            sums: dict[str, torch.Tensor] = {}
            try:
                failed = self._run_passes(z, cotangents, ruled, taps, batch, inputs, group, sums)
            except Exception as exc:  # noqa: BLE001 - an op without a vmap rule: redo the passes one by one
                self.batched_passes, self.batched_error = False, exc
            else:
                for n, s in sums.items():
                    self.sums[n] += s
                return failed
        return self._run_passes(z, cotangents, ruled, taps, batch, inputs, 1, self.sums)

    def _pass_group(self, passes: int, ruled) -> int:
        """Passes per backward pass: all of them, unless their output gradients exceed the budget."""
        if passes == 1:
            return 1
        largest = max((c.out.numel() * c.out.element_size() for _, cs in ruled for c in cs), default=1)
        return max(1, min(passes, self.budget_bytes // (_LIVE_GRADS * largest)))

    def _run_passes(self, z, cotangents, ruled, taps, batch: int, inputs, group: int, sums) -> list[str]:
        """Tensor hooks on the recorded layer outputs hand each output gradient to its rule as soon
        as the backward pass produces it (once all calls of that layer have one), so at most a
        few output gradients are alive at a time. Autograd is asked only for the outputs without
        a recorded ancestor and for the tap parameters.
        """
        pending = [[None] * len(cs) for _, cs in ruled]
        handles = [c.out.register_hook(self._grad_hook(ruled, pending, j, k, sums))
                   for j, (_, cs) in enumerate(ruled) for k, c in enumerate(cs)]
        tap_sums: dict[str, torch.Tensor] = {}
        failed: set[str] = set()
        for t in taps.values():
            t.attach()
        f = stat_fn(self.spec.stat)
        passes = cotangents.shape[0]
        try:
            for s in range(0, passes, group):
                v = cotangents[s:s + group]
                if group == 1:
                    torch.autograd.grad(z, inputs, v[0], retain_graph=s + 1 < passes, allow_unused=True)
                else:
                    _batched_grad(z, inputs, v)
                self._flush(ruled, pending, sums, v.shape[0])
                for n, t in taps.items():
                    g = t.take(self.plan.params[n].shape, batch)
                    if g is None:
                        failed.add(n)
                    elif n not in failed:
                        _add_to(tap_sums, n, f(g).sum(0))
        finally:
            for h in handles:
                h.remove()
            for t in taps.values():
                t.detach()
        for n, s in tap_sums.items():
            if n not in failed:
                _add_to(sums, n, s)
        return sorted(failed)

    def _grad_hook(self, ruled, pending, j: int, k: int, sums):
        def hook(grad):
            pending[j][k] = unbatched(grad)
            if all(g is not None for g in pending[j]):
                self._apply_rule(ruled[j], pending[j], sums)
                pending[j] = [None] * len(pending[j])
        return hook

    def _flush(self, ruled, pending, sums, passes: int) -> None:
        """After a pass: layers with some calls outside the loss's graph (zero gradient there)."""
        for j, grads in enumerate(pending):
            if any(g is not None for g in grads):
                cs = ruled[j][1]
                zero = [torch.zeros((passes, *c.out.shape), dtype=c.out.dtype, device=c.out.device) for c in cs]
                self._apply_rule(ruled[j], [zr if g is None else g for zr, g in zip(zero, grads)], sums)
                pending[j] = [None] * len(grads)

    def _apply_rule(self, ruled_module, grads, sums) -> None:
        rm, cs = ruled_module
        pairs = [(c.inp, g) for c, g in zip(cs, grads)]
        for local, s in rm.rule.grad_stat(rm.module, pairs, self.spec.stat, self.budget_bytes).items():
            _add_to(sums, rm.names[local], s)

    def _add_all_fallback(self, x, y) -> None:
        logits = _check_logits(self.fallback.logits(x), x.shape[0])
        targets = make_targets(logits, y, self.spec, self.generator)
        names = list(self.plan.params)
        self.fallback_names.update(names)
        for n, s in self.fallback.stats(names, x, targets, self.spec.passes(logits.shape[1])).items():
            self.sums[n] += s


class SignalEngine:
    """Accumulates the paper's signal statistic (forward only); see ``rules`` for each layer.

    Parameters of no supported layer get |θ|·N (N samples seen): the linear rule for a weight
    whose input is the constant 1 in every sample (a bias-like, additive parameter). A supported
    layer that never ran gets 0 (no signal reached it); a weight shared by several supported
    layers gets the sum of their contributions.
    """

    def __init__(self, model: nn.Module, *, autocast=nullcontext):
        self.model, self.autocast = model, autocast
        self.plan = make_plan(model)
        self.sums = {n: torch.zeros(p.shape, device=p.device, dtype=wide_dtype(p.dtype)) for n, p in self.plan.params.items()}
        self.count = 0

    def add_batch(self, x: torch.Tensor) -> None:
        by_module = {rm.module: rm for rm in self.plan.rule_modules}

        def add(module, inp, out):
            rm = by_module[module]
            for local, s in rm.rule.signal(module, inp, out).items():
                if local in rm.names:
                    self.sums[rm.names[local]] += s

        with torch.no_grad(), on_forward(list(by_module), add), self.autocast():
            self.model(x)
        self.count += x.shape[0]

    def result(self) -> dict[str, torch.Tensor]:
        out = dict(self.sums)
        for n, p in self.plan.params.items():
            if n not in self.plan.signal_owned:
                out[n] = wide(p.detach()).abs() * float(self.count)
        return out
