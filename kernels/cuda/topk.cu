// Top-k per row (kernels/src/topk.rs select_topk), one block per row, k up to any size the
// output holds (2048 for the indexer) over rows of any length (256K context and more).
//
// Each score maps to a u32 key whose unsigned order is the selection order (fold != 0:
// select_topk's order, NaN = -inf and -0 == +0; fold == 0: f32::total_cmp, used by sampling).
// Radix select over the key in three passes (11, 11, 10 bits) finds the exact k-th largest key
// T and how many elements equal to T are still needed; a last ordered pass then writes every
// index with key > T and the lowest-indexed needed ones with key == T, in ascending index
// order. That is exactly "higher score first, equal scores prefer the lower index", sorted
// ascending, as on the CPU, and independent of thread scheduling.
//
// Row r has n = lens[r] + len_add scores (the indexer passes positions with len_add = 1,
// sampling passes zeros with len_add = vocab). When k >= n the row selects 0..n without
// reading the scores. out is rows x k; out_len[r] = min(k, n).

#define TK_THREADS 512
#define TK_WARPS (TK_THREADS / 32)
#define TK_ITEMS 8
#define TK_BINS 2048

__device__ __forceinline__ u32 tk_key(float s, int fold) {
    return fold ? ir_ordered_bits_fold(s) : ir_ordered_bits_total(s);
}

// Exclusive prefix sum of one int per thread in thread order; *total gets the block's sum.
// Ends with a barrier, so warp_tot can be reused by the next call.
__device__ __forceinline__ int tk_block_scan(int v, int* warp_tot, int* total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int x = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(IR_FULL_MASK, x, o);
        if (lane >= o) x += y;
    }
    if (lane == 31) warp_tot[warp] = x;
    __syncthreads();
    if (warp == 0) {
        int t = lane < TK_WARPS ? warp_tot[lane] : 0;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int y = __shfl_up_sync(IR_FULL_MASK, t, o);
            if (lane >= o) t += y;
        }
        if (lane < TK_WARPS) warp_tot[lane] = t;  // inclusive prefix over warps
    }
    __syncthreads();
    const int before = warp == 0 ? 0 : warp_tot[warp - 1];
    *total = warp_tot[TK_WARPS - 1];
    __syncthreads();
    return before + x - v;
}

extern "C" __global__ void __launch_bounds__(TK_THREADS)
    topk_rows_f32(const float* __restrict__ scores, long long ld, const int* __restrict__ lens, int len_add, int k,
                  int fold, u32* __restrict__ out, int* __restrict__ out_len) {
    __shared__ int hist[TK_BINS];
    __shared__ int warp_tot[32];
    __shared__ u32 sh_digit;
    __shared__ int sh_remaining;

    const int tid = threadIdx.x, lane = tid & 31;
    const int row = blockIdx.x;
    const float* s = scores + (size_t)row * ld;
    const int n = lens[row] + len_add;
    u32* o = out + (size_t)row * k;
    if (k >= n) {
        for (int i = tid; i < n; i += TK_THREADS) o[i] = (u32)i;
        if (tid == 0) out_len[row] = n > 0 ? n : 0;
        return;
    }
    if (tid == 0) out_len[row] = k > 0 ? k : 0;
    if (k <= 0) return;

    // Radix select: after each pass, `prefix` holds the known high bits of T (under `mask`)
    // and `remaining` how many elements with that prefix still belong to the top k.
    u32 prefix = 0, mask = 0;
    int remaining = k;
    for (int pass = 0; pass < 3; ++pass) {
        const int shift = pass == 0 ? 21 : (pass == 1 ? 10 : 0);
        const int nb = pass == 2 ? 1024 : 2048;
        for (int i = tid; i < nb; i += TK_THREADS) hist[i] = 0;
        __syncthreads();
        for (int i0 = 0; i0 < n; i0 += TK_THREADS) {  // uniform trip count: every lane joins the match
            const int i = i0 + tid;
            int bin = -1;
            if (i < n) {
                const u32 key = tk_key(s[i], fold);
                if ((key & mask) == prefix) bin = (int)((key >> shift) & (u32)(nb - 1));
            }
            // Warp-aggregated increment: concentrated scores hit few bins.
            const u32 peers = __match_any_sync(IR_FULL_MASK, bin);
            if (bin >= 0 && lane == __ffs(peers) - 1) atomicAdd(&hist[bin], __popc(peers));
        }
        __syncthreads();
        // Thread t owns bins nb-1-t*per .. nb-1-(t+1)*per+1 (descending), so the exclusive scan
        // of the per-thread counts is the number of elements in higher bins.
        const int per = nb / TK_THREADS;
        int local = 0;
        for (int j = 0; j < per; ++j) local += hist[nb - 1 - (tid * per + j)];
        int total;
        int above = tk_block_scan(local, warp_tot, &total);
        for (int j = 0; j < per; ++j) {
            const int b = nb - 1 - (tid * per + j);
            const int c = hist[b];
            if (above < remaining && above + c >= remaining) {
                sh_digit = (u32)b;
                sh_remaining = remaining - above;
            }
            above += c;
        }
        __syncthreads();
        prefix |= sh_digit << shift;
        mask |= (u32)(nb - 1) << shift;
        remaining = sh_remaining;
        __syncthreads();
    }
    const u32 threshold = prefix;
    const int need_eq = remaining;

    // Ordered compaction: each thread looks at TK_ITEMS consecutive indices per tile.
    int written = 0, eq_seen = 0;
    for (int base = 0; base < n; base += TK_THREADS * TK_ITEMS) {
        const int start = base + tid * TK_ITEMS;
        u32 gt = 0, eq = 0;
#pragma unroll
        for (int j = 0; j < TK_ITEMS; ++j) {
            const int i = start + j;
            if (i < n) {
                const u32 key = tk_key(s[i], fold);
                if (key > threshold) gt |= 1u << j;
                else if (key == threshold) eq |= 1u << j;
            }
        }
        int eq_total;
        const int eq_before = tk_block_scan(__popc(eq), warp_tot, &eq_total);
        int quota = need_eq - eq_seen - eq_before;  // how many of this thread's ties may be taken
        u32 take = 0;
        for (int j = 0; j < TK_ITEMS && quota > 0; ++j) {
            if (eq & (1u << j)) {
                take |= 1u << j;
                --quota;
            }
        }
        const u32 sel = gt | take;
        int sel_total;
        int pos = written + tk_block_scan(__popc(sel), warp_tot, &sel_total);
        for (int j = 0; j < TK_ITEMS; ++j)
            if (sel & (1u << j)) o[pos++] = (u32)(start + j);
        written += sel_total;
        eq_seen += eq_total;
        if (written >= k) break;  // uniform: sel_total is the block's total
    }
}

// Checks a relayed selection (rows x ld positions, the first lens[r] of row r used) before the
// attention kernels index the KV cache with it: row r, at position first_pos + r, is valid iff
// 1 <= lens[r] <= ld and each of its used positions is <= first_pos + r. Every invalid row
// raises *bad to rows - r (atomicMax), so afterwards *bad == 0 means all rows are valid and
// otherwise rows - *bad is the first invalid row, whatever the scheduling. One block per row
// (grid-stride over rows); *bad must be zero before the launch.
extern "C" __global__ void validate_topk_rows(const u32* __restrict__ sel, const int* __restrict__ lens, int rows,
                                              int ld, long long first_pos, u32* __restrict__ bad) {
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const int len = lens[r];
        if (len < 1 || len > ld) {
            if (threadIdx.x == 0) atomicMax(bad, (u32)(rows - r));
            continue;
        }
        const long long limit = first_pos + r;
        const u32* s = sel + (size_t)r * ld;
        for (int j = threadIdx.x; j < len; j += blockDim.x) {
            if ((long long)s[j] > limit) {
                atomicMax(bad, (u32)(rows - r));
                break;
            }
        }
    }
}
