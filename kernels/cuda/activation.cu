// SwiGLU gate (kernels/src/activation.rs silu_mul): gate[i] = gate[i] / (1 + e^-gate[i]) * up[i].
// Same expression and rounding order as the CPU; expf may differ from the host libm by an ulp.
extern "C" __global__ void silu_mul_f32(float* __restrict__ gate, const float* __restrict__ up, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float g = gate[i];
        gate[i] = __fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))), up[i]);
    }
}
