"""Fixtures of the CLI tests."""

import pytest

from icbs_opt.problems import random_problem


@pytest.fixture
def problem_folder(tmp_path):
    """A folder of three small random problems (n = 6, k = 3)."""
    folder = tmp_path / "problems"
    folder.mkdir()
    for i in range(3):
        random_problem(6, 3, seed=i).save(folder / f"p{i}.npz")
    return folder
