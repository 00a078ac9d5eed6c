/*
 * Tests of the annealing core alone (no Python). Build and run from the repository
 * root, with or without -fopenmp:
 *
 *     gcc -O2 -std=c99 -fopenmp native/test_sa.c native/sa.c -lm -o test_sa && ./test_sa
 *
 * Prints one line per failed check and a summary; exits non-zero on failure.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sa.h"

static int failures = 0, checks = 0;

#define CHECK(cond, ...)                                                    \
    do {                                                                    \
        checks++;                                                           \
        if (!(cond)) {                                                      \
            failures++;                                                     \
            fprintf(stderr, "%s:%d: check failed: %s: ", __FILE__, __LINE__, \
                    #cond);                                                 \
            fprintf(stderr, __VA_ARGS__);                                   \
            fputc('\n', stderr);                                            \
        }                                                                   \
    } while (0)

/* ------------------------------------------------------------ helpers */

static uint64_t test_rng_state;

static double uniform_pm1(void) {
    uint64_t z = (test_rng_state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    return (double)(z >> 11) * 0x1.0p-52 - 1.0;
}

/* A random symmetric n x n matrix with entries in [-1, 1). */
static double *random_q(int64_t n, uint64_t seed) {
    double *Q = malloc((size_t)(n * n) * sizeof(double));
    test_rng_state = seed;
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = 0; j <= i; j++) Q[i * n + j] = Q[j * n + i] = uniform_pm1();
    return Q;
}

static double energy(const double *Q, int64_t n, const int8_t *x) {
    double e = 0.0;
    for (int64_t i = 0; i < n; i++)
        if (x[i])
            for (int64_t j = 0; j < n; j++)
                if (x[j]) e += Q[i * n + j];
    return e;
}

static int64_t count_ones(const int8_t *x, int64_t n) {
    int64_t c = 0;
    for (int64_t i = 0; i < n; i++) c += x[i];
    return c;
}

/* The optimum over all x with k ones (n <= 20), written to x_best. */
static double brute_force(const double *Q, int64_t n, int64_t k, int8_t *x_best) {
    double best = INFINITY;
    int8_t x[20];
    for (uint32_t mask = 0; mask < (1u << n); mask++) {
        int64_t ones = 0;
        for (uint32_t m = mask; m; m &= m - 1) ones++;
        if (ones != k) continue;
        for (int64_t i = 0; i < n; i++) x[i] = (int8_t)((mask >> i) & 1u);
        const double e = energy(Q, n, x);
        if (e < best) {
            best = e;
            memcpy(x_best, x, (size_t)n);
        }
    }
    return best;
}

/* The core owns no defaults; these are the Python wrapper's (the constants at the
 * top of icbs_opt/backends/native.py), with sweep_size = max(n, 64). */
static icbs_sa_params default_params(int64_t n, uint64_t seed) {
    icbs_sa_params p = {.beta_min = 1e-3,
                        .beta_max = 100.0,
                        .beta_factor = 1.1,
                        .sweeps_per_beta = 1,
                        .sweep_size = n > 64 ? n : 64,
                        .num_restarts = 10,
                        .num_threads = 0,
                        .auto_schedule = 1,
                        .auto_samples = 2048,
                        .auto_accept = 0.3,
                        .auto_range = 1e3,
                        .seed = seed};
    return p;
}

/* -------------------------------------------------------------- tests */

/* Both schedules find the optimum of every small random problem. */
static void test_exact_on_small_problems(void) {
    int8_t x[20], opt[20];
    for (int64_t n = 2; n <= 12; n++) {
        const int64_t ks[3] = {1, n / 2, n - 1};
        for (int c = 0; c < 3; c++)
            for (uint64_t seed = 0; seed < 3; seed++) {
                const int64_t k = ks[c];
                double *Q = random_q(n, 1000 * (uint64_t)n + 10 * (uint64_t)k + seed);
                const double best = brute_force(Q, n, k, opt);
                for (int au = 0; au <= 1; au++) {
                    icbs_sa_params p = default_params(n, seed);
                    p.auto_schedule = au;
                    double energies[10];
                    icbs_sa_result r = {energies, NULL, NULL, NULL, 0, 0, 0, 0, 0};
                    const int rc = icbs_sa_solve(Q, n, k, NULL, &p, x, &r);
                    const double e = energy(Q, n, x);
                    CHECK(rc == ICBS_SA_OK, "rc %d", rc);
                    CHECK(count_ones(x, n) == k, "n=%lld k=%lld", (long long)n,
                          (long long)k);
                    CHECK(fabs(energies[r.best_restart] - e) < 1e-9, "reported %.12g",
                          energies[r.best_restart]);
                    CHECK(fabs(e - best) < 1e-9, "n=%lld k=%lld auto=%d: %.12g vs %.12g",
                          (long long)n, (long long)k, au, e, best);
                }
                free(Q);
            }
    }
}

static int feasible_groups(const int8_t *x, int64_t n, const int32_t *group,
                           int64_t num_groups, const int64_t *count);

/* One solve with 6 restarts (grouped when gr is given: its reported energy is
 * checked), on num_threads threads (0: the default). */
static int solve6(const double *Q, int64_t n, int64_t k, const icbs_sa_groups *gr,
                  uint64_t seed, int num_threads, int8_t *x, double *e,
                  int64_t *sweeps) {
    icbs_sa_params p = default_params(n, seed);
    p.num_restarts = 6;
    if (num_threads) p.num_threads = num_threads; /* else the default */
    icbs_sa_result r = {e, sweeps, NULL, NULL, 0, 0, 0, 0, 0};
    if (!gr) return icbs_sa_solve(Q, n, k, NULL, &p, x, &r);
    const int status = icbs_sa_solve_groups(Q, n, gr, NULL, &p, x, &r);
    CHECK(fabs(energy(Q, n, x) - e[r.best_restart]) < 1e-9, "reported %.12g",
          e[r.best_restart]);
    return status;
}

/* 1, 2 and 3 threads give the same answer, energies and sweeps; another seed
 * explores differently. */
static void check_thread_invariance(const double *Q, int64_t n, int64_t k,
                                    const icbs_sa_groups *gr) {
    int8_t x[3][600];
    double e[3][6];
    int64_t sweeps[3][6];
    for (int t = 0; t < 3; t++) {
        CHECK(solve6(Q, n, k, gr, 42, t + 1, x[t], e[t], sweeps[t]) == ICBS_SA_OK,
              "threads %d", t + 1);
        if (gr)
            CHECK(feasible_groups(x[t], n, gr->group, gr->num_groups, gr->count),
                  "threads %d", t + 1);
    }
    for (int t = 1; t < 3; t++) {
        CHECK(memcmp(x[0], x[t], (size_t)n) == 0, "x differs with %d threads", t + 1);
        CHECK(memcmp(e[0], e[t], sizeof(e[0])) == 0, "energies differ, %d threads",
              t + 1);
        CHECK(memcmp(sweeps[0], sweeps[t], sizeof(sweeps[0])) == 0,
              "sweeps differ, %d threads", t + 1);
    }
    int8_t y[600];
    double e2[6];
    int64_t sweeps2[6];
    CHECK(solve6(Q, n, k, gr, 43, 0, y, e2, sweeps2) == ICBS_SA_OK, "seed 43");
    CHECK(memcmp(e[0], e2, sizeof(e2)) != 0, "seeds 42 and 43 gave the same runs");
}

static void test_same_answer_for_any_thread_count(void) {
    const int64_t n = 600, k = 240; /* n >= 512: restarts run in parallel */
    double *Q = random_q(n, 7);
    check_thread_invariance(Q, n, k, NULL);
    free(Q);
}

static void test_trivial_cardinalities(void) {
    const int64_t n = 9;
    double *Q = random_q(n, 3);
    int8_t x[9];
    icbs_sa_params p = default_params(n, 0);
    icbs_sa_result r = {NULL, NULL, NULL, NULL, 0, 0, 0, 0, 0};
    memset(x, 7, sizeof(x));
    CHECK(icbs_sa_solve(Q, n, 0, NULL, &p, x, &r) == ICBS_SA_OK, "k = 0");
    CHECK(count_ones(x, n) == 0 && x[0] == 0, "k = 0 gave %lld ones",
          (long long)count_ones(x, n));
    CHECK(icbs_sa_solve(Q, n, n, NULL, &p, x, &r) == ICBS_SA_OK, "k = n");
    CHECK(count_ones(x, n) == n, "k = n gave %lld ones", (long long)count_ones(x, n));
    const double one[1] = {-2.0};
    for (int64_t k = 0; k <= 1; k++) {
        int8_t x1[1] = {5};
        CHECK(icbs_sa_solve(one, 1, k, NULL, &p, x1, &r) == ICBS_SA_OK, "n = 1");
        CHECK(x1[0] == k, "n = 1, k = %lld gave %d", (long long)k, x1[0]);
    }
    free(Q);
}

static void test_warm_start(void) {
    const int64_t n = 12, k = 5;
    double *Q = random_q(n, 99);
    int8_t opt[12], x[12], x0[12];
    const double best = brute_force(Q, n, k, opt);
    /* From the optimum with a cold schedule every restart stays there. */
    icbs_sa_params p = default_params(n, 1);
    p.auto_schedule = 0;
    p.beta_min = p.beta_max = 1e6;
    double e[10];
    icbs_sa_result r = {e, NULL, NULL, NULL, 0, 0, 0, 0, 0};
    CHECK(icbs_sa_solve(Q, n, k, opt, &p, x, &r) == ICBS_SA_OK, "warm start");
    CHECK(memcmp(x, opt, (size_t)n) == 0, "left the optimum");
    for (int t = 0; t < 10; t++)
        CHECK(fabs(e[t] - best) < 1e-12, "restart %d ended at %.12g", t, e[t]);
    /* From any x0 the answer is no worse than x0, even with a short hot schedule. */
    memset(x0, 0, sizeof(x0));
    for (int64_t i = 0; i < k; i++) x0[2 * i] = 1;
    p.beta_min = 1e-6;
    p.beta_max = 1e-5;
    p.num_restarts = 3;
    CHECK(icbs_sa_solve(Q, n, k, x0, &p, x, &r) == ICBS_SA_OK, "hot warm start");
    CHECK(energy(Q, n, x) <= energy(Q, n, x0) + 1e-12, "worse than x0");
    free(Q);
}

static void test_bad_arguments(void) {
    const int64_t n = 6;
    double *Q = random_q(n, 5);
    int8_t x[6], x0[6] = {1, 1, 1, 0, 0, 0};
    icbs_sa_result r = {NULL, NULL, NULL, NULL, 0, 0, 0, 0, 0};
    icbs_sa_params p = default_params(n, 0);
    CHECK(icbs_sa_solve(Q, n, 7, NULL, &p, x, &r) == ICBS_SA_EINVAL, "k > n");
    CHECK(icbs_sa_solve(Q, n, -1, NULL, &p, x, &r) == ICBS_SA_EINVAL, "k < 0");
    CHECK(icbs_sa_solve(Q, 0, 0, NULL, &p, x, &r) == ICBS_SA_EINVAL, "n = 0");
    CHECK(icbs_sa_solve(Q, n, 2, x0, &p, x, &r) == ICBS_SA_EINVAL, "x0 has 3 ones");
    x0[0] = 2;
    CHECK(icbs_sa_solve(Q, n, 3, x0, &p, x, &r) == ICBS_SA_EINVAL, "x0 not 0/1");
    p.num_restarts = 0;
    CHECK(icbs_sa_solve(Q, n, 3, NULL, &p, x, &r) == ICBS_SA_EINVAL, "0 restarts");
    p = default_params(n, 0);
    p.sweeps_per_beta = 0;
    CHECK(icbs_sa_solve(Q, n, 3, NULL, &p, x, &r) == ICBS_SA_EINVAL, "0 sweeps");
    p = default_params(n, 0);
    p.auto_schedule = 0;
    p.beta_factor = 1.0;
    CHECK(icbs_sa_solve(Q, n, 3, NULL, &p, x, &r) == ICBS_SA_EINVAL, "factor 1");
    p.beta_factor = 1.0 + 1e-15;
    CHECK(icbs_sa_solve(Q, n, 3, NULL, &p, x, &r) == ICBS_SA_EINVAL, "1e15 betas");
    p.beta_factor = 1.1;
    p.beta_min = 0.0;
    CHECK(icbs_sa_solve(Q, n, 3, NULL, &p, x, &r) == ICBS_SA_EINVAL, "beta_min 0");
    p.beta_min = 10.0;
    p.beta_max = 1.0;
    CHECK(icbs_sa_solve(Q, n, 3, NULL, &p, x, &r) == ICBS_SA_EINVAL, "max < min");
    p.beta_max = INFINITY;
    CHECK(icbs_sa_solve(Q, n, 3, NULL, &p, x, &r) == ICBS_SA_EINVAL, "max inf");
    p = default_params(n, 0);
    p.sweep_size = 0;
    CHECK(icbs_sa_solve(Q, n, 3, NULL, &p, x, &r) == ICBS_SA_EINVAL, "sweep size 0");
    p = default_params(n, 0);
    p.auto_samples = 0;
    CHECK(icbs_sa_solve(Q, n, 3, NULL, &p, x, &r) == ICBS_SA_EINVAL, "0 samples");
    p = default_params(n, 0);
    p.auto_accept = 1.0;
    CHECK(icbs_sa_solve(Q, n, 3, NULL, &p, x, &r) == ICBS_SA_EINVAL, "accept 1");
    p.auto_accept = 0.0;
    CHECK(icbs_sa_solve(Q, n, 3, NULL, &p, x, &r) == ICBS_SA_EINVAL, "accept 0");
    p = default_params(n, 0);
    p.auto_range = 0.5;
    CHECK(icbs_sa_solve(Q, n, 3, NULL, &p, x, &r) == ICBS_SA_EINVAL, "range < 1");
    free(Q);
}

static void test_auto_range(void) {
    const int64_t n = 200;
    double *Q = random_q(n, 11);
    double lo, hi, lo2, hi2;
    icbs_sa_params p = default_params(n, 3);
    p.auto_range = 500.0;
    CHECK(icbs_sa_auto_betas(Q, n, 80, NULL, &p, &lo, &hi) == ICBS_SA_OK, "auto");
    CHECK(lo > 0.0 && isfinite(hi) && fabs(hi / lo - 500.0) < 1e-9, "%g %g", lo, hi);
    CHECK(icbs_sa_auto_betas(Q, n, 80, NULL, &p, &lo2, &hi2) == ICBS_SA_OK, "again");
    CHECK(lo == lo2 && hi == hi2, "not deterministic");
    /* Scaling Q by 10 scales the range by 1/10. */
    for (int64_t i = 0; i < n * n; i++) Q[i] *= 10.0;
    CHECK(icbs_sa_auto_betas(Q, n, 80, NULL, &p, &lo2, &hi2) == ICBS_SA_OK, "scaled");
    CHECK(fabs(lo2 * 10.0 / lo - 1.0) < 1e-4, "scaled range %g vs %g", lo2, lo);
    memset(Q, 0, (size_t)(n * n) * sizeof(double));
    /* A hotter target gives a smaller beta_min. */
    p.auto_accept = 0.6;
    CHECK(icbs_sa_auto_betas(Q, n, 80, NULL, &p, &lo, &hi) == ICBS_SA_OK, "hotter");
    CHECK(lo < lo2, "accept 0.6 gave beta_min %g, not below %g", lo, lo2);
    /* No uphill swap: the caller's range comes back. */
    memset(Q, 0, (size_t)(n * n) * sizeof(double));
    p.beta_min = 0.25;
    p.beta_max = 4.0;
    CHECK(icbs_sa_auto_betas(Q, n, 80, NULL, &p, &lo, &hi) == ICBS_SA_OK, "zero Q");
    CHECK(lo == 0.25 && hi == 4.0, "zero Q range %g %g", lo, hi);
    free(Q);
}

static void test_larger_problem(void) {
    const int64_t n = 700, k = 300;
    double *Q = random_q(n, 21);
    int8_t *x = malloc((size_t)n);
    double e[4];
    int64_t sweeps[4], accepted[4], descent[4];
    icbs_sa_params p = default_params(n, 8);
    p.num_restarts = 4;
    icbs_sa_result r = {e, sweeps, accepted, descent, 0, 0, 0, 0, 0};
    CHECK(icbs_sa_solve(Q, n, k, NULL, &p, x, &r) == ICBS_SA_OK, "n = 700");
    CHECK(count_ones(x, n) == k, "%lld ones", (long long)count_ones(x, n));
    const double exact = energy(Q, n, x);
    CHECK(fabs(e[r.best_restart] - exact) <= 1e-9 * fabs(exact), "%.12g vs %.12g",
          e[r.best_restart], exact);
    for (int t = 0; t < 4; t++) {
        CHECK(e[r.best_restart] <= e[t], "restart %d beat the best", t);
        CHECK(sweeps[t] >= 1 && sweeps[t] <= r.num_betas, "sweeps %lld",
              (long long)sweeps[t]);
        CHECK(accepted[t] > 0, "restart %d accepted nothing", t);
    }
    free(Q);
    free(x);
}

static void test_stop_flag(void) {
    const int64_t n = 100;
    double *Q = random_q(n, 5);
    int8_t x[100];
    icbs_sa_result r = {0};
    volatile int32_t stop = 1;
    icbs_sa_params p = default_params(n, 4);
    p.stop = &stop;
    CHECK(icbs_sa_solve(Q, n, 40, NULL, &p, x, &r) == ICBS_SA_ESTOP, "stop set");
    stop = 0;
    CHECK(icbs_sa_solve(Q, n, 40, NULL, &p, x, &r) == ICBS_SA_OK, "stop clear");
    free(Q);
}

/* ------------------------------------------------------------ grouped */

/* Whether every group g of x has count[g] ones (G <= 256). */
static int feasible_groups(const int8_t *x, int64_t n, const int32_t *group,
                           int64_t G, const int64_t *count) {
    int64_t ones[256] = {0};
    for (int64_t i = 0; i < n; i++) {
        if (x[i] != 0 && x[i] != 1) return 0;
        ones[group[i]] += x[i];
    }
    for (int64_t g = 0; g < G; g++)
        if (ones[g] != count[g]) return 0;
    return 1;
}

/* The optimum over all x with count[g] ones in each group (n <= 20). */
static double brute_force_groups(const double *Q, int64_t n, const int32_t *group,
                                 int64_t G, const int64_t *count, int8_t *x_best) {
    double best = INFINITY;
    int8_t x[20];
    for (uint32_t mask = 0; mask < (1u << n); mask++) {
        for (int64_t i = 0; i < n; i++) x[i] = (int8_t)((mask >> i) & 1u);
        if (!feasible_groups(x, n, group, G, count)) continue;
        const double e = energy(Q, n, x);
        if (e < best) {
            best = e;
            memcpy(x_best, x, (size_t)n);
        }
    }
    return best;
}

/* A grouping of n variables: kind 0 consecutive groups of m, kind 1 round robin
 * over G = n / m groups (not contiguous), kind 2 random sizes and counts (some
 * groups never move). Writes group and count; returns G. */
static int64_t make_groups(int64_t n, int64_t m, int kind, uint64_t seed,
                           int32_t *group, int64_t *count) {
    int64_t G = (n + m - 1) / m, size[64] = {0};
    test_rng_state = seed;
    for (int64_t i = 0; i < n; i++) {
        if (kind == 0) group[i] = (int32_t)(i / m);
        else if (kind == 1) group[i] = (int32_t)(i % G);
        else group[i] = (int32_t)(i < G ? i : (uniform_pm1() + 1.0) * 0.5 * (double)G);
        if (group[i] >= G) group[i] = (int32_t)(G - 1);
        size[group[i]]++;
    }
    for (int64_t g = 0; g < G; g++) {
        if (kind < 2) count[g] = size[g] / 2;
        else count[g] = (int64_t)((uniform_pm1() + 1.0) * 0.5 * (double)(size[g] + 1));
        if (count[g] > size[g]) count[g] = size[g];
    }
    return G;
}

static int64_t sum_counts(const int64_t *count, int64_t G) {
    int64_t k = 0;
    for (int64_t g = 0; g < G; g++) k += count[g];
    return k;
}

/* Both schedules find the optimum over per-group feasible x of small problems. */
static void test_grouped_exact_on_small_problems(void) {
    int8_t x[20], opt[20];
    int32_t group[20];
    int64_t count[20];
    for (int64_t n = 4; n <= 16; n += 2)
        for (int kind = 0; kind < 3; kind++)
            for (int64_t m = 2; m <= 4; m += 2)
                for (uint64_t seed = 0; seed < 3; seed++) {
                    const int64_t G = make_groups(n, m, kind, seed + 17 * (uint64_t)n,
                                                  group, count);
                    double *Q = random_q(n, 500 * (uint64_t)n + 7 * m + seed + kind);
                    const double best = brute_force_groups(Q, n, group, G, count, opt);
                    const icbs_sa_groups gr = {G, group, count};
                    for (int au = 0; au <= 1; au++) {
                        icbs_sa_params p = default_params(n, seed);
                        p.auto_schedule = au;
                        double e[10];
                        icbs_sa_result r = {e, NULL, NULL, NULL, 0, 0, 0, 0, 0};
                        const int rc = icbs_sa_solve_groups(Q, n, &gr, NULL, &p, x, &r);
                        CHECK(rc == ICBS_SA_OK, "rc %d", rc);
                        CHECK(feasible_groups(x, n, group, G, count),
                              "n=%lld kind=%d m=%lld infeasible", (long long)n, kind,
                              (long long)m);
                        const double ex = energy(Q, n, x);
                        CHECK(fabs(e[r.best_restart] - ex) < 1e-9, "reported %.12g vs %.12g",
                              e[r.best_restart], ex);
                        CHECK(fabs(ex - best) < 1e-9,
                              "n=%lld kind=%d m=%lld auto=%d: %.12g vs %.12g",
                              (long long)n, kind, (long long)m, au, ex, best);
                    }
                    free(Q);
                }
}

/* Every restart's answer is feasible per group; threads do not change answers. */
static void test_grouped_threads_and_seeds(void) {
    const int64_t n = 600; /* n >= 512: restarts run in parallel */
    double *Q = random_q(n, 8);
    int32_t group[600];
    int64_t count[150];
    for (int64_t i = 0; i < n; i++) group[i] = (int32_t)(i / 4);
    for (int64_t g = 0; g < 150; g++) count[g] = 2;
    const icbs_sa_groups gr = {150, group, count};
    check_thread_invariance(Q, n, 0, &gr);
    free(Q);
}

/* Groups with count 0 or count = size never move; all of them: one answer. */
static void test_grouped_fixed_groups(void) {
    const int64_t n = 9;
    double *Q = random_q(n, 12);
    int32_t group[9] = {0, 0, 0, 1, 1, 1, 2, 2, 2};
    int64_t count[3] = {0, 3, 0};
    int8_t x[9];
    double e[10];
    int64_t sweeps[10];
    icbs_sa_params p = default_params(n, 0);
    icbs_sa_result r = {e, sweeps, NULL, NULL, 0, 0, 0, 0, 0};
    icbs_sa_groups gr = {3, group, count};
    CHECK(icbs_sa_solve_groups(Q, n, &gr, NULL, &p, x, &r) == ICBS_SA_OK, "fixed");
    const int8_t want[9] = {0, 0, 0, 1, 1, 1, 0, 0, 0};
    CHECK(memcmp(x, want, 9) == 0, "not the single feasible point");
    CHECK(fabs(e[0] - energy(Q, n, x)) < 1e-12 && sweeps[0] == 0, "energy %.12g", e[0]);
    /* One movable group among fixed ones: only it changes. */
    count[2] = 1;
    int8_t opt[9];
    const double best = brute_force_groups(Q, n, group, 3, count, opt);
    CHECK(icbs_sa_solve_groups(Q, n, &gr, NULL, &p, x, &r) == ICBS_SA_OK, "mixed");
    CHECK(feasible_groups(x, n, group, 3, count), "mixed infeasible");
    CHECK(fabs(energy(Q, n, x) - best) < 1e-12, "mixed %.12g vs %.12g",
          energy(Q, n, x), best);
    free(Q);
}

static void test_grouped_warm_start(void) {
    const int64_t n = 12;
    double *Q = random_q(n, 77);
    int32_t group[12];
    int64_t count[3] = {1, 2, 3};
    for (int64_t i = 0; i < n; i++) group[i] = (int32_t)(i % 3);
    const icbs_sa_groups gr = {3, group, count};
    int8_t opt[12], x[12];
    const double best = brute_force_groups(Q, n, group, 3, count, opt);
    icbs_sa_params p = default_params(n, 1);
    p.auto_schedule = 0;
    p.beta_min = p.beta_max = 1e6;
    double e[10];
    int64_t descent[10];
    icbs_sa_result r = {e, NULL, NULL, descent, 0, 0, 0, 0, 0};
    CHECK(icbs_sa_solve_groups(Q, n, &gr, opt, &p, x, &r) == ICBS_SA_OK, "warm");
    CHECK(memcmp(x, opt, (size_t)n) == 0, "left the optimum");
    for (int t = 0; t < 10; t++)
        CHECK(fabs(e[t] - best) < 1e-12 && descent[t] == 0, "restart %d: %.12g", t,
              e[t]);
    /* A hot short schedule from any feasible x0 ends no worse than x0. */
    int8_t x0[12] = {1, 1, 1, 0, 1, 1, 0, 0, 1, 0, 0, 0};
    CHECK(feasible_groups(x0, n, group, 3, count), "test x0 infeasible");
    p.beta_min = 1e-6;
    p.beta_max = 1e-5;
    CHECK(icbs_sa_solve_groups(Q, n, &gr, x0, &p, x, &r) == ICBS_SA_OK, "hot warm");
    CHECK(energy(Q, n, x) <= energy(Q, n, x0) + 1e-12, "worse than x0");
    CHECK(feasible_groups(x, n, group, 3, count), "hot warm infeasible");
    /* The right total but not per group: refused. */
    int8_t bad[12] = {1, 1, 0, 1, 1, 1, 0, 0, 1, 0, 0, 0};
    CHECK(icbs_sa_solve_groups(Q, n, &gr, bad, &p, x, &r) == ICBS_SA_EINVAL,
          "x0 infeasible per group");
    free(Q);
}

static void test_grouped_bad_arguments(void) {
    const int64_t n = 6;
    double *Q = random_q(n, 5);
    int8_t x[6];
    int32_t group[6] = {0, 0, 0, 1, 1, 1};
    int64_t count[2] = {1, 2};
    icbs_sa_result r = {NULL, NULL, NULL, NULL, 0, 0, 0, 0, 0};
    icbs_sa_params p = default_params(n, 0);
    icbs_sa_groups gr = {2, group, count};
    CHECK(icbs_sa_solve_groups(Q, n, &gr, NULL, &p, x, &r) == ICBS_SA_OK, "valid");
    CHECK(icbs_sa_solve_groups(Q, n, NULL, NULL, &p, x, &r) == ICBS_SA_EINVAL, "NULL");
    gr.num_groups = 0;
    CHECK(icbs_sa_solve_groups(Q, n, &gr, NULL, &p, x, &r) == ICBS_SA_EINVAL, "G = 0");
    gr.num_groups = 7;
    CHECK(icbs_sa_solve_groups(Q, n, &gr, NULL, &p, x, &r) == ICBS_SA_EINVAL, "G > n");
    gr.num_groups = 2;
    group[5] = 2;
    CHECK(icbs_sa_solve_groups(Q, n, &gr, NULL, &p, x, &r) == ICBS_SA_EINVAL, "id 2");
    group[5] = -1;
    CHECK(icbs_sa_solve_groups(Q, n, &gr, NULL, &p, x, &r) == ICBS_SA_EINVAL, "id -1");
    group[5] = 1;
    count[1] = 4;
    CHECK(icbs_sa_solve_groups(Q, n, &gr, NULL, &p, x, &r) == ICBS_SA_EINVAL, "4 > 3");
    count[1] = -1;
    CHECK(icbs_sa_solve_groups(Q, n, &gr, NULL, &p, x, &r) == ICBS_SA_EINVAL, "-1");
    count[1] = 2;
    p.num_restarts = 0;
    CHECK(icbs_sa_solve_groups(Q, n, &gr, NULL, &p, x, &r) == ICBS_SA_EINVAL, "0 runs");
    p = default_params(n, 0);
    p.auto_samples = 0;
    CHECK(icbs_sa_solve_groups(Q, n, &gr, NULL, &p, x, &r) == ICBS_SA_EINVAL, "samples");
    int8_t x0[6] = {1, 0, 0, 1, 1, 2};
    p = default_params(n, 0);
    CHECK(icbs_sa_solve_groups(Q, n, &gr, x0, &p, x, &r) == ICBS_SA_EINVAL, "x0 not 0/1");
    free(Q);
}

/* Unequal groups (the alias draw) on a larger problem: feasible, exact energy. */
static void test_grouped_larger_problem(void) {
    const int64_t n = 700;
    double *Q = random_q(n, 31);
    int32_t *group = malloc((size_t)n * sizeof(int32_t));
    int64_t count[100], ones[100] = {0};
    for (int64_t i = 0; i < n; i++) group[i] = (int32_t)((i * 37) % 100);
    for (int64_t g = 0; g < 100; g++) count[g] = g % 8; /* size 7: 0..7, 7 is fixed */
    const icbs_sa_groups gr = {100, group, count};
    int8_t *x = malloc((size_t)n);
    double e[4];
    int64_t sweeps[4], accepted[4], descent[4];
    icbs_sa_params p = default_params(n, 8);
    p.num_restarts = 4;
    icbs_sa_result r = {e, sweeps, accepted, descent, 0, 0, 0, 0, 0};
    CHECK(icbs_sa_solve_groups(Q, n, &gr, NULL, &p, x, &r) == ICBS_SA_OK, "n = 700");
    for (int64_t i = 0; i < n; i++) ones[group[i]] += x[i];
    for (int64_t g = 0; g < 100; g++)
        CHECK(ones[g] == count[g], "group %lld: %lld ones", (long long)g,
              (long long)ones[g]);
    const double exact = energy(Q, n, x);
    CHECK(fabs(e[r.best_restart] - exact) <= 1e-9 * fabs(exact), "%.12g vs %.12g",
          e[r.best_restart], exact);
    for (int t = 0; t < 4; t++) {
        CHECK(e[r.best_restart] <= e[t], "restart %d beat the best", t);
        CHECK(sweeps[t] >= 1 && sweeps[t] <= r.num_betas, "sweeps %lld",
              (long long)sweeps[t]);
        CHECK(accepted[t] > 0, "restart %d accepted nothing", t);
    }
    CHECK(sum_counts(count, 100) == count_ones(x, n), "total ones");
    free(Q);
    free(group);
    free(x);
}

int main(void) {
    test_exact_on_small_problems();
    test_same_answer_for_any_thread_count();
    test_trivial_cardinalities();
    test_warm_start();
    test_bad_arguments();
    test_auto_range();
    test_larger_problem();
    test_stop_flag();
    test_grouped_exact_on_small_problems();
    test_grouped_threads_and_seeds();
    test_grouped_fixed_groups();
    test_grouped_warm_start();
    test_grouped_bad_arguments();
    test_grouped_larger_problem();
    printf("%d checks, %d failed\n", checks, failures);
    return failures != 0;
}
