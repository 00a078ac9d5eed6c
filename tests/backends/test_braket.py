"""The two Amazon Braket backends (no network: LocalSimulator); the QAOA circuits
are tested in test_qaoa.py."""

import numpy as np
import pytest

pytest.importorskip("braket.devices")

from botocore.exceptions import (  # noqa: E402
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
)
from braket.device_schema import DeviceActionType  # noqa: E402
from braket.devices import LocalSimulator  # noqa: E402

from icbs_opt.backends import get_backend  # noqa: E402
from icbs_opt.backends.braket import (  # noqa: E402
    BraketBackend,
    _direct_probabilities,
    _explain,
)
from icbs_opt.backends.qaoa import Ansatz, linear_ramp  # noqa: E402
from icbs_opt.errors import BackendError, BackendUnavailable, ProblemTooLarge  # noqa: E402
from icbs_opt.problems import BlockProblem, random_problem  # noqa: E402
from icbs_opt.testing import exact_optimum  # noqa: E402
from tests.tiny import (  # noqa: E402
    FAST_OPTIONS,
    GROUPINGS,
    grouped_problem,
    per_group_feasible,
)

FAST = FAST_OPTIONS["braket-local"]


# ------------------------------------------------------------- braket-local
def test_direct_engine_matches_local_simulator():
    problem = random_problem(6, 3, seed=2)
    circ = Ansatz(problem, p=2, mixer="xy").circuit(linear_ramp(2))
    sim = LocalSimulator("braket_sv").run(circ.probability(), shots=0)
    np.testing.assert_allclose(
        _direct_probabilities(circ, 6), sim.result().values[0], atol=1e-12
    )


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
    problem = grouped_problem(groups, counts, seed=len(counts))
    backend = get_backend("braket-local", **FAST)
    samples: list = []
    record_samples(backend, "_sample", samples)
    sol = backend.solve(problem, seed=0)
    assert sol.energy == pytest.approx(exact_optimum(problem), abs=1e-12)
    assert problem.is_feasible(sol.x)
    assert len(samples) == sol.info["evaluations"]
    bits = np.concatenate(samples)
    assert bits.shape == (500 * sol.info["evaluations"], problem.n)
    assert per_group_feasible(problem, bits).all()
    assert sol.info["raw_feasible_fraction"] == 1.0
    assert sol.info["groups"] == len(counts)


def test_grouped_engines_agree():
    problem = grouped_problem([0, 1, 2, 0, 1, 2], [1, 1, 1], seed=6)
    sols = [
        get_backend("braket-local", engine=e, **FAST).solve(problem, seed=2)
        for e in ("direct", "device")
    ]
    assert sols[0].x.tolist() == sols[1].x.tolist()
    np.testing.assert_allclose(sols[0].info["history"], sols[1].info["history"])


def test_grouped_x_mixer_repairs_per_group():
    problem = grouped_problem([0, 0, 0, 0, 1, 1, 1, 1], [1, 3], seed=5)
    backend = get_backend("braket-local", mixer="x", p=1, maxiter=3, shots=50)
    sol = backend.solve(problem, seed=0)
    assert problem.is_feasible(sol.x)
    assert sol.energy == pytest.approx(problem.energy(sol.x))
    assert 0.0 < sol.info["raw_feasible_fraction"] < 1.0
    assert sol.info["penalty"] == problem.default_penalty()
    assert "xy" not in sol.info["gate_counts"]


def test_grouped_x_mixer_finds_the_optimum_with_enough_shots():
    problem = grouped_problem([0, 0, 1, 1, 2, 2], [1, 1, 1], seed=7)
    sol = get_backend("braket-local", mixer="x", **FAST).solve(problem, seed=1)
    assert sol.energy == pytest.approx(exact_optimum(problem), abs=1e-12)


@pytest.mark.parametrize("name", ["braket-local", "braket"])
def test_grouped_single_feasible_point_runs_nothing(name):
    device = {"device": LocalSimulator()} if name == "braket" else {}
    problem = grouped_problem([0, 1, 0, 1, 2], [0, 2, 1])
    sol = get_backend(name, **device, **FAST).solve(problem, seed=0)
    assert sol.x.tolist() == [0, 1, 0, 1, 1]
    assert sol.info["evaluations"] == 0


def test_grouped_cloud_path_on_local_simulator():
    problem = grouped_problem([0, 0, 0, 1, 1, 1], [1, 2], seed=9)
    backend = get_backend("braket", device=LocalSimulator(), **FAST)
    samples: list = []
    record_samples(backend, "_run_task", samples)
    sol = backend.solve(problem, seed=0)
    assert sol.energy == pytest.approx(exact_optimum(problem), abs=1e-12)
    assert per_group_feasible(problem, np.concatenate(samples)).all()
    assert len(sol.info["task_ids"]) == sol.info["evaluations"] == len(samples)
    assert sol.info["raw_feasible_fraction"] == 1.0
