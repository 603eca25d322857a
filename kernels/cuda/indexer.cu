// DSA lightning-indexer scores (kernels/src/indexer.rs):
//   scores[r][s] = sum_h weights[r][h] * ReLU(q[r][h] . k[s])   for keys s <= positions[r]
// for the query rows of ONE sequence whose indexer keys sit in a paged pool.
//
// It is a GEMM with the (row, head) pairs as the M dimension, keys as N and the head
// dimension as K, with the ReLU, head weights and head sum folded into the epilogue while the
// logits are still in registers: logits for all heads never reach global memory. The block
// tile is 128 (row, head) slots x 128 keys, K in slices of 16 through shared memory, 8 x 8
// outputs per thread. Heads are padded to a multiple of 8 (padding has weight 0) so each
// thread's 8 slots are 8 heads of one row; the per-thread partial head sums are then added
// across the row's thread groups in a fixed order, so results are deterministic.
//
// Launch: grid (ceil(keys / 128), ceil(rows / rows_per_block)), 256 threads, where
// rows_per_block = 128 / round_up(heads, 8) (the host requires heads <= 128). Key tiles past
// the largest position of a block's rows return at once, so the causal triangle costs half.
// Only scores[r][s] with s <= positions[r] are written.

#define IX_BM 128
#define IX_BN 128
#define IX_BK 16
#define IX_THREADS 256
#define IX_PAD 4

extern "C" __global__ void __launch_bounds__(IX_THREADS)
    indexer_score_f32(const float* __restrict__ q,          // rows x heads x dim
                      const float* __restrict__ weights,    // rows x heads (all scales folded in)
                      const int* __restrict__ positions,    // rows: absolute position of each query
                      const float* __restrict__ key_pool,   // physical blocks x block_size x dim
                      const int* __restrict__ block_table,  // logical block -> physical block
                      float* __restrict__ scores,           // rows x ld
                      int rows, int heads, int dim, int block_size, long long ld) {
    __shared__ __align__(16) float As[IX_BK][IX_BM + IX_PAD];
    __shared__ __align__(16) float Bs[IX_BK][IX_BN + IX_PAD];
    __shared__ float red[IX_BM / 8][IX_BN];
    __shared__ long long key_off[IX_BN];
    __shared__ int max_pos;

    const int tid = threadIdx.x;
    const int hp = (heads + 7) & ~7;
    const int rb = IX_BM / hp;
    const int groups = hp / 8;
    const int row0 = blockIdx.y * rb;
    const int key0 = blockIdx.x * IX_BN;

    if (tid == 0) {
        int m = -1;
        for (int r = 0; r < rb && row0 + r < rows; ++r) m = max(m, positions[row0 + r]);
        max_pos = m;
    }
    __syncthreads();
    const int mp = max_pos;
    if (key0 > mp) return;  // uniform: no row of this block sees these keys
    if (tid < IX_BN) {
        const int s = key0 + tid;
        long long off = -1;
        if (s <= mp) off = ((long long)block_table[s / block_size] * block_size + s % block_size) * dim;
        key_off[tid] = off;
    }

    const int tn = tid % 16, tm = tid / 16;
    const int m0 = tm * 8;
    const int rl = m0 / hp, h0 = m0 % hp;
    float acc[8][8];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;
    __syncthreads();

    for (int k0 = 0; k0 < dim; k0 += IX_BK) {
        // Consecutive threads read consecutive dims of one query vector / key: coalesced.
        for (int e = tid; e < IX_BM * IX_BK; e += IX_THREADS) {
            const int m = e / IX_BK, kk = e % IX_BK;
            const int r = m / hp, h = m % hp, k = k0 + kk;
            float v = 0.0f;
            if (r < rb && row0 + r < rows && h < heads && k < dim)
                v = __ldg(&q[((size_t)(row0 + r) * heads + h) * dim + k]);
            As[kk][m] = v;
        }
        for (int e = tid; e < IX_BN * IX_BK; e += IX_THREADS) {
            const int n = e / IX_BK, kk = e % IX_BK, k = k0 + kk;
            const long long off = key_off[n];
            Bs[kk][n] = (off >= 0 && k < dim) ? __ldg(&key_pool[off + k]) : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < IX_BK; ++kk) {
            const float4 a0 = *reinterpret_cast<const float4*>(&As[kk][m0]);
            const float4 a1 = *reinterpret_cast<const float4*>(&As[kk][m0 + 4]);
            const float4 b0 = *reinterpret_cast<const float4*>(&Bs[kk][tn * 8]);
            const float4 b1 = *reinterpret_cast<const float4*>(&Bs[kk][tn * 8 + 4]);
            const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
            const float b[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
            for (int i = 0; i < 8; ++i)
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }

    // Epilogue: ReLU, head weight, sum over this thread's 8 heads, then over the row's groups.
    if (rl < rb) {
        const int r = row0 + rl;
        float part[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) part[j] = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int h = h0 + i;
            const float w = (r < rows && h < heads) ? weights[(size_t)r * heads + h] : 0.0f;
#pragma unroll
            for (int j = 0; j < 8; ++j) part[j] = fmaf(w, fmaxf(acc[i][j], 0.0f), part[j]);
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) red[rl * groups + h0 / 8][tn * 8 + j] = part[j];
    }
    __syncthreads();
    for (int e = tid; e < rb * IX_BN; e += IX_THREADS) {
        const int rr = e / IX_BN, n = e % IX_BN;
        const int r = row0 + rr, s = key0 + n;
        if (r < rows && s <= positions[r]) {
            float sum = 0.0f;
            for (int g = 0; g < groups; ++g) sum += red[rr * groups + g][n];
            scores[(size_t)r * ld + s] = sum;
        }
    }
}
