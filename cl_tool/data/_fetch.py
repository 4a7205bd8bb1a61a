"""What runs inside DataLoader workers (or in the main process with $workers 0): decode whole batches.

A worker never raises for bad data: a decode error comes back as data (``error``: the
one-sentence message and its class), so the main process raises the same BadInputError
as with ``--workers 0`` instead of DataLoader's re-raised traceback text. Workers ignore
SIGINT/SIGTERM (the main process handles them and shuts the workers down) and use one
torch thread. Imported lazily (it imports torch).
"""

from __future__ import annotations

import random
import signal
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cl_tool.data.cache import read_rows
from cl_tool.data.transforms import sample_seeds
from cl_tool.errors import ClToolError

# what a request asks for each row
FROM_SOURCE, FROM_FILE, FROM_MAIN = 0, 1, 2


def worker_init(_worker_id: int) -> None:
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    if hasattr(
        signal, "pthread_sigmask"
    ):  # forked with both blocked (see workers._signals_blocked): now they are ignored
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    torch.set_num_threads(1)


def identity(x):
    return x


@dataclass
class Request:
    """One batch for a worker: task rows and where each comes from."""

    pos: int
    index: np.ndarray  # int64 task rows, in batch order
    codes: np.ndarray  # uint8 per row: FROM_SOURCE / FROM_FILE / FROM_MAIN
    paths: tuple[str | None, str | None] = (None, None)  # cache file (temporary, final)
    dtype: str | None = None  # pixel type of the cache file
    augment: Any = None  # an Augment that needs the source image (timm), else None
    seed: int = 0
    epoch: int = 0
    fail: tuple[str, str] | None = None  # (error class, message): raise this for the batch


class _Seeded:
    """Seed python/numpy/torch-CPU global RNGs per sample; restore them afterwards (the main process's training RNG is untouched)."""

    def __enter__(self):
        self.state = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
        return self

    @staticmethod
    def seed(s: int) -> None:
        random.seed(s)
        np.random.seed(s & 0xFFFFFFFF)
        torch.random.default_generator.manual_seed(s & 0x7FFFFFFFFFFFFFFF)

    def __exit__(self, *exc):
        random.setstate(self.state[0])
        np.random.set_state(self.state[1])
        torch.random.set_rng_state(self.state[2])


def decode_rows(pre, values, rows, source: str, *, augment=None, seed=0, epoch=0, skip_bad=False):
    """Decode ``values`` (task rows ``rows``) → (list of arrays, kept rows, [(row, message)] bad); raise on a bad one unless ``skip_bad``."""
    out, kept, bad = [], [], []
    if augment is not None and augment.kind == "timm":
        tf = pre.train_transform(augment.args)
        seeds = sample_seeds(seed, epoch, rows, stream=3)
        with _Seeded():
            for v, r, s in zip(values, rows, seeds.tolist()):
                try:
                    img = pre.to_image(v, int(r), source)
                    _Seeded.seed(int(s))
                    arr = tf(img).numpy()
                except ClToolError as exc:
                    if not skip_bad:
                        raise
                    bad.append((int(r), exc.message))
                    continue
                if tuple(arr.shape) != tuple(pre.input_shape):
                    from cl_tool.errors import BadInputError

                    raise BadInputError(
                        f"timm's training transform made a {'x'.join(map(str, arr.shape))} image from row {int(r)} of $data {source}, "
                        f"but the model needs {'x'.join(map(str, pre.input_shape))}; check $augment_arg."
                    )
                out.append(arr)
                kept.append(int(r))
        return out, kept, bad
    for v, r in zip(values, rows):
        try:
            out.append(pre.decode(v, int(r), source))
            kept.append(int(r))
        except ClToolError as exc:
            if not skip_bad:
                raise
            bad.append((int(r), exc.message))
    return out, kept, bad


def stack(arrays, shape) -> np.ndarray:
    """Stack per-sample arrays; mixed uint8/float32 become float32 (uint8/255, what the first version computed)."""
    if not arrays:
        return np.empty((0, *shape), dtype=np.uint8)
    if all(a.dtype == np.uint8 for a in arrays):
        return np.stack(arrays)
    return np.stack(
        [(a.astype(np.float32) / 255.0) if a.dtype == np.uint8 else a.astype(np.float32, copy=False) for a in arrays]
    )


def stack_tensor(arrays, shape) -> torch.Tensor:
    """:func:`stack` as a tensor; in a DataLoader worker, stacked straight into shared memory.

    A worker's result reaches the main process through shared memory: a tensor made there already is sent as it
    is, any other is copied into a new shared block first (one copy of the batch less, as torch's default_collate).
    """
    new_shared = getattr(torch.UntypedStorage, "_new_shared", None)  # what default_collate uses; private
    if (
        not arrays
        or new_shared is None
        or torch.utils.data.get_worker_info() is None
        or not all(a.dtype == np.uint8 for a in arrays)
    ):
        return torch.from_numpy(stack(arrays, shape))
    n = len(arrays) * int(np.prod(arrays[0].shape))
    out = torch.empty(0, dtype=torch.uint8).set_(new_shared(n)).view(len(arrays), *arrays[0].shape)
    np.stack(arrays, out=out.numpy())
    return out


def _error(exc: ClToolError) -> dict[str, Any]:
    return {"error": (type(exc).__name__, exc.message)}


class MapFetcher:
    """Map-style dataset whose items are whole batches (``Request`` → dict of tensors)."""

    def __init__(self, ds, image_column: str, pre, source: str, skip_bad: bool):
        self.ds, self.image_column, self.pre, self.source, self.skip_bad = ds, image_column, pre, source, skip_bad

    def __getitem__(self, req: Request) -> dict[str, Any]:
        try:
            return self._fetch(req)
        except ClToolError as exc:
            return _error(exc)

    def _fetch(self, req: Request) -> dict[str, Any]:
        if req.fail is not None:
            return {"error": req.fail}
        want = req.codes != FROM_MAIN
        rows = req.index[want]
        codes = req.codes[want]
        arrays: list[np.ndarray | None] = [None] * len(rows)
        bad: list[tuple[int, str]] = []
        src_pos = np.flatnonzero(codes == FROM_SOURCE)
        decoded_rows: list[int] = []
        if len(src_pos):
            if self.ds is None:
                raise RuntimeError("internal: a batch needs the source, but the loader was built without it")
            src_rows = rows[src_pos]
            values = self.ds[src_rows.tolist()][self.image_column]
            outs, kept, bad = decode_rows(
                self.pre,
                values,
                src_rows,
                self.source,
                augment=req.augment,
                seed=req.seed,
                epoch=req.epoch,
                skip_bad=self.skip_bad,
            )
            bad_rows = {r for r, _ in bad}
            it = iter(outs)
            for p, r in zip(src_pos.tolist(), src_rows.tolist()):
                if r not in bad_rows:
                    arrays[p] = next(it)
            decoded_rows = kept
        file_pos = np.flatnonzero(codes == FROM_FILE)
        if len(file_pos):
            got = read_rows(req.paths, tuple(self.pre.input_shape), req.dtype, rows[file_pos])
            for j, p in enumerate(file_pos.tolist()):
                arrays[p] = got[j]
        keep = [p for p in range(len(rows)) if arrays[p] is not None]
        x = stack_tensor([arrays[p] for p in keep], tuple(self.pre.input_shape))
        return {
            "pos": req.pos,
            "rows": torch.from_numpy(rows[keep].astype(np.int64)),
            "x": x,
            "decoded": torch.tensor(decoded_rows, dtype=torch.int64),
            "bad": bad,
            "error": None,
        }


class StreamFetcher(torch.utils.data.IterableDataset):
    """A stream read in source order; global batch k is decoded by worker k mod W (the DataLoader returns them in order).

    Every worker reads the whole (possibly buffer-shuffled) stream but decodes only its batches,
    so the batches, their order and their contents do not depend on the number of workers.
    Under DDP, rank r takes the r-th contiguous share of every global batch.
    """

    def __init__(
        self,
        ds,
        image_column: str,
        label_column: str,
        pre,
        source: str,
        *,
        batch_size: int,
        augment=None,
        seed=0,
        epoch=0,
        start_batch=0,
        rank=0,
        world=1,
        skip_bad=False,
    ):
        super().__init__()
        self.ds, self.image_column, self.label_column, self.pre, self.source = (
            ds,
            image_column,
            label_column,
            pre,
            source,
        )
        self.batch_size, self.augment, self.seed, self.epoch = batch_size, augment, seed, epoch
        self.start_batch, self.rank, self.world, self.skip_bad = start_batch, rank, world, skip_bad

    def __iter__(self):
        from cl_tool.data.sources import label_error

        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        B = self.batch_size
        for k, batch in enumerate(self.ds.iter(batch_size=B)):
            if k < self.start_batch or k % nw != wid:
                continue
            try:
                images, labels = batch[self.image_column], batch[self.label_column]
                share = -(-len(labels) // self.world)
                lo, hi = self.rank * share, min(len(labels), (self.rank + 1) * share)
                rows = np.arange(k * B + lo, k * B + hi, dtype=np.int64)
                self.pre.check_batch(images[lo:hi], int(k * B + lo), self.source, whole=k == 0)
                ys = []
                for r, lab in zip(rows.tolist(), labels[lo:hi]):
                    err = label_error(lab, r, self.source)
                    if err is not None:
                        raise err
                    ys.append(int(lab))
                outs, kept, bad = decode_rows(
                    self.pre,
                    images[lo:hi],
                    rows,
                    self.source,
                    augment=self.augment,
                    seed=self.seed,
                    epoch=self.epoch,
                    skip_bad=self.skip_bad,
                )
                kept_set = set(kept)
                ykeep = [y for y, r in zip(ys, rows.tolist()) if r in kept_set] if bad else ys
                yield {
                    "pos": k,
                    "rows": torch.tensor(kept, dtype=torch.int64),
                    "x": stack_tensor(outs, tuple(self.pre.input_shape)),
                    "y": torch.tensor(ykeep, dtype=torch.int64),
                    "bad": bad,
                    "error": None,
                    "decoded": torch.tensor(kept, dtype=torch.int64),
                }
            except ClToolError as exc:
                yield {"pos": k, **_error(exc)}
                return
