"""OpenMP's idle threads sleep at once (OMP_WAIT_POLICY=PASSIVE) only when other processes keep a core busy."""

import subprocess
import sys

from cl_tool import runtime


def test_busy_elsewhere_subtracts_this_process():
    # 1 s of wall time; the machine was busy 1.5 CPU s, 0.5 of them this process's: others kept 1 CPU busy
    assert runtime.busy_elsewhere((10.0, 100.0, 2.0), (11.0, 101.5, 2.5)) == 1.0
    assert runtime.busy_elsewhere((10.0, 100.0, 2.0), (11.0, 100.4, 2.5)) == 0.0  # clamped: tick rounding
    assert runtime.busy_elsewhere((10.0, 100.0, 2.0), (10.05, 100.1, 2.0)) is None  # too short a window
    assert runtime.busy_elsewhere(None, (11.0, 101.0, 2.0)) is None


def test_wait_policy_rules():
    assert runtime.wait_policy(1.0, {}, torch_loaded=False) == "PASSIVE"
    assert runtime.wait_policy(0.2, {}, torch_loaded=False) is None  # a quiet machine keeps torch's default
    assert runtime.wait_policy(1.0, {"OMP_WAIT_POLICY": "ACTIVE"}, torch_loaded=False) is None  # the user's choice
    assert runtime.wait_policy(1.0, {}, torch_loaded=True) is None  # too late: OpenMP read it when torch loaded
    assert runtime.wait_policy(1.0, {"LOCAL_WORLD_SIZE": "4"}, torch_loaded=False) is None  # ranks count each other
    assert runtime.wait_policy(None, {}, torch_loaded=False) is None


def test_cpu_sample_reads_this_machine():
    sample = runtime.cpu_sample()
    if sample is None:  # not Linux
        return
    wall, busy, own = sample
    assert wall > 0 and busy > 0 and own > 0


PROBE = """
import os, sys
from cl_tool import runtime
runtime.busy_elsewhere = lambda start, end: {others}
from cl_tool.cli import main
try:
    main(["info", "--help"])
except SystemExit:
    pass
sys.stderr.write("POLICY=" + os.environ.get("OMP_WAIT_POLICY", "unset") + "\\n")
"""


def test_a_command_line_sets_the_policy_before_torch_loads():
    def policy(others):
        env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_WAIT_POLICY"}
        proc = subprocess.run(
            [sys.executable, "-c", PROBE.format(others=others)], capture_output=True, text=True, timeout=120, env=env
        )
        return proc.stderr.strip().splitlines()[-1]

    assert policy(1.0) == "POLICY=PASSIVE"
    assert policy(0.0) == "POLICY=unset"
