"""The D-Wave backends: the simulated QPU here, the cloud paths without network."""

import json
import math
import sys

import dimod
import numpy as np
import pytest

from icbs_opt.backends import available_backends, get_backend
from icbs_opt.backends.dwave import SIM_MAX_CLIQUE, SIM_TOPOLOGY, _explain
from icbs_opt.compare import compare
from icbs_opt.errors import BackendError, BackendUnavailable, ProblemTooLarge
from icbs_opt.problems import BlockProblem, random_problem
from icbs_opt.testing import exact_optimum


@pytest.fixture
def no_leap(monkeypatch, tmp_path):
    """No token anywhere: the variable unset, the config file an empty one."""
    monkeypatch.delenv("DWAVE_API_TOKEN", raising=False)
    empty = tmp_path / "dwave.conf"
    empty.write_text("")
    monkeypatch.setenv("DWAVE_CONFIG_FILE", str(empty))


# -------------------------------------------------------------- simulated QPU
def test_sim_reaches_the_exact_optimum_on_small_problems():
    # measured: 20 of 20 (n = 12, k = 3..8), raw reads feasible about a third
    backend = get_backend("dwave-sim", num_reads=20)
    hits, raw = 0, []
    for s in range(20):
        problem = random_problem(12, 3 + s % 6, seed=1000 + s)
        sol = backend.solve(problem, seed=s)
        assert sol.feasible
        hits += sol.energy == pytest.approx(exact_optimum(problem), abs=1e-9)
        raw.append(sol.info["raw_feasible_fraction"])
    assert hits >= 18
    assert 0 < np.mean(raw) < 1


def test_sim_reports_the_embedding():
    problem = random_problem(16, 2, seed=3, group_size=4)
    sol = get_backend("dwave-sim", num_reads=10).solve(problem, seed=1)
    info = sol.info
    assert sol.feasible and info["reads"] == 10 and info["embedding"] == "clique"
    assert info["qubits"] > problem.n and info["max_chain_length"] >= 2
    assert 0 <= info["chain_break_fraction"] <= 1
    assert info["penalty"] == pytest.approx(problem.default_penalty() / 16)
    assert info["chain_strength"] > 0 and info["qpu_access_time"] > 0


def test_sim_max_clique_is_the_topologys():
    from dwave.system.testing import MockDWaveSampler
    from minorminer.busclique import busgraph_cache

    topology, shape = SIM_TOPOLOGY
    graph = MockDWaveSampler(
        topology_type=topology, topology_shape=list(shape)
    ).to_networkx_graph()
    assert len(busgraph_cache(graph).largest_clique()) == SIM_MAX_CLIQUE
    with pytest.raises(ProblemTooLarge, match=f"at most n = {SIM_MAX_CLIQUE}"):
        get_backend("dwave-sim").solve(BlockProblem(np.eye(SIM_MAX_CLIQUE + 1), 1))


def test_sim_options_change_the_run():
    problem = random_problem(10, 4, seed=4)
    sol = get_backend(
        "dwave-sim", num_reads=5, penalty=2.5, chain_strength=7.0, num_sweeps=10
    ).solve(problem, seed=0)
    assert sol.feasible and sol.info["reads"] == 5
    assert sol.info["penalty"] == 2.5 and sol.info["chain_strength"] == 7.0


def test_given_embedding_from_a_json_file(tmp_path):
    from dwave.system.testing import MockDWaveSampler
    from minorminer.busclique import find_clique_embedding

    topology, shape = SIM_TOPOLOGY
    graph = MockDWaveSampler(
        topology_type=topology, topology_shape=list(shape)
    ).to_networkx_graph()
    chains = find_clique_embedding(8, graph)
    path = tmp_path / "embedding.json"
    path.write_text(json.dumps({str(v): list(c) for v, c in chains.items()}))
    backend = get_backend("dwave-sim", embedding=str(path), num_reads=20)
    assert backend.size_limit() == 8
    problem = random_problem(8, 3, seed=5)
    sol = backend.solve(problem, seed=2)
    assert sol.feasible and sol.info["embedding"] == "given"
    assert sol.info["qubits"] == sum(len(c) for c in chains.values())
    assert sol.energy == pytest.approx(exact_optimum(problem), abs=1e-9)
    small = random_problem(5, 2, seed=5)  # the first five chains serve
    assert backend.solve(small, seed=2).info["qubits"] == sum(
        len(chains[i]) for i in range(5)
    )
    with pytest.raises(ProblemTooLarge, match="at most n = 8"):
        backend.solve(random_problem(9, 3, seed=0))


def test_bad_embeddings_are_refused(tmp_path):
    with pytest.raises(BackendError, match="option 'embedding'.*JSON file"):
        get_backend("dwave-sim", embedding=str(tmp_path / "missing.json"))
    with pytest.raises(BackendError, match="chains for variables 0..1"):
        get_backend("dwave-sim", embedding={0: [1], 2: [3]})
    with pytest.raises(BackendError, match="chain of variable 0 must be a list"):
        get_backend("dwave-sim", embedding={0: []})
    apart = get_backend("dwave-sim", embedding={0: [0], 1: [5000]})
    with pytest.raises(BackendError, match="does not fit the QPU's graph"):
        apart.solve(random_problem(2, 1, seed=0))


def test_compare_runs_the_sim_beside_native():
    problems = {f"p{i}": random_problem(10, 5, seed=i) for i in range(2)}
    backends = {
        "native": get_backend("native"),
        "dwave-sim": get_backend("dwave-sim", num_reads=10),
    }
    result = compare(problems, backends, seed=0)
    sim = [r for r in result.runs if r.backend == "dwave-sim"]
    assert [r.status for r in sim] == ["ok", "ok"] and all(r.feasible for r in sim)
    assert all(r.raw_feasible_fraction is not None for r in sim)
    assert all(0 <= r.chain_break_fraction <= 1 for r in sim)
    rows = {row["backend"]: row for row in result.summary()}
    assert rows["native"]["chain_break_fraction"] is None
    assert rows["dwave-sim"]["chain_break_fraction"] is not None


# -------------------------------------------------------------------- hybrid
def test_hybrid_decodes_the_best_feasible_sample_of_a_cqm_sampler():
    problem = random_problem(8, 3, seed=6, group_size=4)
    backend = get_backend("dwave-hybrid", sampler=dimod.ExactCQMSolver())
    sol = backend.solve(problem)
    assert sol.energy == pytest.approx(exact_optimum(problem), abs=1e-12)
    assert sol.info["samples"] == 2**8 and not sol.info["repaired"]
    assert sol.info["raw_feasible_fraction"] == math.comb(4, 3) ** 2 / 2**8
    assert not backend.portable


# ------------------------------------------------- cloud paths, no network
@pytest.mark.parametrize("name", ["dwave-hybrid", "dwave-qpu"])
def test_cloud_backends_need_a_token(name, no_leap):
    with pytest.raises(BackendUnavailable, match="no D-Wave Leap API token found"):
        get_backend(name)
    assert "dwave setup" in available_backends()[name]
    assert available_backends()["dwave-sim"] is None


def test_unreadable_config_file_is_one_sentence(monkeypatch, tmp_path):
    monkeypatch.delenv("DWAVE_API_TOKEN", raising=False)
    monkeypatch.setenv("DWAVE_CONFIG_FILE", str(tmp_path / "missing.conf"))
    with pytest.raises(BackendUnavailable, match="cannot read the D-Wave config") as e:
        get_backend("dwave-hybrid")
    assert "\n" not in str(e.value) and "DWAVE_API_TOKEN" in str(e.value)


def test_a_token_makes_the_cloud_backends_available(no_leap, monkeypatch):
    monkeypatch.setenv("DWAVE_API_TOKEN", "DEV-not-a-real-token")
    reasons = available_backends()  # offline: nothing is contacted
    assert reasons["dwave-hybrid"] is None and reasons["dwave-qpu"] is None


def test_missing_extra_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "minorminer", None)
    for name in ("dwave-sim", "dwave-qpu", "dwave-hybrid"):
        with pytest.raises(
            BackendUnavailable, match=r"pip install 'icbs-opt\[dwave\]'"
        ):
            get_backend(name)


def test_cloud_errors_become_one_sentence():
    from dwave.cloud import exceptions as cloud

    text = _explain(cloud.SolverAuthenticationError("bad token"), "the QPU")
    assert text.startswith("Leap refused the API token for the QPU")
    assert "offline?" in _explain(ConnectionError("no route"), "the QPU")
    assert "'dwave solvers'" in _explain(cloud.SolverNotFoundError("x"), "the QPU")
