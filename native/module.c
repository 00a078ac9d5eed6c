/*
 * icbs_opt._native: the thin CPython binding of the annealing core in sa.c.
 *
 * It checks types and shapes only (what memory safety needs), handles the empty
 * problem, and releases the GIL around the core. Validation of values and
 * defaults belong to icbs_opt/backends/native.py.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <numpy/arrayobject.h>

#include "sa.h"

#ifdef _OPENMP
#include <omp.h>
#endif

static PyObject *raise_for(int rc) {
    if (rc == ICBS_SA_ENOMEM) return PyErr_NoMemory();
    if (rc == ICBS_SA_ESTOP) {
        PyErr_SetNone(PyExc_KeyboardInterrupt);
        return NULL;
    }
    PyErr_SetString(PyExc_ValueError, "native SA core rejected its arguments");
    return NULL;
}

static PyArrayObject *square_matrix(PyObject *obj, npy_intp *n) {
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "Q must be a numpy array, got %s",
                     Py_TYPE(obj)->tp_name);
        return NULL;
    }
    PyArrayObject *arr = (PyArrayObject *)obj;
    if (PyArray_TYPE(arr) != NPY_FLOAT64 || PyArray_NDIM(arr) != 2 ||
        !PyArray_IS_C_CONTIGUOUS(arr) ||
        PyArray_DIM(arr, 0) != PyArray_DIM(arr, 1)) {
        PyErr_SetString(PyExc_TypeError,
                        "Q must be a square, C-contiguous float64 matrix");
        return NULL;
    }
    *n = PyArray_DIM(arr, 0);
    return arr;
}

/* The optional keyword-only arguments, taken out of kwargs by pop_optional. */
#define NUM_OPTIONAL 3
static const char *const optional_names[NUM_OPTIONAL] = {"stop", "groups", "counts"};

static void release_optional(PyObject **values) {
    for (int t = 0; t < NUM_OPTIONAL; t++) Py_CLEAR(values[t]);
}

/* Take the optional keywords out of a copy of kwargs (the other keywords are all
 * required, which PyArg_ParseTupleAndKeywords cannot mix with optional
 * keyword-only ones). On success *kwargs and values[] are new references or NULL. */
static int pop_optional(PyObject **kwargs, PyObject **values) {
    for (int t = 0; t < NUM_OPTIONAL; t++) values[t] = NULL;
    if (*kwargs == NULL) return 0;
    PyObject *copy = PyDict_Copy(*kwargs);
    if (!copy) return -1;
    for (int t = 0; t < NUM_OPTIONAL; t++) {
        values[t] = PyDict_GetItemString(copy, optional_names[t]);
        Py_XINCREF(values[t]);
        if (values[t] && PyDict_DelItemString(copy, optional_names[t]) < 0) {
            Py_DECREF(copy);
            release_optional(values);
            return -1;
        }
    }
    *kwargs = copy;
    return 0;
}

/* The stop flag: None, or a writable C-contiguous int32 array (its first entry). */
static int stop_flag(PyObject *obj, const volatile int32_t **flag) {
    *flag = NULL;
    if (obj == NULL || obj == Py_None) return 0;
    PyArrayObject *arr = (PyArrayObject *)obj;
    if (!PyArray_Check(obj) || PyArray_TYPE(arr) != NPY_INT32 ||
        PyArray_SIZE(arr) < 1 || !PyArray_IS_C_CONTIGUOUS(arr) ||
        !PyArray_ISWRITEABLE(arr)) {
        PyErr_SetString(PyExc_TypeError,
                        "stop must be None or a writable contiguous int32 array");
        return -1;
    }
    *flag = (const volatile int32_t *)PyArray_DATA(arr);
    return 0;
}

/* A C-contiguous 1-D array of `type` (length n when n >= 0, else at least 1). */
static int vector_of(PyObject *obj, int type, npy_intp n) {
    if (!PyArray_Check(obj)) return 0;
    PyArrayObject *arr = (PyArrayObject *)obj;
    return PyArray_TYPE(arr) == type && PyArray_NDIM(arr) == 1 &&
           PyArray_IS_C_CONTIGUOUS(arr) &&
           (n >= 0 ? PyArray_DIM(arr, 0) == n : PyArray_DIM(arr, 0) >= 1);
}

/* groups and counts: both None, or an int32 vector of length n and a non-empty
 * int64 vector. */
static int group_arrays(PyObject *groups, PyObject *counts, npy_intp n,
                        icbs_sa_groups *out) {
    const int none = (groups == NULL || groups == Py_None) &&
                     (counts == NULL || counts == Py_None);
    out->num_groups = 0;
    if (none) return 0;
    if (!groups || !counts || !vector_of(groups, NPY_INT32, n) ||
        !vector_of(counts, NPY_INT64, -1)) {
        PyErr_SetString(PyExc_TypeError,
                        "groups and counts must both be None, or a contiguous int32 "
                        "vector of length n and a non-empty contiguous int64 vector");
        return -1;
    }
    out->group = (const int32_t *)PyArray_DATA((PyArrayObject *)groups);
    out->count = (const int64_t *)PyArray_DATA((PyArrayObject *)counts);
    out->num_groups = (int64_t)PyArray_DIM((PyArrayObject *)counts, 0);
    return 0;
}

static PyObject *new_vector(npy_intp len, int type) {
    npy_intp dims[1] = {len};
    return PyArray_ZEROS(1, dims, type, 0);
}

PyDoc_STRVAR(solve_doc,
             "solve(Q, k, x0, *, seed, num_restarts, beta_min, beta_max, beta_factor,\n"
             "      sweeps_per_beta, sweep_size, num_threads, auto_schedule,\n"
             "      auto_samples, auto_accept, auto_range, stop=None, groups=None,\n"
             "      counts=None) -> (x, info)\n\n"
             "Anneal min x^T Q x subject to sum(x) = k with swap moves. Q: square\n"
             "C-contiguous float64 (symmetric); x0: None or int8 vector with k ones.\n"
             "groups (int32, n group ids in [0, G)) and counts (int64, G ones per\n"
             "group): a grouped problem, swaps only inside a group; k is then\n"
             "ignored and x0 must have counts[g] ones in each group g.\n"
             "stop: None or an int32 array; setting stop[0] != 0 from another thread\n"
             "ends the solve within a sweep with KeyboardInterrupt. Returns the int8\n"
             "answer and a dict of run details. Use the Python\n"
             "backend icbs_opt.backends.native instead: it validates the inputs.");

static PyObject *py_solve(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {
        "Q",           "k",           "x0",           "seed",           "num_restarts",
        "beta_min",    "beta_max",    "beta_factor",  "sweeps_per_beta", "sweep_size",
        "num_threads", "auto_schedule", "auto_samples", "auto_accept",   "auto_range",
        NULL};
    PyObject *q_obj, *x0_obj, *opt[NUM_OPTIONAL]; /* stop, groups, counts */
    long long k, num_restarts, sweeps_per_beta, sweep_size, auto_samples;
    unsigned long long seed;
    double beta_min, beta_max, beta_factor, auto_accept, auto_range;
    int num_threads, auto_schedule;
    (void)self;
    if (pop_optional(&kwargs, opt) < 0) return NULL;
    int parsed = PyArg_ParseTupleAndKeywords(args, kwargs, "OLO$KLdddLLipLdd", keywords,
                                     &q_obj, &k, &x0_obj, &seed, &num_restarts,
                                     &beta_min, &beta_max, &beta_factor,
                                     &sweeps_per_beta, &sweep_size, &num_threads,
                                     &auto_schedule, &auto_samples, &auto_accept,
                                     &auto_range);
    Py_XDECREF(kwargs); /* pop_optional's copy */
    const volatile int32_t *stop = NULL;
    npy_intp n = 0;
    icbs_sa_groups groups;
    PyArrayObject *q = parsed ? square_matrix(q_obj, &n) : NULL;
    const int bad = !q || stop_flag(opt[0], &stop) < 0 ||
                    group_arrays(opt[1], opt[2], n, &groups) < 0;
    release_optional(opt); /* the caller's arrays stay alive during the call */
    if (bad) return NULL;
    const int8_t *x0 = NULL;
    if (x0_obj != Py_None) {
        if (!PyArray_Check(x0_obj) || PyArray_TYPE((PyArrayObject *)x0_obj) != NPY_INT8 ||
            PyArray_NDIM((PyArrayObject *)x0_obj) != 1 ||
            PyArray_DIM((PyArrayObject *)x0_obj, 0) != n ||
            !PyArray_IS_C_CONTIGUOUS((PyArrayObject *)x0_obj)) {
            PyErr_SetString(PyExc_TypeError,
                            "x0 must be None or a contiguous int8 vector of length n");
            return NULL;
        }
        x0 = (const int8_t *)PyArray_DATA((PyArrayObject *)x0_obj);
    }
    if (num_restarts < 1) num_restarts = 1; /* the core rejects it; keep sizes sane */

    PyObject *x = new_vector(n, NPY_INT8);
    PyObject *energies = new_vector((npy_intp)num_restarts, NPY_FLOAT64);
    PyObject *sweeps = new_vector((npy_intp)num_restarts, NPY_INT64);
    PyObject *accepted = new_vector((npy_intp)num_restarts, NPY_INT64);
    PyObject *descent = new_vector((npy_intp)num_restarts, NPY_INT64);
    if (!x || !energies || !sweeps || !accepted || !descent) goto fail;

    icbs_sa_result res = {0};
    res.best_restart = -1;
    if (n > 0) {
        const icbs_sa_params params = {.beta_min = beta_min,
                                       .beta_max = beta_max,
                                       .beta_factor = beta_factor,
                                       .sweeps_per_beta = (int64_t)sweeps_per_beta,
                                       .num_restarts = (int64_t)num_restarts,
                                       .sweep_size = (int64_t)sweep_size,
                                       .num_threads = num_threads,
                                       .auto_schedule = auto_schedule,
                                       .auto_samples = (int64_t)auto_samples,
                                       .auto_accept = auto_accept,
                                       .auto_range = auto_range,
                                       .seed = (uint64_t)seed,
                                       .stop = stop};
        res.restart_energies = (double *)PyArray_DATA((PyArrayObject *)energies);
        res.restart_sweeps = (int64_t *)PyArray_DATA((PyArrayObject *)sweeps);
        res.restart_accepted = (int64_t *)PyArray_DATA((PyArrayObject *)accepted);
        res.restart_descent = (int64_t *)PyArray_DATA((PyArrayObject *)descent);
        const double *qd = (const double *)PyArray_DATA(q);
        int8_t *xd = (int8_t *)PyArray_DATA((PyArrayObject *)x);
        int rc;
        Py_BEGIN_ALLOW_THREADS
        if (groups.num_groups > 0)
            rc = icbs_sa_solve_groups(qd, (int64_t)n, &groups, x0, &params, xd, &res);
        else
            rc = icbs_sa_solve(qd, (int64_t)n, (int64_t)k, x0, &params, xd, &res);
        Py_END_ALLOW_THREADS
        if (rc != ICBS_SA_OK) {
            raise_for(rc);
            goto fail;
        }
    }
    PyObject *info = Py_BuildValue(
        "{s:N,s:N,s:N,s:N,s:L,s:d,s:d,s:L,s:i}", "restart_energies", energies,
        "restart_sweeps", sweeps, "restart_accepted", accepted, "restart_descent",
        descent, "best_restart",
        (long long)res.best_restart, "beta_min", res.beta_min, "beta_max",
        res.beta_max, "num_betas", (long long)res.num_betas, "num_threads",
        res.num_threads);
    if (!info) {
        Py_DECREF(x);
        return NULL; /* Py_BuildValue consumed the N references */
    }
    return Py_BuildValue("(NN)", x, info);

fail:
    Py_XDECREF(x);
    Py_XDECREF(energies);
    Py_XDECREF(sweeps);
    Py_XDECREF(accepted);
    Py_XDECREF(descent);
    return NULL;
}

PyDoc_STRVAR(max_threads_doc,
             "max_threads() -> int: threads num_threads=0 uses (1 without OpenMP).");

static PyObject *py_max_threads(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
#ifdef _OPENMP
    return PyLong_FromLong(omp_get_max_threads());
#else
    return PyLong_FromLong(1);
#endif
}

static PyMethodDef methods[] = {
    {"solve", (PyCFunction)(void (*)(void))py_solve, METH_VARARGS | METH_KEYWORDS,
     solve_doc},
    {"max_threads", py_max_threads, METH_NOARGS, max_threads_doc},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_native",
    .m_doc = "Native cardinality-preserving simulated annealing.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__native(void) {
    import_array();
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
#ifdef _OPENMP
    const int openmp = 1;
#else
    const int openmp = 0;
#endif
    if (PyModule_AddObjectRef(m, "openmp", openmp ? Py_True : Py_False) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
