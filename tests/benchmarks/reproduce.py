"""Run a whole continual-learning experiment from one TOML config, through cl-tool's own CLI.

For every run of the config (a penalty, an importance method and a list of λ) it does
init → (train-next → importance [accumulated]) for each task → evaluate (accuracy matrix),
picks the best λ of each run by final average accuracy, optionally runs a pruning sweep,
and writes under --out: every checkpoint and sidecar, ``results.json``, ``results.md`` (the
tables the README shows), ``lambda_sweep.png`` and ``prune_curves.png``.

    python tests/benchmarks/reproduce.py sample_configs/experiments/permuted_mnist_mlp.toml \
        --data ylecun/mnist --out runs/permuted_mnist

--data is a folder with the MNIST IDX files (converted once to a datasets folder), a dataset with
MNIST's splits such as ``ylecun/mnist`` (its test split is the same 10,000 images as t10k), or any
dataset folder cl-tool reads. --set section.key=value overrides the config (e.g. --set train.epochs=1).
The commands are run in-process through ``cl_tool.cli.main`` (the console script's entry point).

A folder of IDX files is, e.g., the original MNIST distribution's t10k-images-idx3-ubyte.gz and
t10k-labels-idx1-ubyte.gz.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import tomllib

sys.path.insert(0, str(Path(__file__).resolve().parent))


class CommandFailed(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def cl(*args: Any) -> dict:
    """Run ``cl-tool ARGS --json`` in this process; return its JSON (or raise CommandFailed)."""
    from cl_tool.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(["-q", *map(str, args), "--json"])
        except SystemExit as exc:
            code = int(exc.code or 0)
    if code != 0:
        lines = [ln for ln in err.getvalue().splitlines() if ln.startswith("Error:")]
        raise CommandFailed(code, lines[-1] if lines else err.getvalue()[-500:])
    text = out.getvalue().strip()
    return json.loads(text) if text else {}


def kv_args(options: dict[str, Any]) -> list[str]:
    """{"lr": 0.001, "grad-clip": 1.0, "invert": True} → ["--lr", "0.001", "--grad-clip", "1.0", "--invert"]."""
    argv: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            if value:
                argv.append(flag)
        elif isinstance(value, list):
            for v in value:
                argv += [flag, str(v)]
        elif value is not None:
            argv += [flag, str(value)]
    return argv


SPLIT_PREFIX = [""]  # "test" when --data is a dataset with MNIST's splits (ylecun/mnist): its test split is t10k


def task_ref(data: Path, split: str, task: dict[str, Any]) -> str:
    split = SPLIT_PREFIX[0] + split if split.startswith("[") else split
    opts = [f"split={split}"] + [f"{k}={v}" for k, v in task.items() if k not in ("name",)]
    return f"{task['name']}={data}::{','.join(opts)}"


def resolve_data(path: str | None, work: Path) -> str:
    """--data as cl-tool takes it: an IDX folder is converted once; a hub id or dataset folder is used as it is."""
    from _mnist import mnist_source

    data, SPLIT_PREFIX[0] = mnist_source(path, work)
    return data


def run_sequence(cfg: dict, data: Path, folder: Path, run: dict, lam: float | None, seed: int | None = None) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    model, dcfg, train = cfg["model"], cfg["data"], dict(cfg.get("train", {}))
    tasks = dcfg["tasks"]
    penalty, method = run.get("penalty", "none"), run.get("method", "fisher")
    train.update(run.get("train", {}))
    if seed is not None:  # the seed of the initial weights, the data order and any augmentation
        train["seed"] = seed
    imp_opts = dict(cfg.get("importance", {}))
    imp_opts.update(run.get("importance", {}))
    prev = folder / "init.safetensors"
    init_args = kv_args(
        {
            "arch": model["arch"],
            "arch-arg": [f"{k}={v}" for k, v in model.get("arch-args", {}).items()],
            "input-shape": model.get("input-shape"),
            "num-classes": model.get("num-classes"),
            "seed": train.get("seed", 0),
        }
    )
    cl("init", *init_args, "-o", prev, "--force")
    ckpts, sidecar, t0 = [], None, time.perf_counter()
    for t, task in enumerate(tasks):
        out = folder / f"task{t + 1}.safetensors"
        use_pen = t > 0 and penalty != "none"
        pen = ["--penalty", penalty, "--lambda", lam, "--importance", sidecar] if use_pen else ["--penalty", "none"]
        si = ["--si-out", folder / f"task{t + 1}.si.safetensors"] if method == "si" and penalty != "none" else []
        cl(
            "train-next",
            prev,
            "--data",
            task_ref(data, dcfg["train-split"], task),
            *kv_args(train),
            *pen,
            *si,
            "-o",
            out,
            "--force",
        )
        if penalty != "none" and t < len(tasks) - 1:
            new = folder / f"task{t + 1}.importance.safetensors"
            if method == "si":
                _accumulate_si(sidecar, si[1], new)
            else:
                acc = ["--accumulate", sidecar] if sidecar else []
                cl(
                    "importance",
                    out,
                    "--data",
                    task_ref(data, dcfg["train-split"], task),
                    "--method",
                    method,
                    *kv_args(imp_opts),
                    *acc,
                    "-o",
                    new,
                    "--force",
                )
            sidecar = new
        ckpts.append(out)
        prev = out
    tests = [x for task in tasks for x in ("--data", task_ref(data, dcfg["test-split"], task))]
    ev = cl("evaluate", *ckpts, *tests, *kv_args(dict(cfg.get("evaluate", {}).items())))
    return {
        "accuracy": ev["accuracy"],
        "summary": ev["summary"],
        "tasks": ev["tasks"],
        "checkpoints": [str(c) for c in ckpts],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _accumulate_si(prev: Path | None, new: Path, out: Path) -> None:
    """SI sidecars come from train-next; Ω over tasks is their sum (fingerprint: the newest checkpoint)."""
    from cl_tool.sidecar import load_sidecar, save_sidecar

    sc = load_sidecar(new)
    if prev is not None:
        p = load_sidecar(prev)
        sc.tensors = {k: v + p.tensors[k] for k, v in sc.tensors.items()}
        sc.tasks = p.tasks + sc.tasks
    save_sidecar(out, sc, force=True)


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    m = sum(values) / len(values)
    return m, (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0


def aggregate(per_seed: list[dict]) -> dict:
    """One sweep entry from its seeds: the mean summary (``summary``) and its standard deviation (``summary_std``)."""
    ok = [r for r in per_seed if "summary" in r]
    entry: dict[str, Any] = {"per_seed": per_seed, "seconds": round(sum(r.get("seconds", 0) for r in per_seed), 1)}
    if not ok:
        entry["diverged"] = per_seed[0]["diverged"]
        return entry
    entry["summary"], entry["summary_std"] = {}, {}
    for key in ("average_accuracy", "bwt", "learning_accuracy", "average_forgetting"):
        values = [r["summary"][key] for r in ok if r["summary"].get(key) is not None]
        if values:
            entry["summary"][key], entry["summary_std"][key] = _mean_std(values)
        else:
            entry["summary"][key] = entry["summary_std"][key] = None
    entry["accuracy"] = ok[0]["accuracy"]  # the first seed's matrix (all are in per_seed)
    if len(ok) < len(per_seed):
        entry["diverged_seeds"] = [r["seed"] for r in per_seed if "summary" not in r]
    return entry


def _one(cfg: dict, data: Path, folder: Path, run: dict, lam: float | None, seed: int) -> dict:
    try:
        return {"seed": seed, **run_sequence(cfg, data, folder, run, lam, seed)}
    except CommandFailed as exc:
        if exc.code != 5:
            raise
        return {"seed": seed, "diverged": str(exc)}


def run_experiment(cfg: dict, data: Path, out: Path) -> dict:
    """Every run × λ for the config's ``seeds`` (default: the train seed); ``best-seeds``: more seeds at each run's best λ."""
    seeds = list(cfg.get("seeds", [cfg.get("train", {}).get("seed", 0)]))
    extra = [s for s in cfg.get("best-seeds", []) if s not in seeds]
    results: dict[str, Any] = {
        "name": cfg.get("name", ""),
        "description": cfg.get("description", ""),
        "seeds": seeds,
        "best_seeds": seeds + extra,
        "runs": [],
    }
    for run in cfg["runs"]:
        lams = run.get("lambdas", [None]) if run.get("penalty", "none") != "none" else [None]
        sweep = []
        for lam in lams:
            label = run["name"] + ("" if lam is None else f"-lam{lam:g}")
            entry = {
                "lambda": lam,
                **aggregate([_one(cfg, data, out / label / f"seed{s}", run, lam, s) for s in seeds]),
            }
            sweep.append(entry)
            print(f"{label:>32}: {_entry_text(entry)}", flush=True)
        ok = [e for e in sweep if "summary" in e]
        best = max(ok, key=lambda e: e["summary"]["average_accuracy"]) if ok else None
        if best is not None and extra:
            label = run["name"] + ("" if best["lambda"] is None else f"-lam{best['lambda']:g}")
            best.update(
                aggregate(
                    best["per_seed"]
                    + [_one(cfg, data, out / label / f"seed{s}", run, best["lambda"], s) for s in extra]
                )
            )
            print(f"{label + ' (all seeds)':>32}: {_entry_text(best)}", flush=True)
        results["runs"].append(
            {
                "name": run["name"],
                "penalty": run.get("penalty", "none"),
                "method": run.get("method"),
                "train": run.get("train", {}),
                "sweep": sweep,
                "best": best,
            }
        )
    if "prune" in cfg:
        results["prune"] = run_prune(cfg, data, out, results)
    return results


def _entry_text(entry: dict) -> str:
    if "summary" not in entry:
        return f"DIVERGED: {entry['diverged']}"
    s, sd, n = entry["summary"], entry["summary_std"], len(entry["per_seed"])
    text = f"ACC {s['average_accuracy']:.4f}" + (f" ± {sd['average_accuracy']:.4f} ({n} seeds)" if n > 1 else "")
    return (
        text
        + f"  BWT {_fmt(s['bwt'], '+.4f')}  [{entry['seconds']} s]"
        + (f"  diverged seeds {entry['diverged_seeds']}" if entry.get("diverged_seeds") else "")
    )


def run_prune(cfg: dict, data: Path, out: Path, results: dict) -> dict:
    """One-shot pruning sweeps of task ``task``'s checkpoint of every run in ``prune.runs``, for every seed of its best λ.

    Scores on ``prune.score-split`` ("train" (default), "test" or a slice), accuracy on the test split; ``prune.options`` are
    passed to ``cl-tool prune`` (e.g. include-bias, include-classifier, bias-score).
    """
    p = cfg["prune"]
    names = p.get("runs", [p.get("run", results["runs"][0]["name"])])
    task_index = p.get("task", 1) - 1
    task = cfg["data"]["tasks"][task_index]
    splits = {"train": cfg["data"]["train-split"], "test": cfg["data"]["test-split"]}
    score_split = splits.get(p.get("score-split", "train"), p.get("score-split"))  # "train", "test" or a slice
    score_ref = task_ref(data, score_split, task)
    test_ref = task_ref(data, cfg["data"]["test-split"], task)
    imp = dict(cfg.get("importance", {}))
    options = kv_args(p.get("options", {}))
    sparsities = [float(x) for x in str(p["sweep"]).split(",")]
    curves: dict[str, dict[str, dict]] = {}
    unpruned: dict[str, dict] = {}
    for name in names:
        run = next(r for r in results["runs"] if r["name"] == name)
        best = run["best"] or run["sweep"][0]
        per_by: dict[str, list[list[float]]] = {by: [] for by in p["by"]}
        bases = []
        for seed_run in best.get("per_seed", [best]):
            ckpt = Path(seed_run["checkpoints"][task_index])
            for by in p["by"]:
                extra = []
                if by in ("fisher", "mas"):
                    side = ckpt.with_name(f"prune_{by}.importance.safetensors")
                    cl("importance", ckpt, "--data", score_ref, "--method", by, *kv_args(imp), "-o", side, "--force")
                    extra = ["--importance", side]
                res = cl(
                    "prune",
                    ckpt,
                    "--by",
                    by,
                    *extra,
                    "--score-data",
                    score_ref,
                    "--data",
                    test_ref,
                    "--sweep",
                    p["sweep"],
                    "--scope",
                    p.get("scope", "global"),
                    *options,
                )
                per_by[by].append([c["accuracy"] for c in res["curves"][by]])
            bases.append(res["unpruned_accuracy"])
        curves[name] = {
            by: {
                "mean": [_mean_std([acc[i] for acc in runs_])[0] for i in range(len(sparsities))],
                "std": [_mean_std([acc[i] for acc in runs_])[1] for i in range(len(sparsities))],
                "per_seed": runs_,
            }
            for by, runs_ in per_by.items()
        }
        unpruned[name] = dict(zip(("mean", "std"), _mean_std(bases)), per_seed=bases)
        print(
            f"pruning {name}: "
            + ", ".join(f"{by} {curves[name][by]['mean'][-1]:.3f}" for by in p["by"])
            + f" at {sparsities[-1]:g}",
            flush=True,
        )
    record = {
        "runs": names,
        "sparsities": sparsities,
        "curves": curves,
        "unpruned": unpruned,
        "seeds": len(bases),
        "scope": p.get("scope", "global"),
        "options": p.get("options", {}),
        "score_split": score_split,
    }
    record["plot"] = prune_plot(record, out / "prune_curves.png")
    return record


def prune_plot(record: dict, path: Path) -> str | None:
    """Accuracy vs sparsity, mean ± standard deviation over seeds, one panel per run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    runs = record["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 4), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], runs):
        for by, c in record["curves"][name].items():
            ax.errorbar(record["sparsities"], c["mean"], yerr=c["std"], marker="o", capsize=3, label=by)
        ax.set_title(f"{name} (unpruned {record['unpruned'][name]['mean']:.3f}; {record['seeds']} seeds)", fontsize=9)
        ax.set_xlabel("sparsity")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("accuracy (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def lambda_plot(results: dict, path: Path) -> str | None:
    """Final average accuracy against λ for every penalised run (None when no run swept λ)."""
    if not any(e.get("lambda") is not None for run in results["runs"] for e in run["sweep"]):
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in results["runs"]:
        pts = [
            (e["lambda"], e["summary"]["average_accuracy"])
            for e in run["sweep"]
            if e["lambda"] is not None and "summary" in e
        ]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=run["name"])
        elif run["penalty"] == "none" and run["best"]:
            ax.axhline(run["best"]["summary"]["average_accuracy"], color="grey", linestyle="--", label=run["name"])
    ax.set_xscale("log")
    ax.set_xlabel("λ")
    ax.set_ylabel("final average accuracy")
    ax.set_title(textwrap.fill(results.get("name", ""), 70), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _pm(entry: dict, key: str, spec: str) -> str:
    """``mean ± std`` of a summary value over seeds (just the value for one seed)."""
    value = entry["summary"].get(key)
    if value is None:
        return "–"
    std = (entry.get("summary_std") or {}).get(key)
    return format(value, spec) + (f" ± {std:.4f}" if std is not None and len(entry.get("per_seed", [])) > 1 else "")


def markdown(results: dict) -> str:
    seeds = results.get("best_seeds") or results.get("seeds") or [0]
    lines = [
        f"### {results.get('name', '')}",
        "",
        results.get("description", ""),
        "",
        f"Best λ: mean ± standard deviation over seeds {', '.join(map(str, seeds))}; the λ sweep: "
        f"seed{'s' if len(results.get('seeds', [0])) > 1 else ''} {', '.join(map(str, results.get('seeds', [0])))}."
        if len(seeds) > 1
        else "",
        "",
        "| run | best λ | final avg acc | BWT | new-task acc (LA) | λ sweep: final avg acc / LA (wall time) |",
        "|---|---|---|---|---|---|",
    ]

    def took(e) -> str:
        return f" ({e['seconds']:.0f} s)" if e.get("seconds") is not None else ""

    for run in results["runs"]:
        b = run["best"]
        sweep = ", ".join(
            f"{e['lambda']:g}: "
            + (
                f"{e['summary']['average_accuracy']:.3f} / {_fmt(e['summary']['learning_accuracy'], '.3f')}"
                if "summary" in e
                else "diverged"
            )
            + took(e)
            for e in run["sweep"]
            if e["lambda"] is not None
        )
        if not sweep:  # no penalty: one sequence
            sweep = "–" + "".join(took(e) for e in run["sweep"])
        if b is None:
            lines.append(f"| {run['name']} | – | diverged | – | – | {sweep} |")
        else:
            lam = "–" if b["lambda"] is None else f"{b['lambda']:g}"
            lines.append(
                f"| {run['name']} | {lam} | {_pm(b, 'average_accuracy', '.4f')} | {_pm(b, 'bwt', '+.4f')} | "
                f"{_pm(b, 'learning_accuracy', '.4f')} | {sweep or '–'} |"
            )
    if "prune" in results:
        lines += prune_markdown(results["prune"])
    if results.get("seconds") is not None:
        lines += ["", f"Wall time {results['seconds']:,.0f} s in all, on CPU."]
    return "\n".join(lines) + "\n"


def _prune_options(pr: dict) -> str:
    """' (include-bias, bias-score post-activation; scores on [8000:])' from a record's options and score split."""
    parts = [k if v is True else f"{k} {v}" for k, v in pr.get("options", {}).items() if v not in (False, None)]
    if pr.get("score_split"):
        parts.append(f"scores on {pr['score_split']}")
    return f" ({', '.join(parts)})" if parts else ""


def prune_markdown(pr: dict) -> list[str]:
    if "runs" not in pr:  # a single-seed record of an earlier version of this script
        bys = list(pr["curves"])
        lines = [
            "",
            f"Pruning {Path(pr['checkpoint']).name} (unpruned accuracy {pr['unpruned_accuracy']:.4f}):",
            "",
            "| sparsity | " + " | ".join(bys) + " |",
            "|---" * (len(bys) + 1) + "|",
        ]
        for i, pt in enumerate(pr["curves"][bys[0]]):
            lines.append(
                f"| {pt['sparsity']:g} | " + " | ".join(f"{pr['curves'][b][i]['accuracy']:.4f}" for b in bys) + " |"
            )
        return lines
    cols = [(name, by) for name in pr["runs"] for by in pr["curves"][name]]
    unp = ", ".join(f"{n} {pr['unpruned'][n]['mean']:.4f} ± {pr['unpruned'][n]['std']:.4f}" for n in pr["runs"])
    lines = [
        "",
        f"One-shot {pr['scope']} pruning{_prune_options(pr)}, accuracy mean ± std over {pr['seeds']} seeds "
        f"(unpruned: {unp}):",
        "",
        "| sparsity | " + " | ".join(f"{by} ({name})" for name, by in cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for i, s in enumerate(pr["sparsities"]):
        lines.append(
            f"| {s:g} | "
            + " | ".join(f"{pr['curves'][n][b]['mean'][i]:.3f} ± {pr['curves'][n][b]['std'][i]:.3f}" for n, b in cols)
            + " |"
        )
    return lines


def apply_overrides(cfg: dict, sets: list[str]) -> dict:
    cfg = copy.deepcopy(cfg)
    for item in sets:
        key, _, raw = item.partition("=")
        *path, last = key.split(".")
        node = cfg
        for part in path:
            node = node.setdefault(part, {})
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node[last] = value
        if path == ["train"]:  # a train override also beats per-run train settings
            for run in cfg.get("runs", []):
                run.get("train", {}).pop(last, None)
    return cfg


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="experiment TOML, or with --render a results.json to turn into results.md again")
    p.add_argument(
        "--render", action="store_true", help="only re-render results.md (and the λ plot) from CONFIG=results.json"
    )
    p.add_argument(
        "--data", help="MNIST IDX folder, a dataset such as ylecun/mnist (online), or a dataset folder cl-tool reads"
    )
    p.add_argument("--out", required=False, help="output folder (created)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    p.add_argument("--max-lambdas", type=int, default=None, help="keep only the first N λ of each run (quick checks)")
    args = p.parse_args(argv)
    if args.render:
        # OUT/results.json → results.md, lambda_sweep.png, prune_curves.png beside it;
        # NAME.json (e.g. the copies in tests/benchmarks/results) → NAME.md, NAME_lambda_sweep.png, NAME_prune_curves.png
        res_path = Path(args.config)
        prefix = "" if res_path.name == "results.json" else res_path.stem + "_"
        results = json.loads(res_path.read_text())
        results["lambda_plot"] = lambda_plot(results, res_path.with_name(prefix + "lambda_sweep.png"))
        if "runs" in results.get("prune", {}):
            results["prune"]["plot"] = prune_plot(results["prune"], res_path.with_name(prefix + "prune_curves.png"))
        md = markdown(results)
        res_path.with_name((prefix[:-1] or "results") + ".md").write_text(md)
        print(md)
        return results
    if not args.out:
        p.error("--out is required to run an experiment")
    cfg = apply_overrides(tomllib.loads(Path(args.config).read_text()), args.set)
    if args.max_lambdas:
        for run in cfg["runs"]:
            if "lambdas" in run:
                run["lambdas"] = run["lambdas"][: args.max_lambdas]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = resolve_data(args.data, out)
    t0 = time.perf_counter()
    results = run_experiment(cfg, data, out)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    results["config"] = cfg
    results["lambda_plot"] = lambda_plot(results, out / "lambda_sweep.png")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    md = markdown(results)
    (out / "results.md").write_text(md)
    print(md)
    print(f"wall time {results['seconds']} s; results in {out}/results.json")
    return results


if __name__ == "__main__":
    main()
