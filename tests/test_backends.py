"""Every registered backend passes the shared conformance class."""

from typing import Any

from icbs_opt.backends import Backend
from icbs_opt.testing import BackendConformance

#: Test-speed options for slow backends (user-given options still win).
FAST_OPTIONS: dict[str, dict[str, Any]] = {
    "braket-local": {"p": 1, "maxiter": 6, "shots": 500},
    # Device-side sampling is unseeded: enough shots that n <= 12 optima are seen.
    "braket": {"p": 1, "maxiter": 6, "shots": 2000},
}


class TestBackendConformance(BackendConformance):
    def make_backend(self, name: str, **options: Any) -> Backend:
        options = {**FAST_OPTIONS.get(name, {}), **options}
        if name == "braket":  # the documented seam: a device object, no network
            from braket.devices import LocalSimulator

            options.setdefault("device", LocalSimulator())
        return super().make_backend(name, **options)
