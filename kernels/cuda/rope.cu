// Rotary embedding in place (kernels/src/rope.rs), both layouts, over many vectors at once.
//
// x holds n_vecs vectors `stride` floats apart; each vector's rope part starts at `offset`
// and is 2*half floats long. Vector v belongs to token row v / vecs_per_row (one row per
// token, vecs_per_row heads per token) and uses that row's cos/sin (rows x half, YaRN already
// applied by the caller). interleaved != 0: pairs (x[2i], x[2i+1]); otherwise NeoX
// rotate-half pairs (x[i], x[i+half]). Each pair becomes (a*c - b*s, b*c + a*s) with the
// same rounding as the CPU kernel.
extern "C" __global__ void rope_f32(float* __restrict__ x, const float* __restrict__ cosv,
                                    const float* __restrict__ sinv, int n_vecs, int vecs_per_row, int stride,
                                    int offset, int half, int interleaved) {
    const long long total = (long long)n_vecs * half;
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < total;
         t += (long long)gridDim.x * blockDim.x) {
        const int v = (int)(t / half), i = (int)(t % half);
        float* xv = x + (size_t)v * stride + offset;
        const size_t row = (size_t)(v / vecs_per_row);
        const float c = cosv[row * half + i], s = sinv[row * half + i];
        const int ia = interleaved ? 2 * i : i;
        const int ib = interleaved ? 2 * i + 1 : i + half;
        const float a = xv[ia], b = xv[ib];
        xv[ia] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
        xv[ib] = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
    }
}
