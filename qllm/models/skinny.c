/* qllm's skinny GEMM: y = x @ w.T (+ bias) for a few rows x, float32, w as it is (row-major,
 * out x in). Built by qllm/models/skinny.py on the machine that runs it.
 *
 * Every output element is one dot product, computed the same way whatever the number of rows:
 * LANES lanes (16 where the CPU has AVX-512, else 8) accumulate x[m, k] * w[n, k] over k in
 * ascending order (the last partial group zero-filled), then a fixed tree adds the lanes and the
 * bias is added. Each multiply-add is one FMA where the CPU has it (an explicit intrinsic) and a
 * rounded product plus a rounded sum otherwise (the build turns the compiler's own contraction
 * off, which would fuse some and not others). Rows and columns are only blocked (up to ROWS rows
 * by six columns share the loads) and columns are split between threads, so a row's result does
 * not depend on its batch mates, on its place in the batch, or on the thread count.
 *
 * A thread's column blocks are consecutive, so while it computes one block it prefetches the
 * next block's weight rows into L2, spread evenly over the block's k-steps: the weights stream
 * from memory while the rows already in cache are multiplied, instead of the two taking turns.
 */
#include <stddef.h>
#include <string.h>
#if defined(__AVX512F__) || (defined(__FMA__) && defined(__AVX__))
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define LANES 16
#define ROWS 4 /* 24 accumulators, 6 weight vectors and a row vector fit the 32 vector registers */
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
#define ROWS 2
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

#define COLS 6
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
#if ROWS == 4
FULL_BLOCK(3)
FULL_BLOCK(4)
#endif

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

/* y[m, n] = sum_k x[m, k] w[n, k] (+ bias[n]) for m < m_rows, n < n_cols; x, w and y rows are
 * ldx, ldw and ldy floats apart (each row contiguous). */
void qllm_skinny_linear(const float *x, long ldx, const float *w, long ldw, const float *bias,
                        float *y, long ldy, long m_rows, long n_cols, long k, int threads) {
    const long blocks = (n_cols + COLS - 1) / COLS;
    const long passes = (m_rows + ROWS - 1) / ROWS, steps = k / LANES;
    /* The next block's rows span COLS * ldw floats; prefetched over all the k-steps of this one. */
    const long block_lines = (COLS * ldw * (long)sizeof(float) + LINE - 1) / LINE;
    const long per_step = steps ? (block_lines + passes * steps - 1) / (passes * steps) : 0;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long b = 0; b < blocks; b++) {
        const long n0 = b * COLS;
        const int cols = n_cols - n0 < COLS ? (int)(n_cols - n0) : COLS;
        const float *wb = w + n0 * ldw, *bb = bias ? bias + n0 : NULL;
        /* Prefetch only within w: the next block must be a full one. */
        const long lines = n0 + 2 * COLS <= n_cols ? per_step : 0;
        const char *pf = (const char *)(wb + COLS * ldw);
        for (long m0 = 0; m0 < m_rows; m0 += ROWS) {
            const int rows = m_rows - m0 < ROWS ? (int)(m_rows - m0) : ROWS;
            const float *xb = x + m0 * ldx;
            float *yb = y + m0 * ldy + n0;
            if (cols < COLS)
                edge_block(xb, ldx, wb, ldw, yb, ldy, bb, k, rows, cols);
#if ROWS == 4
            else if (rows == 4)
                pf = block_4(xb, ldx, wb, ldw, yb, ldy, bb, k, pf, lines);
            else if (rows == 3)
                pf = block_3(xb, ldx, wb, ldw, yb, ldy, bb, k, pf, lines);
#endif
            else if (rows == 2)
                pf = block_2(xb, ldx, wb, ldw, yb, ldy, bb, k, pf, lines);
            else
                pf = block_1(xb, ldx, wb, ldw, yb, ldy, bb, k, pf, lines);
        }
    }
}
