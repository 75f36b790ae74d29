/* qllm's skinny GEMM: y = x @ w.T (+ bias) for a few rows x, float32, w as it is (row-major,
 * out x in). Built by qllm/models/skinny.py on the machine that runs it.
 *
 * Every output element is one dot product, computed the same way whatever the number of rows:
 * LANES lanes (16 where the CPU has AVX-512, else 8) accumulate x[m, k] * w[n, k] over k in
 * ascending order (the last partial group zero-filled), then a fixed tree adds the lanes and the
 * bias is added. Each multiply-add is one FMA where the CPU has it (an explicit intrinsic) and a
 * rounded product plus a rounded sum otherwise (the build turns the compiler's own contraction
 * off, which would fuse some and not others). Rows and columns are only blocked (up to ROWS rows
 * by COLS columns share the loads: 4 by 6 with AVX-512's 32 vector registers, else 3 by 4) and columns are split between threads, so a row's result does
 * not depend on its batch mates, on its place in the batch, or on the thread count.
 *
 * A thread's column blocks are consecutive, so while it computes one block it prefetches the
 * next block's weight rows into L2, spread evenly over the block's k-steps: the weights stream
 * from memory while the rows already in cache are multiplied, instead of the two taking turns.
 */
#include <math.h>
#include <omp.h>
#include <sched.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) || (defined(__FMA__) && defined(__AVX__))
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define LANES 16
#define ROWS 4 /* 24 accumulators, 6 weight vectors and a row vector fit the 32 vector registers */
#define COLS 6
typedef float vf __attribute__((vector_size(64)));

static inline vf madd(vf acc, vf a, vf b) {
    return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)acc);
}

static inline float lanes_sum(vf a) {
    float s[8];
    for (int i = 0; i < 8; i++) s[i] = a[i] + a[i + 8];
    for (int i = 0; i < 4; i++) s[i] = s[i] + s[i + 4];
    return (s[0] + s[2]) + (s[1] + s[3]);
}
#else
#define LANES 8
#define ROWS 3 /* 12 accumulators, 4 weight vectors and a row vector: about the 16 vector registers */
#define COLS 4
typedef float vf __attribute__((vector_size(32)));

static inline vf madd(vf acc, vf a, vf b) {
#if defined(__FMA__) && defined(__AVX__)
    return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)acc);
#else
    return acc + a * b;
#endif
}

static inline float lanes_sum(vf a) {
    float even = (a[0] + a[4]) + (a[2] + a[6]);
    float odd = (a[1] + a[5]) + (a[3] + a[7]);
    return even + odd;
}
#endif

#define LINE 64 /* bytes per prefetched cache line */

static inline vf load_vec(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* The last n < LANES floats at p, zero-filled to LANES. */
static inline vf load_tail(const float *p, long n) {
    vf v = {0};
    memcpy(&v, p, n * sizeof(float));
    return v;
}

static inline void store(vf acc[ROWS][COLS], int rows, int cols, float *y, long ldy, const float *bias) {
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < cols; j++) {
            float s = lanes_sum(acc[i][j]);
            if (bias) s += bias[j];
            y[i * ldy + j] = s;
        }
}

/* A full block of R rows by COLS columns, prefetching `lines` lines from pf per k-step; returns
 * where the prefetch stopped. */
#define FULL_BLOCK(R)                                                                              \
    static const char *block_##R(const float *x, long ldx, const float *w, long ldw, float *y,     \
                                 long ldy, const float *bias, long k, const char *pf, long lines) { \
        const long kv = k - k % LANES, tail = k - kv;                                              \
        vf acc[ROWS][COLS];                                                                        \
        for (int i = 0; i < R; i++)                                                                \
            for (int j = 0; j < COLS; j++) acc[i][j] = (vf){0};                                    \
        for (long p = 0; p < kv; p += LANES) {                                                     \
            vf wv[COLS];                                                                           \
            for (int j = 0; j < COLS; j++) wv[j] = load_vec(w + j * ldw + p);                      \
            for (long q = 0; q < lines; q++, pf += LINE) __builtin_prefetch(pf, 0, 2);             \
            for (int i = 0; i < R; i++) {                                                          \
                vf xv = load_vec(x + i * ldx + p);                                                 \
                for (int j = 0; j < COLS; j++) acc[i][j] = madd(acc[i][j], xv, wv[j]);             \
            }                                                                                      \
        }                                                                                          \
        if (tail)                                                                                  \
            for (int i = 0; i < R; i++) {                                                          \
                vf xv = load_tail(x + i * ldx + kv, tail);                                         \
                for (int j = 0; j < COLS; j++)                                                     \
                    acc[i][j] = madd(acc[i][j], xv, load_tail(w + j * ldw + kv, tail));            \
            }                                                                                      \
        store(acc, R, COLS, y, ldy, bias);                                                         \
        return pf;                                                                                 \
    }

FULL_BLOCK(1)
FULL_BLOCK(2)
FULL_BLOCK(3)
#if ROWS == 4
FULL_BLOCK(4)
#endif

/* A full block of `rows` <= ROWS rows (see FULL_BLOCK). */
static inline const char *full_block(int rows, const float *x, long ldx, const float *w, long ldw, float *y,
                                     long ldy, const float *bias, long k, const char *pf, long lines) {
    switch (rows) {
#if ROWS == 4
    case 4:
        return block_4(x, ldx, w, ldw, y, ldy, bias, k, pf, lines);
#endif
    case 3:
        return block_3(x, ldx, w, ldw, y, ldy, bias, k, pf, lines);
    case 2:
        return block_2(x, ldx, w, ldw, y, ldy, bias, k, pf, lines);
    default:
        return block_1(x, ldx, w, ldw, y, ldy, bias, k, pf, lines);
    }
}

/* The last, narrower column block: rows [0, rows) by columns [0, cols), cols < COLS. */
static void edge_block(const float *x, long ldx, const float *w, long ldw, float *y, long ldy,
                       const float *bias, long k, int rows, int cols) {
    const long kv = k - k % LANES, tail = k - kv;
    vf acc[ROWS][COLS];
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < cols; j++) acc[i][j] = (vf){0};
    for (long p = 0; p < kv; p += LANES)
        for (int i = 0; i < rows; i++) {
            vf xv = load_vec(x + i * ldx + p);
            for (int j = 0; j < cols; j++) acc[i][j] = madd(acc[i][j], xv, load_vec(w + j * ldw + p));
        }
    if (tail)
        for (int i = 0; i < rows; i++) {
            vf xv = load_tail(x + i * ldx + kv, tail);
            for (int j = 0; j < cols; j++) acc[i][j] = madd(acc[i][j], xv, load_tail(w + j * ldw + kv, tail));
        }
    store(acc, rows, cols, y, ldy, bias);
}

/* Rows [0, m) of x times columns [n0, n0 + cols) of w (plus those of bias, or NULL) into the same
 * columns of y (rows ldy apart), a full block or the narrower last one at a time, prefetching
 * `lines` lines per k-step from pf; returns where the prefetch stopped. */
static const char *columns(const float *x, long ldx, long m, const float *w, long ldw, long n0, int cols,
                           const float *bias, float *y, long ldy, long k, const char *pf, long lines) {
    const float *wb = w + n0 * ldw, *bb = bias ? bias + n0 : NULL;
    for (long m0 = 0; m0 < m; m0 += ROWS) {
        const int rows = m - m0 < ROWS ? (int)(m - m0) : ROWS;
        const float *xb = x + m0 * ldx;
        float *yb = y + m0 * ldy + n0;
        if (cols < COLS)
            edge_block(xb, ldx, wb, ldw, yb, ldy, bb, k, rows, cols);
        else
            pf = full_block(rows, xb, ldx, wb, ldw, yb, ldy, bb, k, pf, lines);
    }
    return pf;
}

/* Lines to prefetch per k-step so that the next block's COLS weight rows (ld floats apart) arrive
 * over all the k-steps of m rows' passes over this one. */
static long lines_per_step(long m, long ld, long k) {
    const long passes = (m + ROWS - 1) / ROWS, steps = k / LANES;
    const long block_lines = (COLS * ld * (long)sizeof(float) + LINE - 1) / LINE;
    return steps ? (block_lines + passes * steps - 1) / (passes * steps) : 0;
}

/* y[m, n] = sum_k x[m, k] w[n, k] (+ bias[n]) for m < m_rows, n < n_cols; x, w and y rows are
 * ldx, ldw and ldy floats apart (each row contiguous). */
void qllm_skinny_linear(const float *x, long ldx, const float *w, long ldw, const float *bias,
                        float *y, long ldy, long m_rows, long n_cols, long k, int threads) {
    const long blocks = (n_cols + COLS - 1) / COLS, per_step = lines_per_step(m_rows, ldw, k);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long b = 0; b < blocks; b++) {
        const long n0 = b * COLS;
        const int cols = n_cols - n0 < COLS ? (int)(n_cols - n0) : COLS;
        /* Prefetch only within w: the next block must be a full one. */
        const long lines = n0 + 2 * COLS <= n_cols ? per_step : 0;
        columns(x, ldx, m_rows, w, ldw, n0, cols, bias, y, ldy, k, (const char *)(w + (n0 + COLS) * ldw), lines);
    }
}

/* Several weights of one input (a layer's query, key and value projections) in one parallel
 * region: weight i (n_cols[i] x k, rows ldw[i] apart, bias[i] or NULL) into y[i] (ldy[i] apart).
 * Each output element is computed as by qllm_skinny_linear; the column blocks of all the weights
 * are split between the threads as one range. */
void qllm_skinny_linear_many(const float *x, long ldx, long m_rows, long k, int count, const float *const *w,
                             const long *ldw, const float *const *bias, float *const *y, const long *ldy,
                             const long *n_cols, int threads) {
    long first[17]; /* weight i's blocks are [first[i], first[i + 1]) */
    long lines[16];
    if (count > 16) return;
    first[0] = 0;
    for (int i = 0; i < count; i++) {
        first[i + 1] = first[i] + (n_cols[i] + COLS - 1) / COLS;
        lines[i] = lines_per_step(m_rows, ldw[i], k);
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long g = 0; g < first[count]; g++) {
        int i = 0;
        while (g >= first[i + 1]) i++;
        const long n0 = (g - first[i]) * COLS;
        const int cols = n_cols[i] - n0 < COLS ? (int)(n_cols[i] - n0) : COLS;
        const long step = n0 + 2 * COLS <= n_cols[i] ? lines[i] : 0;
        columns(x, ldx, m_rows, w[i], ldw[i], n0, cols, bias[i], y[i], ldy[i], k,
                (const char *)(w[i] + (n0 + COLS) * ldw[i]), step);
    }
}

/* ------------------------------------------------------------------------------------------------
 * SwiGLU experts: y = (silu(x @ gate.T) * (x @ up.T)) @ down.T, gate and up the two halves of one
 * fused [2 * inter, hidden] weight, down [hidden, inter]. Both products run on the blocks above,
 * so every element is computed as by qllm_skinny_linear, and silu(g) = g / (1 + exp(-g)) uses
 * qllm's own exp (below): an expert's rows get the same bits whatever rows share the call, and a
 * whole MoE layer (qllm_moe_swiglu) gets each expert's rows the same bits as the expert alone
 * (qllm_swiglu_expert) followed by the weighted sum in ascending expert order.
 */

/* exp(v) for the activation: 2^n * p(r), n = round(v / ln 2), r = v - n ln 2 (ln 2 in two parts),
 * p a degree-6 polynomial; only rounded IEEE operations, so the result is the same scalar or
 * vectorised. Relative error about 2e-7 over the clamped range. */
static inline float qexp(float v) {
    v = v > 88.0f ? 88.0f : (v < -87.0f ? -87.0f : v);
    const float n = floorf(v * 1.44269504f + 0.5f);
    const float r = (v - n * 0.693145752f) - n * 1.42860677e-6f;
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* A barrier for the threads of one parallel region that are all working: spin, then yield the
 * core (the other thread may be waiting for it on a busy machine). */
static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

typedef struct {
    volatile int count;
    volatile int sense;
} spin_barrier;

static void barrier_wait(spin_barrier *b, int *local, int threads) {
    if (threads == 1) return;
    *local = !*local;
    if (__atomic_add_fetch(&b->count, 1, __ATOMIC_ACQ_REL) == threads) {
        __atomic_store_n(&b->count, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&b->sense, *local, __ATOMIC_RELEASE);
        return;
    }
    for (long spins = 0; __atomic_load_n(&b->sense, __ATOMIC_ACQUIRE) != *local; spins++) {
        if (spins > 4000)
            sched_yield();
        else
            cpu_relax();
    }
}

/* Thread t's share [*lo, *hi) of n items split into `threads` contiguous parts. */
static inline void share(long n, int t, int threads, long *lo, long *hi) {
    *lo = n * t / threads;
    *hi = n * (t + 1) / threads;
}

/* One expert on m contiguous rows x (ldx apart), thread t of `threads`: h = silu(gate) * up into
 * h [m, inter] (this thread's share of the intermediate columns), then the barrier, then
 * h @ down.T (this thread's share of the hidden columns): stored into out (ldo apart) where scale
 * is NULL, else added as out[at[i]] += y[i] * scale[i]. */
static void expert_part(const float *x, long ldx, long m, const float *gu, long ldgu, const float *down,
                        long ldd, long hidden, long inter, float *h, float *out, long ldo, const long *at,
                        const float *scale, spin_barrier *bar, int *sense, int t, int threads) {
    float tmp[ROWS * 2 * COLS];
    long lo, hi;
    /* gate and up columns of one block of intermediate indices, then their activation */
    const long pairs = (inter + COLS - 1) / COLS;
    const long gu_lines = lines_per_step(m, ldgu, hidden);
    share(pairs, t, threads, &lo, &hi);
    for (long b = lo; b < hi; b++) {
        const long j0 = b * COLS;
        const int cols = inter - j0 < COLS ? (int)(inter - j0) : COLS;
        const char *to_up = (const char *)(gu + (inter + j0) * ldgu);
        const char *to_next = (const char *)(gu + (j0 + COLS) * ldgu);
        const long up_lines = cols == COLS ? gu_lines : 0;
        const long next_lines = b + 1 < hi && j0 + 2 * COLS <= inter ? gu_lines : 0;
        for (long m0 = 0; m0 < m; m0 += ROWS) {
            const long rows = m - m0 < ROWS ? m - m0 : ROWS;
            const float *xb = x + m0 * ldx;
            to_up = columns(xb, ldx, rows, gu, ldgu, j0, cols, NULL, tmp - j0, 2 * COLS, hidden, to_up, up_lines);
            to_next = columns(xb, ldx, rows, gu, ldgu, inter + j0, cols, NULL, tmp + COLS - inter - j0, 2 * COLS,
                              hidden, to_next, next_lines);
            for (long i = 0; i < rows; i++)
                for (int j = 0; j < cols; j++) {
                    const float g = tmp[i * 2 * COLS + j], u = tmp[i * 2 * COLS + COLS + j];
                    const float silu = g / (1.0f + qexp(-g));
                    h[(m0 + i) * inter + j0 + j] = silu * u;
                }
        }
    }
    barrier_wait(bar, sense, threads);
    /* down: this thread's hidden columns, all rows */
    const long blocks = (hidden + COLS - 1) / COLS;
    const long d_lines = lines_per_step(m, ldd, inter);
    share(blocks, t, threads, &lo, &hi);
    for (long b = lo; b < hi; b++) {
        const long n0 = b * COLS;
        const int cols = hidden - n0 < COLS ? (int)(hidden - n0) : COLS;
        const char *pf = (const char *)(down + (n0 + COLS) * ldd);
        const long lines = b + 1 < hi && n0 + 2 * COLS <= hidden ? d_lines : 0;
        if (scale == NULL) {
            columns(h, inter, m, down, ldd, n0, cols, NULL, out, ldo, inter, pf, lines);
            continue;
        }
        for (long m0 = 0; m0 < m; m0 += ROWS) {
            const long rows = m - m0 < ROWS ? m - m0 : ROWS;
            pf = columns(h + m0 * inter, inter, rows, down, ldd, n0, cols, NULL, tmp - n0, COLS, inter, pf, lines);
            for (long i = 0; i < rows; i++) {
                float *o = out + at[m0 + i] * ldo + n0;
                const float s = scale[m0 + i];
                for (int j = 0; j < cols; j++) {
                    const float v = tmp[i * COLS + j] * s;
                    o[j] = o[j] + v;
                }
            }
        }
    }
}

/* One expert: out [m, hidden] (ldo apart) = the expert on rows x; h: scratch of m * inter floats. */
void qllm_swiglu_expert(const float *x, long ldx, long m, const float *gu, long ldgu, const float *down,
                        long ldd, long hidden, long inter, float *h, float *out, long ldo, int threads) {
    spin_barrier bar = {0, 0};
#pragma omp parallel num_threads(threads)
    {
        int sense = 0;
        expert_part(x, ldx, m, gu, ldgu, down, ldd, hidden, inter, h, out, ldo, NULL, NULL, &bar, &sense,
                    omp_get_thread_num(), omp_get_num_threads());
    }
}

/* A MoE layer's routed experts, in the order given (ascending), from the first on: expert
 * experts[j] takes rows at[offsets[j] .. offsets[j + 1]) of x with routing weights scale[...] and
 * adds its weighted output to those rows of out (ldo apart). Expert e's fused gate/up weight is at
 * gu + e * gu_stride (rows ldgu apart), its down weight at down + e * d_stride (rows ldd apart).
 * xs: scratch of offsets[count] * hidden floats (the rows gathered), h: 2 * (the most rows of one
 * expert) * inter floats. Between experts, where *stop is nonzero, it returns early: the return
 * value is how many experts it computed. */
long qllm_moe_swiglu(const float *x, long ldx, float *out, long ldo, const float *gu, long gu_stride, long ldgu,
                     const float *down, long d_stride, long ldd, long hidden, long inter, const long *experts,
                     const long *offsets, const long *at, const float *scale, long count, const int *stop,
                     float *xs, float *h, long h_rows, int threads) {
    spin_barrier bar = {0, 0};
    long done = count;
#pragma omp parallel num_threads(threads)
    {
        int sense = 0, halt = 0;
        const int t = omp_get_thread_num(), n = omp_get_num_threads();
        long lo, hi;
        share(offsets[count], t, n, &lo, &hi);
        for (long i = lo; i < hi; i++) memcpy(xs + i * hidden, x + at[i] * ldx, hidden * sizeof(float));
        barrier_wait(&bar, &sense, n);
        for (long j = 0; j < count && !halt; j++) {
            const long e = experts[j], first = offsets[j], m = offsets[j + 1] - first;
            float *hj = h + (j & 1) * h_rows * inter; /* two buffers: the next expert's gate/up may
                                                          start while this one's down still reads */
            expert_part(xs + first * hidden, hidden, m, gu + e * gu_stride, ldgu, down + e * d_stride, ldd,
                        hidden, inter, hj, out, ldo, at + first, scale + first, &bar, &sense, t, n);
            if (j + 1 < count && stop != NULL) {
                /* one thread reads the flag; all take its answer after the barrier */
                if (t == 0) __atomic_store_n(&done, __atomic_load_n(stop, __ATOMIC_RELAXED) ? j + 1 : count,
                                             __ATOMIC_RELAXED);
                barrier_wait(&bar, &sense, n);
                halt = __atomic_load_n(&done, __ATOMIC_RELAXED) != count;
            }
        }
    }
    return done;
}

/* ------------------------------------------------------------------------------------------------
 * Decode attention: `count` requests with one query row each, every (request, KV head) pair on
 * its own, so a request's output does not depend on the others or on the thread count. For
 * query head h (KV head h / group): scores s_t = (q . k_t) * scale, each dot product as the GEMM
 * above computes one (LANES lanes over the head dimension in ascending order, a fixed tree);
 * p_t = exp(s_t - max s), summed over t in ascending order; out = (sum_t p_t v_t) / sum_t p_t.
 * Request r's keys are k[r] + head * k_head[r] + t * k_row[r] (floats), its values likewise, for
 * t < len[r]. scratch: threads * (the longest len) floats.
 */
static inline float dot(const float *a, const float *b, long d) {
    const long dv = d - d % LANES;
    vf acc = {0};
    for (long p = 0; p < dv; p += LANES) acc = madd(acc, load_vec(a + p), load_vec(b + p));
    if (d > dv) acc = madd(acc, load_tail(a + dv, d - dv), load_tail(b + dv, d - dv));
    return lanes_sum(acc);
}

void qllm_decode_attention(long count, const float *const *q, const float *const *k, const long *k_head,
                           const long *k_row, const float *const *v, const long *v_head, const long *v_row,
                           const long *len, long hkv, long group, long d, long dv, float scale,
                           float *const *out, float *scratch, long longest, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long pair = 0; pair < count * hkv; pair++) {
        const long r = pair / hkv, head = pair % hkv, n = len[r];
        float *s = scratch + (long)omp_get_thread_num() * longest;
        const float *kh = k[r] + head * k_head[r], *vh = v[r] + head * v_head[r];
        for (long g = 0; g < group; g++) {
            const long qh = head * group + g;
            const float *qv = q[r] + qh * d;
            float top = -INFINITY;
            for (long t = 0; t < n; t++) {
                s[t] = dot(qv, kh + t * k_row[r], d) * scale;
                top = s[t] > top ? s[t] : top;
            }
            float total = 0.0f;
            for (long t = 0; t < n; t++) {
                s[t] = qexp(s[t] - top);
                total += s[t];
            }
            float *o = out[r] + qh * dv;
            for (long j = 0; j < dv; j++) o[j] = 0.0f;
            for (long t = 0; t < n; t++) {
                const float p = s[t], *vt = vh + t * v_row[r];
                for (long j = 0; j < dv; j++) o[j] = o[j] + p * vt[j];
            }
            for (long j = 0; j < dv; j++) o[j] = o[j] / total;
        }
    }
}
