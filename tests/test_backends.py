"""Every registered backend passes the shared conformance class."""

from icbs_opt.testing import BackendConformance


class TestBackendConformance(BackendConformance):
    pass
