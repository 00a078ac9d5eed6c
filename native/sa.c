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
#define ICBS_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define PREFETCH(ptr) ((void)0)
#define ICBS_ALWAYS_INLINE inline
#endif

/* Per-thread workspace: O(n). */
typedef struct {
    int32_t *idx;       /* idx[0..k) the ones, idx[k..n) the zeros (grouped: per
                           group segment, its ones first) */
    int32_t *best_ones; /* the ones of this restart's best state (grouped: idx) */
    int32_t *win_ones;  /* the ones of this thread's best restart */
    int32_t *ones;      /* grouped: the ones gathered from idx */
    double *field;      /* f = Q x */
    double *cost;       /* descent: Q_ll + 2 f_l for zeros, +inf for ones */
    double *one;        /* descent: x as doubles */
} work_t;

static void work_free(work_t *w) {
    free(w->idx);
    free(w->best_ones);
    free(w->win_ones);
    free(w->ones);
    free(w->field);
    free(w->cost);
    free(w->one);
    memset(w, 0, sizeof(*w));
}

/* snap: entries of a snapshot of the state (k, or n when grouped). */
static int work_alloc(work_t *w, int64_t n, int64_t k, int64_t snap) {
    const size_t kk = k > 0 ? (size_t)k : 1;
    memset(w, 0, sizeof(*w));
    w->idx = malloc((size_t)n * sizeof(int32_t));
    w->best_ones = malloc((snap > 0 ? (size_t)snap : 1) * sizeof(int32_t));
    w->win_ones = malloc(kk * sizeof(int32_t));
    w->ones = malloc(kk * sizeof(int32_t));
    w->field = malloc((size_t)n * sizeof(double));
    w->cost = malloc((size_t)n * sizeof(double));
    w->one = malloc((size_t)n * sizeof(double));
    if (!w->idx || !w->best_ones || !w->win_ones || !w->ones || !w->field || !w->cost ||
        !w->one) {
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

/* ------------------------------------------------------------------ groups */

/* A movable group (0 < count < size): its segment of idx, ones first, and its
 * alias-table entry. */
typedef struct {
    uint32_t start, count, zeros;
    uint32_t alias; /* drawn instead when the uniform draw is >= prob */
    double prob;
} mgroup_t;

/*
 * A grouped problem's layout, built once per solve and shared read-only by the
 * threads. Group g's variables, in index order, are order[start[g]..start[g+1]).
 */
typedef struct {
    int64_t num_groups;
    const int64_t *count; /* the caller's counts */
    int64_t *start;       /* G + 1 offsets */
    int32_t *order;       /* the n variables, group by group */
    int64_t num_movable;
    mgroup_t *mg;  /* the movable groups, in group order */
    int equal;     /* all movable groups have as many swaps: no alias draw */
    int64_t total; /* ones in all */
    double swaps;  /* feasible swaps in all */
} layout_t;

static void layout_free(layout_t *L) {
    free(L->start);
    free(L->order);
    free(L->mg);
    memset(L, 0, sizeof(*L));
}

/* Walker's alias table (Vose's construction) for weights count * zeros. */
static int build_alias(layout_t *L) {
    const int64_t m = L->num_movable;
    mgroup_t *mg = L->mg;
    double sum = 0.0;
    L->equal = 1;
    for (int64_t t = 0; t < m; t++) {
        mg[t].prob = (double)mg[t].count * (double)mg[t].zeros;
        mg[t].alias = (uint32_t)t;
        sum += mg[t].prob;
        L->equal = L->equal && mg[t].prob == mg[0].prob;
    }
    L->swaps = sum;
    if (L->equal) return ICBS_SA_OK;
    int64_t *small = malloc((size_t)m * sizeof(int64_t));
    int64_t *large = malloc((size_t)m * sizeof(int64_t));
    if (!small || !large) {
        free(small);
        free(large);
        return ICBS_SA_ENOMEM;
    }
    int64_t ns = 0, nl = 0;
    for (int64_t t = 0; t < m; t++) {
        mg[t].prob *= (double)m / sum;
        if (mg[t].prob < 1.0) small[ns++] = t;
        else large[nl++] = t;
    }
    while (ns > 0 && nl > 0) {
        const int64_t a = small[--ns], b = large[--nl];
        mg[a].alias = (uint32_t)b;
        mg[b].prob = (mg[b].prob + mg[a].prob) - 1.0;
        if (mg[b].prob < 1.0) small[ns++] = b;
        else large[nl++] = b;
    }
    while (nl > 0) mg[large[--nl]].prob = 1.0; /* rounding leftovers */
    while (ns > 0) mg[small[--ns]].prob = 1.0;
    free(small);
    free(large);
    return ICBS_SA_OK;
}

/* Group sizes, offsets and the counts' check; sets L->start and L->total. */
static int layout_offsets(layout_t *L, int64_t n, const int32_t *group) {
    const int64_t G = L->num_groups;
    for (int64_t v = 0; v < n; v++) {
        if (group[v] < 0 || group[v] >= G) return ICBS_SA_EINVAL;
        L->start[group[v] + 1]++;
    }
    for (int64_t g = 0; g < G; g++) {
        const int64_t size = L->start[g + 1], c = L->count[g];
        if (c < 0 || c > size) return ICBS_SA_EINVAL;
        L->num_movable += c > 0 && c < size;
        L->total += c;
        L->start[g + 1] += L->start[g];
    }
    return ICBS_SA_OK;
}

/* The variables group by group, and the movable groups. */
static int layout_fill(layout_t *L, int64_t n, const int32_t *group) {
    const int64_t G = L->num_groups;
    int64_t *next = malloc((size_t)G * sizeof(int64_t));
    L->mg = malloc((size_t)(L->num_movable > 0 ? L->num_movable : 1) * sizeof(mgroup_t));
    if (!next || !L->mg) {
        free(next);
        return ICBS_SA_ENOMEM;
    }
    memcpy(next, L->start, (size_t)G * sizeof(int64_t));
    for (int64_t v = 0; v < n; v++) L->order[next[group[v]]++] = (int32_t)v;
    free(next);
    int64_t m = 0;
    for (int64_t g = 0; g < G; g++) {
        const int64_t size = L->start[g + 1] - L->start[g], c = L->count[g];
        if (c == 0 || c == size) continue;
        L->mg[m].start = (uint32_t)L->start[g];
        L->mg[m].count = (uint32_t)c;
        L->mg[m++].zeros = (uint32_t)(size - c);
    }
    return build_alias(L);
}

static int layout_build(layout_t *L, int64_t n, const icbs_sa_groups *groups) {
    memset(L, 0, sizeof(*L));
    if (!groups->group || !groups->count || groups->num_groups < 1 ||
        groups->num_groups > n)
        return ICBS_SA_EINVAL;
    L->num_groups = groups->num_groups;
    L->count = groups->count;
    L->start = calloc((size_t)L->num_groups + 1, sizeof(int64_t));
    L->order = malloc((size_t)n * sizeof(int32_t));
    int rc = !L->start || !L->order ? ICBS_SA_ENOMEM
                                    : layout_offsets(L, n, groups->group);
    if (rc == ICBS_SA_OK) rc = layout_fill(L, n, groups->group);
    if (rc != ICBS_SA_OK) layout_free(L);
    return rc;
}

/* Each group's segment: the ones of x0 then its zeros (index order), or count
 * random ones first (partial shuffle of the segment). */
static void init_groups(const layout_t *L, int32_t *idx, int64_t n, const int8_t *x0,
                        rng_t *g) {
    memcpy(idx, L->order, (size_t)n * sizeof(int32_t));
    for (int64_t grp = 0; grp < L->num_groups; grp++) {
        const int64_t s0 = L->start[grp], size = L->start[grp + 1] - s0;
        const int64_t c = L->count[grp];
        int32_t *seg = idx + s0;
        if (x0) {
            int64_t a = 0, b = c;
            for (int64_t t = 0; t < size; t++) {
                const int32_t v = L->order[s0 + t];
                if (x0[v]) seg[a++] = v;
                else seg[b++] = v;
            }
        } else if (c > 0 && c < size) {
            for (int64_t a = 0; a < c; a++) {
                const int64_t b = a + (int64_t)rng_below(g, (uint32_t)(size - a));
                const int32_t t = seg[a];
                seg[a] = seg[b];
                seg[b] = t;
            }
        }
    }
}

/* The start of every restart: ones first, or ones first per group. */
static void init_restart(const layout_t *L, int32_t *idx, int64_t n, int64_t k,
                         const int8_t *x0, rng_t *g) {
    if (L) init_groups(L, idx, n, x0, g);
    else init_state(idx, n, k, x0, g);
}

/* The ones of a grouped state (group by group) into out[0..total). */
static void gather_ones(const layout_t *L, const int32_t *idx, int32_t *out) {
    int64_t t = 0;
    for (int64_t grp = 0; grp < L->num_groups; grp++)
        for (int64_t a = 0; a < L->count[grp]; a++) out[t++] = idx[L->start[grp] + a];
}

/*
 * A proposal, as positions in idx of a one and a zero: uniform over all swaps, or
 * (grouped) a group by the alias table, then one of its ones and one of its zeros.
 */
static inline void draw_swap(const layout_t *L, int64_t n, int64_t k, rng_t *g,
                             uint32_t *one, uint32_t *zero) {
    if (!L) {
        *one = rng_below(g, (uint32_t)k);
        *zero = (uint32_t)k + rng_below(g, (uint32_t)(n - k));
        return;
    }
    uint32_t m = rng_below(g, (uint32_t)L->num_movable);
    if (!L->equal && !(rng_uniform(g) < L->mg[m].prob)) m = L->mg[m].alias;
    const mgroup_t *q = &L->mg[m];
    *one = q->start + rng_below(g, q->count);
    *zero = q->start + q->count + rng_below(g, q->zeros);
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
    int64_t n, k;         /* k: ones in all */
    const layout_t *lay;  /* NULL, or the groups of a grouped problem */
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

/* The rounding tolerance of a descent: DESCENT_TOL times the largest possible
 * one-flip change |Q_ll| + 2 |f_l| (or 1 when every one is 0). */
static double descent_tol(const problem_t *p, const double *f) {
    double scale = 0.0;
    for (int64_t l = 0; l < p->n; l++) {
        const double m = fabs(p->diag[l]) + 2.0 * fabs(f[l]);
        scale = m > scale ? m : scale;
    }
    return DESCENT_TOL * (scale > 0.0 ? scale : 1.0);
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
    for (int64_t l = 0; l < n; l++)
        cost[l] = one[l] != 0.0 ? INFINITY : diag[l] + 2.0 * f[l];
    const double tol = descent_tol(p, f);
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

/* The ones of the state in w->idx: idx[0..k), or gathered from the groups. */
static const int32_t *state_ones(const problem_t *p, work_t *w) {
    if (!p->lay) return w->idx;
    gather_ones(p->lay, w->idx, w->ones);
    return w->ones;
}

/* x^T Q x summed exactly over the ones, after sorting them (equal states then
 * give equal energies). */
static double exact_energy(const double *Q, int64_t n, int32_t *ones, int64_t k) {
    qsort(ones, (size_t)k, sizeof(int32_t), cmp_int32);
    double e = 0.0;
    for (int64_t a = 0; a < k; a++) {
        const double *row = row_of(Q, n, ones[a]);
        double s = 0.0;
        for (int64_t b = 0; b < k; b++) s += row[ones[b]];
        e += s;
    }
    return e;
}

/* The zero of seg[0..z) that lowers most diag_j + 2 f_j - 2 row_j; returns its
 * position (-1 if none compares, e.g. NaN) and that value in *best. */
static int64_t best_zero(const int32_t *seg, int64_t z, const double *diag,
                         const double *f, const double *row, double *best) {
    int64_t pos = -1;
    *best = INFINITY;
    for (int64_t b = 0; b < z; b++) {
        const int32_t j = seg[b];
        const double d = diag[j] + 2.0 * f[j] - 2.0 * row[j];
        if (d < *best) {
            *best = d;
            pos = b;
        }
    }
    return pos;
}

/*
 * The grouped descent: for each one of each movable group in turn, the best swap
 * with a zero of its group if it lowers the energy by more than the rounding
 * tolerance; passes repeat until one applies none (at most n). A pass costs
 * sum count * zeros plus n per applied swap. The energy is then summed exactly
 * and w->best_ones[0..k) gets the sorted ones. Returns the swaps applied.
 */
static int64_t descend_groups(const problem_t *p, work_t *w, double *energy) {
    const double *Q = p->Q, *diag = p->diag;
    const int64_t n = p->n;
    double *f = w->field;
    const double tol = descent_tol(p, f);
    int64_t swaps = 0;
    for (int64_t pass = 0; pass < n; pass++) {
        int64_t applied = 0;
        for (int64_t m = 0; m < p->lay->num_movable; m++) {
            const mgroup_t *q = &p->lay->mg[m];
            int32_t *ones = w->idx + q->start, *zeros = ones + q->count;
            for (uint32_t a = 0; a < q->count; a++) {
                const int32_t i = ones[a];
                const double *row = row_of(Q, n, i);
                double best;
                const int64_t b = best_zero(zeros, q->zeros, diag, f, row, &best);
                if (b < 0 || !(diag[i] - 2.0 * f[i] + best < -tol)) continue;
                swap_update(f, row_of(Q, n, zeros[b]), row, n);
                ones[a] = zeros[b];
                zeros[b] = i;
                applied++;
            }
        }
        swaps += applied;
        if (applied == 0) break;
    }
    gather_ones(p->lay, w->idx, w->best_ones);
    *energy = exact_energy(Q, n, w->best_ones, p->k);
    return swaps;
}

/* The state of a restart's walk. */
typedef struct {
    double e, best_e; /* energy now (running sum) and lowest seen */
    int at_best;      /* the current state is the best seen: snapshot it on leaving */
    int64_t done, acc; /* sweeps run, swaps accepted */
} walk_t;

/*
 * The anneal of one restart from the state in w (fields included), keeping the
 * best state seen in w->best_ones (snap bytes of idx) when the walk leaves it.
 * Always inlined, with lay = NULL at the ungrouped call, so that the ungrouped
 * loop carries no test of the groups.
 */
static ICBS_ALWAYS_INLINE void anneal(const problem_t *p, const layout_t *lay,
                                      work_t *w, rng_t *g, size_t snap,
                                      walk_t *walk) {
    const double *Q = p->Q, *diag = p->diag;
    const int64_t n = p->n, k = p->k;
    int32_t *idx = w->idx;
    double *f = w->field;
    /* Pairs (positions in idx of a one and a zero) are drawn AHEAD proposals
     * in advance so that their Q entries can be prefetched from memory. */
    uint32_t ahead_a[AHEAD], ahead_b[AHEAD];
    for (int q = 0; q < AHEAD; q++) draw_swap(lay, n, k, g, &ahead_a[q], &ahead_b[q]);
    unsigned slot = 0;
    for (int64_t t = 0; t < p->num_betas; t++) {
        const double beta = p->beta_min * pow(p->beta_factor, (double)t);
        int64_t changed = 0;
        for (int64_t s = 0; s < p->sweeps_per_beta; s++, walk->done++) {
            if (stop_requested(p)) break;
            for (int64_t m = 0; m < p->sweep_size; m++) {
                const uint32_t a = ahead_a[slot], b = ahead_b[slot];
                uint32_t na, nb;
                draw_swap(lay, n, k, g, &na, &nb);
                ahead_a[slot] = na;
                ahead_b[slot] = nb;
                slot = (slot + 1) % AHEAD;
                PREFETCH(row_of(Q, n, idx[na]) + idx[nb]);
                const int32_t i = idx[a], j = idx[b];
                const double delta = diag[i] - 2.0 * f[i] + diag[j] + 2.0 * f[j] -
                                     2.0 * row_of(Q, n, i)[j];
                int accept = delta <= 0.0;
                if (!accept) {
                    const double x = beta * delta;
                    accept = x < MAX_EXPONENT && rng_uniform(g) < exp(-x);
                }
                if (!accept) continue;
                if (delta > 0.0 && walk->at_best) {
                    memcpy(w->best_ones, idx, snap);
                    walk->at_best = 0;
                }
                swap_update(f, row_of(Q, n, j), row_of(Q, n, i), n);
                idx[a] = j;
                idx[b] = i;
                walk->e += delta;
                walk->acc++;
                changed += delta != 0.0;
                if (walk->e < walk->best_e) {
                    walk->best_e = walk->e;
                    walk->at_best = 1;
                }
            }
        }
        if (changed == 0 || stop_requested(p)) break;
    }
}

/*
 * One restart: anneal, return to the best state seen, descend. Leaves the final
 * ones in w->best_ones and returns their exact energy.
 */
static double run_restart(const problem_t *p, work_t *w, int64_t r, int64_t *sweeps,
                          int64_t *accepted, int64_t *descent_swaps) {
    const double *Q = p->Q;
    const int64_t n = p->n, k = p->k;
    const layout_t *lay = p->lay;
    /* A snapshot holds the ones, or (grouped) the whole index array. */
    const size_t snap = (size_t)(lay ? n : k) * sizeof(int32_t);
    int32_t *idx = w->idx;
    double *f = w->field;
    rng_t g;
    rng_seed(&g, p->seed, (uint64_t)r);

    init_restart(lay, idx, n, k, p->x0, &g);
    const int32_t *ones = state_ones(p, w);
    compute_field(Q, n, ones, k, f);
    walk_t walk = {0.0, 0.0, 1, 0, 0};
    for (int64_t a = 0; a < k; a++) walk.e += f[ones[a]];
    walk.best_e = walk.e;
    if (lay && lay->num_movable > 0) anneal(p, lay, w, &g, snap, &walk);
    else if (!lay && k > 0 && k < n) anneal(p, NULL, w, &g, snap, &walk);
    *sweeps = walk.done;
    *accepted = walk.acc;
    if (stop_requested(p)) { /* the solve reports ICBS_SA_ESTOP: skip the descent */
        *descent_swaps = 0;
        return walk.best_e;
    }
    if (!walk.at_best) {
        /* Back to the best state seen; the descent needs only its ones and fields. */
        memcpy(idx, w->best_ones, snap);
        compute_field(Q, n, state_ones(p, w), k, f);
    }
    double exact;
    if (lay) { /* leaves the ones in w->best_ones */
        *descent_swaps = descend_groups(p, w, &exact);
        return exact;
    }
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

/* The energy change of swapping the one i out and the zero j in. */
static inline double swap_delta(const double *Q, int64_t n, const double *f, int32_t i,
                                int32_t j) {
    return row_of(Q, n, i)[i] - 2.0 * f[i] + row_of(Q, n, j)[j] + 2.0 * f[j] -
           2.0 * row_of(Q, n, i)[j];
}

/* The auto schedule's own arguments. */
static int check_auto(const icbs_sa_params *params) {
    return params->auto_samples < 1 || !(params->auto_accept > 0.0) ||
                   !(params->auto_accept < 1.0) || !(params->auto_range >= 1.0) ||
                   !isfinite(params->auto_range)
               ? ICBS_SA_EINVAL
               : ICBS_SA_OK;
}

/* The uphill changes d > 0 of m proposals (every swap when `all`), into d. */
static int64_t sample_uphill(const double *Q, int64_t n, int64_t k, const layout_t *L,
                             const int32_t *idx, const double *f, int all, int64_t m,
                             rng_t *g, double *d) {
    int64_t up = 0;
    if (all && L) {
        for (int64_t t = 0; t < L->num_movable; t++) {
            const mgroup_t *q = &L->mg[t];
            for (uint32_t a = 0; a < q->count; a++)
                for (uint32_t b = 0; b < q->zeros; b++) {
                    const double delta = swap_delta(Q, n, f, idx[q->start + a],
                                                    idx[q->start + q->count + b]);
                    if (delta > 0.0) d[up++] = delta;
                }
        }
        return up;
    }
    const int64_t nz = n - k;
    for (int64_t s = 0; s < m; s++) {
        uint32_t a, b;
        if (all) {
            a = (uint32_t)(s / nz);
            b = (uint32_t)(k + s % nz);
        } else {
            draw_swap(L, n, k, g, &a, &b);
        }
        const double delta = swap_delta(Q, n, f, idx[a], idx[b]);
        if (delta > 0.0) d[up++] = delta;
    }
    return up;
}

/* icbs_sa_auto_betas for k ones in all, grouped by L or not (L = NULL). */
static int auto_betas(const double *Q, int64_t n, int64_t k, const layout_t *L,
                      const int8_t *x0, const icbs_sa_params *params, double *beta_min,
                      double *beta_max) {
    *beta_min = params->beta_min;
    *beta_max = params->beta_max;
    if (L ? L->num_movable == 0 : k == 0 || k == n) return ICBS_SA_OK;
    /* Every pair when there are few, else auto_samples random ones. */
    const double pairs = L ? L->swaps : (double)k * (double)(n - k);
    const int all = pairs <= (double)params->auto_samples;
    const int64_t m = all ? (int64_t)pairs : params->auto_samples;
    int32_t *idx = malloc((size_t)n * sizeof(int32_t));
    int32_t *ones = L ? malloc((size_t)(k > 0 ? k : 1) * sizeof(int32_t)) : idx;
    double *f = malloc((size_t)n * sizeof(double));
    double *d = malloc((size_t)m * sizeof(double));
    int rc = idx && ones && f && d ? ICBS_SA_OK : ICBS_SA_ENOMEM;
    if (rc == ICBS_SA_OK) {
        rng_t g;
        rng_seed(&g, params->seed, AUTO_STREAM);
        init_restart(L, idx, n, k, x0, &g);
        if (L) gather_ones(L, idx, ones);
        compute_field(Q, n, ones, k, f);
        const int64_t up = sample_uphill(Q, n, k, L, idx, f, all, m, &g, d);
        if (up > 0) {
            *beta_min = beta_for_acceptance(d, up, params->auto_accept);
            *beta_max = params->auto_range * *beta_min;
        }
    }
    if (ones != idx) free(ones);
    free(idx);
    free(f);
    free(d);
    return rc;
}

int icbs_sa_auto_betas(const double *Q, int64_t n, int64_t k, const int8_t *x0,
                       const icbs_sa_params *params, double *beta_min,
                       double *beta_max) {
    if (!Q || !params || !beta_min || !beta_max || n < 1 || n > INT32_MAX || k < 0 ||
        k > n || check_auto(params) != ICBS_SA_OK)
        return ICBS_SA_EINVAL;
    return auto_betas(Q, n, k, NULL, x0, params, beta_min, beta_max);
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
    const int ok = work_alloc(&w, p->n, p->k, p->lay ? p->n : p->k) == ICBS_SA_OK;
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


/* The beta range: the caller's, or the auto schedule's; checks it. */
static int beta_range(const double *Q, int64_t n, int64_t k, const layout_t *lay,
                      const int8_t *x0, const icbs_sa_params *params, double *beta_min,
                      double *beta_max, int64_t *num_betas) {
    *beta_min = params->beta_min;
    *beta_max = params->beta_max;
    if (params->auto_schedule) {
        if (check_auto(params) != ICBS_SA_OK) return ICBS_SA_EINVAL;
        const int rc = auto_betas(Q, n, k, lay, x0, params, beta_min, beta_max);
        if (rc != ICBS_SA_OK) return rc;
    }
    const double factor = params->beta_factor;
    if (!(*beta_min > 0.0) || !(*beta_max >= *beta_min) || !isfinite(*beta_max) ||
        !(factor > 1.0) || !isfinite(factor))
        return ICBS_SA_EINVAL;
    /* Every beta_min * factor^t not above beta_max (up to rounding). */
    const double steps = floor(log(*beta_max / *beta_min) / log(factor) + 1e-9);
    if (!(steps < MAX_BETAS)) return ICBS_SA_EINVAL;
    *num_betas = (int64_t)steps + 1;
    return ICBS_SA_OK;
}

/*
 * A problem with a single feasible point (k = 0 or k = n; grouped: no movable
 * group): every restart ends where it starts.
 */
static int trivial_answer(const double *Q, int64_t n, int64_t k, const layout_t *lay,
                          int64_t R, int8_t *x_out, icbs_sa_result *result) {
    double e = 0.0;
    if (lay) {
        int32_t *ones = malloc((size_t)(k > 0 ? k : 1) * sizeof(int32_t));
        if (!ones) return ICBS_SA_ENOMEM;
        memset(x_out, 0, (size_t)n);
        int64_t t = 0;
        for (int64_t g = 0; g < lay->num_groups; g++)
            for (int64_t v = lay->start[g]; lay->count[g] > 0 && v < lay->start[g + 1];
                 v++)
                x_out[ones[t++] = lay->order[v]] = 1;
        e = exact_energy(Q, n, ones, k);
        free(ones);
    } else {
        for (int64_t i = 0; k == n && i < n * n; i++) e += Q[i];
        memset(x_out, k == n, (size_t)n);
    }
    for (int64_t r = 0; r < R; r++) {
        if (result->restart_energies) result->restart_energies[r] = e;
        if (result->restart_sweeps) result->restart_sweeps[r] = 0;
        if (result->restart_accepted) result->restart_accepted[r] = 0;
        if (result->restart_descent) result->restart_descent[r] = 0;
    }
    return ICBS_SA_OK;
}

/* The restarts on `threads` threads, the best answer into x_out and result. */
static int run_all(const problem_t *p, int threads, int64_t R, int8_t *x_out,
                   icbs_sa_result *result) {
    double *energies = malloc((size_t)R * sizeof(double));
    if (!energies) return ICBS_SA_ENOMEM;
    shared_t sh = {R, result, energies, x_out, INFINITY, -1, ICBS_SA_OK};
#ifdef _OPENMP
    if (threads > 1) {
#pragma omp parallel num_threads(threads)
        run_restarts(p, &sh, 1);
    } else
#endif
        /* No OpenMP call at all here: a process forked from one whose OpenMP
         * threads ran can still solve on one thread (GNU libgomp's pool does
         * not survive fork). */
        run_restarts(p, &sh, 0);
    const int status = sh.status == ICBS_SA_OK && stop_requested(p) ? ICBS_SA_ESTOP
                                                                    : sh.status;
    if (status == ICBS_SA_OK) {
        if (result->restart_energies)
            memcpy(result->restart_energies, energies, (size_t)R * sizeof(double));
        result->best_restart = sh.best_r;
        result->num_threads = threads;
    }
    free(energies);
    return status;
}

/* The solve of k ones in all, grouped by lay or not (lay = NULL); x0 checked. */
static int solve(const double *Q, int64_t n, int64_t k, const layout_t *lay,
                 const int8_t *x0, const icbs_sa_params *params, int8_t *x_out,
                 icbs_sa_result *result) {
    if (params->num_restarts < 1 || params->sweeps_per_beta < 1 ||
        params->sweep_size < 1)
        return ICBS_SA_EINVAL;
    double beta_min, beta_max;
    int64_t num_betas;
    int rc = beta_range(Q, n, k, lay, x0, params, &beta_min, &beta_max, &num_betas);
    if (rc != ICBS_SA_OK) return rc;
    const int64_t R = params->num_restarts;
    result->best_restart = 0;
    result->beta_min = beta_min;
    result->beta_max = beta_max;
    result->num_betas = num_betas;
    result->num_threads = 1;
    if (lay ? lay->num_movable == 0 : k == 0 || k == n)
        return trivial_answer(Q, n, k, lay, R, x_out, result);

    double *diag = malloc((size_t)n * sizeof(double));
    if (!diag) return ICBS_SA_ENOMEM;
    for (int64_t v = 0; v < n; v++) diag[v] = Q[(size_t)v * (size_t)n + (size_t)v];
    const problem_t p = {.Q = Q,
                         .diag = diag,
                         .n = n,
                         .k = k,
                         .lay = lay,
                         .x0 = x0,
                         .beta_min = beta_min,
                         .beta_factor = params->beta_factor,
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
    rc = run_all(&p, threads, R, x_out, result);
    free(diag);
    return rc;
}

/* x0 holds 0/1 only, with count[g] ones in each group g (n >= 1, groups valid). */
static int check_x0_groups(const int8_t *x0, int64_t n, const icbs_sa_groups *groups) {
    int64_t *ones = calloc((size_t)groups->num_groups, sizeof(int64_t));
    if (!ones) return ICBS_SA_ENOMEM;
    int rc = ICBS_SA_OK;
    for (int64_t v = 0; v < n && rc == ICBS_SA_OK; v++) {
        if (x0[v] != 0 && x0[v] != 1) rc = ICBS_SA_EINVAL;
        else ones[groups->group[v]] += x0[v];
    }
    for (int64_t g = 0; g < groups->num_groups && rc == ICBS_SA_OK; g++)
        if (ones[g] != groups->count[g]) rc = ICBS_SA_EINVAL;
    free(ones);
    return rc;
}

int icbs_sa_solve(const double *Q, int64_t n, int64_t k, const int8_t *x0,
                  const icbs_sa_params *params, int8_t *x_out, icbs_sa_result *result) {
    if (!Q || !params || !x_out || !result || n < 1 || n > INT32_MAX || k < 0 ||
        k > n)
        return ICBS_SA_EINVAL;
    if (x0) {
        int64_t ones = 0;
        for (int64_t v = 0; v < n; v++) {
            if (x0[v] != 0 && x0[v] != 1) return ICBS_SA_EINVAL;
            ones += x0[v];
        }
        if (ones != k) return ICBS_SA_EINVAL;
    }
    return solve(Q, n, k, NULL, x0, params, x_out, result);
}

int icbs_sa_solve_groups(const double *Q, int64_t n, const icbs_sa_groups *groups,
                         const int8_t *x0, const icbs_sa_params *params, int8_t *x_out,
                         icbs_sa_result *result) {
    if (!Q || !groups || !params || !x_out || !result || n < 1 || n > INT32_MAX)
        return ICBS_SA_EINVAL;
    layout_t lay;
    int rc = layout_build(&lay, n, groups);
    if (rc != ICBS_SA_OK) return rc;
    if (x0) rc = check_x0_groups(x0, n, groups);
    if (rc == ICBS_SA_OK) rc = solve(Q, n, lay.total, &lay, x0, params, x_out, result);
    layout_free(&lay);
    return rc;
}
