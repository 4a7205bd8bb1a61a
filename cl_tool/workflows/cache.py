"""``cl-tool cache``: list the decoded cache's files (size, source, last use), remove them, trim the folder to a size."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from cl_tool.data.cache import default_cache_dir
from cl_tool.data.cache_admin import cache_max, entries, evict, parse_duration, parse_size, remove
from cl_tool.errors import UsageError
from cl_tool.output import Output, human_bytes
from cl_tool.params import Args, option


@dataclass(kw_only=True)
class CacheArgs(Args):
    cache_dir: Optional[Path] = option(
        None,
        "--cache-dir",
        metavar="DIR",
        help="Folder of the decoded-image cache (default $CL_TOOL_CACHE or ~/.cache/cl-tool/decoded).",
    )
    clear: bool = option(False, "--clear", help="Remove the cache files (with --older-than: only those).")
    older_than: Optional[str] = option(
        None,
        "--older-than",
        metavar="AGE",
        help="Only the files last used more than AGE ago (s, m, h, d, w; e.g. 7d, 12h).",
    )
    max_size: Optional[str] = option(
        None,
        "--max",
        metavar="SIZE",
        help="Remove the least recently used files until the folder holds at most SIZE (e.g. 20G, 500M).",
    )


def run_cache(args: CacheArgs, out: Output) -> dict[str, Any]:
    """List (or remove, or trim) the cache files of the cache folder; the table and total on stdout."""
    folder = Path(args.cache_dir).expanduser() if args.cache_dir is not None else default_cache_dir()
    if args.max_size is not None and (args.clear or args.older_than is not None):
        raise UsageError("$max_size trims by recency on its own; drop $clear and $older_than, or drop $max_size.")
    age = parse_duration(args.older_than, "$older_than") if args.older_than is not None else None
    removed = []
    if args.max_size is not None:
        cap = parse_size(args.max_size, "$max_size")
        removed = evict(folder, cap) if cap is not None else []
    elif args.clear:
        now = time.time()
        removed = [e for e in entries(folder) if (age is None or now - e.last_used > age) and remove(e)]
    now = time.time()
    listed = [e for e in entries(folder) if age is None or args.clear or now - e.last_used > age]
    total = sum(e.bytes for e in listed)
    if removed:
        out.log(f"Removed {len(removed)} file(s), {human_bytes(sum(e.bytes for e in removed))}, from {folder}.")
    out.table(
        f"decoded cache {folder} (least recently used first)",
        ["file", "size", "rows", "last used", "source"],
        [
            [
                e.path.name[:12],
                human_bytes(e.bytes),
                "?" if e.rows is None else f"{e.rows:,}",
                time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used)),
                e.source or "?",
            ]
            for e in listed
        ],
    )
    try:
        cap = cache_max()
    except UsageError as exc:
        out.warn(exc.message)
        cap = None
    out.say(
        f"total: {len(listed)} file(s), {human_bytes(total)}"
        + (f" (older than {args.older_than})" if age is not None and not args.clear else "")
        + f"; cap {human_bytes(cap) if cap is not None else 'none'} ($CL_TOOL_CACHE_MAX)."
    )
    return out.result(
        {
            "folder": str(folder),
            "files": [e.record() for e in listed],
            "total_bytes": total,
            "cap_bytes": cap,
            "removed": [e.record() for e in removed],
        }
    )
