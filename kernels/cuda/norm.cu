// RMSNorm and LayerNorm over rows (kernels/src/norm.rs). One block per row; statistics are
// accumulated in double like the CPU kernel, the elementwise part is the CPU expression with
// round-to-nearest intrinsics (no FMA contraction), so outputs match to the last bit unless
// the double sums round differently across an f32 boundary.

// out = x * (1 / sqrt(mean(x^2) + eps)) * weight, rows of length dim.
extern "C" __global__ void rms_norm_f32(const float* __restrict__ x, const float* __restrict__ weight,
                                        float* __restrict__ out, int rows, int dim, float eps) {
    __shared__ double scratch[32];
    const int row = blockIdx.x;
    if (row >= rows) return;
    const float* xr = x + (size_t)row * dim;
    float* orow = out + (size_t)row * dim;
    double ss = 0.0;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        double v = (double)xr[i];
        ss = __dadd_rn(ss, __dmul_rn(v, v));
    }
    ss = ir_block_sum_d(ss, scratch);
    const float mean_sq = (float)(ss / (double)dim);
    const float inv = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(mean_sq, eps)));
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        orow[i] = __fmul_rn(__fmul_rn(xr[i], inv), weight[i]);
    }
}

// out = (x - mean) / sqrt(var + eps) * weight + bias (biased variance, two-pass).
extern "C" __global__ void layer_norm_f32(const float* __restrict__ x, const float* __restrict__ weight,
                                          const float* __restrict__ bias, float* __restrict__ out, int rows,
                                          int dim, float eps) {
    __shared__ double scratch[32];
    const int row = blockIdx.x;
    if (row >= rows) return;
    const float* xr = x + (size_t)row * dim;
    float* orow = out + (size_t)row * dim;
    double s = 0.0;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) s = __dadd_rn(s, (double)xr[i]);
    const double mean = ir_block_sum_d(s, scratch) / (double)dim;
    double sq = 0.0;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        double d = __dsub_rn((double)xr[i], mean);
        sq = __dadd_rn(sq, __dmul_rn(d, d));
    }
    const double var = ir_block_sum_d(sq, scratch) / (double)dim;
    const float inv = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn((float)var, eps)));
    const float meanf = (float)mean;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float v = __fmul_rn(__fmul_rn(__fsub_rn(xr[i], meanf), inv), weight[i]);
        orow[i] = __fadd_rn(v, bias[i]);
    }
}
