// MoE routing (worker/src/model/moe.rs route): group-limited sigmoid routing with the
// correction bias, one warp per token.
//
// scores = sigmoid(logits); choice = scores + bias. A group's score is the sum of its two best
// choice values; the topk_group best groups stay eligible, and the top_k best eligible
// experts by choice are picked (best first). Every "best" uses f32::total_cmp with ties to the
// lower index, as the CPU does. Weights are the chosen experts' sigmoid scores, divided by
// their sum (+1e-20) when norm_topk_prob, times routed_scaling_factor, with the CPU's
// operation order. Limits (checked by the host): experts <= 512, n_group <= 32,
// top_k <= 32, experts divisible by n_group.

#define MOE_WARPS 4
#define MOE_MAX_EXPERTS 512
#define MOE_MAX_TOPK 32

// Packs (eligible, total-order key, index) so that the u64 maximum is the best candidate:
// eligible first, then the larger value, then the lower index.
__device__ __forceinline__ u64 moe_pack(bool eligible, float v, int idx) {
    if (!eligible) return 0ull;
    return (1ull << 63) | ((u64)ir_ordered_bits_total(v) << 31) | (u64)(0x7fffffff - idx);
}

__device__ __forceinline__ int moe_unpack_index(u64 p) { return 0x7fffffff - (int)(p & 0x7fffffffull); }

__device__ __forceinline__ u64 moe_warp_max(u64 v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const u64 w = __shfl_xor_sync(IR_FULL_MASK, v, o);
        v = w > v ? w : v;
    }
    return v;
}

extern "C" __global__ void __launch_bounds__(MOE_WARPS * 32)
    moe_route_f32(const float* __restrict__ logits,  // tokens x experts router logits
                  const float* __restrict__ bias,    // experts (e_score_correction_bias)
                  int tokens, int experts, int n_group, int topk_group, int top_k, int norm_topk_prob,
                  float routed_scaling_factor, int* __restrict__ out_experts, float* __restrict__ out_weights) {
    __shared__ float sc[MOE_WARPS][MOE_MAX_EXPERTS];
    __shared__ float ch[MOE_WARPS][MOE_MAX_EXPERTS];
    __shared__ float gs[MOE_WARPS][32];
    __shared__ int chosen[MOE_WARPS][MOE_MAX_TOPK];

    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int t = blockIdx.x * MOE_WARPS + w;
    if (t >= tokens) return;  // whole warp; no block-wide barrier below
    const float* lg = logits + (size_t)t * experts;
    for (int i = lane; i < experts; i += 32) {
        const float s = __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-lg[i])));
        sc[w][i] = s;
        ch[w][i] = __fadd_rn(s, bias[i]);
    }
    __syncwarp();

    const int per = experts / n_group;
    if (lane < n_group) {
        const float* g = &ch[w][lane * per];
        int b0 = 0;
        for (int i = 1; i < per; ++i)
            if (ir_ordered_bits_total(g[i]) > ir_ordered_bits_total(g[b0])) b0 = i;
        // Rust's f32 sum starts from -0.0 and adds in the order of top_indices (best first).
        float sum = __fadd_rn(-0.0f, g[b0]);
        if (per >= 2) {
            int b1 = -1;
            for (int i = 0; i < per; ++i) {
                if (i == b0) continue;
                if (b1 < 0 || ir_ordered_bits_total(g[i]) > ir_ordered_bits_total(g[b1])) b1 = i;
            }
            sum = __fadd_rn(sum, g[b1]);
        }
        gs[w][lane] = sum;
    }
    __syncwarp();

    u32 group_mask = 0;
    for (int r = 0; r < topk_group; ++r) {
        const bool ok = lane < n_group && !((group_mask >> lane) & 1u);
        const u64 best = moe_warp_max(moe_pack(ok, ok ? gs[w][lane] : 0.0f, lane));
        group_mask |= 1u << moe_unpack_index(best);
    }

    for (int r = 0; r < top_k; ++r) {
        u64 best = 0;
        for (int i = lane; i < experts; i += 32) {
            bool taken = false;
            for (int j = 0; j < r; ++j) taken |= chosen[w][j] == i;
            const float v = ((group_mask >> (i / per)) & 1u) ? ch[w][i] : IR_NEG_INF;
            const u64 p = moe_pack(!taken, v, i);
            best = p > best ? p : best;
        }
        best = moe_warp_max(best);
        if (lane == 0) chosen[w][r] = moe_unpack_index(best);
        __syncwarp();
    }

    if (lane == 0) {
        float wts[MOE_MAX_TOPK];
        for (int j = 0; j < top_k; ++j) wts[j] = sc[w][chosen[w][j]];
        if (norm_topk_prob) {
            float sum = -0.0f;
            for (int j = 0; j < top_k; ++j) sum = __fadd_rn(sum, wts[j]);
            sum = __fadd_rn(sum, 1e-20f);
            for (int j = 0; j < top_k; ++j) wts[j] = __fdiv_rn(wts[j], sum);
        }
        for (int j = 0; j < top_k; ++j) {
            out_experts[(size_t)t * top_k + j] = chosen[w][j];
            out_weights[(size_t)t * top_k + j] = __fmul_rn(wts[j], routed_scaling_factor);
        }
    }
}
