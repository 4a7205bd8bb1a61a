"""Memory does not grow with the number of samples: no float32 (nor uint8, over the RAM budget) copy of the task.

A fake task of N small images (each row the same tiny PNG, so the Arrow file stays small) is
read whole, with ``--cache none`` and with the decoded cache on disk over a zero RAM budget,
in a fresh process per N; the peak RSS of the large N must stay within a few MB of the small
one (measured here: ~4 MB, labels and Arrow pages). A float32 copy of the large task would add ~190 MB, a uint8 one ~47 MB.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = textwrap.dedent("""
    import io, resource, sys
    import numpy as np
    import datasets
    from PIL import Image
    n, work = int(sys.argv[1]), sys.argv[2]
    datasets.disable_progress_bars()
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(buf, format="PNG")
    png = buf.getvalue()
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    def rows():
        for i in range(n):
            yield {"image": {"bytes": png, "path": None}, "label": i % 10}
    datasets.Dataset.from_generator(rows, features=feats, cache_dir=work + "/hf").save_to_disk(work + "/data")
    import torch
    from cl_tool.data import Preprocess, TaskSpec, open_task
    pre = Preprocess.builtin((3, 32, 32), (0.5,) * 3, (0.25,) * 3)
    torch.set_num_threads(1)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seen = 0
    for cache in ("none", "disk", "disk"):  # the second disk pass reads the finished cache file back (pread)
        t = open_task(TaskSpec(work + "/data"), pre, cache=cache, workers=0, cache_dir=work + "/cache", ram_budget=0)
        for b in t.batches(batch_size=256, shuffle=True, seed=1):
            seen += len(b.index)
        t.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(seen, base, peak)
""")


def _peak(n: int, work: Path) -> tuple[int, int, int]:
    work.mkdir()
    # A fixed mmap threshold: large arrays are returned to the system when freed, so glibc's heap drift (±10-20 MB
    # from batch-sized buffers, bounded but noisy) does not hide or fake a growth.
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "MALLOC_MMAP_THRESHOLD_": "65536",
    }
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(n), str(work)], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr
    seen, base, peak = map(int, out.stdout.split())
    return seen, base, peak


def test_peak_memory_does_not_grow_with_the_task(tmp_path):
    small_n, large_n = 1_000, 16_000
    s_seen, s_base, s_peak = _peak(small_n, tmp_path / "small")
    l_seen, l_base, l_peak = _peak(large_n, tmp_path / "large")
    assert (s_seen, l_seen) == (3 * small_n, 3 * large_n)
    growth_mb = ((l_peak - l_base) - (s_peak - s_base)) / 1024
    float_copy_mb = (large_n - small_n) * 3 * 32 * 32 * 4 / 2**20
    assert growth_mb < 15, (
        f"peak RSS grew by {growth_mb:.1f} MB for {large_n - small_n} more samples (a float32 copy: {float_copy_mb:.0f} MB)"
    )
