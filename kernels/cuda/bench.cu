// Ceiling probes for cuda-bench: the device's FP32 FMA rate and copy bandwidth, measured with
// the same compiler and launch path as the real kernels.

// 8 independent FMA chains per thread, `iters` rounds: 16 * iters FLOPs per thread. The
// constants keep values bounded; the result is stored so the chains cannot be removed.
extern "C" __global__ void fma_peak_f32(float* __restrict__ out, int iters, float a, float b) {
    float x[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) x[i] = (float)(threadIdx.x + i) * 1e-3f;
    for (int it = 0; it < iters; ++it) {
#pragma unroll
        for (int i = 0; i < 8; ++i) x[i] = fmaf(x[i], a, b);
    }
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) s += x[i];
    out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}

// Streaming copy with 16-byte accesses (n4 float4 elements): reads + writes = 32 bytes each.
extern "C" __global__ void copy_f32x4(const float4* __restrict__ src, float4* __restrict__ dst, long long n4) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n4; i += (long long)gridDim.x * blockDim.x)
        dst[i] = src[i];
}
