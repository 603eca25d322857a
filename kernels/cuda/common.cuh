// Shared helpers, prepended to every kernel source before NVRTC compiles it (NVRTC runs with
// no include path, so nothing here may include a system header).
//
// Numerics rule for all kernels: where the CPU kernel's result is exact up to rounding of a
// fixed expression (norms, RoPE, SwiGLU), the GPU code spells the same expression with the
// round-to-nearest intrinsics (__fmul_rn, __fadd_rn, ...) so NVRTC cannot contract it into an
// FMA and change the rounding. Reductions (dot products, sums) are free to use FMAs: their
// order differs from the CPU anyway and parity tests use a tolerance there.

typedef unsigned int u32;
typedef unsigned long long u64;

#define IR_NEG_INF __int_as_float(0xff800000)
#define IR_FULL_MASK 0xffffffffu

// Maps a score to a u32 whose unsigned order is select_topk's order (kernels/src/topk.rs):
// NaN counts as -inf, -0.0 folds into +0.0.
__device__ __forceinline__ u32 ir_ordered_bits_fold(float score) {
    u32 b = __float_as_uint(score);
    if (score != score) b = 0xff800000u;
    if ((b << 1) == 0u) b = 0u;
    u32 flip = (u32)((int)b >> 31) | 0x80000000u;
    return b ^ flip;
}

// Maps a float to a u32 whose unsigned order is Rust's f32::total_cmp (sampling and MoE
// routing use it): -NaN < -inf < ... < -0.0 < +0.0 < ... < +inf < +NaN.
__device__ __forceinline__ u32 ir_ordered_bits_total(float v) {
    u32 b = __float_as_uint(v);
    u32 flip = (u32)((int)b >> 31) | 0x80000000u;
    return b ^ flip;
}

__device__ __forceinline__ float ir_warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(IR_FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float ir_warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(IR_FULL_MASK, v, o));
    return v;
}

// Sum of one double per thread over the whole block; every thread gets the total. Uses 32
// doubles of shared memory passed by the caller; blockDim.x must be a multiple of 32.
__device__ __forceinline__ double ir_block_sum_d(double v, double* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(IR_FULL_MASK, v, o);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    double total = 0.0;
    // Every thread sums the warp totals in the same order, so all get the same bits.
    for (int w = 0; w < warps; ++w) total += scratch[w];
    return total;
}
