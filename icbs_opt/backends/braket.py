"""QAOA on Amazon Braket: ``braket-local`` (local statevector) and ``braket`` (by ARN).

Both backends build the circuits of :mod:`icbs_opt.backends.qaoa` with the Braket
SDK, optimise the angles with scipy and return the best feasible sample seen over
all evaluations. The SDK is imported inside methods, so importing icbs_opt never
needs it (``pip install "icbs-opt[braket]"``).
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from icbs_opt.backends.base import (
    C_INT_MAX,
    Backend,
    Option,
    choice_option,
    float_option,
    int_option,
)
from icbs_opt.checks import check_float
from icbs_opt.errors import BackendError, BackendUnavailable
from icbs_opt.problems import BlockProblem

if TYPE_CHECKING:  # qaoa imports the Braket SDK, which stays optional
    from icbs_opt.backends.qaoa import AngleSearch, Ansatz, SampleTally

logger = logging.getLogger(__name__)

_INSTALL = "the Amazon Braket SDK is not installed; run: pip install 'icbs-opt[braket]'"
#: Braket gate names -> classes of braket.default_simulator.gate_operations.
_SIM_OPERATIONS = {
    "X": "PauliX",
    "H": "Hadamard",
    "Rx": "RotX",
    "Ry": "RotY",
    "Rz": "RotZ",
    "CNot": "CX",
    "XY": "XY",
    "ZZ": "ZZ",
}
#: Most QAOA layers: each adds O(n^2) gates, and no device keeps coherence so long.
MAX_LAYERS = 1000
#: Device states in which tasks run (AwsDevice says ONLINE, LocalSimulator AVAILABLE).
_RUNNING_STATES = ("ONLINE", "AVAILABLE")


def _parse_angles(value: Any) -> str | tuple[float, ...]:
    if isinstance(value, str) and value.strip() == "ramp":
        return "ramp"
    parts = value.split(",") if isinstance(value, str) else value
    if not isinstance(parts, (list, tuple, np.ndarray)) or len(parts) == 0:
        raise BackendError(
            "option 'initial_angles' must be 'ramp' or 2p numbers "
            f"'g1,..,gp,b1,..,bp', got {value!r}"
        )
    return tuple(
        check_float(v, f"option 'initial_angles' value {i + 1}", error=BackendError)
        for i, v in enumerate(parts)
    )


def _qaoa_options(shots: int, maxiter: int) -> tuple[Option, ...]:
    """The options both backends share, with their own defaults."""
    return (
        choice_option(
            "mixer",
            ("xy", "x"),
            "xy",
            "xy: Dicke state + XY mixer (always feasible); x: |+> + X mixer on the "
            "penalty model, samples repaired",
        ),
        int_option("p", 2, "QAOA layers", maximum=MAX_LAYERS),
        int_option("shots", shots, "shots per circuit evaluation", maximum=C_INT_MAX),
        choice_option(
            "optimizer",
            ("COBYLA", "Nelder-Mead", "Powell"),
            "COBYLA",
            "scipy.optimize.minimize method for the angles",
        ),
        int_option(
            "maxiter",
            maxiter,
            "most circuit evaluations of the optimiser",
            maximum=C_INT_MAX,
        ),
        Option(
            "initial_angles",
            _parse_angles,
            "ramp",
            "'ramp' (linear ramp, dt = 0.75) or 'g1,..,gp,b1,..,bp'",
            "ramp | 2p floats",
        ),
        choice_option("graph", ("ring", "complete"), "ring", "XY mixer graph"),
        float_option(
            "penalty",
            None,
            "cardinality penalty of the x mixer (default: the problem's safe bound)",
        ),
    )


def _only_feasible_point(problem: BlockProblem) -> np.ndarray | None:
    """The feasible x when it is unique (every group has no ones or all ones)."""
    counts = problem.group_counts
    full = counts == [members.size for members in problem.group_indices]  # (G,)
    if not np.all(full | (counts == 0)):
        return None
    return full[problem.groups].astype(np.int8)


def _bits_from_indices(indices: np.ndarray, n: int) -> np.ndarray:
    """Basis-state indices (qubit 0 most significant) -> ``(m, n)`` 0/1 array."""
    shifts = np.arange(n - 1, -1, -1)
    return ((indices[:, None] >> shifts) & 1).astype(np.int8)


class _QaoaBackend(Backend):
    """Shared QAOA driver; :meth:`_run_qaoa` takes a circuit -> samples function."""

    def __init__(self, **options: Any):
        super().__init__(**options)
        angles = self._params["initial_angles"]
        if angles != "ramp" and len(angles) != 2 * self._params["p"]:
            raise BackendError(
                f"option 'initial_angles' of backend {self.name!r} needs 2p = "
                f"{2 * self._params['p']} values, got {len(angles)}"
            )

    def _run_qaoa(
        self,
        problem: BlockProblem,
        sample: Callable[[Any], np.ndarray],
        gate_set: str,
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Optimise the angles, running circuits with ``sample`` (-> ``(shots, n)``)."""
        from icbs_opt.backends.qaoa import (
            Ansatz,
            SampleTally,
            linear_ramp,
            optimise_angles,
        )

        o = self._params
        ansatz = Ansatz(
            problem,
            p=o["p"],
            mixer=o["mixer"],
            graph=o["graph"],
            penalty=o["penalty"],
            gate_set=gate_set,
        )
        tally = SampleTally(problem, ansatz.penalty)

        def evaluate(angles: np.ndarray) -> float:
            return tally.add(sample(ansatz.circuit(angles)))

        start = (
            linear_ramp(o["p"])
            if o["initial_angles"] == "ramp"
            else o["initial_angles"]
        )
        search = optimise_angles(
            evaluate, np.asarray(start), optimizer=o["optimizer"], maxiter=o["maxiter"]
        )
        final_mean = evaluate(search.angles)  # the optimised angles, sampled once more
        x, repaired = tally.answer()
        logger.info(
            "%s: n=%d k=%d groups=%d %s p=%d, %d evaluations, raw feasible %.3f, "
            "energy %.6g",
            self.name,
            problem.n,
            problem.k,
            problem.num_groups,
            o["mixer"],
            o["p"],
            search.evaluations + 1,
            tally.feasible_shots / tally.shots,
            problem.energy(x),
        )
        return x, _qaoa_info(ansatz, search, tally, final_mean, repaired)


def _qaoa_info(
    ansatz: Ansatz,
    search: AngleSearch,
    tally: SampleTally,
    final_mean: float,
    repaired: bool,
) -> dict[str, Any]:
    """The ``info`` of a QAOA solve (angles, evaluations, shots, the circuit)."""
    from icbs_opt.backends.qaoa import gate_counts

    circuit = ansatz.circuit(search.angles)
    info = {
        "mixer": ansatz.mixer,
        "p": ansatz.p,
        "gate_set": ansatz.gate_set,
        "angles": search.angles.tolist(),
        "angle_scale": ansatz.scale,
        "history": search.history + [final_mean],
        "final_mean": final_mean,
        "evaluations": search.evaluations + 1,
        "shots": tally.shots,
        "raw_feasible_fraction": tally.feasible_shots / tally.shots,
        "best_raw_energy": (
            tally.best_raw_energy if tally.best_raw_x is not None else None
        ),
        "repaired": repaired,
        "qubits": ansatz.problem.n,
        "depth": circuit.depth,
        "gate_counts": gate_counts(circuit),
    }
    if ansatz.mixer == "x":
        info["penalty"] = ansatz.penalty
    if ansatz.problem.is_grouped:
        info["groups"] = ansatz.problem.num_groups
    return info


class BraketLocalBackend(_QaoaBackend):
    """QAOA on the Braket SDK's local statevector simulator (``braket_sv``).

    Each evaluation builds the circuit for the current angles, computes its exact
    output distribution with ``braket_sv`` and draws ``shots`` samples from it
    with the seeded generator, so the same seed gives the same answer. Engines:

    - ``direct`` (default): the circuit's instructions are applied by the
      simulator's own ``StateVectorSimulation`` (the engine behind
      ``LocalSimulator("braket_sv")``), skipping the OpenQASM round trip;
    - ``device``: ``LocalSimulator("braket_sv").run(circuit.probability(),
      shots=0)``, the task path a device takes; 3 to 5 times slower, because the
      simulator parses an OpenQASM program per evaluation.

    Both give the same distribution. ``x0`` is ignored (no warm start).
    """

    name = "braket-local"
    #: One xy, p = 3 evaluation takes about 0.6 s at n = 16 and 2 s at n = 18 here
    #: (2 cores); an optimisation runs 50 of them (docs/backends.md).
    max_n = 16
    options = _qaoa_options(shots=1000, maxiter=50) + (
        choice_option(
            "engine",
            ("direct", "device"),
            "direct",
            "direct: braket_sv's simulation engine; device: LocalSimulator tasks",
        ),
    )

    def unavailable_reason(self) -> str | None:
        """Say how to install the SDK when it or scipy is missing."""
        for module in ("braket.devices", "braket.default_simulator", "scipy"):
            if importlib.util.find_spec(module.split(".")[0]) is None:
                return _INSTALL
        return None

    def _solve(
        self, problem: BlockProblem, *, seed: int | None, x0: np.ndarray | None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        only = _only_feasible_point(problem)
        if only is not None:  # nothing to sample
            return only, {"evaluations": 0}
        n = problem.n
        rng = np.random.default_rng(seed)
        return self._run_qaoa(problem, lambda c: self._sample(c, n, rng), "compact")

    def _sample(self, circuit: Any, n: int, rng: np.random.Generator) -> np.ndarray:
        """Exact distribution of ``circuit``, then ``shots`` seeded samples."""
        if self._params["engine"] == "direct":
            probs = _direct_probabilities(circuit, n)
        else:
            from braket.devices import LocalSimulator

            result = LocalSimulator("braket_sv").run(circuit.probability(), shots=0)
            probs = np.asarray(result.result().values[0], dtype=np.float64)
        probs = np.clip(probs, 0.0, None)
        indices = rng.choice(
            probs.size, size=self._params["shots"], p=probs / probs.sum()
        )
        return _bits_from_indices(indices, n)


def _direct_probabilities(circuit: Any, n: int) -> np.ndarray:
    """Output distribution of ``circuit`` by braket_sv's StateVectorSimulation."""
    from braket.default_simulator import StateVectorSimulation, gate_operations

    operations = []
    for ins in circuit.instructions:
        cls = getattr(gate_operations, _SIM_OPERATIONS[ins.operator.name])
        targets = [int(q) for q in ins.target]
        angle = getattr(ins.operator, "angle", None)
        operations.append(cls(targets) if angle is None else cls(targets, float(angle)))
    simulation = StateVectorSimulation(n, 0, 1)
    simulation.evolve(operations)
    return np.asarray(simulation.probabilities, dtype=np.float64)


def _parse_device_arn(value: Any) -> str:
    arn = value.strip() if isinstance(value, str) else ""
    if not arn.startswith("arn:aws:braket:") or ":device/" not in arn:
        raise ValueError(
            "expected an Amazon Braket device ARN such as "
            "'arn:aws:braket:us-east-1::device/qpu/ionq/Forte-1'"
        )
    return arn


def _parse_s3_folder(value: Any) -> tuple[str, str]:
    if isinstance(value, tuple) and len(value) == 2:  # a parsed (bucket, prefix)
        value = "/".join(value)
    text = value.strip() if isinstance(value, str) else ""
    text = text.removeprefix("s3://").strip("/")
    bucket, _, prefix = text.partition("/")
    if not bucket or not prefix:
        raise ValueError("expected 'bucket/prefix' (or 's3://bucket/prefix')")
    return bucket, prefix


class BraketBackend(_QaoaBackend):
    """QAOA on an Amazon Braket device (QPU or managed simulator) chosen by ARN.

    The circuits are those of ``braket-local``; each evaluation is one quantum
    task of ``shots`` shots, sampled by the device (so the seed fixes the angle
    search but not the device's sampling). Circuits use ``xy``/``zz`` gates when
    the device lists them and only ``x, h, rx, ry, rz, cnot`` otherwise.
    ``info["tracker"]`` holds ``braket.tracking.Tracker``'s task statistics and
    estimated cost in USD.

    Args:
        device: The seam for tests and custom devices: any Braket ``Device``
            (e.g. ``LocalSimulator()``) used instead of ``AwsDevice(device_arn)``.
            The whole path (gate-set choice, width and status checks, task
            creation, result parsing, tracker) runs on it.
        **options: The declared options.

    Every failure to reach or use the device (no credentials, no region, unknown
    ARN, access denied, device offline, circuit too wide, failed or timed-out
    task) raises :class:`BackendUnavailable` with one message saying what to fix.

    A threads executor runs a batch in threads that each submit, not the SDK's
    task batches: each problem's angle search runs in its own thread
    (:meth:`batch_threads`: one per problem when ``workers`` is None), so the
    first task of every problem is submitted without waiting for another
    problem's results, and the device queue holds one task of each
    problem at a time. Within one problem each task waits for the one before,
    because the optimiser picks the next angles from its result. Each answer's
    ``info["tracker"]`` counts only its own tasks.
    """

    name = "braket"
    #: Statevector managed simulators and current QPUs are far past their useful
    #: fidelity before this; the device's own qubit count is checked at solve time.
    max_n = 26
    options = _qaoa_options(shots=100, maxiter=20) + (
        Option(
            "device_arn",
            _parse_device_arn,
            None,
            "Amazon Braket device ARN (aws braket search-devices lists them)",
            "text",
        ),
        Option(
            "s3_folder",
            _parse_s3_folder,
            None,
            "'bucket/prefix' for task results (default: Braket's default bucket)",
            "text",
        ),
        float_option(
            "poll_timeout", 3600.0, "seconds to wait for each task", minimum=1.0
        ),
    )

    def __init__(self, device: Any = None, **options: Any):
        super().__init__(**options)
        self._device = device

    @property
    def portable(self) -> bool:
        """False when built with a ``device`` object (it cannot be rebuilt)."""
        return self._device is None

    def batch_threads(self, count: int) -> int:
        """One thread per problem, so every problem's tasks are queued at once."""
        return max(count, 1)

    # ---------------------------------------------------------- availability
    def unavailable_reason(self) -> str | None:
        """Check offline what a cloud run needs: SDK, ARN, region and credentials.

        Reads only the environment and the AWS config files (the instance and
        container metadata endpoints are not queried).
        """
        if importlib.util.find_spec("braket") is None:
            return _INSTALL
        if self._device is not None:
            return None
        arn = self._params["device_arn"]
        if arn is None:
            return (
                "no device ARN configured; pass --backend-option device_arn=ARN "
                "(e.g. arn:aws:braket:us-east-1::device/qpu/ionq/Forte-1; "
                "'aws braket search-devices' lists them)"
            )
        import botocore.credentials
        import botocore.session

        session = botocore.session.get_session()
        region = arn.split(":")[3] or session.get_config_variable("region")
        if not region:
            return (
                f"no AWS region configured for {arn}; set AWS_DEFAULT_REGION or "
                "'region' in ~/.aws/config"
            )
        resolver = botocore.credentials.create_credential_resolver(session)
        for method in ("iam-role", "container-role"):  # these would use the network
            resolver.remove(method)
        if resolver.load_credentials() is None:
            return (
                "no AWS credentials found; run 'aws configure', set "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or set AWS_PROFILE"
            )
        return None

    # ------------------------------------------------------------- the device
    def _open_device(self, n: int) -> tuple[Any, str]:
        """Return the ready device and the gate set, or raise BackendUnavailable."""
        from braket.device_schema import DeviceActionType

        from icbs_opt.backends.qaoa import GATE_SETS

        arn = self._params["device_arn"]
        label = arn if self._device is None else type(self._device).__name__
        try:
            if self._device is None:
                from braket.aws import AwsDevice

                device = AwsDevice(arn)
            else:
                device = self._device
            status = device.status
            properties = device.properties
        except Exception as exc:  # botocore and the SDK raise many types
            raise BackendUnavailable(_explain(exc, label)) from exc
        if status not in _RUNNING_STATES:
            raise BackendUnavailable(
                f"device {label} is {status}, not ONLINE; pick another device_arn or "
                "retry within the device's availability window"
            )
        width = getattr(getattr(properties, "paradigm", None), "qubitCount", None)
        if width is not None and n > width:
            raise BackendUnavailable(
                f"the circuit needs n = {n} qubits but device {label} has {width}; "
                f"use a smaller block size (--block-size {width})"
            )
        action = properties.action.get(DeviceActionType.OPENQASM)
        if action is None:
            raise BackendUnavailable(
                f"device {label} does not run OpenQASM gate circuits; pick a "
                "gate-model device_arn"
            )
        supported = {op.lower() for op in action.supportedOperations}
        for gate_set in ("compact", "basic"):
            if GATE_SETS[gate_set] <= supported:
                return device, gate_set
        missing = sorted(GATE_SETS["basic"] - supported)
        raise BackendUnavailable(
            f"device {label} lacks the gates {', '.join(missing)} that the QAOA "
            "circuits need; pick another device_arn"
        )

    def _solve(
        self, problem: BlockProblem, *, seed: int | None, x0: np.ndarray | None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        only = _only_feasible_point(problem)
        if only is not None:  # spend no tasks on it
            return only, {"evaluations": 0}
        n = problem.n
        device, gate_set = self._open_device(n)
        task_ids: list[str] = []
        with _thread_tracker() as tracker:
            x, info = self._run_qaoa(
                problem, lambda c: self._run_task(device, c, n, task_ids), gate_set
            )
        info["device"] = self._params["device_arn"] or type(device).__name__
        info["task_ids"] = task_ids
        info["tracker"] = _tracker_summary(tracker)
        return x, info

    def _run_task(
        self, device: Any, circuit: Any, n: int, task_ids: list[str]
    ) -> np.ndarray:
        """Run one task of ``shots`` shots; return its ``(shots, n)`` samples."""
        shots = self._params["shots"]
        label = self._params["device_arn"] or type(device).__name__
        kwargs: dict[str, Any] = {}
        if self._device is None:  # AwsDevice-only arguments
            kwargs["poll_timeout_seconds"] = self._params["poll_timeout"]
            if self._params["s3_folder"] is not None:
                kwargs["s3_destination_folder"] = self._params["s3_folder"]
        try:
            task = device.run(circuit, shots=shots, **kwargs)
            result = task.result()
        except Exception as exc:  # botocore and the SDK raise many types
            raise BackendUnavailable(_explain(exc, label)) from exc
        task_ids.append(str(task.id))
        if result is None:
            raise BackendUnavailable(_task_failure(task, label, self._params))
        measured = [int(q) for q in result.measured_qubits]
        bits = np.asarray(result.measurements, dtype=np.int8)  # (shots, measured)
        if sorted(measured) != list(range(n)):
            raise BackendUnavailable(
                f"device {label} returned measurements of qubits {measured}, "
                f"expected 0..{n - 1}"
            )
        return bits[:, np.argsort(measured)]


def _task_failure(task: Any, label: str, params: dict[str, Any]) -> str:
    """One sentence on why a task gave no result (cancelling it if still pending)."""
    state = task.state()
    if state in ("FAILED", "CANCELLED"):
        reason = task.metadata().get("failureReason", {})
        detail = reason.get("message", "no reason given") if reason else "no reason"
        return f"task {task.id} on device {label} ended {state}: {detail}"
    task.cancel()
    return (
        f"task {task.id} on device {label} was still {state} after "
        f"poll_timeout = {params['poll_timeout']:g} s and was cancelled; raise "
        "--backend-option poll_timeout or pick a device with a shorter queue"
    )


def _explain(exc: Exception, label: str) -> str:
    """Turn an error from botocore or the Braket SDK into one sentence."""
    kind = type(exc).__name__
    code = ""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code", "")
    text = str(exc)
    if kind in ("NoCredentialsError", "PartialCredentialsError"):
        return (
            "no AWS credentials found; run 'aws configure', set AWS_ACCESS_KEY_ID "
            "and AWS_SECRET_ACCESS_KEY, or set AWS_PROFILE"
        )
    if kind == "NoRegionError":
        return f"no AWS region configured for {label}; set AWS_DEFAULT_REGION"
    if code in ("ResourceNotFoundException", "ValidationException") or (
        isinstance(exc, ValueError) and "not found" in text  # AwsDevice's own
    ):
        return (
            f"device {label} is unknown to Amazon Braket ({code or kind}: {text}); "
            "check device_arn and its region with 'aws braket search-devices'"
        )
    if code in (
        "AccessDeniedException",
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "ExpiredTokenException",
        "UnauthorizedOperation",
    ):
        return (
            f"access to device {label} was denied ({code}: {text}); check the AWS "
            "credentials and that their IAM policy allows Amazon Braket "
            "(e.g. AmazonBraketFullAccess) and the results S3 bucket"
        )
    if kind in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionError"):
        return f"cannot reach Amazon Braket for device {label} (offline?): {text}"
    return f"device {label} failed ({code or kind}): {text}"


def _thread_tracker() -> Any:
    """A ``braket.tracking.Tracker`` of the tasks created by the calling thread.

    Trackers listen to every task of the process, so with solves running in
    parallel threads (a threads executor's batch) a plain one would count the other
    threads' tasks too. A task's creation event is sent by the thread that
    creates it, and a tracker takes status and completion events only for tasks
    it holds, so dropping other threads' creation events is enough.
    """
    from braket.tracking import Tracker
    from braket.tracking.tracking_events import _TaskCreationEvent

    owner = threading.get_ident()

    class ThreadTracker(Tracker):
        def receive_event(self, event: Any) -> None:
            if isinstance(event, _TaskCreationEvent) and (
                threading.get_ident() != owner
            ):
                return
            super().receive_event(event)

    return ThreadTracker()


def _tracker_summary(tracker: Any) -> dict[str, Any]:
    """Task statistics and estimated cost from a ``braket.tracking.Tracker``."""
    stats: dict[str, Any] = {}
    for device, entry in tracker.quantum_tasks_statistics().items():
        stats[device] = {
            key: (value.total_seconds() if hasattr(value, "total_seconds") else value)
            for key, value in entry.items()
        }
    try:
        cost: float | None = float(
            tracker.simulator_tasks_cost() + tracker.qpu_tasks_cost()
        )
    except Exception as exc:  # the price list is fetched over the network
        logger.warning("could not estimate the Braket cost: %s", exc)
        cost = None
    return {"tasks": stats, "estimated_cost_usd": cost}
