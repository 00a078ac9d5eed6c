"""QAOA circuits and the two Amazon Braket backends (no network: LocalSimulator)."""

import itertools
import math

import numpy as np
import pytest

pytest.importorskip("braket.devices")

from botocore.exceptions import (  # noqa: E402
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
)
from braket.circuits import Circuit  # noqa: E402
from braket.device_schema import DeviceActionType  # noqa: E402
from braket.devices import LocalSimulator  # noqa: E402

from icbs_opt.backends import get_backend  # noqa: E402
from icbs_opt.backends.braket import (  # noqa: E402
    BraketBackend,
    _direct_probabilities,
    _explain,
)
from icbs_opt.backends.qaoa import (  # noqa: E402
    Ansatz,
    SampleTally,
    dicke_product,
    dicke_state,
    group_mixer_edges,
    linear_ramp,
    mixer_edges,
)
from icbs_opt.errors import BackendError, BackendUnavailable, ProblemTooLarge  # noqa: E402
from icbs_opt.problems import BlockProblem, random_problem  # noqa: E402
from icbs_opt.testing import exact_optimum  # noqa: E402

FAST = {"p": 1, "maxiter": 6, "shots": 500}


def statevector(circ: Circuit) -> np.ndarray:
    """Amplitudes from Braket's LocalSimulator (qubit 0 most significant)."""
    task = LocalSimulator("braket_sv").run(Circuit().add_circuit(circ).state_vector())
    return np.asarray(task.result().values[0])


def weights(n: int) -> np.ndarray:
    return np.array([bin(i).count("1") for i in range(2**n)])


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


def test_direct_engine_matches_local_simulator():
    problem = random_problem(6, 3, seed=2)
    circ = Ansatz(problem, p=2, mixer="xy").circuit(linear_ramp(2))
    sim = LocalSimulator("braket_sv").run(circ.probability(), shots=0)
    np.testing.assert_allclose(
        _direct_probabilities(circ, 6), sim.result().values[0], atol=1e-12
    )


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


# ------------------------------------------------------------- braket-local
def test_every_xy_sample_is_feasible_and_n8_exact():
    backend = get_backend("braket-local", **FAST)
    for seed in range(3):
        problem = random_problem(8, 3 + seed, seed=10 + seed)
        sol = backend.solve(problem, seed=seed)
        assert sol.info["raw_feasible_fraction"] == 1.0
        assert sol.energy == pytest.approx(exact_optimum(problem), abs=1e-12)
        assert sol.info["evaluations"] == len(sol.info["history"]) <= 7
        assert sol.info["shots"] == 500 * sol.info["evaluations"]
        assert sol.info["depth"] > 0 and sol.info["gate_counts"]["xy"] == 8


def test_x_mixer_returns_repaired_feasible_answers():
    backend = get_backend(
        "braket-local", mixer="x", penalty=0.0, p=1, maxiter=3, shots=4
    )
    problem = random_problem(8, 1, seed=3)
    sol = backend.solve(problem, seed=0)  # some raw samples feasible: the best kept
    assert sol.feasible and not sol.info["repaired"]
    assert 0.0 < sol.info["raw_feasible_fraction"] < 1.0
    assert sol.info["best_raw_energy"] == sol.energy
    sol = backend.solve(problem, seed=2)  # no raw sample feasible: repaired
    assert sol.feasible and sol.info["repaired"]
    assert sol.info["raw_feasible_fraction"] == 0.0
    assert sol.info["best_raw_energy"] is None


def test_engines_agree():
    problem = random_problem(6, 3, seed=8)
    sols = [
        get_backend("braket-local", engine=e, **FAST).solve(problem, seed=5)
        for e in ("direct", "device")
    ]
    assert sols[0].x.tolist() == sols[1].x.tolist()
    np.testing.assert_allclose(sols[0].info["history"], sols[1].info["history"])


def test_local_size_limit_suggests_block_size():
    backend = get_backend("braket-local")
    assert backend.size_limit() == 16
    with pytest.raises(ProblemTooLarge, match=r"--block-size 16"):
        backend.solve(BlockProblem(np.eye(17), 8))


def test_initial_angles_option():
    backend = get_backend("braket-local", p=1, maxiter=2, initial_angles="0.2,0.4")
    assert backend.parameters["initial_angles"] == (0.2, 0.4)
    assert backend.solve(random_problem(5, seed=0), seed=0).feasible
    with pytest.raises(BackendError, match="needs 2p = 4 values, got 3"):
        get_backend("braket-local", p=2, initial_angles="0.1,0.2,0.3")


@pytest.mark.parametrize("name", ["braket-local", "braket"])
@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"shots": 10**23}, r"option 'shots' must be an integer in \[1, 2147483647\]"),
        ({"shots": "1e23"}, r"option 'shots' .*got '1e23'"),
        ({"maxiter": True}, r"option 'maxiter' must be an integer .*got True"),
        ({"p": 5000}, r"option 'p' must be an integer in \[1, 1000\], got 5000"),
        ({"p": 2.0}, r"option 'p' .*got 2.0"),
        ({"penalty": float("nan")}, r"option 'penalty' must be a finite .*got nan"),
        ({"penalty": "-1"}, r"option 'penalty' must be a finite number >= 0"),
        ({"initial_angles": "0.1,inf"}, r"'initial_angles' value 2 .*got 'inf'"),
        ({"initial_angles": 3}, r"'initial_angles' must be 'ramp' or 2p numbers"),
        ({"mixer": True}, r"option 'mixer' .*got True: expected one of 'xy', 'x'"),
    ],
)
def test_bad_qaoa_options(name, options, match):
    device = {"device": LocalSimulator()} if name == "braket" else {}
    with pytest.raises(BackendError, match=match):
        get_backend(name, **device, **options)


def test_none_means_the_default():
    backend = get_backend("braket-local", shots=None, p=None, penalty=None)
    assert backend.parameters["shots"] == 1000 and backend.parameters["p"] == 2
    assert backend.parameters["penalty"] is None


# ---------------------------------------------------------- braket (cloud)
class _Device(LocalSimulator):
    """A LocalSimulator reporting another status or gate list (device seam)."""

    def __init__(self, *, status="AVAILABLE", gates=None, backend="braket_sv"):
        super().__init__(backend)
        self._fake_status, self._gates = status, gates

    @property
    def status(self):
        return self._fake_status

    @property
    def properties(self):
        props = super().properties
        if self._gates is not None:
            props = props.copy(deep=True)  # schemas use the pydantic v1 API
            props.action[DeviceActionType.OPENQASM].supportedOperations = self._gates
        return props


def test_cloud_path_on_local_simulator():
    backend = get_backend("braket", device=LocalSimulator(), **FAST)
    problem = random_problem(6, 3, seed=1)
    sol = backend.solve(problem, seed=0)
    assert sol.energy == pytest.approx(exact_optimum(problem), abs=1e-12)
    info = sol.info
    assert info["gate_set"] == "compact" and info["device"] == "LocalSimulator"
    assert len(info["task_ids"]) == info["evaluations"]
    assert info["tracker"]["estimated_cost_usd"] == 0.0  # local tasks cost nothing
    assert info["raw_feasible_fraction"] == 1.0


def test_cloud_basic_gate_set_when_device_lacks_xy():
    device = _Device(gates=["x", "h", "rx", "ry", "rz", "cnot"])
    backend = get_backend("braket", device=device, **FAST)
    problem = random_problem(5, 2, seed=6)
    sol = backend.solve(problem, seed=0)
    assert sol.info["gate_set"] == "basic"
    assert set(sol.info["gate_counts"]) <= {"x", "h", "rx", "ry", "rz", "cnot"} | {
        "total",
        "two_qubit",
    }
    assert sol.energy == pytest.approx(exact_optimum(problem), abs=1e-12)


@pytest.mark.parametrize(
    ("device", "n", "message"),
    [
        (_Device(status="OFFLINE"), 4, "is OFFLINE, not ONLINE"),
        (_Device(backend="braket_dm"), 14, r"needs n = 14 qubits .*--block-size 13"),
        (_Device(gates=["x", "h", "rz"]), 4, "lacks the gates cnot, rx, ry"),
    ],
)
def test_cloud_device_failures(device, n, message):
    backend = get_backend("braket", device=device, **FAST)
    with pytest.raises(BackendUnavailable, match=message):
        backend.solve(random_problem(n, seed=0), seed=0)


def test_cloud_failed_task():
    class FailedTask:
        id = "task-1"

        def result(self):
            return None

        def state(self):
            return "FAILED"

        def metadata(self):
            return {"failureReason": {"message": "circuit too deep"}}

    class FailingDevice(LocalSimulator):
        def run(self, *args, **kwargs):
            return FailedTask()

    backend = get_backend("braket", device=FailingDevice(), **FAST)
    with pytest.raises(BackendUnavailable, match="ended FAILED: circuit too deep"):
        backend.solve(random_problem(4, seed=0), seed=0)


@pytest.fixture
def no_aws(monkeypatch, tmp_path):
    """An environment with no AWS configuration at all."""
    for var in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    return monkeypatch


SV1 = "arn:aws:braket:::device/quantum-simulator/amazon/sv1"
FORTE = "arn:aws:braket:us-east-1::device/qpu/ionq/Forte-1"


def test_cloud_unavailable_reasons(no_aws):
    reason = BraketBackend().unavailable_reason()
    assert "no device ARN configured; pass --backend-option device_arn=ARN" in reason
    assert "no AWS region" in BraketBackend(device_arn=SV1).unavailable_reason()
    no_aws.setenv("AWS_DEFAULT_REGION", "us-east-1")
    reason = BraketBackend(device_arn=SV1).unavailable_reason()
    assert reason.startswith("no AWS credentials found")
    with pytest.raises(BackendUnavailable, match="no AWS credentials found"):
        get_backend("braket", device_arn=FORTE)
    no_aws.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    no_aws.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    assert BraketBackend(device_arn=FORTE).unavailable_reason() is None


def test_cloud_rejects_malformed_arn():
    with pytest.raises(BackendError, match="option 'device_arn' .* got 'sv1'"):
        get_backend("braket", device_arn="sv1")
    with pytest.raises(BackendError, match="option 'device_arn' .* got 5: expected"):
        get_backend("braket", device_arn=5)


def test_compare_suggests_its_own_option_syntax(no_aws, tmp_path, capsys):
    from icbs_opt.cli import main

    random_problem(4, 2, seed=0).save(tmp_path / "p.npz")
    argv = ["compare", "--problems", str(tmp_path), "--backends", "exhaustive,braket"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "pass --backend-option braket.device_arn=ARN" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    ("exc", "message"),
    [
        (
            ClientError(
                {"Error": {"Code": "AccessDeniedException", "Message": "nope"}},
                "GetDevice",
            ),
            "access to device X was denied",
        ),
        (
            ClientError(
                {"Error": {"Code": "ResourceNotFoundException", "Message": "?"}},
                "GetDevice",
            ),
            "device X is unknown to Amazon Braket",
        ),
        (ValueError("QPU 'X' not found"), "device X is unknown to Amazon Braket"),
        (NoCredentialsError(), "no AWS credentials found"),
        (EndpointConnectionError(endpoint_url="https://x"), "cannot reach Amazon"),
    ],
)
def test_cloud_error_messages(exc, message):
    assert _explain(exc, "X").startswith(message)


# ----------------------------------------------------------- grouped problems
#: Group ids per variable and ones per group: consecutive groups of 2, 3 and 4,
#: interleaved (non-contiguous) groups, and groups of size one.
GROUPINGS = [
    ([0, 0, 1, 1, 2, 2], [1, 1, 1]),
    ([0, 0, 0, 1, 1, 1], [1, 2]),
    ([0, 0, 0, 0, 1, 1, 1, 1], [2, 2]),
    ([0, 1, 2, 0, 1, 2, 0, 1], [1, 2, 2]),
    ([0, 0, 1, 1, 1, 1, 2, 3], [1, 2, 0, 1]),
]


def grouped(groups, counts, seed=0):
    """A seeded random grouped problem."""
    Q = random_problem(len(groups), seed=seed).Q
    return BlockProblem(Q, counts, groups=groups)


def index_bits(n: int) -> np.ndarray:
    """``(2^n, n)`` bits of every basis index (qubit 0 most significant)."""
    return (np.arange(2**n)[:, None] >> np.arange(n - 1, -1, -1)) & 1


def per_group_feasible(problem, bits: np.ndarray) -> np.ndarray:
    """Whether each row of ``bits`` has the right number of ones in every group."""
    groups = np.asarray(problem.groups)
    ones = np.stack(
        [bits[:, groups == g].sum(axis=1) for g in range(len(problem.group_counts))],
        axis=1,
    )
    return (ones == np.asarray(problem.group_counts)).all(axis=1)


def brute_force(problem) -> float:
    """The optimum over every x feasible in every group, by enumeration."""
    return min(
        problem.energy(np.array(x))
        for x in itertools.product((0, 1), repeat=problem.n)
        if problem.is_feasible(np.array(x))
    )


def group_of_qubit(problem) -> dict[int, int]:
    return {q: int(g) for q, g in enumerate(problem.groups)}


@pytest.mark.parametrize(("groups", "counts"), GROUPINGS)
def test_dicke_product_is_uniform_on_per_group_strings(groups, counts):
    problem = grouped(groups, counts)
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
    problem = grouped([0, 1, 2, 0, 1, 2, 0, 1], [1, 2, 2], seed=3)
    ansatz = Ansatz(problem, p=2, mixer="xy", graph=graph, gate_set=gate_set)
    angles = np.random.default_rng(0).uniform(-2, 2, size=4)
    probs = np.abs(statevector(ansatz.circuit(angles))) ** 2
    feasible = per_group_feasible(problem, index_bits(problem.n))
    assert probs[~feasible].sum() < 1e-12
    assert probs.sum() == pytest.approx(1.0)
    assert np.ptp(probs[feasible]) > 1e-3  # the angles did something


@pytest.mark.parametrize("graph", ["ring", "complete"])
def test_grouped_circuit_has_no_xy_gate_across_groups(graph):
    problem = grouped([0, 0, 1, 1, 1, 1, 2, 3], [1, 2, 0, 1], seed=1)
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
    problem = grouped([0, 0, 1, 1, 1, 2, 2, 2], [1, 0, 3], seed=2)
    circ = Ansatz(problem, p=1, mixer="xy").circuit(linear_ramp(1))
    hops = [ins.target for ins in circ.instructions if ins.operator.name == "XY"]
    assert [[int(q) for q in t] for t in hops] == [[0, 1]]
    probs = np.abs(statevector(circ)) ** 2
    assert probs[per_group_feasible(problem, index_bits(8))].sum() == pytest.approx(1)


def test_x_ansatz_uses_the_per_group_penalty():
    problem = grouped([0, 0, 1, 1, 1], [1, 2], seed=4)
    ansatz = Ansatz(problem, p=1, mixer="x", penalty=2.5)
    h, J, _ = problem.to_ising(2.5)
    np.testing.assert_allclose(ansatz._h * ansatz.scale, h)
    np.testing.assert_allclose(ansatz._J * ansatz.scale, J)


def test_tally_checks_feasibility_per_group():
    problem = grouped([0, 0, 1, 1], [1, 1], seed=0)
    tally = SampleTally(problem, penalty=1.5)
    bits = np.array([[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 0, 1]])
    np.testing.assert_array_equal(tally.violation(bits), [2, 2, 0])
    mean = tally.add(bits[:2])  # each has the total count 2 but is infeasible
    energies = [problem.energy(x) for x in bits[:2]]
    assert mean == pytest.approx(np.mean(energies) + 1.5 * 2)
    assert tally.feasible_shots == 0 and tally.shots == 2
    x, repaired = tally.answer()
    assert repaired and problem.is_feasible(x)


def record_samples(backend, method: str, samples: list) -> None:
    """Keep every ``(shots, n)`` sample array that ``backend.method`` returns."""
    inner = getattr(backend, method)

    def wrapped(*args, **kwargs):
        bits = inner(*args, **kwargs)
        samples.append(bits)
        return bits

    setattr(backend, method, wrapped)


@pytest.mark.parametrize(("groups", "counts"), GROUPINGS)
def test_grouped_xy_samples_all_feasible_and_exact(groups, counts):
    problem = grouped(groups, counts, seed=len(counts))
    backend = get_backend("braket-local", **FAST)
    samples: list = []
    record_samples(backend, "_sample", samples)
    sol = backend.solve(problem, seed=0)
    assert sol.energy == pytest.approx(brute_force(problem), abs=1e-12)
    assert problem.is_feasible(sol.x)
    assert len(samples) == sol.info["evaluations"]
    bits = np.concatenate(samples)
    assert bits.shape == (500 * sol.info["evaluations"], problem.n)
    assert per_group_feasible(problem, bits).all()
    assert sol.info["raw_feasible_fraction"] == 1.0
    assert sol.info["groups"] == len(counts)


def test_grouped_engines_agree():
    problem = grouped([0, 1, 2, 0, 1, 2], [1, 1, 1], seed=6)
    sols = [
        get_backend("braket-local", engine=e, **FAST).solve(problem, seed=2)
        for e in ("direct", "device")
    ]
    assert sols[0].x.tolist() == sols[1].x.tolist()
    np.testing.assert_allclose(sols[0].info["history"], sols[1].info["history"])


def test_grouped_x_mixer_repairs_per_group():
    problem = grouped([0, 0, 0, 0, 1, 1, 1, 1], [1, 3], seed=5)
    backend = get_backend("braket-local", mixer="x", p=1, maxiter=3, shots=50)
    sol = backend.solve(problem, seed=0)
    assert problem.is_feasible(sol.x)
    assert sol.energy == pytest.approx(problem.energy(sol.x))
    assert 0.0 < sol.info["raw_feasible_fraction"] < 1.0
    assert sol.info["penalty"] == problem.default_penalty()
    assert "xy" not in sol.info["gate_counts"]


def test_grouped_x_mixer_finds_the_optimum_with_enough_shots():
    problem = grouped([0, 0, 1, 1, 2, 2], [1, 1, 1], seed=7)
    sol = get_backend("braket-local", mixer="x", **FAST).solve(problem, seed=1)
    assert sol.energy == pytest.approx(brute_force(problem), abs=1e-12)


@pytest.mark.parametrize("name", ["braket-local", "braket"])
def test_grouped_single_feasible_point_runs_nothing(name):
    device = {"device": LocalSimulator()} if name == "braket" else {}
    problem = grouped([0, 1, 0, 1, 2], [0, 2, 1])
    sol = get_backend(name, **device, **FAST).solve(problem, seed=0)
    assert sol.x.tolist() == [0, 1, 0, 1, 1]
    assert sol.info["evaluations"] == 0


def test_grouped_cloud_path_on_local_simulator():
    problem = grouped([0, 0, 0, 1, 1, 1], [1, 2], seed=9)
    backend = get_backend("braket", device=LocalSimulator(), **FAST)
    samples: list = []
    record_samples(backend, "_run_task", samples)
    sol = backend.solve(problem, seed=0)
    assert sol.energy == pytest.approx(brute_force(problem), abs=1e-12)
    assert per_group_feasible(problem, np.concatenate(samples)).all()
    assert len(sol.info["task_ids"]) == sol.info["evaluations"] == len(samples)
    assert sol.info["raw_feasible_fraction"] == 1.0
