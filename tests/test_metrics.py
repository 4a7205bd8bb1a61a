"""Continual-learning summaries, checked against arithmetic done by hand."""

import subprocess
import sys

import pytest

from cl_tool.errors import BadInputError
from cl_tool.metrics import cl_summary, gate

approx = pytest.approx


def test_square_3x3_by_hand():
    R = [
        [0.90, 0.10, 0.05],  # after stage 0 (trained on task 0)
        [0.70, 0.95, 0.10],  # after stage 1
        [0.60, 0.80, 0.97],  # after stage 2
    ]
    s = cl_summary(R)
    assert (s["num_stages"], s["num_tasks"]) == (3, 3)
    # ACC = (0.60 + 0.80 + 0.97) / 3 = 2.37 / 3 = 0.79
    assert s["average_accuracy"] == approx(0.79)
    # BWT = ((0.60 - 0.90) + (0.80 - 0.95)) / (3 - 1) = (-0.30 - 0.15) / 2 = -0.225
    assert s["bwt"] == approx(-0.225)
    # f_0 = max(0.90, 0.70) - 0.60 = 0.30 ; f_1 = max(0.10, 0.95) - 0.80 = 0.15 ; f_2 undefined
    assert s["forgetting"][0] == approx(0.30)
    assert s["forgetting"][1] == approx(0.15)
    assert s["forgetting"][2] is None
    # average forgetting = (0.30 + 0.15) / 2 = 0.225
    assert s["average_forgetting"] == approx(0.225)
    # LA = (0.90 + 0.95 + 0.97) / 3 = 2.82 / 3 = 0.94
    assert s["learning_accuracy"] == approx(0.94)


def test_forgetting_uses_max_over_all_earlier_stages():
    # Task 0 peaks at stage 1 (not at stage 0 where it was learned): f_0 = 0.9 - 0.5 = 0.4.
    R = [[0.8, 0.0, 0.0], [0.9, 0.9, 0.0], [0.5, 0.6, 0.9]]
    s = cl_summary(R)
    assert s["forgetting"][0] == approx(0.4)
    # f_1 = max(0.0, 0.9) - 0.6 = 0.3
    assert s["forgetting"][1] == approx(0.3)
    assert s["average_forgetting"] == approx(0.35)
    # BWT = ((0.5 - 0.8) + (0.6 - 0.9)) / 2 = -0.3
    assert s["bwt"] == approx(-0.3)


def test_percent_units_are_kept():
    s = cl_summary([[90.0, 10.0], [70.0, 95.0]])
    # ACC = (70 + 95) / 2 = 82.5 ; BWT = (70 - 90) / 1 = -20 ; f_0 = 90 - 70 = 20 ; LA = (90 + 95) / 2 = 92.5
    assert s["average_accuracy"] == approx(82.5)
    assert s["bwt"] == approx(-20.0)
    assert s["forgetting"] == [approx(20.0), None]
    assert s["learning_accuracy"] == approx(92.5)


def test_non_square_more_tasks_than_stages():
    R = [
        [0.5, 0.6, 0.7],
        [0.4, 0.9, 0.7],
    ]
    s = cl_summary(R)
    # ACC = (0.4 + 0.9 + 0.7) / 3 = 2.0 / 3
    assert s["average_accuracy"] == approx(2.0 / 3)
    assert s["bwt"] is None and s["learning_accuracy"] is None
    # k != m: every task, over the earlier stage 0: f = (0.5-0.4, 0.6-0.9, 0.7-0.7) = (0.1, -0.3, 0.0)
    assert s["forgetting"] == [approx(0.1), approx(-0.3), approx(0.0)]
    # average = (0.1 - 0.3 + 0.0) / 3 = -0.2 / 3
    assert s["average_forgetting"] == approx(-0.2 / 3)


def test_non_square_more_stages_than_tasks():
    R = [[0.9, 0.2], [0.8, 0.3], [0.6, 0.5]]
    s = cl_summary(R)
    # ACC = (0.6 + 0.5) / 2 = 0.55
    assert s["average_accuracy"] == approx(0.55)
    # f_0 = max(0.9, 0.8) - 0.6 = 0.3 ; f_1 = max(0.2, 0.3) - 0.5 = -0.2 ; mean = 0.05
    assert s["forgetting"] == [approx(0.3), approx(-0.2)]
    assert s["average_forgetting"] == approx(0.05)
    assert s["bwt"] is None and s["learning_accuracy"] is None


def test_one_by_one():
    s = cl_summary([[0.875]])
    assert s["average_accuracy"] == 0.875
    assert s["bwt"] is None
    assert s["forgetting"] == [None]
    assert s["average_forgetting"] is None
    assert s["learning_accuracy"] == 0.875


def test_single_stage_many_tasks():
    s = cl_summary([[0.5, 0.25, 0.75]])
    assert s["average_accuracy"] == approx(0.5)
    assert s["forgetting"] == [None, None, None]
    assert s["average_forgetting"] is None
    assert s["bwt"] is None and s["learning_accuracy"] is None


@pytest.mark.parametrize(
    "R", [[], [[]], [[0.1, 0.2], [0.3]], [[float("nan")]], [[0.5, float("inf")]], [["0.5"]], [[True]]]
)
def test_invalid_matrix(R):
    with pytest.raises(BadInputError):
        cl_summary(R)


def test_gate():
    s = cl_summary([[0.90, 0.10], [0.70, 0.95]])  # ACC = 0.825, average forgetting = 0.2
    assert gate(s) is None
    assert gate(s, fail_under_acc=0.8, fail_over_forgetting=0.25) is None
    r = gate(s, fail_under_acc=0.85)
    assert r is not None and "0.825" in r and "fail_under_acc" in r and "\n" not in r
    r = gate(s, fail_over_forgetting=0.1)
    assert r is not None and "0.2" in r and "fail_over_forgetting" in r
    r = gate(s, fail_under_acc=0.9, fail_over_forgetting=0.1)
    assert r.count(";") == 1 and r.endswith(".")
    # Forgetting undefined with a single stage: the forgetting gate passes.
    assert gate(cl_summary([[0.5]]), fail_over_forgetting=0.0) is None


def test_metrics_does_not_import_torch():
    code = "import sys, cl_tool.metrics; assert 'torch' not in sys.modules and 'numpy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
