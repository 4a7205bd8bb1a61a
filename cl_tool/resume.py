"""The resumable training state of ``train-next --checkpoint-every``: one safetensors file, no pickle.

Tensors: ``model/<name>`` (the state dict), ``opt/<param index>/<key>`` (optimiser state),
``rng/torch`` (the CPU generator state), ``rng/cuda`` (the generator state of the CUDA device the
run trained on; absent: not saved, a CPU run or a file written before it was saved), ``si/<key>`` (Synaptic Intelligence accumulators).
Metadata: ``cl_tool.resume`` = "1", ``fingerprint`` of the input checkpoint, ``config`` (the
training options as JSON; a resume with other options is refused), ``position`` (epoch, batch,
global step), ``optimizer`` (param groups and which state entries are tensors), ``scaler`` (the
fp16 grad scaler) and ``epochs`` (the per-epoch records so far).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from cl_tool.checkpoint import metadata_json
from cl_tool.errors import BadInputError, IncompatibleError
from cl_tool.lineage import target_note
from cl_tool.safetensors_io import load_tensors, save_tensors


class ResumeState:
    """Save and load the resumable state of one training run at ``path``."""

    def __init__(self, path: str | Path, *, fingerprint: str, config: dict[str, Any]):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.config = config

    def save(self, st: dict[str, Any]) -> None:
        import torch  # inside functions: `info` reads resume states without torch

        tensors: dict[str, Any] = {f"model/{k}": v for k, v in st["model"].items()}
        opt = st["optimizer"]
        opt_meta = {"param_groups": opt["param_groups"], "state_keys": {}}
        for idx, s in opt["state"].items():
            keys = []
            for k, v in s.items():
                tensors[f"opt/{idx}/{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
                keys.append([k, isinstance(v, torch.Tensor)])
            opt_meta["state_keys"][str(idx)] = keys
        tensors["rng/torch"] = st["rng"]
        if st.get("rng_cuda") is not None:
            tensors["rng/cuda"] = st["rng_cuda"]
        for k, v in (st.get("si") or {}).items():
            tensors[f"si/{k}"] = v
        meta = {
            "cl_tool.resume": "1",
            "fingerprint": self.fingerprint,
            "config": json.dumps(self.config, sort_keys=True),
            "position": json.dumps({"epoch": st["epoch"], "batch": st["batch"], "global_step": st["global_step"]}),
            "optimizer": json.dumps(opt_meta),
            "scaler": json.dumps(st.get("scaler")),
            "epochs": json.dumps(st.get("epochs", [])),
        }
        save_tensors(self.path, tensors, meta, force=True)

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None if there is none; refuses one of another run (other input or options)."""
        if not self.path.exists():
            return None
        tensors, meta = load_tensors(self.path, "Resume state")
        if meta.get("cl_tool.resume") != "1":
            raise BadInputError(f"{self.path} is not a cl-tool resume state; remove it or pass another $state_file.")
        if meta.get("fingerprint") != self.fingerprint:
            raise IncompatibleError(
                f"Resume state {self.path} was written for another input checkpoint (fingerprint {meta.get('fingerprint')} "
                f"vs {self.fingerprint}); delete it to start afresh."
            )
        saved_cfg = json.loads(meta.get("config", "{}"))
        if saved_cfg != json.loads(json.dumps(self.config, sort_keys=True)):
            diff = sorted(k for k in set(saved_cfg) | set(self.config) if saved_cfg.get(k) != self.config.get(k))
            raise IncompatibleError(
                f"Resume state {self.path} was written with other training options ({', '.join(diff)}); "
                f"rerun with the same options or delete it."
            )
        pos = json.loads(meta["position"])
        opt_meta = json.loads(meta["optimizer"])
        state = {}
        for idx, keys in opt_meta["state_keys"].items():
            state[int(idx)] = {
                k: (tensors[f"opt/{idx}/{k}"] if is_t else tensors[f"opt/{idx}/{k}"].item()) for k, is_t in keys
            }
        return {
            **pos,
            "model": {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")},
            "optimizer": {"state": state, "param_groups": opt_meta["param_groups"]},
            "scaler": json.loads(meta.get("scaler", "null")),
            "rng": tensors["rng/torch"],
            "rng_cuda": tensors.get("rng/cuda"),
            "si": {k[len("si/") :]: v for k, v in tensors.items() if k.startswith("si/")} or None,
            "epochs": json.loads(meta.get("epochs", "[]")),
        }

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()


def rng_states(device) -> dict[str, Any]:
    """``{"rng": CPU generator state, "rng_cuda": the CUDA generator state of ``device`` or None}`` (uint8 tensors)."""
    import torch

    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"rng": torch.get_rng_state(), "rng_cuda": cuda}


def restore_rng_states(st: dict[str, Any], device) -> None:
    """Set the generators :func:`rng_states` saved: the CPU one always; the CUDA one of ``device`` when the run is on
    CUDA and the state holds one (a state saved on the CPU leaves it as seeded)."""
    import torch

    torch.set_rng_state(st["rng"])
    if device.type == "cuda" and st.get("rng_cuda") is not None:
        torch.cuda.set_rng_state(st["rng_cuda"], device)


def describe(path: Path, header, meta, *, problems: list[str], verify: bool, sparsity: bool) -> dict[str, Any]:
    """What `cl-tool info` shows of a resume state: position, the run's options, the input checkpoint's fingerprint
    and how many tensors of each group (model, opt, rng, si) it holds."""
    where = f"Resume state {path}"
    config = metadata_json(meta, "config", where, {}, (dict,))
    position = metadata_json(meta, "position", where, {}, (dict,))
    epochs = metadata_json(meta, "epochs", where, [], (list,))
    groups: dict[str, int] = {}
    for name in header:
        prefix = name.split("/", 1)[0]
        groups[prefix] = groups.get(prefix, 0) + 1
    data = config.get("data")
    return {
        "input_fingerprint": meta.get("fingerprint"),
        "position": position,
        "epochs_done": len(epochs),
        "config": config,
        "data": data.get("name") if isinstance(data, dict) else data,
        "tensor_groups": groups,
    }


def relation(info: dict[str, Any], target: dict[str, Any], stored: dict[str, list[int]]) -> dict[str, Any]:
    """``info --for``: whether ``train-next --resume`` accepts the state ``info`` for the checkpoint ``target``: only a
    state written by a run from that very checkpoint (the same fingerprint)."""
    ck, note = target["path"], target_note(target)
    if info["input_fingerprint"] == target["fingerprint"]:
        reason = f"yes: it was written by a train-next run from {ck}; rerun the same command with --resume{note}"
        return {"checkpoint": ck, "usable": True, "generations": 0, "reason": reason}
    reason = (
        f"no: it was written by a train-next run from another checkpoint (fingerprint {info['input_fingerprint']}, "
        f"{ck} has {target['fingerprint']}); train-next --resume refuses it (exit 4){note}"
    )
    return {"checkpoint": ck, "usable": False, "generations": None, "reason": reason}
