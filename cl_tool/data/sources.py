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

from cl_tool.data.specs import IMAGE_COLUMN_NAMES, LABEL_COLUMN_NAMES, parse_split
from cl_tool.errors import BadInputError, EnvironmentProblem, UsageError

FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}
_SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def _is_saved_folder(p: Path) -> bool:
    return any((p / m).exists() for m in _SAVED_MARKERS)


#: Split folder/file names and the split each stands for (as the datasets library reads a local folder).
SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "test": "test",
    "testing": "test",
    "eval": "test",
    "evaluation": "test",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
}
#: The splits evaluation reads by default, in order of preference; training and importance read ``train``.
HELD_OUT_SPLITS = ("test", "validation")


def choose_split(names: list[str], role: str, source: str) -> str:
    """The split a command reads when none is given: the only one; for evaluation (``role`` "eval") ``test``, else
    ``validation``; for training and importance ``train``. Several splits and none of those → exit 2 listing them."""
    if len(names) == 1:
        return names[0]
    wanted = HELD_OUT_SPLITS if role == "eval" else ("train",)
    for name in wanted:
        if name in names:
            return name
    purpose = "evaluation (test or validation)" if role == "eval" else "training (train)"
    raise UsageError(
        f"$data {source} has splits {', '.join(names)} and none is the default for {purpose}; "
        f"choose one with $split (e.g. ::split={names[0]})."
    )


def load_raw(source: str, split_name: str | None, *, streaming: bool = False, role: str = "train"):
    """(``datasets.Dataset`` or ``IterableDataset``, split name, whether that split was chosen by default) for ``source``.

    ``role``: "train" or "eval", which split is read when ``split_name`` is None (see :func:`choose_split`).
    Local folders and files are read without the datasets library's own cache (nothing is written anywhere).
    """
    import datasets

    datasets.disable_progress_bars()  # cl-tool shows its own, on terminals only

    p = Path(source)
    if p.exists() and not (p.is_dir() or p.is_file()):
        raise BadInputError(
            f"$data {source} is not a regular file or folder (a pipe or device); give a dataset folder or file."
        )
    try:
        if p.is_dir():
            ds = datasets.load_from_disk(str(p)) if _is_saved_folder(p) else load_local_folder(p, source)
        elif p.is_file():
            if p.suffix.lower() not in FILE_BUILDERS:
                raise BadInputError(
                    f"$data {source}: unsupported file type {p.suffix!r}; use a save_to_disk folder, an imagefolder, or parquet/csv/json files."
                )
            ds = datasets.DatasetDict({"train": read_data_files([p], source)})
        elif (
            p.suffix.lower() in FILE_BUILDERS
            or source.startswith((".", "/", "~"))
            or os.sep in source
            and (not re.fullmatch(r"[\w.-]+/[\w.-]+", source) or p.parent.is_dir())
        ):  # `runs/task_b` with ./runs present: a path
            raise BadInputError(f"$data {source} does not exist; check the path.")
        else:
            ds = load_hub(source, streaming=streaming)
    except (BadInputError, UsageError, EnvironmentProblem):
        raise
    except IndexError as exc:  # datasets.load_from_disk of a saved 0-row Dataset (no arrow files)
        raise BadInputError(f"$data {source} holds no data (an empty dataset); give a non-empty dataset.") from exc
    except (FileNotFoundError, ValueError, OSError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "corresponds to no data" in msg:  # a parquet/csv/json file without rows
            raise BadInputError(f"$data {source} has no samples; give a non-empty dataset.") from exc
        raise BadInputError(f"$data {source} could not be read as a dataset ({msg}).") from exc
    defaulted = False
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        names = list(ds.keys())
        if split_name is None:
            split_name = choose_split(names, role, source)
            defaulted = len(names) > 1
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
    return ds, split_name, defaulted


# ----------------------------------------------------------------------------------------------- local folders


def _image_extensions() -> frozenset[str]:
    try:
        from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

        return frozenset(e.lower() for e in ImageFolder.EXTENSIONS)
    except (ImportError, AttributeError):  # pragma: no cover - older/newer datasets layouts
        return frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})


def walk_unique(root):
    """``os.walk(root)`` following symbolic links to folders, each real folder once (a link cycle, or a second path
    to a folder already read, is not entered again); subfolders in name order. Yields (folder, dirs, files)."""
    seen: set[tuple[int, int]] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        try:
            st = os.stat(folder)
        except OSError:
            dirs[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs.sort()
        yield folder, dirs, files


def _walk_files(root: Path) -> list[Path]:
    """Every non-hidden file under ``root`` (see :func:`walk_unique`), sorted."""
    out: list[Path] = []
    for folder, dirs, files in walk_unique(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        out.extend(Path(folder) / f for f in files if not f.startswith("."))
    return sorted(out)


def _subfolders(folder: Path) -> list[Path]:
    """The non-hidden folders in ``folder`` (symbolic links to folders included), sorted by name."""
    return sorted((e for e in folder.iterdir() if not e.name.startswith(".") and e.is_dir()), key=lambda e: e.name)


def load_local_folder(p: Path, source: str):
    """A local folder that is not a ``save_to_disk`` folder, as a ``DatasetDict``: an imagefolder (class folders,
    optionally under split folders), or parquet/csv/json files assigned to splits by their names, as the datasets
    library assigns them."""
    files = _walk_files(p)
    if any(f.name in ("metadata.csv", "metadata.jsonl", "metadata.parquet") for f in files):
        import datasets  # labels from a metadata file: the datasets library's own imagefolder reader

        return datasets.load_dataset("imagefolder", data_dir=str(p))
    exts = _image_extensions()
    if any(f.suffix.lower() in exts for f in files):
        return _imagefolder(p, source, exts)
    if any(f.suffix.lower() in FILE_BUILDERS for f in files):
        return _data_files_folder(p, source)
    raise BadInputError(
        f"$data {source} has no samples: no images and no parquet/csv/json files in it; give a dataset folder."
    )


def _imagefolder(p: Path, source: str, exts: frozenset[str]):
    """An imagefolder read as torchvision's ``ImageFolder`` reads one: every class folder is a class (empty ones and
    linked ones included), named by the folder; labels are ``ClassLabel`` ids of the sorted union of class names over
    the splits (split folders ``train``/``test``/``validation`` and their aliases, else one split ``train``)."""
    import datasets

    top = _subfolders(p)
    split_dirs: dict[str, list[Path]] = {}
    for d in top:
        if d.name.lower() in SPLIT_NAMES:
            split_dirs.setdefault(SPLIT_NAMES[d.name.lower()], []).append(d)
    if split_dirs:
        others = [d.name for d in top if d.name.lower() not in SPLIT_NAMES]
        if others:
            raise BadInputError(
                f"$data {source} has split folders ({', '.join(sorted(split_dirs))}) beside other folders "
                f"({', '.join(others[:5])}); put every class folder inside a split folder."
            )
        roots = split_dirs
    else:
        roots = {"train": [p]}
    per_split: dict[str, list[tuple[Path, str]]] = {}
    class_names: set[str] = set()
    for split, folders in roots.items():
        rows: list[tuple[Path, str]] = []
        for root in folders:
            loose = [
                f for f in root.iterdir() if f.is_file() and f.suffix.lower() in exts and not f.name.startswith(".")
            ]
            if loose:
                raise BadInputError(
                    f"$data {source}: image {loose[0].relative_to(p)} is not in a class folder; an imagefolder holds "
                    f"one folder per class (e.g. {root.name}/cat/1.png)."
                )
            for cls in _subfolders(root):
                class_names.add(cls.name)
                rows.extend((f, cls.name) for f in _walk_files(cls) if f.suffix.lower() in exts)
        per_split[split] = rows
    names = sorted(class_names)
    index = {n: i for i, n in enumerate(names)}
    features = datasets.Features({"image": datasets.Image(decode=False), "label": datasets.ClassLabel(names=names)})
    out = {}
    for split, rows in per_split.items():
        rows.sort(key=lambda r: (index[r[1]], str(r[0])))
        out[split] = datasets.Dataset.from_dict(
            {"image": [{"bytes": None, "path": str(f)} for f, _ in rows], "label": [index[c] for _, c in rows]},
            features=features,
            split=split,
        )
    if not any(len(d) for d in out.values()):
        raise BadInputError(f"$data {source} has no samples: its class folders hold no images.")
    return datasets.DatasetDict(out)


def _data_files_folder(p: Path, source: str):
    """parquet/csv/json files of a folder, one Dataset per split (split by file name, as ``datasets`` does)."""
    import datasets
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        files = DataFilesDict.from_patterns(get_data_patterns(str(p)), base_path=str(p))
    except Exception as exc:
        raise BadInputError(f"$data {source} has no data files the datasets library recognises ({exc}).") from exc
    out = {}
    for split, paths in files.items():
        chosen = [Path(f) for f in paths if Path(f).suffix.lower() in FILE_BUILDERS]
        if chosen:
            out[str(split)] = read_data_files(chosen, source)
    if not out:
        raise BadInputError(f"$data {source} has no samples: no parquet/csv/json files in it.")
    return datasets.DatasetDict(out)


def _read_table(path: Path):
    """One parquet/csv/json(l) file as a pyarrow Table (the datasets library's own schema metadata kept)."""
    import json

    import pyarrow as pa

    kind = FILE_BUILDERS[path.suffix.lower()]
    if kind == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path, memory_map=True)
    if kind == "csv":
        import pyarrow.csv as pcsv

        return pcsv.read_csv(path)
    import pyarrow.json as pjson

    try:
        return pjson.read_json(path)  # JSON lines
    except pa.ArrowInvalid:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
        if isinstance(doc, dict) and len(doc) == 1 and isinstance(next(iter(doc.values())), list):
            doc = next(iter(doc.values()))  # {"data": [...]}
        if isinstance(doc, list) and all(isinstance(r, dict) for r in doc):
            return pa.Table.from_pylist(doc)
        if isinstance(doc, dict) and all(isinstance(v, list) for v in doc.values()):
            return pa.Table.from_pydict(doc)
        raise ValueError("the JSON is neither JSON lines, a list of records nor a mapping of columns") from None


def read_data_files(paths: list[Path], source: str):
    """parquet/csv/json(l) files as one in-memory ``datasets.Dataset`` (parquet memory-mapped), its features from the
    files' own metadata. Unlike ``datasets.load_dataset`` this writes no Arrow copy into the library's cache, so a
    changed file is always read as it is now."""
    import datasets
    import pyarrow as pa

    tables = []
    for path in paths:
        try:
            tables.append(_read_table(path))
        except (pa.ArrowException, ValueError, UnicodeDecodeError) as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise BadInputError(f"$data {source}: {path.name} could not be read as a dataset ({msg}).") from exc
    try:
        table = tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="default")
    except pa.ArrowException as exc:
        raise BadInputError(f"$data {source}: its files have different columns ({exc}).") from exc
    if table.num_rows == 0:
        raise BadInputError(f"$data {source} has no samples; give a non-empty dataset.")
    return datasets.Dataset(table)


def hub_offline() -> bool:
    """True when $HF_HUB_OFFLINE or $HF_DATASETS_OFFLINE is set to 1/ON/YES/TRUE (the hub is then never asked)."""
    return any(
        os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE")
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_reachable(timeout: float = 1.5) -> bool:
    """Whether a TCP connection to the hub's endpoint opens within ``timeout`` seconds (name lookup included)."""
    import socket
    import threading
    from urllib.parse import urlsplit

    url = urlsplit(hub_endpoint())
    host, port = url.hostname, url.port or (80 if url.scheme == "http" else 443)
    if not host:
        return False
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)  # a name lookup has no timeout of its own
    thread.start()
    thread.join(timeout)
    return bool(ok)


def load_hub(source: str, *, streaming: bool = False):
    """A hub dataset by name; fails at once (no retries) when the hub cannot be reached and offline mode is not set."""
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source):
        raise BadInputError(f"$data {source} does not exist; check the path.")
    if not hub_offline() and not hub_reachable():
        raise EnvironmentProblem(
            f"$data {source} is not a local file or folder, and the Hugging Face Hub ({hub_endpoint()}) cannot be reached "
            f"to look it up; check the path, or set HF_HUB_OFFLINE=1 to read a copy downloaded before."
        )
    import datasets
    import huggingface_hub

    datasets.logging.set_verbosity_error()  # the library's own retry and cache lines: cl-tool says what went wrong
    huggingface_hub.logging.set_verbosity_error()
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
    """An opened source: the selected rows, their columns and what describe() reports."""

    ds: Any  # datasets.Dataset (rows selected, columns image+label, images not decoded) or IterableDataset
    image_column: str
    label_column: str
    split: str | None  # the split read (None: a dataset without named splits)
    num_rows: int | None  # None: a stream of unknown length
    streaming: bool = False
    fingerprint: str | None = None  # the datasets fingerprint of the selected Arrow dataset (non-streaming)
    info: dict[str, Any] = field(default_factory=dict)  # split, subset, class names, notes: see open_selection


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


def class_names_of(ds, lab_col: str) -> list[str] | None:
    """The names of a ``ClassLabel`` label column, or None (plain integer labels)."""
    feat = (ds.features or {}).get(lab_col)
    names = getattr(feat, "names", None) if type(feat).__name__ == "ClassLabel" else None
    return [str(n) for n in names] if names else None


def _check_slice(spec, start: int | None, stop: int | None, n: int) -> None:
    """A slice bound beyond the split's length is an error (Python would silently shorten it)."""
    for bound in (start, stop):
        if bound is not None and (bound > n or bound < -n):
            raise UsageError(
                f"$split {spec.split} reaches beyond the {n:,} rows of $data {spec.source}; "
                f"use bounds within -{n} and {n} (e.g. [:{n}])."
            )


def subset_rows(n: int, *, start=None, stop=None, limit=None, sample=None, seed: int = 0):
    """The rows a task reads (int64 numpy, ascending) out of ``n``: the slice [start:stop], then either its first
    ``limit`` rows or ``sample`` rows drawn uniformly without replacement (a permutation seeded by ``seed``)."""
    import numpy as np

    rows = np.arange(n, dtype=np.int64)[slice(start, stop)]
    if sample is not None:
        pick = np.random.default_rng(seed).permutation(len(rows))[:sample]
        rows = rows[np.sort(pick)]
    elif limit is not None:
        rows = rows[:limit]
    return rows


def describe_subset(spec, start, stop, n_split: int, n_rows: int) -> str | None:
    """How the rows were chosen from the split, in words (None: all of it)."""
    parts = []
    if (start, stop) != (None, None):
        parts.append(f"rows [{'' if start is None else start}:{'' if stop is None else stop}]")
    if getattr(spec, "sample", None) is not None:
        parts.append(f"a random {n_rows:,} (seed {spec.sample_seed})")
    elif spec.limit is not None and n_rows == spec.limit:
        parts.append(f"the first {n_rows:,}")
    return (", ".join(parts) + f" of {n_split:,}") if parts and n_rows != n_split else None


def open_selection(spec, *, streaming: bool = False) -> Selection:
    """Open ``spec``'s source, choose split, slice, limit or sample and the columns (nothing decoded).

    ``info``: ``split`` (the split read), ``split_default`` (chosen by the command's role, not by the user),
    ``subset`` (how rows were chosen, in words, or None), ``rows_in_split``, ``class_names`` (ClassLabel names or
    None), ``notes`` (lines the command prints: e.g. a subset that covers fewer classes than its split).
    """
    import numpy as np

    split_name, start, stop = parse_split(spec.split)
    role = getattr(spec, "role", "train")
    sample = getattr(spec, "sample", None)
    ds, split_name, defaulted = load_raw(spec.source, split_name, streaming=streaming, role=role)
    info: dict[str, Any] = {"split": split_name, "split_default": defaulted, "notes": []}
    if streaming and not hasattr(ds, "to_iterable_dataset"):  # already a datasets.IterableDataset
        if sample is not None:
            raise UsageError(
                f"$data {spec.source}: ::sample draws rows by index, which a stream does not have; drop $streaming or use ::limit."
            )
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
            _check_slice(spec, start, stop, total)
            idx = range(total)[slice(start, stop)]
            if spec.limit is not None:
                idx = idx[: spec.limit]
            first, n = (idx.start if len(idx) else 0), len(idx)
            if n == 0:
                raise BadInputError(
                    f"$data {spec.source} has no samples{' in the chosen split/slice' if (start, stop) != (None, None) or spec.limit else ''}; give a non-empty dataset."
                )
            ds = ds.skip(first).take(n) if first else ds.take(n)
            info["subset"] = describe_subset(spec, start, stop, total, n)
            info["rows_in_split"] = total
        else:
            first = start or 0
            count = None if stop is None else max(0, stop - first)
            if spec.limit is not None:
                count = spec.limit if count is None else min(count, spec.limit)
            if first:
                ds = ds.skip(first)
            if count is not None:
                ds = ds.take(count)
            info["subset"] = "a slice of a stream" if (start, stop, spec.limit) != (None, None, None) else None
        info["class_names"] = class_names_of(ds, lab_col)
        ds = _undecoded(ds.select_columns([img_col, lab_col]), img_col)
        return Selection(ds, img_col, lab_col, split_name, n, streaming=True, info=info)
    img_col, lab_col = _columns(ds, spec, IMAGE_COLUMN_NAMES, LABEL_COLUMN_NAMES)
    n_total = len(ds)
    _check_slice(spec, start, stop, n_total)
    if sample is not None and sample > len(range(n_total)[slice(start, stop)]):
        raise UsageError(
            f"$data {spec.source}: ::sample={sample} asks for more rows than the {len(range(n_total)[slice(start, stop)]):,} "
            f"it has{' in the chosen slice' if (start, stop) != (None, None) else ''}; use a smaller sample."
        )
    rows = subset_rows(
        n_total, start=start, stop=stop, limit=spec.limit, sample=sample, seed=getattr(spec, "sample_seed", 0)
    )
    if len(rows) == 0:
        raise BadInputError(
            f"$data {spec.source} has no samples{' in the chosen split/slice' if (start, stop) != (None, None) or spec.limit else ''}; give a non-empty dataset."
        )
    info["class_names"] = class_names_of(ds, lab_col)
    info["subset"] = describe_subset(spec, start, stop, n_total, len(rows))
    info["rows_in_split"] = n_total
    if len(rows) != n_total:
        full = read_labels(ds, lab_col, spec.source)
        have, of = len(np.unique(full[rows])), len(np.unique(full))
        if have < of:
            hint = "; ::sample=N draws a random subset of the whole split" if sample is None else ""
            info["notes"].append(
                f"${spec.option} {spec.source}: the chosen {len(rows):,} of {n_total:,} rows cover {have} of the "
                f"{of} classes in split {split_name or '(unnamed)'}{hint}."
            )
        if len(rows) == int(rows[-1] - rows[0]) + 1:
            ds = ds.select(range(int(rows[0]), int(rows[-1]) + 1))
        else:  # an indices mapping kept in memory (never written beside the source's Arrow files)
            ds = ds.select(rows, keep_in_memory=True)
    ds = _undecoded(ds.select_columns([img_col, lab_col]), img_col)
    if streaming:  # a save_to_disk folder, streamed from its Arrow files
        return Selection(
            ds.to_iterable_dataset(num_shards=1), img_col, lab_col, split_name, len(rows), streaming=True, info=info
        )
    return Selection(
        ds, img_col, lab_col, split_name, len(rows), fingerprint=getattr(ds, "_fingerprint", None), info=info
    )


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
    entries = []
    for root, _dirs, files in walk_unique(p):
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
