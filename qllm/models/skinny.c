/* qllm's skinny GEMM: y = x @ w.T (+ bias) for a few rows x, float32, w as it is (row-major,
 * out x in). Built by qllm/models/skinny.py on the machine that runs it.
 *
 * Every output element is one dot product, computed the same way whatever the number of rows:
 * eight lanes accumulate x[m, k] * w[n, k] over k in ascending order (the last partial group of
 * eight zero-filled), then a fixed tree adds the lanes and the bias is added. Each multiply-add is
 * one FMA where the CPU has it (an explicit intrinsic) and a rounded product plus a rounded sum
 * otherwise (the build turns the compiler's own contraction off, which would fuse some and not
 * others). Rows and columns are only blocked (two rows by six columns share the loads) and
 * columns are split between threads, so a row's result does not depend on its batch mates, on its
 * place in the batch, or on the thread count.
 */
#include <stddef.h>
#include <string.h>
#if defined(__FMA__) && defined(__AVX__)
#include <immintrin.h>
#endif

typedef float v8 __attribute__((vector_size(32)));

#define ROWS 2
#define COLS 6

static inline v8 load8(const float *p) {
    v8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline v8 madd(v8 acc, v8 a, v8 b) {
#if defined(__FMA__) && defined(__AVX__)
    return (v8)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)acc);
#else
    return acc + a * b;
#endif
}

/* The last n < 8 floats at p, zero-filled to eight. */
static inline v8 load_tail(const float *p, long n) {
    v8 v = {0};
    memcpy(&v, p, n * sizeof(float));
    return v;
}

static inline float lanes_sum(v8 a) {
    float even = (a[0] + a[4]) + (a[2] + a[6]);
    float odd = (a[1] + a[5]) + (a[3] + a[7]);
    return even + odd;
}

/* Rows [0, rows) by columns [0, cols) of a block, rows <= ROWS and cols <= COLS. */
static void block(const float *x, long ldx, const float *w, long ldw, float *y, long ldy,
                  const float *bias, long k, int rows, int cols) {
    const long kv = k & ~7L, tail = k - kv;
    v8 acc[ROWS][COLS];
    for (int i = 0; i < ROWS; i++)
        for (int j = 0; j < COLS; j++) acc[i][j] = (v8){0};
    if (rows == ROWS && cols == COLS) {
        for (long p = 0; p < kv; p += 8) {
            v8 wv[COLS];
            for (int j = 0; j < COLS; j++) wv[j] = load8(w + j * ldw + p);
            for (int i = 0; i < ROWS; i++) {
                v8 xv = load8(x + i * ldx + p);
                for (int j = 0; j < COLS; j++) acc[i][j] = madd(acc[i][j], xv, wv[j]);
            }
        }
    } else if (rows == 1 && cols == COLS) {
        for (long p = 0; p < kv; p += 8) {
            v8 xv = load8(x + p);
            for (int j = 0; j < COLS; j++) acc[0][j] = madd(acc[0][j], xv, load8(w + j * ldw + p));
        }
    } else {
        for (long p = 0; p < kv; p += 8)
            for (int i = 0; i < rows; i++) {
                v8 xv = load8(x + i * ldx + p);
                for (int j = 0; j < cols; j++) acc[i][j] = madd(acc[i][j], xv, load8(w + j * ldw + p));
            }
    }
    if (tail)
        for (int i = 0; i < rows; i++) {
            v8 xv = load_tail(x + i * ldx + kv, tail);
            for (int j = 0; j < cols; j++) acc[i][j] = madd(acc[i][j], xv, load_tail(w + j * ldw + kv, tail));
        }
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < cols; j++) {
            float s = lanes_sum(acc[i][j]);
            if (bias) s += bias[j];
            y[i * ldy + j] = s;
        }
}

/* y[m, n] = sum_k x[m, k] w[n, k] (+ bias[n]) for m < m_rows, n < n_cols; x, w and y rows are
 * ldx, ldw and ldy floats apart (each row contiguous). */
void qllm_skinny_linear(const float *x, long ldx, const float *w, long ldw, const float *bias,
                        float *y, long ldy, long m_rows, long n_cols, long k, int threads) {
    const long blocks = (n_cols + COLS - 1) / COLS;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long b = 0; b < blocks; b++) {
        const long n0 = b * COLS;
        const int cols = n_cols - n0 < COLS ? (int)(n_cols - n0) : COLS;
        for (long m0 = 0; m0 < m_rows; m0 += ROWS) {
            const int rows = m_rows - m0 < ROWS ? (int)(m_rows - m0) : ROWS;
            block(x + m0 * ldx, ldx, w + n0 * ldw, ldw, y + m0 * ldy + n0, ldy,
                  bias ? bias + n0 : NULL, k, rows, cols);
        }
    }
}
