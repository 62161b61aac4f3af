/* The MoE's FFN experts in one call on the CPU (see cpu_fused_experts.py).
 *
 * For rows x [T, H] with k slots each (local expert id, -1 for none, and a weight):
 *   out[t] = sum over the valid slots s of t, in slot order, of weight[s] * down_e(silu(gate_e(x[t])) * up_e(x[t]))
 * with gate_up [E, H, 2I] (gate columns, then up) and down [E, I, H], all float32, row-major.
 *
 * 1. A counting sort groups the slots by expert (stable: slot order within an expert).
 * 2. The experts are spread over the OpenMP threads. Each thread, for blocks of up to BLOCK of
 *    an expert's slots, gathers their rows into its own buffer, runs the gate/up GEMM, the
 *    weighted SwiGLU, and the down GEMM straight into those slots' rows of `results` [S, H];
 *    its buffers stay in its core's cache. The GEMMs are MKL's sgemm, run single-threaded
 *    inside the parallel region.
 * 3. Each output row sums its slots' result rows in slot order, over the threads by row.
 * Every sum has a fixed order, so the output does not depend on the number of threads.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef MOEPORT_VECTOR_EXPF
/* glibc's libmvec has vector expf: declaring it lets the compiler vectorize the SwiGLU loop */
float expf(float) __attribute__((__simd__("notinbranch")));
#endif

/* Fortran sgemm (column-major) and MKL's per-thread thread count, passed in as addresses */
typedef void (*sgemm_fn)(const char *, const char *, const int *, const int *, const int *, const float *,
                         const float *, const int *, const float *, const int *, const float *, float *, const int *);
typedef int (*threads_local_fn)(int);

enum { BLOCK = 128, PAD = 16 }; /* rows per GEMM; floats added to each buffer row (no power-of-two strides) */

typedef struct {
    const float *x, *gate_up, *down, *weights;
    const int64_t *order, *start; /* slots sorted by expert; expert e holds order[start[e] .. start[e + 1]) */
    int hidden, inter, k;
    float *results;
    sgemm_fn sgemm;
} experts_t;

typedef struct {
    float *rows, *gate_up, *act; /* BLOCK rows each, with leading dimensions below */
    int ld_rows, ld_gate_up, ld_act;
} buffers_t;

/* row-major y[m, n] = a[m, kk] . b[kk, n], as the column-major product y^T = b^T a^T */
static void matmul(sgemm_fn sgemm, int m, int n, int kk, const float *a, int lda, const float *b, int ldb, float *y,
                   int ldy) {
    const float one = 1.0f, zero = 0.0f;
    sgemm("N", "N", &n, &m, &kk, &one, b, &ldb, a, &lda, &zero, y, &ldy);
}

static void run_expert(const experts_t *p, int e, const buffers_t *b) {
    const int h = p->hidden, in = p->inter;
    const float *gate_up = p->gate_up + (size_t)e * h * 2 * in, *down = p->down + (size_t)e * in * h;
    for (int64_t first = p->start[e]; first < p->start[e + 1]; first += BLOCK) {
        const int64_t left = p->start[e + 1] - first;
        const int m = (int)(left < BLOCK ? left : BLOCK);
        for (int i = 0; i < m; i++)
            memcpy(b->rows + (size_t)i * b->ld_rows, p->x + (size_t)(p->order[first + i] / p->k) * h, sizeof(float) * h);
        matmul(p->sgemm, m, 2 * in, h, b->rows, b->ld_rows, gate_up, 2 * in, b->gate_up, b->ld_gate_up);
        for (int i = 0; i < m; i++) {
            const float w = p->weights[p->order[first + i]];
            const float *gate = b->gate_up + (size_t)i * b->ld_gate_up, *up = gate + in;
            float *act = b->act + (size_t)i * b->ld_act;
            for (int j = 0; j < in; j++) act[j] = gate[j] / (1.0f + expf(-gate[j])) * up[j] * w;
        }
        matmul(p->sgemm, m, h, in, b->act, b->ld_act, down, h, p->results + (size_t)first * h, h);
    }
}

/* Returns 0, or 1 when a buffer could not be allocated (out is then unchanged). */
int fused_experts(const float *x, const int64_t *ids, const float *weights, int tokens, int k, const float *gate_up,
                  const float *down, int experts, int hidden, int inter, float *results, float *out, int threads,
                  void *sgemm, void *threads_local) {
    const int64_t slots = (int64_t)tokens * k;
    int64_t *start = calloc((size_t)experts + 2, sizeof(int64_t));
    int64_t *order = malloc(sizeof(int64_t) * (size_t)(slots > 0 ? slots : 1));
    int64_t *position = malloc(sizeof(int64_t) * (size_t)(slots > 0 ? slots : 1));
    if (!start || !order || !position) {
        free(start), free(order), free(position);
        return 1;
    }
    for (int64_t s = 0; s < slots; s++)
        if (ids[s] >= 0 && ids[s] < experts) start[ids[s] + 2]++;
    for (int e = 0; e < experts; e++) start[e + 2] += start[e + 1];
    for (int64_t s = 0; s < slots; s++) {
        position[s] = -1;
        if (ids[s] >= 0 && ids[s] < experts) {
            position[s] = start[ids[s] + 1]++;
            order[position[s]] = s;
        }
    }
    /* now expert e's slots are order[start[e] .. start[e + 1]) */
    const experts_t p = {x, gate_up, down, weights, order, start, hidden, inter, k, results, (sgemm_fn)sgemm};
    int failed = 0;
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads)
    {
        const int previous = threads_local ? ((threads_local_fn)threads_local)(1) : 0;
        buffers_t b = {NULL, NULL, NULL, hidden + PAD, 2 * inter + PAD, inter + PAD};
        const size_t floats = (size_t)BLOCK * (b.ld_rows + b.ld_gate_up + b.ld_act);
        if (posix_memalign((void **)&b.rows, 64, sizeof(float) * floats) != 0) b.rows = NULL;
        if (b.rows == NULL) {
#pragma omp atomic write
            failed = 1;
        } else {
            b.gate_up = b.rows + (size_t)BLOCK * b.ld_rows;
            b.act = b.gate_up + (size_t)BLOCK * b.ld_gate_up;
        }
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(dynamic, 1)
            for (int e = 0; e < experts; e++)
                if (p.start[e + 1] > p.start[e]) run_expert(&p, e, &b);
#pragma omp for schedule(static)
            for (int t = 0; t < tokens; t++) {
                float *o = out + (size_t)t * hidden;
                memset(o, 0, sizeof(float) * hidden);
                for (int j = 0; j < k; j++) {
                    const int64_t at = position[(int64_t)t * k + j];
                    if (at < 0) continue;
                    const float *r = results + (size_t)at * hidden;
                    for (int c = 0; c < hidden; c++) o[c] += r[c];
                }
            }
        }
        free(b.rows);
        if (threads_local) ((threads_local_fn)threads_local)(previous);
    }
    free(start), free(order), free(position);
    return failed;
}
