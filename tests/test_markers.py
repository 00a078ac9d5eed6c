"""The `slow` marker: the default run leaves the slow tests out, `-m slow` runs only
them, and the two selections together are the whole suite."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = REPO / "pyproject.toml"

SAMPLE = """
import pytest

@pytest.mark.slow
def test_slow():
    pass

def test_fast():
    pass
"""

#: Each core path keeps a fast test in the default run (a node id prefix).
CORE = {
    "native solve": "tests/backends/test_native.py::test_exact_optimum_against",
    "a digits prune": "tests/cli/test_prune.py::test_cli_prune_writes_everything",
    "checkpoint resume": "tests/pruning/test_checkpoint.py::test_resume_equals",
    "CLI resume": "tests/cli/test_interrupts.py::test_periodic_checkpoint_resumes",
    "CLI prune": "tests/cli/test_prune.py::test_cli_prune_then_evaluate",
}


def collected(*args: str) -> tuple[set[str], int]:
    """Node ids that ``pytest --collect-only`` selects with ``args`` in the repo, and
    how many it deselected."""
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", *args],
        cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    deselected = re.search(r"\((\d+) deselected\)", run.stdout)
    ids = {line for line in run.stdout.splitlines() if "::" in line}
    return ids, int(deselected.group(1)) if deselected else 0


@pytest.mark.parametrize(
    ("marks", "selected"),
    [((), ["test_fast"]), (("-m", "slow"), ["test_slow"]),
     (("-m", ""), ["test_fast", "test_slow"])],
)  # fmt: skip
def test_the_configured_selection(pytester, marks, selected):
    pytester.makepyfile(test_sample=SAMPLE)
    config = ["-c", str(PYPROJECT), "-p", "no:cacheprovider"]
    result = pytester.runpytest_inprocess(*config, "--collect-only", "-q", *marks)
    ids = sorted(line.split("::")[1] for line in result.outlines if "::" in line)
    assert ids == selected


@pytest.mark.slow
def test_default_and_slow_selections_split_the_suite():
    (default, left_out), (slow, _) = collected(), collected("-m", "slow")
    assert not default & slow and left_out == len(slow)
    assert "tests/tasks/test_causal_lm.py::test_smollm2_task" in slow
    assert any(t.startswith("tests/test_notebooks.py::test_runs_in") for t in slow)
    for path, prefix in CORE.items():
        assert any(t.startswith(prefix) for t in default), f"no default test of {path}"
