"""Block problems as dimod CQMs (in, out, files) and the Ocean sampler."""

import json

import dimod
import dimod.testing
import numpy as np
import pytest

from icbs_opt import BlockCQMSampler
from icbs_opt.backends import get_backend
from icbs_opt.cli import main
from icbs_opt.compare import Harvester, find_problem_files, load_problems
from icbs_opt.errors import BackendError, ProblemError
from icbs_opt.problems import BlockProblem, random_problem

PROBLEMS = {
    "ungrouped": random_problem(10, 4, seed=0),
    "grouped": random_problem(12, 2, seed=1, group_size=4),
    "uneven": BlockProblem(
        random_problem(9, seed=2).Q, [1, 3, 0], groups=[2, 0, 1, 1, 0, 1, 0, 1, 1]
    ),
}


def _random_samples(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2, size=(200, n))


# ---------------------------------------------------------------- to/from CQM
@pytest.mark.parametrize("name", PROBLEMS)
def test_cqm_round_trip_keeps_energies_and_feasibility(name):
    problem = PROBLEMS[name]
    cqm = problem.to_cqm()
    samples = _random_samples(problem.n, seed=3)
    energies = cqm.objective.energies((samples, range(problem.n)))
    expected = [problem.energy(x) for x in samples]
    np.testing.assert_allclose(energies, expected, rtol=1e-12, atol=1e-12)
    for x in samples[:50]:
        assert cqm.check_feasible(dict(enumerate(x))) == problem.is_feasible(x)
    back = BlockProblem.from_cqm(cqm)
    np.testing.assert_array_equal(back.Q, problem.Q)
    assert back.groups.tolist() == problem.groups.tolist()
    assert back.group_counts.tolist() == problem.group_counts.tolist()
    np.testing.assert_allclose([back.energy(x) for x in samples], expected)


def test_cqm_labels_are_stable():
    assert list(PROBLEMS["ungrouped"].to_cqm().constraints) == ["cardinality"]
    cqm = PROBLEMS["grouped"].to_cqm()
    assert list(cqm.constraints) == ["group_0", "group_1", "group_2"]
    assert list(cqm.variables) == list(range(12))
    assert all(cqm.vartype(v) is dimod.BINARY for v in cqm.variables)
    assert cqm.constraints["group_1"].rhs == 2


def test_from_cqm_takes_any_labels_in_variable_order():
    a, b, c = dimod.Binaries("abc")
    cqm = dimod.ConstrainedQuadraticModel()
    cqm.set_objective(2 * a - b + 3 * a * c)
    cqm.add_constraint(a + b + c == 2, label="pick two")
    problem = BlockProblem.from_cqm(cqm)
    assert problem.k == 2 and not problem.is_grouped
    assert problem.Q.tolist() == [[2.0, 0.0, 1.5], [0.0, -1.0, 0.0], [1.5, 0.0, 0.0]]


def test_from_cqm_numbers_other_groups_by_their_lowest_variable(tmp_path):
    x = list(dimod.Binaries(range(4)))
    cqm = dimod.ConstrainedQuadraticModel()
    cqm.add_variables("BINARY", range(4))
    cqm.set_objective(x[0] - x[3])
    cqm.add_constraint(x[2] + x[3] == 2, label="late")
    cqm.add_constraint(x[0] + x[1] == 1, label="early")
    problem = BlockProblem.from_cqm(cqm)
    assert problem.groups.tolist() == [0, 0, 1, 1]
    assert problem.group_counts.tolist() == [1, 2]
    with open(tmp_path / "c.cqm", "wb") as f:
        f.write(cqm.to_file().read())
    assert BlockProblem.load(tmp_path / "c.cqm").groups.tolist() == [0, 0, 1, 1]


def _cqm(objective=None, *constraints, **kwargs):
    x = list(dimod.Binaries(range(3)))
    cqm = dimod.ConstrainedQuadraticModel()
    cqm.set_objective(objective if objective is not None else x[0] * x[1] - x[2])
    for i, (lhs, label) in enumerate(constraints):
        cqm.add_constraint(lhs(x), label=label or f"c{i}", **kwargs)
    return cqm


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: _cqm(None, (lambda x: x[0] + x[1] <= 1, "c")), "'c' must be an eq"),
        (
            lambda: _cqm(None, (lambda x: x[0] + 2 * x[1] + x[2] == 2, "c")),
            "'c' must have every coefficient 1, got 2 on variable 1",
        ),
        (
            lambda: _cqm(None, (lambda x: x[0] * x[1] + x[2] == 1, "q")),
            "'q' must be linear sum",
        ),
        (
            lambda: _cqm(
                None,
                (lambda x: x[0] + x[1] == 1, "a"),
                (lambda x: x[1] + x[2] == 1, "b"),
            ),
            "constraint 'b': variable 1 is also in constraint 'a'",
        ),
        (
            lambda: _cqm(None, (lambda x: x[0] + x[1] == 1, "a")),
            "variable 2 is in no constraint",
        ),
        (
            lambda: _cqm(None, (lambda x: x[0] + x[1] + x[2] == 1.5, "h")),
            "'h' must have an integer right-hand side k in \\[0, 3\\].*got 1.5",
        ),
        (
            lambda: _cqm(None, (lambda x: x[0] + x[1] + x[2] == 4, "h")),
            "got 4",
        ),
        (
            lambda: _cqm(
                dimod.Binary(0) + dimod.Binary(1) + dimod.Binary(2) + 1.5,
                (lambda x: x[0] + x[1] + x[2] == 1, "c"),
            ),
            "got offset 1.5",
        ),
        (
            lambda: _cqm(None, (lambda x: x[0] + x[1] + x[2] == 1, "s"), weight=2.0),
            "constraint 's' is soft",
        ),
        (lambda: dimod.ConstrainedQuadraticModel(), "the CQM has no variables"),
        (lambda: dimod.BQM("BINARY"), "expected a dimod ConstrainedQuadraticModel"),
    ],
)
def test_from_cqm_refuses_other_forms_in_one_line(build, message):
    with pytest.raises(ProblemError, match=message) as info:
        BlockProblem.from_cqm(build())
    assert "\n" not in str(info.value)


def test_from_cqm_refuses_non_binary_variables():
    cqm = dimod.ConstrainedQuadraticModel()
    i = dimod.Integer("i", upper_bound=3)
    cqm.set_objective(i)
    cqm.add_constraint(i == 1, label="c")
    with pytest.raises(ProblemError, match="variable 'i' must be BINARY, got INTEGER"):
        BlockProblem.from_cqm(cqm)


# ---------------------------------------------------------------------- files
@pytest.mark.parametrize("name", PROBLEMS)
def test_cqm_file_round_trip(name, tmp_path):
    problem = PROBLEMS[name]
    path = tmp_path / "p.cqm"
    problem.save(path)
    with open(path, "rb") as f:  # dimod's own format
        assert dimod.ConstrainedQuadraticModel.from_file(f).num_constraints() == (
            problem.num_groups
        )
    loaded = BlockProblem.load(path)
    np.testing.assert_array_equal(loaded.Q, problem.Q)
    assert loaded.group_counts.tolist() == problem.group_counts.tolist()
    assert loaded.groups.tolist() == problem.groups.tolist()
    assert BlockProblem.load(path, k=1).group_counts.tolist() == [1] * (
        problem.num_groups
    )


def test_bad_cqm_file_is_refused(tmp_path):
    path = tmp_path / "bad.cqm"
    path.write_bytes(b"not a cqm at all")
    with pytest.raises(ProblemError, match="bad.cqm.*not a dimod CQM file"):
        BlockProblem.load(path)


def test_cqm_files_in_solve_and_compare(tmp_path, capsys):
    for name, problem in PROBLEMS.items():
        problem.save(tmp_path / f"{name}.cqm")
    files = find_problem_files([tmp_path])
    assert sorted(f.name for f in files) == [
        "grouped.cqm",
        "uneven.cqm",
        "ungrouped.cqm",
    ]
    problems, unreadable = load_problems(files)
    assert not unreadable and len(problems) == 3
    path = tmp_path / "ungrouped.cqm"
    assert main(["solve", str(path), "--backend", "exhaustive", "--json", "-"]) == 0
    answer = json.loads(capsys.readouterr().out)
    exact = get_backend("exhaustive").solve(PROBLEMS["ungrouped"])
    assert answer["energy"] == pytest.approx(exact.energy) and answer["feasible"]


def test_harvester_writes_cqm(tmp_path):
    hook = Harvester(tmp_path, task="demo", fmt="cqm")
    problem = BlockProblem(
        [[1.0, 0.5], [0.5, -1.0]], 1, meta={"layer": "fc", "step": 3, "x_cur": [1, 0]}
    )
    hook(problem)
    assert [p.name for p in tmp_path.iterdir()] == ["step00003_fc.cqm"]
    scaled, _ = problem.scaled()
    np.testing.assert_array_equal(BlockProblem.load(hook.files[0]).Q, scaled.Q)
    with pytest.raises(ProblemError, match="fmt must be 'npz' or 'cqm', got 'txt'"):
        Harvester(tmp_path, fmt="txt")


def test_cli_prune_harvest_cqm(tmp_path, monkeypatch, cache):
    monkeypatch.setenv("ICBS_OPT_CACHE_DIR", str(cache))
    out = tmp_path / "blocks"
    argv = ["prune", "--steps", "2", "--block-size", "8", "--no-progress"]
    assert main([*argv, "--harvest", str(out), "--harvest-format", "cqm"]) == 0
    problems, unreadable = load_problems(find_problem_files([out]))
    assert not unreadable and len(problems) == 2
    assert all(name.endswith(".cqm") and p.n == 8 for name, p in problems.items())


# -------------------------------------------------------------- the sampler
@pytest.mark.parametrize("name", PROBLEMS)
@pytest.mark.parametrize(
    "backend, options",
    [("native", {}), ("neal", {"num_reads": 4, "num_sweeps": 200}), ("exhaustive", {})],
)
def test_sample_cqm_equals_solve(name, backend, options):
    problem = PROBLEMS[name]
    cqm = problem.to_cqm()
    sampler = BlockCQMSampler(backend, **options)
    sampleset = sampler.sample_cqm(cqm, seed=5)
    dimod.testing.assert_sampleset_energies_cqm(sampleset, cqm)
    sol = get_backend(backend, **options).solve(problem, seed=5)
    first = sampleset.first
    assert [first.sample[i] for i in range(problem.n)] == sol.x.tolist()
    assert first.energy == pytest.approx(sol.energy, rel=1e-12, abs=1e-12)
    assert first.is_feasible and first.is_satisfied.tolist() == [True] * len(
        cqm.constraints
    )
    assert sampleset.info["constraint_labels"] == list(cqm.constraints)
    assert sampleset.info["backend"] == backend
    assert isinstance(sampleset.info["run_time"], int)


def test_sampler_declares_parameters_and_properties():
    sampler = BlockCQMSampler("native", num_restarts=3)
    assert isinstance(sampler, dimod.Scoped)
    assert set(sampler.parameters) == {"seed", "x0", "label"}
    assert sampler.properties["backend"] == "native"
    assert sampler.properties["backend_parameters"]["num_restarts"] == 3
    assert sampler.properties["supported_problem_types"] == ["cqm"]
    with pytest.raises(BackendError, match="options \\['p'\\] go with a backend name"):
        BlockCQMSampler(get_backend("native"), p=1)
    with pytest.raises(BackendError, match="unknown backend 'nope'"):
        BlockCQMSampler("nope")


def test_sampler_keeps_the_cqm_labels_and_takes_a_warm_start():
    a, b, c, d = dimod.Binaries(["a", "b", "c", "d"])
    cqm = dimod.ConstrainedQuadraticModel()
    cqm.set_objective(-a - 2 * b + 3 * a * b + c * d)
    cqm.add_constraint(a + b == 1, label="first")
    cqm.add_constraint(c + d == 1, label="second")
    with BlockCQMSampler("exhaustive") as sampler:
        sampleset = sampler.sample_cqm(
            cqm, x0={"a": 1, "b": 0, "c": 0, "d": 1}, label="demo"
        )
    assert sampleset.first.sample == {"a": 0, "b": 1, "c": 1, "d": 0}
    assert sampleset.first.energy == -2.0
    assert sampleset.info["problem_label"] == "demo"
    with pytest.raises(ProblemError, match="x0 must have exactly 1 ones in group 1"):
        BlockCQMSampler("native").sample_cqm(cqm, x0=[1, 0, 1, 1])


def test_sampler_refuses_other_cqms():
    cqm = _cqm(None, (lambda x: x[0] + x[1] + x[2] <= 1, "c"))
    with pytest.raises(ProblemError, match="'c' must be an equality"):
        BlockCQMSampler("native").sample_cqm(cqm)
