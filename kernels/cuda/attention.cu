// Sparse MLA attention in absorbed (MQA) form (kernels/src/attention.rs):
//   out[r,h] = sum_s softmax_s(scale * (q_latent[r,h] . ckv[s] + q_rope[r,h] . kpe[s])) * ckv[s]
// over row r's selected key positions s, read from a paged latent / rope-key cache. Serves
// prefill (many rows) and decode (few rows) alike.
//
// Block = one row x 16 heads (4 warps x 4 heads) x one split of the row's selected keys.
// Selected keys are staged through shared memory 8 at a time; every warp scores them for its
// 4 heads (lanes own strided columns, the dot product is finished with a butterfly so every
// lane holds the same bits) and accumulates them into per-lane output columns with an online
// softmax. Each loaded key element feeds 4 heads, so shared-memory reads stay below the FMA
// rate. Limits (checked by the host): kv_rank <= 512, rope_dim <= 64.
//
// Decode has few rows, so the keys of a row are split over gridDim.z blocks (flash-decoding);
// with splits > 1 each block writes its unnormalized partial output and (max, sum) and
// mla_combine_f32 merges the splits in a fixed order (deterministic).

#define AT_WARPS 4
#define AT_HPW 4
#define AT_HEADS (AT_WARPS * AT_HPW)
#define AT_TK 8
#define AT_MAX_RANK 512
#define AT_MAX_ROPE 64
#define AT_RPL (AT_MAX_RANK / 32)
#define AT_PPL (AT_MAX_ROPE / 32)

extern "C" __global__ void __launch_bounds__(AT_WARPS * 32)
    sparse_mla_attention_f32(const float* __restrict__ q_latent,    // rows x heads x rank
                             const float* __restrict__ q_rope,      // rows x heads x rope
                             const float* __restrict__ ckv_pool,    // phys blocks x block_size x rank
                             const float* __restrict__ kpe_pool,    // phys blocks x block_size x rope
                             const int* __restrict__ block_tables,  // concatenated per-sequence tables
                             const int* __restrict__ table_start,   // rows: offset of the row's table
                             const u32* __restrict__ selected,      // rows x sel_ld positions
                             long long sel_ld,
                             const int* __restrict__ sel_len,  // rows: selected count
                             float* __restrict__ out,          // rows x heads x rank (splits == 1)
                             float* __restrict__ part_o,       // splits x rows x heads x rank
                             float* __restrict__ part_ml,      // splits x rows x heads x 2
                             int rows, int heads, int rank, int rope, int block_size, float scale, int splits) {
    __shared__ __align__(16) float kv[AT_TK][AT_MAX_RANK];
    __shared__ __align__(16) float kp[AT_TK][AT_MAX_ROPE];

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int row = blockIdx.y, split = blockIdx.z;
    const int hbase = blockIdx.x * AT_HEADS + warp * AT_HPW;
    const int len = sel_len[row];
    const int chunk = (len + splits - 1) / splits;
    const int kbeg = min(split * chunk, len), kend = min(kbeg + chunk, len);
    const u32* sel = selected + (size_t)row * sel_ld;
    const int* table = block_tables + table_start[row];

    float ql[AT_HPW][AT_RPL], qr[AT_HPW][AT_PPL], acc[AT_HPW][AT_RPL];
    float m[AT_HPW], l[AT_HPW];
#pragma unroll
    for (int u = 0; u < AT_HPW; ++u) {
        const int h = hbase + u;
        const bool hv = h < heads;
#pragma unroll
        for (int i = 0; i < AT_RPL; ++i) {
            const int c = lane + 32 * i;
            ql[u][i] = (hv && c < rank) ? q_latent[((size_t)row * heads + h) * rank + c] : 0.0f;
            acc[u][i] = 0.0f;
        }
#pragma unroll
        for (int i = 0; i < AT_PPL; ++i) {
            const int c = lane + 32 * i;
            qr[u][i] = (hv && c < rope) ? q_rope[((size_t)row * heads + h) * rope + c] : 0.0f;
        }
        m[u] = IR_NEG_INF;
        l[u] = 0.0f;
    }
    const bool vec_rank = (rank & 3) == 0, vec_rope = (rope & 3) == 0;

    for (int t0 = kbeg; t0 < kend; t0 += AT_TK) {
        const int nt = min(AT_TK, kend - t0);
        __syncthreads();  // the previous tile is consumed
        for (int j = 0; j < nt; ++j) {
            const u32 pos = sel[t0 + j];
            const size_t slot = (size_t)table[pos / block_size] * block_size + pos % block_size;
            const float* src = ckv_pool + slot * rank;
            const float* srp = kpe_pool + slot * rope;
            if (vec_rank) {
                for (int c = threadIdx.x * 4; c < rank; c += blockDim.x * 4)
                    *reinterpret_cast<float4*>(&kv[j][c]) = __ldg(reinterpret_cast<const float4*>(src + c));
            } else {
                for (int c = threadIdx.x; c < rank; c += blockDim.x) kv[j][c] = __ldg(src + c);
            }
            if (vec_rope) {
                for (int c = threadIdx.x * 4; c < rope; c += blockDim.x * 4)
                    *reinterpret_cast<float4*>(&kp[j][c]) = __ldg(reinterpret_cast<const float4*>(srp + c));
            } else {
                for (int c = threadIdx.x; c < rope; c += blockDim.x) kp[j][c] = __ldg(srp + c);
            }
        }
        __syncthreads();

        float sc[AT_HPW][AT_TK];
#pragma unroll
        for (int j = 0; j < AT_TK; ++j) {
            if (j < nt) {
                float p[AT_HPW];
#pragma unroll
                for (int u = 0; u < AT_HPW; ++u) p[u] = 0.0f;
#pragma unroll
                for (int i = 0; i < AT_RPL; ++i) {
                    const int c = lane + 32 * i;
                    if (c < rank) {
                        const float v = kv[j][c];
#pragma unroll
                        for (int u = 0; u < AT_HPW; ++u) p[u] = fmaf(ql[u][i], v, p[u]);
                    }
                }
#pragma unroll
                for (int i = 0; i < AT_PPL; ++i) {
                    const int c = lane + 32 * i;
                    if (c < rope) {
                        const float v = kp[j][c];
#pragma unroll
                        for (int u = 0; u < AT_HPW; ++u) p[u] = fmaf(qr[u][i], v, p[u]);
                    }
                }
#pragma unroll
                for (int u = 0; u < AT_HPW; ++u) sc[u][j] = ir_warp_sum(p[u]) * scale;
            } else {
#pragma unroll
                for (int u = 0; u < AT_HPW; ++u) sc[u][j] = IR_NEG_INF;
            }
        }

        // Online softmax: rescale what was accumulated under the old max, then add the tile.
#pragma unroll
        for (int u = 0; u < AT_HPW; ++u) {
            float tmax = IR_NEG_INF;
#pragma unroll
            for (int j = 0; j < AT_TK; ++j) tmax = fmaxf(tmax, sc[u][j]);
            const float mnew = fmaxf(m[u], tmax);
            const float corr = (m[u] == IR_NEG_INF) ? 0.0f : expf(m[u] - mnew);
            l[u] *= corr;
#pragma unroll
            for (int i = 0; i < AT_RPL; ++i) acc[u][i] *= corr;
            float sum = 0.0f;
#pragma unroll
            for (int j = 0; j < AT_TK; ++j) {
                const float p = j < nt ? expf(sc[u][j] - mnew) : 0.0f;
                sc[u][j] = p;
                sum += p;
            }
            l[u] += sum;
            m[u] = mnew;
        }
#pragma unroll
        for (int j = 0; j < AT_TK; ++j) {
            if (j < nt) {
#pragma unroll
                for (int i = 0; i < AT_RPL; ++i) {
                    const int c = lane + 32 * i;
                    if (c < rank) {
                        const float v = kv[j][c];
#pragma unroll
                        for (int u = 0; u < AT_HPW; ++u) acc[u][i] = fmaf(sc[u][j], v, acc[u][i]);
                    }
                }
            }
        }
    }

#pragma unroll
    for (int u = 0; u < AT_HPW; ++u) {
        const int h = hbase + u;
        if (h >= heads) continue;
        if (splits == 1) {
            // As the CPU: multiply by the reciprocal; an empty selection gives zeros.
            const float inv = l[u] > 0.0f ? 1.0f / l[u] : 0.0f;
            float* o = out + ((size_t)row * heads + h) * rank;
#pragma unroll
            for (int i = 0; i < AT_RPL; ++i) {
                const int c = lane + 32 * i;
                if (c < rank) o[c] = acc[u][i] * inv;
            }
        } else {
            const size_t idx = ((size_t)split * rows + row) * heads + h;
            float* o = part_o + idx * rank;
#pragma unroll
            for (int i = 0; i < AT_RPL; ++i) {
                const int c = lane + 32 * i;
                if (c < rank) o[c] = acc[u][i];
            }
            if (lane == 0) {
                part_ml[idx * 2] = m[u];
                part_ml[idx * 2 + 1] = l[u];
            }
        }
    }
}

// Merges the splits of sparse_mla_attention_f32: one block per (row, head), splits in order.
extern "C" __global__ void mla_combine_f32(const float* __restrict__ part_o, const float* __restrict__ part_ml,
                                           float* __restrict__ out, int rows, int heads, int rank, int splits) {
    const int rh = blockIdx.x;
    if (rh >= rows * heads) return;
    const size_t stride = (size_t)rows * heads;
    float mx = IR_NEG_INF;
    for (int s = 0; s < splits; ++s) mx = fmaxf(mx, part_ml[(s * stride + rh) * 2]);
    float total = 0.0f;
    for (int s = 0; s < splits; ++s) {
        const float ms = part_ml[(s * stride + rh) * 2];
        if (ms != IR_NEG_INF) total += part_ml[(s * stride + rh) * 2 + 1] * expf(ms - mx);
    }
    const float inv = total > 0.0f ? 1.0f / total : 0.0f;
    for (int c = threadIdx.x; c < rank; c += blockDim.x) {
        float o = 0.0f;
        for (int s = 0; s < splits; ++s) {
            const float ms = part_ml[(s * stride + rh) * 2];
            if (ms != IR_NEG_INF) o += part_o[(s * stride + rh) * rank + c] * expf(ms - mx);
        }
        out[(size_t)rh * rank + c] = o * inv;
    }
}
