"""A task opened lazily and read per batch: ``open_task(spec, preprocess)`` → ``Task.batches(...)``.

Per batch, in DataLoader worker processes (``workers``; 0 = in this process): rows are read
from the source (Arrow, memory-mapped) and decoded to the model's geometry as uint8, or read
back from the decoded cache; in this process: uint8 → float32 /255 on the target device
(pinned, ``non_blocking`` copies on CUDA), augmentation, task transforms, normalisation. No
float32 copy of the task is ever made; memory is a few batches plus, for a task whose decoded
pixels fit the RAM budget (256 MiB by default), a uint8 copy of it.

Reproducibility: batches, their contents and augmentation are a pure function of (order,
seed, epoch, sample index); they do not depend on the number of workers or on worker
scheduling, and reading a task never touches the global torch/numpy/python RNGs of this
process. A resumed run (same order from batch k) therefore sees exactly the batches the
uninterrupted one saw, with any ``workers``. Streams are read in source order (a seeded
shuffle buffer for training) and are reproducible the same way.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from cl_tool.data.cache import (
    CACHE_MODES,
    RAM_BUDGET,
    SUFFIX,
    CacheDamaged,
    Store,
    cache_key,
    default_cache_dir,
    folder_writable,
    space_for,
)
from cl_tool.data.cache_admin import mark_used
from cl_tool.data.sources import is_local, local_signature, open_selection, read_labels
from cl_tool.data.transforms import apply_task_transforms, normalise_, parse_augment, shift_batch, to_unit_float
from cl_tool.data.workers import Workers, data_loader, default_workers, raise_worker_error, shut_down, track
from cl_tool.errors import BadInputError, IncompatibleError, OutputError, UsageError

STREAM_SHUFFLE_BUFFER = 10_000


class Batch(NamedTuple):
    index: Any  # int64 (B,) task rows, on the CPU
    x: Any  # float32 (B, C, H, W), normalised, on the device
    y: Any  # int64 (B,), on the device


def _key_parts(spec, pre, source_id: str) -> dict[str, Any]:
    return {
        "source": source_id,
        "split": spec.split,
        "role": spec.role if spec.split is None else None,  # which split a source read without --split gives
        "limit": spec.limit,
        "sample": [spec.sample, spec.sample_seed] if spec.sample is not None else None,
        "image_column": spec.image_column,
        "label_column": spec.label_column,
        "scale": spec.scale,
        "preprocess": pre.key(),
    }


def open_task(
    spec,
    pre,
    *,
    cache: str = "auto",
    workers: int | None = None,
    streaming: bool = False,
    skip_bad: bool = False,
    cache_dir=None,
    ram_budget: int = RAM_BUDGET,
    shuffle_buffer: int = STREAM_SHUFFLE_BUFFER,
) -> Task:
    """Open ``spec`` (a TaskSpec) for a model preprocessed by ``pre`` (a Preprocess); nothing is decoded yet.

    ``cache``: ``auto`` (a decoded-cache file in ``cache_dir`` when it is writable and has room,
    the pixels in memory when they fit ``ram_budget``; neither: decode every pass), ``ram``,
    ``disk`` (the folder must be writable) or ``none``. A cache file made by an earlier command
    is used without opening the source (no ``datasets`` import, no decoding).
    """
    if cache not in CACHE_MODES:
        raise UsageError(f"$cache {cache} is unknown; use {', '.join(CACHE_MODES)}.")
    workers = default_workers() if workers is None else int(workers)
    if workers < 0:
        raise UsageError(f"$workers must be 0 or more, got {workers}.")
    if streaming and cache in ("ram", "disk"):
        raise UsageError(
            f"$cache {cache} does not apply to $streaming (a stream is read anew each pass); use $cache none or drop $streaming."
        )
    if spec.name is None:
        spec.name = Path(spec.source).name or spec.source
    pre = pre.with_scale(spec.scale)
    common = {"workers": workers, "skip_bad": skip_bad, "shuffle_buffer": shuffle_buffer}
    if streaming:
        sel = open_selection(spec, streaming=True)
        info = {**sel.info, "image_column": sel.image_column, "label_column": sel.label_column}
        return Task(
            spec, pre, n=sel.num_rows, labels=None, info=info, store=None, selection=sel, streaming=True, **common
        )

    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    want_disk = cache in ("auto", "disk")
    parts = path = None
    note = None
    if want_disk and is_local(spec.source):
        parts = _key_parts(spec, pre, "local:" + local_signature(spec.source))
        path = folder / (cache_key(parts) + SUFFIX)
        st, note = _load_store(path, parts, ram_budget, spec)
        if st is not None:
            mark_used(path)
            return Task(spec, pre, n=st.n, labels=st.labels, info=st.info, store=st, selection=None, **common)
    sel = open_selection(spec)
    pre.check_column(sel.ds, sel.image_column, spec.source)
    labels = read_labels(sel.ds, sel.label_column, spec.source)
    info = {**sel.info, "image_column": sel.image_column, "label_column": sel.label_column}
    if want_disk and parts is None:  # a hub id: keyed by the datasets fingerprint of the selected rows
        parts = _key_parts(spec, pre, f"hub:{spec.source}:{sel.fingerprint}")
        path = folder / (cache_key(parts) + SUFFIX)
        st, note = _load_store(path, parts, ram_budget, spec)
        if st is not None:
            mark_used(path)
            return Task(spec, pre, n=st.n, labels=st.labels, info=st.info, store=st, selection=sel, **common)
    if path is not None:  # what the cache file was decoded from, for `cl-tool cache` (not part of the key)
        info["cache_source"] = str(Path(spec.source).resolve()) if is_local(spec.source) else spec.source
    n = len(labels)
    est = n * math.prod(pre.input_shape)  # uint8 bytes
    shape = tuple(pre.input_shape)
    store = None
    if cache == "ram":
        store = Store(n, shape, labels=labels, info=info, parts=None, want_ram=True, final=None, ram_budget=1 << 62)
    elif cache == "disk":
        if not folder_writable(folder):
            raise OutputError(
                f"$cache disk: the cache folder {folder} is not writable; set $cache_dir (or $CL_TOOL_CACHE) to a writable folder, or use $cache none."
            )
        store = Store(
            n,
            shape,
            labels=labels,
            info=info,
            parts=parts,
            want_ram=est <= ram_budget,
            final=path,
            ram_budget=ram_budget,
        )
    elif cache == "auto":
        disk_ok = path is not None and folder_writable(folder) and space_for(folder, est, reserve=True)
        ram_ok = est <= ram_budget
        if disk_ok or ram_ok:
            store = Store(
                n,
                shape,
                labels=labels,
                info=info,
                parts=parts,
                want_ram=ram_ok,
                final=path if disk_ok else None,
                ram_budget=ram_budget,
            )
    task = Task(spec, pre, n=n, labels=labels, info=info, store=store, selection=sel, **common)
    task.cache_note = note
    return task


def _load_store(path: Path, parts, ram_budget: int, spec) -> tuple[Store | None, str | None]:
    """(the cache file at ``path`` as a Store, or None; the one-line note when a damaged file was passed over)."""
    try:
        return Store.load(path, parts, want_ram=True, ram_budget=ram_budget), None
    except CacheDamaged as exc:
        return None, (
            f"${spec.option} {spec.source}: the decoded-image cache file {path} failed its check ({exc}); "
            f"it was not used and the images were decoded again."
        )


class Task:
    """One opened task: ``len``, ``labels`` (read without decoding), ``describe()``, ``batches(...)``, ``close()``."""

    def __init__(
        self, spec, pre, *, n, labels, info, store, selection, workers, skip_bad, shuffle_buffer, streaming=False
    ):
        import numpy as np
        import torch

        self.spec, self.preprocess, self.info = spec, pre, dict(info)
        self.streaming = streaming
        self.workers, self.skip_bad, self.shuffle_buffer = workers, skip_bad, shuffle_buffer
        self._n = n
        self.labels = torch.from_numpy(np.array(labels, dtype=np.int64)) if labels is not None else None
        self._raw_labels = np.array(labels, dtype=np.int64) if labels is not None else None  # the data's own ids
        self._store: Store | None = store
        self._sel = selection
        self._bad: dict[int, str] = dict(store.bad) if store is not None else {}
        self._pool = Workers(workers)
        self._label_check: tuple[int, str] | None = None
        self._lookup = None  # data class id → model output row (cl_tool.data.classes), None: the identity
        self._note: str | None = None  # lines for the log (see cache_note)
        self._in_pass = False
        self.stats = {"decoded": 0, "batches": 0}
        track(self)

    # ------------------------------------------------------------------------------------------- basics

    def __len__(self) -> int:
        if self._n is None:
            raise TypeError("the length of this stream is not known")
        return int(self._n)

    @property
    def num_samples(self) -> int | None:
        return self._n

    @property
    def cache(self) -> str:
        """Where decoded pixels come from after the first pass: ram, disk, or none."""
        st = self._store
        if st is None:
            return "none"
        return (
            "ram"
            if st.ram is not None or (st.want_ram and st.dtype is None)
            else ("disk" if st.on_disk or st.final is not None else "none")
        )

    @property
    def class_names(self) -> list[str] | None:
        """The data's own class names (a ClassLabel's), or None for plain integer labels."""
        return self.info.get("class_names")

    def map_classes(self, lookup) -> None:
        """Relabel the task: data class id k becomes output row ``lookup[k]`` (a numpy int64 array; None: row k)."""
        import torch

        self._lookup = torch.as_tensor(lookup, dtype=torch.int64) if lookup is not None else None
        if self._raw_labels is not None:
            raw = torch.from_numpy(self._raw_labels)
            self.labels = raw if self._lookup is None or not raw.numel() else self._lookup[raw]

    @property
    def cache_note(self) -> str | None:
        """Lines for the log when the cache did not work as asked: a damaged file, caching abandoned, or a cache file
        that could not be written (the command logs them when it is done with the task)."""
        lines = [self._note] if self._note else []
        st = self._store
        if st is not None and st.disk_error:
            kept = "kept in memory for this command only" if st.ram is not None else "decoded again on every pass"
            lines.append(
                f"${self.spec.option} {self.spec.source}: the decoded-image cache file was not written "
                f"({st.disk_error}); the images were {kept}."
            )
        return "\n".join(lines) or None

    @cache_note.setter
    def cache_note(self, value: str | None) -> None:
        self._note = value

    def describe(self) -> dict[str, Any]:
        """What was read: source, split (and whether it was the default), subset, samples and samples per class."""
        from cl_tool.data.classes import class_counts  # it imports numpy: inside functions, for start-up time

        d = self.spec.describe()
        d.update({k: v for k, v in self.info.items() if k not in ("notes", "class_names", "cache_source")})
        d["samples"] = self._n
        if self.labels is not None and self._raw_labels is not None:
            d["classes"] = class_counts(self._raw_labels, self.class_names)
        if self.skip_bad:
            d["skipped_images"] = len(self._bad)
        return d

    def summary(self) -> str:
        """One line for the log: which data produced the numbers."""
        d = self.describe()
        split = d.get("split")
        where = f"split {split}" if split else "no named splits"
        if d.get("split_default") and split:
            where += (
                " (the default for "
                + ("evaluation" if self.spec.role == "eval" else "training")
                + "; $split picks another)"
            )
        subset = f", {d['subset']}" if d.get("subset") else ""
        tf = d.get("transforms") or {}
        derived = [f"{k} {tf[k]}" for k in ("rotate", "permute") if tf.get(k) is not None] + (
            ["inverted"] if tf.get("invert") else []
        )
        subset += f", {', '.join(derived)}" if derived else ""
        samples = f"{d['samples']:,} samples" if d.get("samples") is not None else "a stream"
        classes = d.get("classes")
        cls = ""
        if classes:
            counts = list(classes.values())
            cls = f", {len(classes)} classes ({min(counts):,}–{max(counts):,} samples each)"
        name = f"{self.spec.name}=" if self.spec.name and self.spec.name != Path(self.spec.source).name else ""
        return f"${self.spec.option} {name}{self.spec.source}: {where}{subset}, {samples}{cls}."

    def close(self) -> None:
        """Stop the worker processes; remove an unfinished cache file."""
        self._pool.close()
        if self._store is not None:
            self._store.close()

    def __enter__(self) -> Task:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _ensure_source(self) -> None:
        if self._sel is None:
            sel = open_selection(self.spec)
            if len(sel.ds) != self._n:
                raise BadInputError(
                    f"$data {self.spec.source} changed while cl-tool was using it ({len(sel.ds)} rows instead of {self._n}); run the command again."
                )
            self._sel = sel
            self._pool.close()  # its workers were started without the source

    def _abandon_store(self, reason: str) -> None:
        """Stop caching (the command logs :attr:`cache_note` when it is done with the task)."""
        if self._store is not None:
            self._store.close()
            self._store = None
            note = f"${self.spec.option} {self.spec.source}: decoded images were not cached ({reason}); every pass decoded them."
            self._note = f"{self._note}\n{note}" if self._note else note

    # ------------------------------------------------------------------------------------------- batches

    def batches(
        self,
        order: Iterable | None = None,
        *,
        batch_size: int | None = None,
        augment=None,
        seed: int = 0,
        epoch: int = 0,
        device=None,
        shuffle: bool = False,
        start_batch: int = 0,
        shard: tuple[int, int] | None = None,
    ) -> Iterator[Batch]:
        """Yield ``Batch(index, x, y)`` for each list of task rows in ``order``.

        ``order``: an iterable of index lists (e.g. a ``GlobalBatchSampler``: this rank's shares
        of the shuffled global batches), or None: all rows in order in batches of ``batch_size``
        (``shuffle``: the training order ``randperm`` of (seed, epoch); ``start_batch``: skip that
        many batches; ``shard=(rank, world)``: this rank's share of each batch). A stream takes
        no ``order``: it is read in source order (``shuffle``: a seeded shuffle buffer).
        ``augment``: None/"none", "shift=K", "timm" or an ``Augment``; randomness is a function
        of (seed, epoch, sample index) only.
        """
        import torch

        aug = parse_augment(augment)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        rank, world = shard or (0, 1)
        if self.streaming:
            if order is not None:
                raise ValueError(
                    "a streamed task is read in source order; pass batch_size (and shuffle) instead of an order"
                )
            if not batch_size or batch_size < 1:
                raise ValueError("batches() of a stream needs batch_size >= 1")
            return self._counted(self._stream(batch_size, aug, seed, epoch, dev, shuffle, start_batch, rank, world))
        if order is None:
            if not batch_size or batch_size < 1:
                raise ValueError("batches() needs an order or batch_size >= 1")
            from cl_tool.data.samplers import GlobalBatchSampler

            sampler = GlobalBatchSampler(len(self), batch_size, seed=seed, rank=rank, world=world, shuffle=shuffle)
            sampler.set_epoch(epoch, start_batch)
            order = sampler
        return self._counted(self._map(order, aug, seed, epoch, dev))

    def _counted(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        """``batches``, refusing a pass in which every image was skipped as undecodable (exit 3)."""
        n = 0
        for b in batches:
            n += len(b.index)
            yield b
            del b  # not held while the next batch is made: a consumer that lets go of a batch frees it then
        if n == 0 and self._bad:
            first = next(iter(self._bad.values()))
            raise BadInputError(
                f"None of the images of ${self.spec.option} {self.spec.source} that this pass read could be decoded "
                f"({len(self._bad):,} skipped by $skip_bad_images; the first: {first.rstrip('.')}); check the files."
            )

    def _index(self, idx):
        import numpy as np
        import torch

        arr = idx.numpy() if isinstance(idx, torch.Tensor) else np.asarray(idx)
        arr = arr.astype(np.int64, copy=False).reshape(-1)
        if len(arr) and (arr.min() < 0 or arr.max() >= self._n):
            raise IndexError(f"task row {int(arr.min() if arr.min() < 0 else arr.max())} is outside 0..{self._n - 1}")
        return arr

    def _map(self, order, aug, seed, epoch, dev) -> Iterator[Batch]:
        import torch

        store = self._store if not aug.needs_source else None
        if store is not None and store.complete and store.ram is not None:  # everything in memory: no workers needed
            for idx in order:
                idx = self._index(idx)
                idx = self._drop_known_bad(idx, store)
                yield self._finish(idx, torch.from_numpy(store.ram[idx]), aug, seed, epoch, dev)
            return
        if self._in_pass:
            raise RuntimeError(
                "Task.batches(): another pass over this task is still open (its workers are shared); "
                "finish or close it before starting a new one"
            )
        with_source = store is None or not (store.complete and store.on_disk)
        if with_source:
            self._ensure_source()
        loader = self._pool.map_loader(lambda: self._fetcher(with_source), pin=dev.type == "cuda", source=with_source)
        pending: dict[int, tuple[Any, Any]] = {}
        self._pool.feed.set(self._requests(order, aug, seed, epoch, store, pending))
        self._in_pass = True
        try:
            yield from self._receive_all(loader, pending, store, aug, seed, epoch, dev)
        finally:
            self._in_pass = False

    def _receive_all(self, loader, pending, store, aug, seed, epoch, dev) -> Iterator[Batch]:
        import numpy as np
        import torch

        for res in self._pool.iterate(loader):
            if res.get("error"):
                raise_worker_error(res["error"])
            idx, codes = pending.pop(res["pos"])
            rows_w, xw = res["rows"].numpy(), res["x"]
            if res["bad"]:
                self._bad.update(dict(res["bad"]))
            decoded = res["decoded"].numpy()
            self.stats["decoded"] += len(decoded)
            if store is not None and store is self._store:
                if res["bad"]:
                    rows, msgs = zip(*res["bad"])
                    store.mark_bad(rows, msgs)
                if len(decoded):
                    sel = np.isin(rows_w, decoded)
                    rows_new, x_new = (rows_w, xw.numpy()) if sel.all() else (rows_w[sel], xw.numpy()[sel])
                    if not store.put(rows_new, x_new):
                        self._abandon_store("the images decode to mixed pixel types")
            from cl_tool.data._fetch import FROM_MAIN

            main = codes == FROM_MAIN
            if main.any():
                bad_rows = {r for r, _ in res["bad"]}
                keep = np.array([m or int(r) not in bad_rows for r, m in zip(idx.tolist(), main.tolist())], dtype=bool)
                final = idx[keep]
                from_ram, from_worker = store.ram[idx[main]], xw.numpy()
                if from_ram.dtype != from_worker.dtype:
                    from_ram = from_ram.astype(np.float32) / 255.0 if from_ram.dtype == np.uint8 else from_ram
                    from_worker = (
                        from_worker.astype(np.float32) / 255.0 if from_worker.dtype == np.uint8 else from_worker
                    )
                out = np.empty((len(final), *from_ram.shape[1:]), dtype=from_ram.dtype)
                mk = main[keep]
                out[mk] = from_ram
                out[~mk] = from_worker
                yield self._finish(final, torch.from_numpy(out), aug, seed, epoch, dev)
            else:
                yield self._finish(rows_w, xw, aug, seed, epoch, dev)

    def _drop_known_bad(self, idx, store):
        st = store.status[idx]
        badm = st == 2
        if badm.any():
            if not self.skip_bad:
                r = int(idx[badm][0])
                raise BadInputError(
                    store.bad.get(
                        r, f"The image in row {r} of $data {self.spec.source} cannot be decoded; remove or replace it."
                    )
                )
            idx = idx[~badm]
        return idx

    def _requests(self, order, aug, seed, epoch, store, pending):
        import numpy as np

        from cl_tool.data._fetch import FROM_FILE, FROM_MAIN, FROM_SOURCE, Request

        for pos, idx in enumerate(order):
            idx = self._index(idx)
            fail = None
            codes = np.full(len(idx), FROM_SOURCE, dtype=np.uint8)
            paths, dtype = (None, None), None
            if store is not None and store is self._store:
                try:
                    idx = self._drop_known_bad(idx, store)
                except BadInputError as exc:
                    fail = ("BadInputError", exc.message)
                codes = np.full(len(idx), FROM_SOURCE, dtype=np.uint8)
                have = store.status[idx] == 1
                if store.ram is not None:
                    codes[have] = FROM_MAIN
                elif store.on_disk:
                    codes[have] = FROM_FILE
                paths, dtype = store.file_paths(), store.dtype
            pending[pos] = (idx, codes)
            yield Request(pos, idx, codes, paths, dtype, aug if aug.needs_source else None, seed, epoch, fail)

    def _fetcher(self, with_source: bool):
        from cl_tool.data._fetch import MapFetcher  # it imports torch

        ds = self._sel.ds if with_source else None
        return MapFetcher(ds, self.info["image_column"], self.preprocess, self.spec.source, self.skip_bad)

    def _stream(self, batch_size, aug, seed, epoch, dev, shuffle, start_batch, rank, world) -> Iterator[Batch]:
        from cl_tool.data._fetch import StreamFetcher

        ds = self._sel.ds
        if shuffle:
            ds = ds.shuffle(seed=seed, buffer_size=self.shuffle_buffer)
            ds.set_epoch(epoch)
        fetch = StreamFetcher(
            ds,
            self.info["image_column"],
            self.info["label_column"],
            self.preprocess,
            self.spec.source,
            batch_size=batch_size,
            augment=aug if aug.needs_source else None,
            seed=seed,
            epoch=epoch,
            start_batch=start_batch,
            rank=rank,
            world=world,
            skip_bad=self.skip_bad,
        )
        loader = data_loader(fetch, self.workers, pin=dev.type == "cuda")
        seen = 0
        try:
            for res in self._pool.iterate(loader):
                if res.get("error"):
                    raise_worker_error(res["error"])
                if res["bad"]:
                    self._bad.update(dict(res["bad"]))
                self.stats["decoded"] += len(res["decoded"])
                seen += 1
                yield self._finish(res["rows"].numpy(), res["x"], aug, seed, epoch, dev, y=res["y"])
        finally:
            shut_down(loader)
        if seen == 0 and start_batch == 0 and rank == 0:
            raise BadInputError(f"$data {self.spec.source} has no samples; give a non-empty dataset.")

    def _finish(self, idx, x, aug, seed, epoch, dev, y=None) -> Batch:
        import numpy as np
        import torch

        index = torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64))
        if y is None:
            y = self.labels[index]
        elif self._lookup is not None and y.numel():
            y = self._lookup[y]
        if self._label_check is not None and y.numel():
            _check_range(int(y.min()), int(y.max()), self._label_check[0], self._label_check[1], self.spec.source)
        if dev.type == "cuda":
            if not x.is_pinned():
                x = x.pin_memory()
            x = x.to(dev, non_blocking=True)
            y = y.to(dev, non_blocking=True)
        elif dev.type != "cpu":
            x, y = x.to(dev), y.to(dev)
        x = to_unit_float(x)
        if aug.kind == "shift":
            x = shift_batch(x, index.numpy(), aug.shift, seed, epoch)
        x = apply_task_transforms(x, self.spec)
        x = normalise_(x, self.preprocess.mean, self.preprocess.std)
        self.stats["batches"] += 1
        return Batch(index, x, y)


def _check_range(lo: int, hi: int, num_classes: int, what: str, source: str) -> None:
    if lo < 0 or hi >= num_classes:
        bad = hi if hi >= num_classes else lo
        raise IncompatibleError(
            f"{what} {source} has label {bad}, outside the model's {num_classes} classes (0..{num_classes - 1}); "
            f"use a model with more classes (or $grow_head in train-next)."
        )


def check_labels(task, num_classes: int, what: str | None = None) -> None:
    """Refuse labels outside [0, num_classes) (exit 4 naming the task's ``--data`` option).

    A stream's labels are not known in advance: they are checked batch by batch instead.
    """
    what = what or f"${task.spec.option}"
    y = task.labels
    if y is None:
        task._label_check = (num_classes, what)
        return
    if y.numel() == 0:
        return
    _check_range(int(y.min()), int(y.max()), num_classes, what, task.spec.source)
