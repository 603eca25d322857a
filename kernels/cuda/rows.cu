// Row moves and conversions around the GEMMs of the worker's GPU forward pass: embedding and
// MoE gathers, paged-cache writes, MoE output accumulation, residual adds, F32 -> BF16.
// Index arrays come from the host; an index outside [0, src_rows) / [0, out_rows) is skipped
// (gathers write zeros), so a bad index can never touch memory outside the buffers.

// out[i, :] = src[idx[i], :] for i < rows.
extern "C" __global__ void gather_rows_f32(const float* __restrict__ src, int src_rows, const int* __restrict__ idx,
                                           float* __restrict__ out, int rows, int dim) {
    const long long n = (long long)rows * dim;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n;
         e += (long long)gridDim.x * blockDim.x) {
        const int i = (int)(e / dim), j = (int)(e % dim);
        const int s = idx[i];
        out[e] = (s >= 0 && s < src_rows) ? src[(long long)s * dim + j] : 0.0f;
    }
}

// out[idx[i], :] = src[i, :] for i < rows (indices distinct).
extern "C" __global__ void scatter_rows_f32(const float* __restrict__ src, const int* __restrict__ idx,
                                            float* __restrict__ out, int out_rows, int rows, int dim) {
    const long long n = (long long)rows * dim;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n;
         e += (long long)gridDim.x * blockDim.x) {
        const int i = (int)(e / dim), j = (int)(e % dim);
        const int d = idx[i];
        if (d >= 0 && d < out_rows) out[(long long)d * dim + j] = src[e];
    }
}

// out[idx[i], :] += w[i] * src[i, :] for i < rows (indices distinct within one launch), with
// the CPU's rounding: the product is rounded, then the sum (no FMA contraction).
extern "C" __global__ void scatter_add_rows_f32(const float* __restrict__ src, const int* __restrict__ idx,
                                                const float* __restrict__ w, float* __restrict__ out, int out_rows,
                                                int rows, int dim) {
    const long long n = (long long)rows * dim;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n;
         e += (long long)gridDim.x * blockDim.x) {
        const int i = (int)(e / dim), j = (int)(e % dim);
        const int d = idx[i];
        if (d >= 0 && d < out_rows) {
            float* o = out + (long long)d * dim + j;
            *o = __fadd_rn(*o, __fmul_rn(w[i], src[e]));
        }
    }
}

// acc[i] += x[i].
extern "C" __global__ void add_f32(float* __restrict__ acc, const float* __restrict__ x, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        acc[i] = __fadd_rn(acc[i], x[i]);
    }
}

// out[i] = BF16 bits of x[i], rounded to nearest even (as half::bf16::from_f32); NaN stays a
// quiet NaN.
extern "C" __global__ void f32_to_bf16(const float* __restrict__ x, unsigned short* __restrict__ out, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const u32 b = __float_as_uint(x[i]);
        u32 r;
        if ((b & 0x7fffffffu) > 0x7f800000u) {
            r = (b >> 16) | 0x0040u;
        } else {
            r = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
        }
        out[i] = (unsigned short)r;
    }
}
