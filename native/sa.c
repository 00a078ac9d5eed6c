/* Cardinality-preserving simulated annealing; see sa.h for the algorithm. */
#include "sa.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

/* ------------------------------------------------------------------ random */

static uint64_t splitmix64(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

typedef struct {
    uint64_t s[4];
} rng_t;

static inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

/* xoshiro256** */
static inline uint64_t rng_next(rng_t *g) {
    uint64_t *s = g->s;
    uint64_t out = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return out;
}

/* Stream `stream` of `seed`: distinct streams are independent for practical use. */
static void rng_seed(rng_t *g, uint64_t seed, uint64_t stream) {
    uint64_t sm = seed;
    uint64_t mixed = splitmix64(&sm) ^ (stream * 0xD1B54A32D192ED03ULL);
    for (int i = 0; i < 4; i++) g->s[i] = splitmix64(&mixed);
}

/* Uniform integer in [0, bound), bound in [1, 2^32), unbiased (Lemire). */
static inline uint32_t rng_below(rng_t *g, uint32_t bound) {
    uint64_t m = (rng_next(g) >> 32) * (uint64_t)bound;
    uint32_t low = (uint32_t)m;
    if (low < bound) {
        uint32_t threshold = (uint32_t)(-bound) % bound;
        while (low < threshold) {
            m = (rng_next(g) >> 32) * (uint64_t)bound;
            low = (uint32_t)m;
        }
    }
    return (uint32_t)(m >> 32);
}

/* Uniform double in [0, 1). */
static inline double rng_uniform(rng_t *g) {
    return (double)(rng_next(g) >> 11) * 0x1.0p-53;
}

/* ------------------------------------------------------------------- state */

/* Seeds of restart r use stream r; the auto schedule's sample uses this one. */
#define AUTO_STREAM UINT64_C(0xFFFFFFFFFFFFFFFF)

/* Smaller problems run their restarts on one thread. */
#define MIN_PARALLEL_N 512

/* More temperatures than this are refused (a beta_factor too close to 1). */
#define MAX_BETAS 1e9

/* Beyond this beta * delta, exp(-beta * delta) < 2^-53: reject without drawing. */
#define MAX_EXPONENT 37.0

/* The finishing descent ignores changes below this times the largest field term. */
#define DESCENT_TOL 1e-12

/* The hot loops get an AVX2 clone where GCC can dispatch at load time (glibc
 * ifunc). The clones compute the same results: no reassociation, no FMA. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__)
#define ICBS_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define ICBS_CLONES
#endif

/* Proposals drawn in advance, to prefetch their entries of Q. */
#define AHEAD 8

#if defined(__GNUC__) || defined(__clang__)
#define PREFETCH(ptr) __builtin_prefetch(ptr)
#else
#define PREFETCH(ptr) ((void)0)
#endif

/* Per-thread workspace: O(n). */
typedef struct {
    int32_t *idx;       /* idx[0..k) the ones, idx[k..n) the zeros */
    int32_t *best_ones; /* the ones of this restart's best state */
    int32_t *win_ones;  /* the ones of this thread's best restart */
    double *field;      /* f = Q x */
    double *cost;       /* descent: Q_ll + 2 f_l for zeros, +inf for ones */
    double *one;        /* descent: x as doubles */
} work_t;

static void work_free(work_t *w) {
    free(w->idx);
    free(w->best_ones);
    free(w->win_ones);
    free(w->field);
    free(w->cost);
    free(w->one);
    memset(w, 0, sizeof(*w));
}

static int work_alloc(work_t *w, int64_t n, int64_t k) {
    const size_t kk = k > 0 ? (size_t)k : 1;
    memset(w, 0, sizeof(*w));
    w->idx = malloc((size_t)n * sizeof(int32_t));
    w->best_ones = malloc(kk * sizeof(int32_t));
    w->win_ones = malloc(kk * sizeof(int32_t));
    w->field = malloc((size_t)n * sizeof(double));
    w->cost = malloc((size_t)n * sizeof(double));
    w->one = malloc((size_t)n * sizeof(double));
    if (!w->idx || !w->best_ones || !w->win_ones || !w->field || !w->cost || !w->one) {
        work_free(w);
        return ICBS_SA_ENOMEM;
    }
    return ICBS_SA_OK;
}

/* Ones first: the ones of x0 in index order, or k random ones (partial shuffle). */
static void init_state(int32_t *idx, int64_t n, int64_t k, const int8_t *x0, rng_t *g) {
    if (x0) {
        int64_t a = 0, b = k;
        for (int64_t v = 0; v < n; v++) {
            if (x0[v]) idx[a++] = (int32_t)v;
            else idx[b++] = (int32_t)v;
        }
        return;
    }
    for (int64_t v = 0; v < n; v++) idx[v] = (int32_t)v;
    for (int64_t a = 0; a < k; a++) {
        const int64_t b = a + (int64_t)rng_below(g, (uint32_t)(n - a));
        const int32_t t = idx[a];
        idx[a] = idx[b];
        idx[b] = t;
    }
}

static inline const double *row_of(const double *Q, int64_t n, int32_t i) {
    return Q + (size_t)i * (size_t)n;
}

/* f = sum of the rows of Q at the ones (Q symmetric, so this is Q x). */
static void compute_field(const double *Q, int64_t n, const int32_t *ones, int64_t k,
                          double *restrict f) {
    memset(f, 0, (size_t)n * sizeof(double));
    for (int64_t a = 0; a < k; a++) {
        const double *restrict row = row_of(Q, n, ones[a]);
        for (int64_t l = 0; l < n; l++) f[l] += row[l];
    }
}

/* f += Q[j,:] - Q[i,:]: the field update of an accepted swap (the hot loop). */
ICBS_CLONES
static void swap_update(double *restrict f, const double *restrict add,
                        const double *restrict sub, int64_t n) {
    for (int64_t l = 0; l < n; l++) f[l] += add[l] - sub[l];
}

/* The swap update that also refreshes the descent's cost of adding each zero. */
ICBS_CLONES
static void swap_update_cost(double *restrict f, double *restrict cost,
                             const double *restrict one, const double *restrict diag,
                             const double *restrict add, const double *restrict sub,
                             int64_t n) {
    for (int64_t l = 0; l < n; l++) {
        f[l] += add[l] - sub[l];
        cost[l] = one[l] != 0.0 ? INFINITY : diag[l] + 2.0 * f[l];
    }
}

/*
 * For one row of Q: the lowest cost[l] - 2 row[l] (the best zero to swap in, up to
 * the removal term) and sum_l row[l] one[l] (the row's share of x^T Q x). Four
 * accumulators in a fixed order keep the sum identical on every build.
 */
ICBS_CLONES
static double row_scan(const double *restrict row, const double *restrict cost,
                       const double *restrict one, int64_t n, double *row_sum) {
    double m0 = INFINITY, m1 = INFINITY, m2 = INFINITY, m3 = INFINITY;
    double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
    int64_t l = 0;
    for (; l + 4 <= n; l += 4) {
        const double d0 = cost[l] - 2.0 * row[l], d1 = cost[l + 1] - 2.0 * row[l + 1];
        const double d2 = cost[l + 2] - 2.0 * row[l + 2];
        const double d3 = cost[l + 3] - 2.0 * row[l + 3];
        m0 = d0 < m0 ? d0 : m0;
        m1 = d1 < m1 ? d1 : m1;
        m2 = d2 < m2 ? d2 : m2;
        m3 = d3 < m3 ? d3 : m3;
        s0 += row[l] * one[l];
        s1 += row[l + 1] * one[l + 1];
        s2 += row[l + 2] * one[l + 2];
        s3 += row[l + 3] * one[l + 3];
    }
    for (; l < n; l++) {
        const double d = cost[l] - 2.0 * row[l];
        m0 = d < m0 ? d : m0;
        s0 += row[l] * one[l];
    }
    m0 = m1 < m0 ? m1 : m0;
    m2 = m3 < m2 ? m3 : m2;
    *row_sum = (s0 + s1) + (s2 + s3);
    return m2 < m0 ? m2 : m0;
}

typedef struct {
    const double *Q;
    const double *diag;
    int64_t n, k;
    const int8_t *x0;
    double beta_min, beta_factor;
    int64_t num_betas, sweeps_per_beta;
    int64_t sweep_size; /* proposals per sweep */
    uint64_t seed;
    const volatile int32_t *stop; /* NULL or the caller's stop flag */
} problem_t;

/* Whether the caller asked the solve to stop (a plain load: any thread may set it). */
static inline int stop_requested(const problem_t *p) {
    return p->stop != NULL && *p->stop != 0;
}

static int cmp_int32(const void *a, const void *b) {
    const int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

/*
 * Zero-temperature finish from the state with ones idx[0..k) and fields f: for each
 * one i in turn, apply the best swap with a zero if it lowers the energy by more
 * than the rounding tolerance; repeat passes until one applies none. A pass reads
 * k rows of Q; the clean last pass also yields the exact energy, returned in
 * *energy. Returns the number of swaps applied. Updates idx[0..k) only.
 */
static int64_t descend(const problem_t *p, work_t *w, double *energy) {
    const double *Q = p->Q, *diag = p->diag;
    const int64_t n = p->n, k = p->k;
    int32_t *ones = w->idx;
    double *f = w->field, *cost = w->cost, *one = w->one;
    memset(one, 0, (size_t)n * sizeof(double));
    for (int64_t a = 0; a < k; a++) one[ones[a]] = 1.0;
    double scale = 0.0;
    for (int64_t l = 0; l < n; l++) {
        cost[l] = one[l] != 0.0 ? INFINITY : diag[l] + 2.0 * f[l];
        const double m = fabs(diag[l]) + 2.0 * fabs(f[l]);
        scale = m > scale ? m : scale;
    }
    const double tol = DESCENT_TOL * (scale > 0.0 ? scale : 1.0);
    int64_t swaps = 0;
    for (int64_t pass = 0; pass < n; pass++) {
        int64_t applied = 0;
        double e = 0.0;
        /* Visit the ones in index order: equal states then sum to equal energies. */
        qsort(ones, (size_t)k, sizeof(int32_t), cmp_int32);
        for (int64_t a = 0; a < k; a++) {
            const int32_t i = ones[a];
            const double *row = row_of(Q, n, i);
            double row_sum;
            const double best = row_scan(row, cost, one, n, &row_sum);
            e += row_sum;
            if (!(diag[i] - 2.0 * f[i] + best < -tol)) continue;
            int64_t j = 0;
            while (j < n - 1 && cost[j] - 2.0 * row[j] != best) j++;
            if (one[j] != 0.0) continue; /* unreachable unless Q holds NaN */
            one[i] = 0.0;
            one[j] = 1.0;
            swap_update_cost(f, cost, one, diag, row_of(Q, n, (int32_t)j), row, n);
            ones[a] = (int32_t)j;
            applied++;
        }
        swaps += applied;
        if (applied == 0) {
            *energy = e;
            return swaps;
        }
    }
    /* No clean pass within n passes (rounding ping-pong): sum x^T Q x directly. */
    qsort(ones, (size_t)k, sizeof(int32_t), cmp_int32);
    double e = 0.0;
    for (int64_t a = 0; a < k; a++) {
        double row_sum;
        row_scan(row_of(Q, n, ones[a]), cost, one, n, &row_sum);
        e += row_sum;
    }
    *energy = e;
    return swaps;
}

/*
 * One restart: anneal, return to the best state seen, descend. Leaves the final
 * ones in w->best_ones and returns their exact energy.
 */
static double run_restart(const problem_t *p, work_t *w, int64_t r, int64_t *sweeps,
                          int64_t *accepted, int64_t *descent_swaps) {
    const double *Q = p->Q, *diag = p->diag;
    const int64_t n = p->n, k = p->k, nz = n - k;
    int32_t *idx = w->idx, *zeros = w->idx + k;
    double *f = w->field;
    rng_t g;
    rng_seed(&g, p->seed, (uint64_t)r);

    init_state(idx, n, k, p->x0, &g);
    compute_field(Q, n, idx, k, f);
    double e = 0.0;
    for (int64_t a = 0; a < k; a++) e += f[idx[a]];
    double best_e = e;
    int at_best = 1; /* the current state is the best seen; snapshot it on leaving */
    int64_t done = 0, acc = 0;

    if (k > 0 && nz > 0) {
        /* Pairs (positions in the ones and the zeros) are drawn AHEAD proposals
         * in advance so that their Q entries can be prefetched from memory. */
        uint32_t ahead_a[AHEAD], ahead_b[AHEAD];
        for (int q = 0; q < AHEAD; q++) {
            ahead_a[q] = rng_below(&g, (uint32_t)k);
            ahead_b[q] = rng_below(&g, (uint32_t)nz);
        }
        unsigned slot = 0;
        for (int64_t t = 0; t < p->num_betas; t++) {
            const double beta = p->beta_min * pow(p->beta_factor, (double)t);
            int64_t changed = 0;
            for (int64_t s = 0; s < p->sweeps_per_beta; s++, done++) {
                if (stop_requested(p)) break;
                for (int64_t m = 0; m < p->sweep_size; m++) {
                    const uint32_t a = ahead_a[slot], b = ahead_b[slot];
                    const uint32_t na = rng_below(&g, (uint32_t)k);
                    const uint32_t nb = rng_below(&g, (uint32_t)nz);
                    ahead_a[slot] = na;
                    ahead_b[slot] = nb;
                    slot = (slot + 1) % AHEAD;
                    PREFETCH(row_of(Q, n, idx[na]) + zeros[nb]);
                    const int32_t i = idx[a], j = zeros[b];
                    const double delta = diag[i] - 2.0 * f[i] + diag[j] + 2.0 * f[j] -
                                         2.0 * row_of(Q, n, i)[j];
                    int accept = delta <= 0.0;
                    if (!accept) {
                        const double x = beta * delta;
                        accept = x < MAX_EXPONENT && rng_uniform(&g) < exp(-x);
                    }
                    if (!accept) continue;
                    if (delta > 0.0 && at_best) {
                        memcpy(w->best_ones, idx, (size_t)k * sizeof(int32_t));
                        at_best = 0;
                    }
                    swap_update(f, row_of(Q, n, j), row_of(Q, n, i), n);
                    idx[a] = j;
                    zeros[b] = i;
                    e += delta;
                    acc++;
                    changed += delta != 0.0;
                    if (e < best_e) {
                        best_e = e;
                        at_best = 1;
                    }
                }
            }
            if (changed == 0 || stop_requested(p)) break;
        }
    }
    *sweeps = done;
    *accepted = acc;
    if (stop_requested(p)) { /* the solve reports ICBS_SA_ESTOP: skip the descent */
        *descent_swaps = 0;
        return best_e;
    }
    if (!at_best) {
        /* Back to the best state seen; the descent needs only its ones and fields. */
        memcpy(idx, w->best_ones, (size_t)k * sizeof(int32_t));
        compute_field(Q, n, idx, k, f);
    }
    double exact;
    *descent_swaps = descend(p, w, &exact);
    memcpy(w->best_ones, idx, (size_t)k * sizeof(int32_t));
    return exact;
}

/* ---------------------------------------------------------------- schedule */

/* Mean Metropolis acceptance exp(-beta d) over the uphill changes d[0..m). */
static double mean_acceptance(const double *d, int64_t m, double beta) {
    double s = 0.0;
    for (int64_t t = 0; t < m; t++) s += exp(-beta * d[t]);
    return s / (double)m;
}

/* The beta at which mean_acceptance is `target` (bisection on log beta). */
static double beta_for_acceptance(const double *d, int64_t m, double target) {
    double lo = log(1e-12), hi = log(1e12);
    for (int it = 0; it < 24; it++) { /* brackets beta within a factor 1 + 4e-6 */
        const double mid = 0.5 * (lo + hi);
        if (mean_acceptance(d, m, exp(mid)) > target) lo = mid;
        else hi = mid;
    }
    return exp(0.5 * (lo + hi));
}

int icbs_sa_auto_betas(const double *Q, int64_t n, int64_t k, const int8_t *x0,
                       const icbs_sa_params *params, double *beta_min,
                       double *beta_max) {
    if (!Q || !params || !beta_min || !beta_max || n < 1 || n > INT32_MAX || k < 0 ||
        k > n || params->auto_samples < 1 || !(params->auto_accept > 0.0) ||
        !(params->auto_accept < 1.0) || !(params->auto_range >= 1.0) ||
        !isfinite(params->auto_range))
        return ICBS_SA_EINVAL;
    *beta_min = params->beta_min;
    *beta_max = params->beta_max;
    const int64_t nz = n - k;
    if (k == 0 || nz == 0) return ICBS_SA_OK;
    /* Every pair when there are few, else auto_samples random ones. */
    const int all = (double)k * (double)nz <= (double)params->auto_samples;
    const int64_t m = all ? k * nz : params->auto_samples;
    int32_t *idx = malloc((size_t)n * sizeof(int32_t));
    double *f = malloc((size_t)n * sizeof(double));
    double *d = malloc((size_t)m * sizeof(double));
    if (!idx || !f || !d) {
        free(idx);
        free(f);
        free(d);
        return ICBS_SA_ENOMEM;
    }
    rng_t g;
    rng_seed(&g, params->seed, AUTO_STREAM);
    init_state(idx, n, k, x0, &g);
    compute_field(Q, n, idx, k, f);
    int64_t up = 0;
    for (int64_t s = 0; s < m; s++) {
        const int32_t i = idx[all ? s / nz : (int64_t)rng_below(&g, (uint32_t)k)];
        const int32_t j = idx[k + (all ? s % nz : (int64_t)rng_below(&g, (uint32_t)nz))];
        const double delta = row_of(Q, n, i)[i] - 2.0 * f[i] + row_of(Q, n, j)[j] +
                             2.0 * f[j] - 2.0 * row_of(Q, n, i)[j];
        if (delta > 0.0) d[up++] = delta;
    }
    if (up > 0) {
        *beta_min = beta_for_acceptance(d, up, params->auto_accept);
        *beta_max = params->auto_range * *beta_min;
    }
    free(idx);
    free(f);
    free(d);
    return ICBS_SA_OK;
}

/* ------------------------------------------------------------------- solve */

/* What the threads share: the restarts' outputs and the best answer so far. */
typedef struct {
    int64_t num_restarts;
    icbs_sa_result *result;
    double *energies;
    int8_t *x_out;
    double best_e; /* best (energy, restart) merged so far */
    int64_t best_r;
    int status;
} shared_t;

/* Restart r; keeps this thread's best (energy, restart) and its ones. */
static void one_restart(const problem_t *p, shared_t *sh, work_t *w, int64_t r,
                        double *mine_e, int64_t *mine_r) {
    int64_t sweeps = 0, accepted = 0, descent = 0;
    if (stop_requested(p)) return; /* icbs_sa_solve reports ICBS_SA_ESTOP */
    const double e = run_restart(p, w, r, &sweeps, &accepted, &descent);
    sh->energies[r] = e;
    if (sh->result->restart_sweeps) sh->result->restart_sweeps[r] = sweeps;
    if (sh->result->restart_accepted) sh->result->restart_accepted[r] = accepted;
    if (sh->result->restart_descent) sh->result->restart_descent[r] = descent;
    if (*mine_r < 0 || e < *mine_e || (e == *mine_e && r < *mine_r)) {
        *mine_e = e;
        *mine_r = r;
        memcpy(w->win_ones, w->best_ones, (size_t)p->k * sizeof(int32_t));
    }
}

static void merge_best(const problem_t *p, shared_t *sh, const work_t *w, double e,
                       int64_t r) {
    if (r < 0) return;
    if (sh->best_r < 0 || e < sh->best_e || (e == sh->best_e && r < sh->best_r)) {
        sh->best_e = e;
        sh->best_r = r;
        memset(sh->x_out, 0, (size_t)p->n);
        for (int64_t a = 0; a < p->k; a++) sh->x_out[w->win_ones[a]] = 1;
    }
}

/*
 * One thread's share of the restarts: inside an OpenMP team (in_team) those the
 * team hands out, else all of them in order. Then merges the thread's best.
 */
static void run_restarts(const problem_t *p, shared_t *sh, int in_team) {
    work_t w;
    const int ok = work_alloc(&w, p->n, p->k) == ICBS_SA_OK;
    double mine_e = INFINITY;
    int64_t mine_r = -1;
    if (!ok) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
        sh->status = ICBS_SA_ENOMEM;
    }
    if (in_team) {
        /* Every thread of the team must reach this loop, even without memory. */
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
        for (int64_t r = 0; r < sh->num_restarts; r++)
            if (ok) one_restart(p, sh, &w, r, &mine_e, &mine_r);
#ifdef _OPENMP
#pragma omp critical(icbs_sa_merge)
#endif
        merge_best(p, sh, &w, mine_e, mine_r);
    } else if (ok) {
        for (int64_t r = 0; r < sh->num_restarts; r++)
            one_restart(p, sh, &w, r, &mine_e, &mine_r);
        merge_best(p, sh, &w, mine_e, mine_r);
    }
    if (ok) work_free(&w);
}


int icbs_sa_solve(const double *Q, int64_t n, int64_t k, const int8_t *x0,
                  const icbs_sa_params *params, int8_t *x_out, icbs_sa_result *result) {
    if (!Q || !params || !x_out || !result || n < 1 || n > INT32_MAX || k < 0 ||
        k > n || params->num_restarts < 1 || params->sweeps_per_beta < 1 ||
        params->sweep_size < 1)
        return ICBS_SA_EINVAL;
    if (x0) {
        int64_t ones = 0;
        for (int64_t v = 0; v < n; v++) {
            if (x0[v] != 0 && x0[v] != 1) return ICBS_SA_EINVAL;
            ones += x0[v];
        }
        if (ones != k) return ICBS_SA_EINVAL;
    }
    double beta_min = params->beta_min, beta_max = params->beta_max;
    if (params->auto_schedule) {
        int rc = icbs_sa_auto_betas(Q, n, k, x0, params, &beta_min, &beta_max);
        if (rc != ICBS_SA_OK) return rc;
    }
    const double factor = params->beta_factor;
    if (!(beta_min > 0.0) || !(beta_max >= beta_min) || !isfinite(beta_max) ||
        !(factor > 1.0) || !isfinite(factor))
        return ICBS_SA_EINVAL;

    /* Every beta_min * factor^t not above beta_max (up to rounding). */
    const double steps = floor(log(beta_max / beta_min) / log(factor) + 1e-9);
    if (!(steps < MAX_BETAS)) return ICBS_SA_EINVAL;
    const int64_t num_betas = (int64_t)steps + 1;
    double *diag = malloc((size_t)n * sizeof(double));
    const int64_t R = params->num_restarts;
    double *energies = malloc((size_t)R * sizeof(double));
    if (!diag || !energies) {
        free(diag);
        free(energies);
        return ICBS_SA_ENOMEM;
    }
    for (int64_t v = 0; v < n; v++) diag[v] = Q[(size_t)v * (size_t)n + (size_t)v];

    result->best_restart = 0;
    result->beta_min = beta_min;
    result->beta_max = beta_max;
    result->num_betas = num_betas;
    result->num_threads = 1;
    if (k == 0 || k == n) {
        /* A single feasible point: every restart ends where it starts. */
        double e = 0.0;
        for (int64_t i = 0; k == n && i < n * n; i++) e += Q[i];
        memset(x_out, k == n, (size_t)n);
        for (int64_t r = 0; r < R; r++) {
            if (result->restart_energies) result->restart_energies[r] = e;
            if (result->restart_sweeps) result->restart_sweeps[r] = 0;
            if (result->restart_accepted) result->restart_accepted[r] = 0;
            if (result->restart_descent) result->restart_descent[r] = 0;
        }
        free(diag);
        free(energies);
        return ICBS_SA_OK;
    }

    const problem_t p = {.Q = Q,
                         .diag = diag,
                         .n = n,
                         .k = k,
                         .x0 = x0,
                         .beta_min = beta_min,
                         .beta_factor = factor,
                         .num_betas = num_betas,
                         .sweeps_per_beta = params->sweeps_per_beta,
                         .sweep_size = params->sweep_size,
                         .seed = params->seed,
                         .stop = params->stop};
    int threads = 1;
#ifdef _OPENMP
    threads = params->num_threads > 0 ? params->num_threads : omp_get_max_threads();
#endif
    if (threads > R) threads = (int)R;
    if (n < MIN_PARALLEL_N) threads = 1; /* thread start-up would cost more */
    if (threads < 1) threads = 1;

    shared_t sh = {R, result, energies, x_out, INFINITY, -1, ICBS_SA_OK};
#ifdef _OPENMP
    if (threads > 1) {
#pragma omp parallel num_threads(threads)
        run_restarts(&p, &sh, 1);
    } else
#endif
        /* No OpenMP call at all here: a process forked from one whose OpenMP
         * threads ran can still solve on one thread (GNU libgomp's pool does
         * not survive fork). */
        run_restarts(&p, &sh, 0);
    const int status = sh.status == ICBS_SA_OK && stop_requested(&p) ? ICBS_SA_ESTOP
                                                                     : sh.status;
    const int64_t best_r = sh.best_r;

    if (status == ICBS_SA_OK) {
        if (result->restart_energies)
            memcpy(result->restart_energies, energies, (size_t)R * sizeof(double));
        result->best_restart = best_r;
        result->num_threads = threads;
    }
    free(diag);
    free(energies);
    return status;
}
