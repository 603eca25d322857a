// Token selection (worker/src/sampling.rs), one block per row of logits.

#define SP_THREADS 1024
#define SP_WARPS (SP_THREADS / 32)
#define SP_MAX 2048

// Greedy: index of the largest logit, ties to the lowest id, with the CPU loop's NaN
// behaviour (`if v > logits[best]`): a NaN never wins, and a NaN at index 0 wins everything.
extern "C" __global__ void __launch_bounds__(SP_THREADS)
    argmax_rows_f32(const float* __restrict__ logits, int vocab, int* __restrict__ out) {
    __shared__ float wv[SP_WARPS];
    __shared__ int wi[SP_WARPS];
    const int row = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const float* x = logits + (size_t)row * vocab;
    float bv = 0.0f;
    int bi = -1;  // -1: no non-NaN value seen
    for (int i = threadIdx.x; i < vocab; i += SP_THREADS) {
        const float v = x[i];
        if (v == v && (bi < 0 || v > bv)) {
            bv = v;
            bi = i;
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(IR_FULL_MASK, bv, o);
        const int oi = __shfl_xor_sync(IR_FULL_MASK, bi, o);
        if (oi >= 0 && (bi < 0 || ov > bv || (ov == bv && oi < bi))) {
            bv = ov;
            bi = oi;
        }
    }
    if (lane == 0) {
        wv[warp] = bv;
        wi[warp] = bi;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < SP_WARPS; ++w) {
            const float ov = wv[w];
            const int oi = wi[w];
            if (oi >= 0 && (bi < 0 || ov > bv || (ov == bv && oi < bi))) {
                bv = ov;
                bi = oi;
            }
        }
        const bool first_nan = vocab > 0 && x[0] != x[0];
        out[row] = (first_nan || bi < 0) ? 0 : bi;
    }
}

// Temperature / top-k / top-p sampling over a candidate set chosen by topk_rows_f32 in
// total_cmp order (fold = 0): the top_k candidates, or the whole vocabulary when top_k is 0
// (the host allows at most SP_MAX candidates). As the CPU: candidates sorted by logit
// descending (ties: lower id), p_i = exp(f64((l_i - max) / T)), normalized; top_p keeps the
// shortest prefix whose mass reaches top_p; then u * (kept mass) walks the prefix. The sums
// run sequentially in the CPU's order so the same uniform `u` (drawn on the host from the
// request's seeded generator) picks the same token.
extern "C" __global__ void __launch_bounds__(SP_THREADS)
    sample_rows_f32(const float* __restrict__ logits, int vocab, const u32* __restrict__ cand, long long cand_ld,
                    const int* __restrict__ cand_len, float temperature, float top_p,
                    const double* __restrict__ uniforms, int* __restrict__ out) {
    __shared__ u64 keys[SP_MAX];
    __shared__ double probs[SP_MAX];
    __shared__ double sh_total;
    const int row = blockIdx.x;
    const float* x = logits + (size_t)row * vocab;
    const int c = min(cand_len[row], SP_MAX);
    if (c <= 0) {
        if (threadIdx.x == 0) out[row] = 0;
        return;
    }
    int p2 = 1;
    while (p2 < c) p2 <<= 1;
    for (int i = threadIdx.x; i < p2; i += SP_THREADS) {
        u64 key = 0;  // padding sorts last: every real key has a nonzero low word (~id)
        if (i < c) {
            const u32 id = cand[(size_t)row * cand_ld + i];
            key = ((u64)ir_ordered_bits_total(x[id]) << 32) | (u64)(~id);
        }
        keys[i] = key;
    }
    __syncthreads();
    // Bitonic sort, descending.
    for (int size = 2; size <= p2; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int i = threadIdx.x; i < p2; i += SP_THREADS) {
                const int j = i ^ stride;
                if (j > i) {
                    const bool desc = (i & size) == 0;
                    const u64 a = keys[i], b = keys[j];
                    if ((a < b) == desc) {
                        keys[i] = b;
                        keys[j] = a;
                    }
                }
            }
            __syncthreads();
        }
    }
    const float mx = x[~(u32)keys[0]];
    for (int i = threadIdx.x; i < c; i += SP_THREADS) {
        const float l = x[~(u32)keys[i]];
        probs[i] = exp((double)__fdiv_rn(__fsub_rn(l, mx), temperature));
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        double total = -0.0;
        for (int i = 0; i < c; ++i) total += probs[i];
        sh_total = total;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < c; i += SP_THREADS) probs[i] /= sh_total;
    __syncthreads();
    if (threadIdx.x == 0) {
        int keep = c;
        if (top_p < 1.0f) {
            double acc = 0.0;
            for (int i = 0; i < c; ++i) {
                acc += probs[i];
                if (acc >= (double)top_p) {
                    keep = i + 1;
                    break;
                }
            }
        }
        double kept = -0.0;
        for (int i = 0; i < keep; ++i) kept += probs[i];
        double u = uniforms[row] * kept;
        int pick = keep - 1;
        for (int i = 0; i < keep; ++i) {
            if (u < probs[i]) {
                pick = i;
                break;
            }
            u -= probs[i];
        }
        out[row] = (int)(~(u32)keys[pick]);
    }
}
