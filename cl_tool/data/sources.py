"""Open a ``--data`` source lazily as a Hugging Face ``datasets`` object; pick split, slice and columns.

Local sources: a ``save_to_disk`` folder (Dataset or DatasetDict), an ``imagefolder`` folder,
parquet/csv/json(l) files; anything else that looks like ``owner/name`` is a hub id. A
non-streaming source is an Arrow-backed ``datasets.Dataset`` (memory-mapped; nothing is
decoded here); ``streaming=True`` gives a ``datasets.IterableDataset``. Rules kept from the
first version: a missing split is an error listing the existing ones; a single Dataset has
no named splits unless its ``split`` says so; FIFOs and devices are refused; an empty or
corrupt file is one sentence. No torch here; ``datasets`` is imported inside functions.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cl_tool.errors import BadInputError, EnvironmentProblem, UsageError

FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}
_SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def _is_saved_folder(p: Path) -> bool:
    return any((p / m).exists() for m in _SAVED_MARKERS)


def load_raw(source: str, split_name: str | None, *, streaming: bool = False):
    """Return (``datasets.Dataset`` or ``IterableDataset``, split name) for ``source`` and the chosen split."""
    import datasets

    datasets.disable_progress_bars()  # cl-tool shows its own, on terminals only

    p = Path(source)
    if p.exists() and not (p.is_dir() or p.is_file()):
        raise BadInputError(
            f"$data {source} is not a regular file or folder (a pipe or device); give a dataset folder or file."
        )
    try:
        if p.is_dir():
            if _is_saved_folder(p):
                ds = datasets.load_from_disk(
                    str(p)
                )  # streaming: made iterable after the selection (see open_selection)
            else:
                ds = datasets.load_dataset("imagefolder", data_dir=str(p), streaming=streaming)
        elif p.is_file():
            builder = FILE_BUILDERS.get(p.suffix.lower())
            if builder is None:
                raise BadInputError(
                    f"$data {source}: unsupported file type {p.suffix!r}; use a save_to_disk folder, an imagefolder, or parquet/csv/json files."
                )
            ds = datasets.load_dataset(builder, data_files=str(p), streaming=streaming)
        elif (
            p.suffix.lower() in FILE_BUILDERS
            or source.startswith((".", "/", "~"))
            or os.sep in source
            and (not re.fullmatch(r"[\w.-]+/[\w.-]+", source) or p.parent.is_dir())
        ):  # `runs/task_b` with ./runs present: a path
            raise BadInputError(f"$data {source} does not exist; check the path.")
        else:
            ds = load_hub(source, streaming=streaming)
    except BadInputError:
        raise
    except EnvironmentProblem:
        raise
    except IndexError as exc:  # datasets.load_from_disk of a saved 0-row Dataset (no arrow files)
        raise BadInputError(f"$data {source} holds no data (an empty dataset); give a non-empty dataset.") from exc
    except (FileNotFoundError, ValueError, OSError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "corresponds to no data" in msg:  # a parquet/csv/json file without rows
            raise BadInputError(f"$data {source} has no samples; give a non-empty dataset.") from exc
        raise BadInputError(f"$data {source} could not be read as a dataset ({msg}).") from exc
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        names = list(ds.keys())
        if split_name is None:
            split_name = "train" if "train" in ds else names[0]
            if len(names) > 1 and "train" not in ds:
                raise UsageError(f"$data {source} has splits {names}; choose one with $split.")
        if split_name not in ds:
            raise UsageError(f"$split {split_name} is not in $data {source}; available splits: {', '.join(names)}.")
        ds = ds[split_name]
    elif split_name is not None:
        own = str(ds.split) if getattr(ds, "split", None) is not None else None
        if split_name != own:
            raise UsageError(
                f"$split {split_name} is not in $data {source}: it holds a single dataset "
                f"{f'(split {own!r})' if own else 'without named splits'}; drop the split name (a slice such as [:100] works)."
            )
    return ds, split_name


def load_hub(source: str, *, streaming: bool = False):
    import datasets

    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source):
        raise BadInputError(f"$data {source} does not exist; check the path.")
    try:
        return datasets.load_dataset(source, streaming=streaming)
    except Exception as exc:
        text = str(exc)
        if (
            "offline" in text.lower()
            or "connect" in text.lower()
            or "resolve" in text.lower()
            or "network" in text.lower()
            or "Max retries" in text
            or "couldn't reach" in text.lower()
        ):
            raise EnvironmentProblem(
                f"$data {source} is not a local path and the Hugging Face Hub cannot be reached; download it on a connected machine and pass the local folder."
            ) from exc
        raise BadInputError(
            f"$data {source} is neither a local path nor a loadable hub dataset ({text.splitlines()[0] if text else type(exc).__name__})."
        ) from exc


def find_column(
    ds, wanted: str | None, kind: str, option: str, names: tuple[str, ...], feature_types: tuple[str, ...]
) -> str:
    cols = list(ds.column_names or [])
    features = ds.features or {}
    if wanted:
        if wanted not in cols:
            raise BadInputError(f"{option} {wanted!r} is not a column of the dataset; its columns are {cols}.")
        return wanted
    for col, feat in features.items():
        if type(feat).__name__ in feature_types:
            return col
    for n in names:
        if n in cols:
            return n
    raise BadInputError(f"The dataset has no {kind} column (columns: {cols}); name it with {option}.")


# ----------------------------------------------------------------------------------------------- selection


@dataclass
class Selection:
    """An opened source: the (sliced) dataset, its columns and what describe() reports."""

    ds: Any  # datasets.Dataset (rows selected, columns image+label, images not decoded) or IterableDataset
    image_column: str
    label_column: str
    split: str | None  # as describe() reports it
    num_rows: int | None  # None: a stream of unknown length
    streaming: bool = False
    fingerprint: str | None = None  # the datasets fingerprint of the selected Arrow dataset (non-streaming)
    info: dict[str, Any] = field(default_factory=dict)


def _columns(ds, spec, image_names, label_names):
    img_col = find_column(ds, spec.image_column, "image", "$image_column", image_names, ("Image", "Array2D", "Array3D"))
    lab_col = find_column(ds, spec.label_column, "label", "$label_column", label_names, ("ClassLabel",))
    if img_col == lab_col:
        raise BadInputError(
            f"$data {spec.source}: the image and label columns are both {img_col!r}; set $image_column / $label_column."
        )
    return img_col, lab_col


def _undecoded(ds, img_col: str):
    """``ds`` with only what is read, images left encoded (decoded per batch, so a corrupt file is named)."""
    import datasets

    feats = ds.features or {}
    if type(feats.get(img_col)).__name__ == "Image":
        ds = ds.cast_column(img_col, datasets.Image(decode=False))
    return ds


def open_selection(spec, *, streaming: bool = False) -> Selection:
    """Open ``spec``'s source, choose split/slice/limit and the columns (nothing decoded)."""
    from cl_tool.data.specs import IMAGE_COLUMN_NAMES, LABEL_COLUMN_NAMES, parse_split

    split_name, start, stop = parse_split(spec.split)
    ds, split_name = load_raw(spec.source, split_name, streaming=streaming)
    described_split = split_name if start is None and stop is None else spec.split
    if streaming and not hasattr(ds, "to_iterable_dataset"):  # already a datasets.IterableDataset
        if ds.column_names is None:  # csv/json without declared features: learn the columns from the first row
            first = next(iter(ds.take(1)), None)
            if first is None:
                raise BadInputError(f"$data {spec.source} has no samples; give a non-empty dataset.")
            ds = ds._resolve_features()
        img_col, lab_col = _columns(ds, spec, IMAGE_COLUMN_NAMES, LABEL_COLUMN_NAMES)
        total = _stream_length(ds, split_name)
        if total is None and ((start is not None and start < 0) or (stop is not None and stop < 0)):
            raise UsageError(
                f"$split {spec.split}: a slice counted from the end needs the dataset's length, which $streaming "
                f"does not know for $data {spec.source}; use a non-negative slice or drop $streaming."
            )
        n = None
        if total is not None:
            idx = range(total)[slice(start, stop)]
            if spec.limit is not None:
                idx = idx[: spec.limit]
            first, n = (idx.start if len(idx) else 0), len(idx)
            if n == 0:
                raise BadInputError(
                    f"$data {spec.source} has no samples{' in the chosen split/slice' if (start, stop) != (None, None) or spec.limit else ''}; give a non-empty dataset."
                )
            ds = ds.skip(first).take(n) if first else ds.take(n)
        else:
            first = start or 0
            count = None if stop is None else max(0, stop - first)
            if spec.limit is not None:
                count = spec.limit if count is None else min(count, spec.limit)
            if first:
                ds = ds.skip(first)
            if count is not None:
                ds = ds.take(count)
        ds = _undecoded(ds.select_columns([img_col, lab_col]), img_col)
        return Selection(ds, img_col, lab_col, described_split, n, streaming=True)
    img_col, lab_col = _columns(ds, spec, IMAGE_COLUMN_NAMES, LABEL_COLUMN_NAMES)
    n_total = len(ds)
    idx = range(n_total)[slice(start, stop)]
    if spec.limit is not None:
        idx = idx[: spec.limit]
    if len(idx) == 0:
        raise BadInputError(
            f"$data {spec.source} has no samples{' in the chosen split/slice' if (start, stop) != (None, None) or spec.limit else ''}; give a non-empty dataset."
        )
    if len(idx) != n_total:
        ds = ds.select(idx)
    ds = _undecoded(ds.select_columns([img_col, lab_col]), img_col)
    if streaming:  # a save_to_disk folder, streamed from its Arrow files
        return Selection(
            ds.to_iterable_dataset(num_shards=1), img_col, lab_col, described_split, len(idx), streaming=True
        )
    return Selection(ds, img_col, lab_col, described_split, len(idx), fingerprint=getattr(ds, "_fingerprint", None))


def _stream_length(ds, split_name: str | None) -> int | None:
    try:
        splits = ds.info.splits or {}
        sp = splits.get(split_name or "train")
        return int(sp.num_examples) if sp is not None and sp.num_examples else None
    except (AttributeError, TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------- labels


def label_error(lab, row: int, source: str) -> BadInputError | None:
    """The error for one label value (the first version's rules), or None when it is a class id."""
    if lab is None:
        return BadInputError(f"Row {row} of $data {source} has no label; remove unlabeled rows.")
    try:
        if isinstance(lab, float) and not lab.is_integer():
            raise ValueError(lab)
        int(lab)
    except (TypeError, ValueError, OverflowError):
        return BadInputError(
            f"Label {lab!r} in row {row} of $data {source} is not an integer class id; encode labels as integers or a ClassLabel."
        )
    return None


def labels_of(values, source: str, first_row: int = 0):
    """int64 numpy labels from a list of label values; the first bad one raises BadInputError naming its row."""
    import numpy as np

    out = np.empty(len(values), dtype=np.int64)
    for i, lab in enumerate(values):
        err = label_error(lab, first_row + i, source)
        if err is not None:
            raise err
        out[i] = int(lab)
    return out


def read_labels(ds, lab_col: str, source: str):
    """All labels of an Arrow dataset as int64 numpy, read from the label column only (no image is decoded)."""
    import numpy as np
    import pyarrow as pa

    col = ds.select_columns([lab_col]).with_format("arrow")[:][lab_col]
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    t = col.type
    if pa.types.is_dictionary(t):
        col = col.cast(t.value_type)
        t = col.type
    if col.null_count == 0 and (pa.types.is_integer(t) or pa.types.is_boolean(t)):
        return np.asarray(col.cast(pa.int64()).to_numpy(zero_copy_only=False), dtype=np.int64)
    if col.null_count == 0 and pa.types.is_floating(t):
        arr = col.to_numpy(zero_copy_only=False)
        ok = np.isfinite(arr) & (np.floor(arr) == arr) & (np.abs(arr) < 2.0**63)
        if ok.all():
            return arr.astype(np.int64)
        row = int(np.argmin(ok))
        raise label_error(float(arr[row]), row, source)
    return labels_of(col.to_pylist(), source)


# ----------------------------------------------------------------------------------------------- identity


def is_local(source: str) -> bool:
    return os.path.lexists(source)


#: a single-file source up to this size also contributes its content to its signature (xxh3_128)
CONTENT_HASH_LIMIT = 64 << 20


def _stat_entry(st: os.stat_result) -> str:
    return f"{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{st.st_ctime_ns}"


def local_signature(source: str) -> str:
    """A digest of a local source's resolved path and every file's (relative path, size, mtime_ns, inode, ctime_ns).

    Any changed, added or removed file changes it, also when its size and modification time are
    restored (``tar --mtime``, ``cp -p``, ``rsync -a``, ``os.utime``): rewriting or replacing a file
    gives it a new change time (st_ctime, which no user can set) or a new inode. Symbolic links to
    files and folders are followed (a folder reached again through a link cycle is read once; a
    dangling link counts as such). A single file of at most CONTENT_HASH_LIMIT bytes also adds its
    content (xxh3_128). It is read without opening ``datasets``, so a command whose decoded data is
    cached never imports it.
    """
    p = Path(source).resolve()
    h = hashlib.sha256(str(p).encode())
    if p.is_file():
        st = p.stat()
        h.update(("\0" + _stat_entry(st)).encode())
        if st.st_size <= CONTENT_HASH_LIMIT:
            import xxhash

            content = xxhash.xxh3_128()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    content.update(chunk)
            h.update(b"\0" + content.digest())
        return h.hexdigest()
    entries, seen = [], set()
    for root, dirs, files in os.walk(p, followlinks=True):
        try:
            here = os.stat(root)
        except OSError:
            dirs[:] = []
            continue
        if (here.st_dev, here.st_ino) in seen:  # a link back to a folder already read: a cycle or a second path
            dirs[:] = []
            continue
        seen.add((here.st_dev, here.st_ino))
        dirs.sort()
        for name in files:
            fp = os.path.join(root, name)
            try:
                entry = _stat_entry(os.stat(fp))
            except OSError:
                entry = "dangling"
            entries.append(f"{os.path.relpath(fp, p)}\0{entry}")
    entries.sort()
    h.update("\n".join(entries).encode())
    return h.hexdigest()
