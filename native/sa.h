/*
 * Cardinality-preserving simulated annealing for  min x^T Q x  s.t.  sum(x) = k.
 *
 * The C core of icbs-opt's `native` backend. It works on flat arrays and knows
 * nothing of Python; native/module.c binds it, icbs_opt/backends/native.py owns
 * validation.
 *
 * Moves swap one 1 with one 0, so every visited state is feasible. With the local
 * fields f = Q x cached, removing i (x_i = 1) and adding j (x_j = 0) changes the
 * energy by
 *
 *     Q_ii - 2 f_i + Q_jj + 2 f_j - 2 Q_ij          (Q symmetric)
 *
 * which costs O(1); an accepted swap updates f += Q[j,:] - Q[i,:] in O(n). The ones
 * and the zeros live in one index array (ones first), so a uniformly random pair is
 * two bounded random numbers.
 *
 * Schedule: inverse temperatures beta_min * beta_factor^t, t = 0, 1, ..., up to
 * beta_max; sweeps_per_beta sweeps at each. A sweep is sweep_size proposed swaps
 * (Metropolis: accepted if the change d <= 0, else with probability exp(-beta d)).
 * A temperature at which no energy-changing swap is accepted ends the restart.
 * With auto_schedule, icbs_sa_auto_betas derives beta_min and beta_max from Q.
 *
 * Each restart then goes back to the best state it visited and finishes with a
 * descent: for each one i in turn, the best swap with a zero if it lowers the
 * energy; passes repeat until one changes nothing. The restart's energy is
 * recomputed exactly from Q during that last pass.
 *
 * Restarts are independent: restart r draws from its own xoshiro256** stream
 * seeded from (seed, r) by splitmix64, so the result does not depend on how many
 * threads run them (OpenMP when compiled with it, else one after another). The
 * best restart has the lowest energy, ties going to the lower restart index.
 *
 * Grouped problems (icbs_sa_solve_groups) split the variables into groups, each
 * with its own count of ones, e.g. N:M sparsity. A move then swaps one 1 and one 0
 * of the SAME group, so every visited state keeps every group's count; the move
 * test is the same O(1) expression. Each group's variables live in one segment of
 * the index array (its ones first). Groups with count 0 or count = size never
 * move. Proposals are uniform over the feasible swaps: a group is drawn with
 * probability proportional to its number of swaps, count * (size - count), by
 * Walker's alias method (one bounded draw when all movable groups have the same
 * number of swaps, as in N:M), then one of its ones and one of its zeros. The
 * finishing descent swaps inside groups only, and the restart's energy is summed
 * exactly from Q over its ones in index order. The auto schedule samples the same
 * proposals.
 *
 * The core owns no schedule policy: every number of the schedule (the range, the
 * sweep size, the auto schedule's sample size, acceptance and range) comes from
 * the caller in icbs_sa_params. icbs-opt's defaults are the constants at the top
 * of icbs_opt/backends/native.py.
 */
#ifndef ICBS_SA_H
#define ICBS_SA_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Return codes. */
#define ICBS_SA_OK 0
#define ICBS_SA_EINVAL 1 /* an argument is out of range */
#define ICBS_SA_ENOMEM 2 /* an allocation failed */
#define ICBS_SA_ESTOP 3  /* *params->stop became nonzero: no answer */

typedef struct {
    double beta_min;         /* > 0: first inverse temperature (auto: the fallback) */
    double beta_max;         /* >= beta_min: last one (auto: the fallback) */
    double beta_factor;      /* > 1 */
    int64_t sweeps_per_beta; /* >= 1 */
    int64_t sweep_size;      /* >= 1: proposals per sweep (n in the reference) */
    int64_t num_restarts;    /* >= 1 */
    int num_threads;         /* 0: the OpenMP default; ignored without OpenMP */
    int auto_schedule;       /* nonzero: icbs_sa_auto_betas picks the range */
    int64_t auto_samples;    /* >= 1: swaps the auto schedule samples */
    double auto_accept;      /* in (0, 1): mean uphill acceptance at beta_min */
    double auto_range;       /* >= 1: beta_max / beta_min of the auto schedule */
    uint64_t seed;
    /* NULL, or a flag the caller may set from another thread to stop the solve:
     * read between sweeps and before each restart; once nonzero the solve ends
     * within one sweep and returns ICBS_SA_ESTOP. */
    const volatile int32_t *stop;
} icbs_sa_params;

/* The groups of a grouped problem. */
typedef struct {
    int64_t num_groups;   /* G, 1 <= G <= n */
    const int32_t *group; /* n group ids, each in [0, G) */
    const int64_t *count; /* G counts: 0 <= count[g] <= the size of group g */
} icbs_sa_groups;

typedef struct {
    /* Caller-allocated arrays of num_restarts entries, or NULL. */
    double *restart_energies;  /* exact energy of each restart's answer */
    int64_t *restart_sweeps;   /* sweeps each restart ran before it ended */
    int64_t *restart_accepted; /* accepted swaps in each restart's anneal */
    int64_t *restart_descent;  /* swaps of each restart's finishing descent */
    /* Filled by the core. */
    int64_t best_restart;
    double beta_min; /* the range actually used */
    double beta_max;
    int64_t num_betas;
    int num_threads; /* threads that ran restarts */
} icbs_sa_result;

/*
 * Anneal. Q is n x n, row-major, symmetric (only read). x0 (n bytes of 0/1 with
 * exactly k ones) is the start of every restart, or NULL for a random feasible
 * start per restart. x_out (n bytes) receives the best state found; each restart
 * keeps the best state it visited, not only its last one.
 *
 * Memory: besides Q, O(n) per thread plus O(n) shared.
 *
 * Returns ICBS_SA_OK, ICBS_SA_EINVAL, ICBS_SA_ENOMEM, or ICBS_SA_ESTOP when
 * params->stop was set during the solve (x_out and result are then unusable).
 */
int icbs_sa_solve(const double *Q, int64_t n, int64_t k, const int8_t *x0,
                  const icbs_sa_params *params, int8_t *x_out, icbs_sa_result *result);

/*
 * Anneal a grouped problem: as icbs_sa_solve, with every group g holding exactly
 * groups->count[g] ones (their sum is the k of icbs_sa_solve). x0, when given,
 * must have those counts. With params->auto_schedule the range comes from the
 * proposals of the grouped moves, as icbs_sa_auto_betas describes (every swap
 * when there are at most params->auto_samples of them).
 *
 * Memory: besides Q, O(n) per thread plus O(n) shared.
 *
 * Returns as icbs_sa_solve; ICBS_SA_EINVAL also for a group id out of range or a
 * count out of [0, size of its group].
 */
int icbs_sa_solve_groups(const double *Q, int64_t n, const icbs_sa_groups *groups,
                         const int8_t *x0, const icbs_sa_params *params, int8_t *x_out,
                         icbs_sa_result *result);

/*
 * The auto schedule's beta range, from Q's scale as the moves see it: at the start
 * state (x0, or a random feasible state drawn from params->seed) take the energy
 * changes of params->auto_samples random swaps (every swap when there are fewer
 * pairs), and set
 *
 *     beta_min  where the mean Metropolis acceptance exp(-beta d) over the uphill
 *               changes d > 0 is params->auto_accept,
 *     beta_max = params->auto_range * beta_min.
 *
 * Writes both and returns ICBS_SA_OK, or an error code. When no sampled swap is
 * uphill (k = 0, k = n, Q = 0, ...), params->beta_min and params->beta_max are
 * returned unchanged.
 */
int icbs_sa_auto_betas(const double *Q, int64_t n, int64_t k, const int8_t *x0,
                       const icbs_sa_params *params, double *beta_min,
                       double *beta_max);

#ifdef __cplusplus
}
#endif

#endif /* ICBS_SA_H */
