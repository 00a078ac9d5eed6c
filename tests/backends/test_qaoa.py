"""QAOA circuits: Dicke states, XY mixers within groups, the sample tally
(amplitudes from Braket's LocalSimulator, no network)."""

import math

import numpy as np
import pytest

pytest.importorskip("braket.devices")

from braket.circuits import Circuit  # noqa: E402
from braket.devices import LocalSimulator  # noqa: E402

from icbs_opt.backends.qaoa import (  # noqa: E402
    Ansatz,
    SampleTally,
    dicke_product,
    dicke_state,
    group_mixer_edges,
    linear_ramp,
    mixer_edges,
)
from icbs_opt.problems import random_problem  # noqa: E402
from tests.tiny import GROUPINGS, grouped_problem, per_group_feasible  # noqa: E402


def statevector(circ: Circuit) -> np.ndarray:
    """Amplitudes from Braket's LocalSimulator (qubit 0 most significant)."""
    task = LocalSimulator("braket_sv").run(Circuit().add_circuit(circ).state_vector())
    return np.asarray(task.result().values[0])


def weights(n: int) -> np.ndarray:
    return np.array([bin(i).count("1") for i in range(2**n)])


def index_bits(n: int) -> np.ndarray:
    """``(2^n, n)`` bits of every basis index (qubit 0 most significant)."""
    return (np.arange(2**n)[:, None] >> np.arange(n - 1, -1, -1)) & 1


def group_of_qubit(problem) -> dict[int, int]:
    return {q: int(g) for q, g in enumerate(problem.groups)}


# ------------------------------------------------------------------ circuits
@pytest.mark.parametrize("n", range(1, 7))
def test_dicke_state_is_uniform_on_weight_k(n):
    for k in range(n + 1):
        amp = statevector(dicke_state(n, k))
        expected = (weights(n) == k) / math.sqrt(math.comb(n, k))
        np.testing.assert_allclose(amp, expected, atol=1e-9, err_msg=f"n={n} k={k}")


def test_dicke_state_rejects_bad_k():
    with pytest.raises(ValueError, match="got n=3, k=4"):
        dicke_state(3, 4)


@pytest.mark.parametrize("graph", ["ring", "complete"])
@pytest.mark.parametrize("gate_set", ["compact", "basic"])
def test_xy_ansatz_preserves_hamming_weight(graph, gate_set):
    problem = random_problem(6, 2, seed=1)
    ansatz = Ansatz(problem, p=2, mixer="xy", graph=graph, gate_set=gate_set)
    angles = np.random.default_rng(0).uniform(-2, 2, size=4)
    probs = np.abs(statevector(ansatz.circuit(angles))) ** 2
    assert probs[weights(6) != 2].sum() < 1e-12
    assert probs.sum() == pytest.approx(1.0)
    assert np.ptp(probs[weights(6) == 2]) > 1e-3  # the angles did something


@pytest.mark.parametrize("mixer", ["xy", "x"])
def test_gate_sets_prepare_the_same_state(mixer):
    problem = random_problem(5, 2, seed=4)
    angles = np.array([0.3, -0.7, 0.5, 0.9])
    states = [
        statevector(Ansatz(problem, p=2, mixer=mixer, gate_set=g).circuit(angles))
        for g in ("compact", "basic")
    ]
    overlap = abs(np.vdot(states[0], states[1]))
    assert overlap == pytest.approx(1.0, abs=1e-9)


def test_mixer_edges():
    assert mixer_edges(4, "ring") == [(0, 1), (2, 3), (1, 2), (3, 0)]
    assert len(mixer_edges(5, "complete")) == 10
    assert mixer_edges(1, "ring") == []
    with pytest.raises(ValueError, match="got 'star'"):
        mixer_edges(4, "star")


def test_tally_repairs_infeasible_samples():
    problem = random_problem(6, 3, seed=0)
    tally = SampleTally(problem, penalty=1.0)
    tally.add(np.array([[1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 1]]))
    x, repaired = tally.answer()
    assert repaired and problem.is_feasible(x)
    assert tally.feasible_shots == 0 and tally.shots == 2


# ------------------------------------------------------------------ grouped
@pytest.mark.parametrize(("groups", "counts"), GROUPINGS)
def test_dicke_product_is_uniform_on_per_group_strings(groups, counts):
    problem = grouped_problem(groups, counts)
    members = [
        np.flatnonzero(np.array(groups) == g).tolist() for g in range(len(counts))
    ]
    amp = statevector(dicke_product(members, counts))
    feasible = per_group_feasible(problem, index_bits(problem.n))
    expected = feasible / math.sqrt(feasible.sum())
    np.testing.assert_allclose(amp, expected, atol=1e-9)


def test_dicke_product_of_one_group_is_the_dicke_state():
    for n, k in [(5, 2), (6, 3), (4, 0), (3, 3)]:
        assert str(dicke_product([list(range(n))], [k])) == str(dicke_state(n, k))


@pytest.mark.parametrize(
    ("groups", "counts", "match"),
    [
        ([[0, 1], [1, 2]], [1, 1], r"exactly once, got \[\[0, 1\], \[1, 2\]\]"),
        ([[0, 2]], [1], r"exactly once, got \[\[0, 2\]\]"),
        ([[0, 1], []], [1, 0], "non-empty"),
        ([[0, 1], [2]], [1], r"one entry per group \(2\), got 1"),
        ([[0, 1], [2]], [1, 2], r"count of group 1 must be in 0..1, got 2"),
    ],
)
def test_dicke_product_rejects_bad_groups(groups, counts, match):
    with pytest.raises(ValueError, match=match):
        dicke_product(groups, counts)


def test_group_mixer_edges():
    edges = group_mixer_edges([[0, 2, 4], [1, 3], [5]], "ring")
    assert edges == [(0, 2), (4, 0), (2, 4), (1, 3)]
    complete = group_mixer_edges([[0, 1, 2, 3], [4, 5, 6]], "complete")
    assert len(complete) == 6 + 3
    assert all((a < 4) == (b < 4) for a, b in complete)
    assert group_mixer_edges([[0], [1], [2]], "ring") == []
    with pytest.raises(ValueError, match="got 'star'"):
        group_mixer_edges([[0, 1]], "star")


@pytest.mark.parametrize("graph", ["ring", "complete"])
@pytest.mark.parametrize("gate_set", ["compact", "basic"])
def test_grouped_xy_ansatz_keeps_every_group_count(graph, gate_set):
    problem = grouped_problem([0, 1, 2, 0, 1, 2, 0, 1], [1, 2, 2], seed=3)
    ansatz = Ansatz(problem, p=2, mixer="xy", graph=graph, gate_set=gate_set)
    angles = np.random.default_rng(0).uniform(-2, 2, size=4)
    probs = np.abs(statevector(ansatz.circuit(angles))) ** 2
    feasible = per_group_feasible(problem, index_bits(problem.n))
    assert probs[~feasible].sum() < 1e-12
    assert probs.sum() == pytest.approx(1.0)
    assert np.ptp(probs[feasible]) > 1e-3  # the angles did something


@pytest.mark.parametrize("graph", ["ring", "complete"])
def test_grouped_circuit_has_no_xy_gate_across_groups(graph):
    problem = grouped_problem([0, 0, 1, 1, 1, 1, 2, 3], [1, 2, 0, 1], seed=1)
    circ = Ansatz(problem, p=2, mixer="xy", graph=graph).circuit(linear_ramp(2))
    group = group_of_qubit(problem)
    hops = [
        [int(q) for q in ins.target]
        for ins in circ.instructions
        if ins.operator.name == "XY"
    ]
    assert all(group[a] == group[b] for a, b in hops)
    # groups 2 and 3 have one qubit, group 0 two (one edge, both graphs)
    per_layer = 1 + (4 if graph == "ring" else 6)
    assert len(hops) == 2 * per_layer


def test_grouped_fixed_groups_get_no_edges():
    problem = grouped_problem([0, 0, 1, 1, 1, 2, 2, 2], [1, 0, 3], seed=2)
    circ = Ansatz(problem, p=1, mixer="xy").circuit(linear_ramp(1))
    hops = [ins.target for ins in circ.instructions if ins.operator.name == "XY"]
    assert [[int(q) for q in t] for t in hops] == [[0, 1]]
    probs = np.abs(statevector(circ)) ** 2
    assert probs[per_group_feasible(problem, index_bits(8))].sum() == pytest.approx(1)


def test_x_ansatz_uses_the_per_group_penalty():
    problem = grouped_problem([0, 0, 1, 1, 1], [1, 2], seed=4)
    ansatz = Ansatz(problem, p=1, mixer="x", penalty=2.5)
    h, J, _ = problem.to_ising(2.5)
    np.testing.assert_allclose(ansatz._h * ansatz.scale, h)
    np.testing.assert_allclose(ansatz._J * ansatz.scale, J)


def test_tally_checks_feasibility_per_group():
    problem = grouped_problem([0, 0, 1, 1], [1, 1], seed=0)
    tally = SampleTally(problem, penalty=1.5)
    bits = np.array([[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 0, 1]])
    np.testing.assert_array_equal(tally.violation(bits), [2, 2, 0])
    mean = tally.add(bits[:2])  # each has the total count 2 but is infeasible
    energies = [problem.energy(x) for x in bits[:2]]
    assert mean == pytest.approx(np.mean(energies) + 1.5 * 2)
    assert tally.feasible_shots == 0 and tally.shots == 2
    x, repaired = tally.answer()
    assert repaired and problem.is_feasible(x)
