// The MoE's FFN experts in one call on the CPU: the CPU implementation of the operator
// moeport::fused_experts (defined, with its fake for torch.compile, in cpu_fused_experts.py).
//
// For rows x [T, H] with k slots each (local expert id, -1 for none, and a weight):
//   out[t] = sum over the valid slots s of t, in slot order, of weight[s] * down_e(silu(gate_e(x[t])) * up_e(x[t]))
// with gate_up [E, H, 2I] (gate columns, then up) and down [E, I, H], all float32, row-major.
//
// 1. A counting sort groups the slots by expert (stable: slot order within an expert).
// 2. The experts are spread over the OpenMP threads. Each thread, for blocks of up to BLOCK of
//    an expert's slots, gathers their rows into its own buffer, runs the gate/up GEMM, the
//    weighted SwiGLU, and the down GEMM straight into those slots' rows of `results` [S, H];
//    its buffers stay in its core's cache. The GEMMs are MKL's sgemm from torch's own CPU
//    library, run single-threaded inside the parallel region.
// 3. Each output row sums its slots' result rows in slot order, over the threads by row.
// Every sum has a fixed order, so the output does not depend on the number of threads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <torch/library.h>

#ifdef MOEPORT_VECTOR_EXPF
// glibc's libmvec has a vector expf: declaring it lets the compiler vectorize the SwiGLU loop
extern "C" float expf(float) __attribute__((__simd__("notinbranch")));
#endif

// MKL's Fortran sgemm (column-major, every argument by pointer) and its per-thread thread count,
// as torch's CPU library exports them; weak, so a torch build without them still loads this library
// (moeport looks for sgemm_ before building, and does not offer the operator where it is missing).
extern "C" {
void sgemm_(const char *, const char *, const int *, const int *, const int *, const float *, const float *,
            const int *, const float *, const int *, const float *, float *, const int *) __attribute__((weak));
int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
}

namespace {

enum { BLOCK = 128, PAD = 16 };  // rows per GEMM; floats added to each buffer row (no power-of-two strides)

struct Experts {
    const float *x, *gate_up, *down, *weights;
    const int64_t *order, *start;  // slots sorted by expert; expert e holds order[start[e] .. start[e + 1])
    int hidden, inter, k;
    float *results;
};

struct Buffers {
    float *rows, *gate_up, *act;  // BLOCK rows each, with the leading dimensions below
    int ld_rows, ld_gate_up, ld_act;
};

// row-major y[m, n] = a[m, kk] . b[kk, n], as the column-major product y^T = b^T a^T
void matmul(int m, int n, int kk, const float *a, int lda, const float *b, int ldb, float *y, int ldy) {
    const float one = 1.0f, zero = 0.0f;
    sgemm_("N", "N", &n, &m, &kk, &one, b, &ldb, a, &lda, &zero, y, &ldy);
}

void run_expert(const Experts &p, int e, const Buffers &b) {
    const int h = p.hidden, in = p.inter;
    const float *gate_up = p.gate_up + (size_t)e * h * 2 * in, *down = p.down + (size_t)e * in * h;
    for (int64_t first = p.start[e]; first < p.start[e + 1]; first += BLOCK) {
        const int64_t left = p.start[e + 1] - first;
        const int m = (int)(left < BLOCK ? left : BLOCK);
        for (int i = 0; i < m; i++)
            memcpy(b.rows + (size_t)i * b.ld_rows, p.x + (size_t)(p.order[first + i] / p.k) * h, sizeof(float) * h);
        matmul(m, 2 * in, h, b.rows, b.ld_rows, gate_up, 2 * in, b.gate_up, b.ld_gate_up);
        for (int i = 0; i < m; i++) {
            const float w = p.weights[p.order[first + i]];
            const float *gate = b.gate_up + (size_t)i * b.ld_gate_up, *up = gate + in;
            float *act = b.act + (size_t)i * b.ld_act;
            for (int j = 0; j < in; j++) act[j] = gate[j] / (1.0f + expf(-gate[j])) * up[j] * w;
        }
        matmul(m, h, in, b.act, b.ld_act, down, h, p.results + (size_t)first * h, h);
    }
}

// Returns false when a buffer could not be allocated (out is then unchanged).
bool fused_experts_into(const float *x, const int64_t *ids, const float *weights, int tokens, int k,
                        const float *gate_up, const float *down, int experts, int hidden, int inter, float *results,
                        float *out, int threads) {
    const int64_t slots = (int64_t)tokens * k;
    int64_t *start = (int64_t *)calloc((size_t)experts + 2, sizeof(int64_t));
    int64_t *order = (int64_t *)malloc(sizeof(int64_t) * (size_t)(slots > 0 ? slots : 1));
    int64_t *position = (int64_t *)malloc(sizeof(int64_t) * (size_t)(slots > 0 ? slots : 1));
    if (!start || !order || !position) {
        free(start), free(order), free(position);
        return false;
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
    // now expert e's slots are order[start[e] .. start[e + 1])
    const Experts p = {x, gate_up, down, weights, order, start, hidden, inter, k, results};
    int failed = 0;
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads)
    {
        const int previous = MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0;
        Buffers b = {nullptr, nullptr, nullptr, hidden + PAD, 2 * inter + PAD, inter + PAD};
        const size_t floats = (size_t)BLOCK * (b.ld_rows + b.ld_gate_up + b.ld_act);
        if (posix_memalign((void **)&b.rows, 64, sizeof(float) * floats) != 0) b.rows = nullptr;
        if (b.rows == nullptr) {
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
                if (p.start[e + 1] > p.start[e]) run_expert(p, e, b);
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
        if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous);
    }
    free(start), free(order), free(position);
    return !failed;
}

// What the loops above assume; anything else would read or write out of bounds. A dtype other
// than float32 is NotImplementedError in Python, any other mismatch ValueError.
void check(const at::Tensor &x, const at::Tensor &ids, const at::Tensor &weights, const at::Tensor &gate_up,
           const at::Tensor &down, const at::Tensor &results, const at::Tensor &out) {
    TORCH_CHECK_NOT_IMPLEMENTED(x.scalar_type() == at::kFloat, "the fused CPU experts take float32, not ",
                                x.scalar_type());
    for (const at::Tensor *t : {&x, &ids, &weights, &gate_up, &down, &results, &out}) {
        TORCH_CHECK_VALUE(t->device().is_cpu() && t->is_contiguous(), "fused_experts takes contiguous CPU tensors");
        TORCH_CHECK_VALUE(t == &ids ? t->scalar_type() == at::kLong : t->scalar_type() == at::kFloat,
                          "fused_experts takes int64 expert ids and float32 everything else");
    }
    TORCH_CHECK_VALUE(x.dim() == 2 && ids.dim() == 2 && gate_up.dim() == 3 && down.dim() == 3,
                      "fused_experts takes x [N, H], ids [N, k], gate_up [E, H, 2I] and down [E, I, H]");
    const int64_t n = ids.size(0), k = ids.size(1), count = gate_up.size(0), hidden = gate_up.size(1);
    const int64_t double_inter = gate_up.size(2);
    TORCH_CHECK_VALUE(x.sizes() == at::IntArrayRef({n, hidden}) && weights.sizes() == at::IntArrayRef({n, k}) &&
                          out.sizes() == at::IntArrayRef({n, hidden}),
                      "rows ", x.sizes(), ", ids ", ids.sizes(), ", weights ", weights.sizes(), " and out ",
                      out.sizes(), " do not match hidden size ", hidden);
    TORCH_CHECK_VALUE(double_inter % 2 == 0 && down.sizes() == at::IntArrayRef({count, double_inter / 2, hidden}),
                      "gate_up ", gate_up.sizes(), " and down ", down.sizes(), " are not SwiGLU experts");
    TORCH_CHECK_VALUE(results.sizes() == at::IntArrayRef({n * k, hidden}), "results must be [", n * k, ", ",
                      hidden, "], not ", results.sizes());
}

void fused_experts(const at::Tensor &x, const at::Tensor &ids, const at::Tensor &weights, const at::Tensor &gate_up,
                   const at::Tensor &down, const at::Tensor &results, const at::Tensor &out) {
    TORCH_CHECK(sgemm_ != nullptr, "fused_experts needs MKL's sgemm, which this torch build does not export");
    check(x, ids, weights, gate_up, down, results, out);
    const bool done = fused_experts_into(
        x.data_ptr<float>(), ids.data_ptr<int64_t>(), weights.data_ptr<float>(), (int)ids.size(0),
        (int)ids.size(1), gate_up.data_ptr<float>(), down.data_ptr<float>(), (int)gate_up.size(0),
        (int)gate_up.size(1), (int)(gate_up.size(2) / 2), results.data_ptr<float>(), out.data_ptr<float>(),
        at::get_num_threads());
    TORCH_CHECK(done, "fused_experts could not allocate its per-thread buffers");
}

}  // namespace

TORCH_LIBRARY_IMPL(moeport, CPU, m) { m.impl("fused_experts", &fused_experts); }
