/* qllm's skinny GEMM: y = x @ w.T (+ bias) for a few rows x, float32, w as it is (row-major,
 * out x in). Built by qllm/models/skinny.py on the machine that runs it.
 *
 * Every output element is one dot product, computed the same way whatever the number of rows:
 * eight lanes accumulate x[m, k] * w[n, k] over k in ascending order, a fixed tree adds the lanes,
 * then the k remainder and the bias are added in order. Rows and columns are only blocked (two
 * rows by four columns share the weight loads) and columns are split between threads, so a row's
 * result does not depend on its batch mates, on its place in the batch, or on the thread count.
 */
#include <stddef.h>

typedef float v8 __attribute__((vector_size(32)));

#define ROWS 2
#define COLS 4

static inline v8 load8(const float *p) {
    v8 v;
    __builtin_memcpy(&v, p, sizeof v);
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
    const long kv = k & ~7L;
    v8 acc[ROWS][COLS];
    for (int i = 0; i < ROWS; i++)
        for (int j = 0; j < COLS; j++) acc[i][j] = (v8){0};
    if (rows == ROWS && cols == COLS) {
        for (long p = 0; p < kv; p += 8) {
            v8 wv[COLS];
            for (int j = 0; j < COLS; j++) wv[j] = load8(w + j * ldw + p);
            for (int i = 0; i < ROWS; i++) {
                v8 xv = load8(x + i * ldx + p);
                for (int j = 0; j < COLS; j++) acc[i][j] += xv * wv[j];
            }
        }
    } else {
        for (long p = 0; p < kv; p += 8)
            for (int i = 0; i < rows; i++) {
                v8 xv = load8(x + i * ldx + p);
                for (int j = 0; j < cols; j++) acc[i][j] += xv * load8(w + j * ldw + p);
            }
    }
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < cols; j++) {
            float s = lanes_sum(acc[i][j]);
            for (long p = kv; p < k; p++) s += x[i * ldx + p] * w[j * ldw + p];
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
