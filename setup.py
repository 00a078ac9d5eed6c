"""Build the native simulated-annealing core (`icbs_opt._native`).

OpenMP is used when the compiler accepts ``-fopenmp``; otherwise the extension is
built single-threaded (restarts then run one after another, with the same results).
"""

import os
import shutil
import subprocess
import tempfile

import numpy as np
from setuptools import Extension, setup


def _openmp_flags() -> tuple[list[str], list[str]]:
    if os.environ.get("ICBS_OPT_NO_OPENMP"):
        return [], []
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        return [], []
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "t.c")
        with open(src, "w") as f:
            f.write(
                "#include <omp.h>\nint main(void){return omp_get_max_threads() < 1;}\n"
            )
        ok = (
            subprocess.run(
                [cc, "-fopenmp", src, "-o", os.path.join(tmp, "t")],
                capture_output=True,
            ).returncode
            == 0
        )
    return (["-fopenmp"], ["-fopenmp"]) if ok else ([], [])


compile_omp, link_omp = _openmp_flags()

setup(
    ext_modules=[
        Extension(
            "icbs_opt._native",
            sources=["native/sa.c", "native/module.c"],
            depends=["native/sa.h"],  # rebuild on header changes; ships in the sdist
            include_dirs=["native", np.get_include()],
            extra_compile_args=["-O3", "-std=c99", *compile_omp],
            extra_link_args=link_omp,
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        )
    ]
)
