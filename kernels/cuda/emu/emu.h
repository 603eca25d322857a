// A tiny CUDA emulator for checking kernel *logic* on a machine without a GPU: every CUDA
// thread of a block is an OS thread, blocks run one after another, __syncthreads is a
// std::barrier, warp intrinsics exchange through per-warp slots. `__shared__` becomes a
// function-local `static` (one instance, shared by the block's threads, reused by the next
// block). Numerics follow the host's IEEE arithmetic (compile with -ffp-contract=off), so
// results may differ from a GPU only where the GPU's expf/exp differ from the host libm.
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
struct float4 {
    float x, y, z, w;
};

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static

namespace emu {
struct Block {
    std::unique_ptr<std::barrier<>> bar;
    std::vector<std::unique_ptr<std::barrier<>>> warp_bar;
    std::vector<uint64_t> slots;  // one per thread
};
inline Block* blk = nullptr;
inline int lane() { return threadIdx.x & 31; }
inline int warp() { return threadIdx.x >> 5; }
inline void warp_sync() { blk->warp_bar[warp()]->arrive_and_wait(); }
template <class T>
inline T exchange(T v, int src_lane) {
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    blk->slots[threadIdx.x] = bits;
    warp_sync();
    uint64_t got = blk->slots[warp() * 32 + src_lane];
    warp_sync();
    T r;
    std::memcpy(&r, &got, sizeof(T));
    return r;
}

template <class F>
void launch(dim3 grid, dim3 block, F kernel) {
    gridDim = grid;
    blockDim = block;
    const unsigned n = block.x;  // 1-D blocks only
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                Block b;
                b.bar = std::make_unique<std::barrier<>>(n);
                for (unsigned w = 0; w < (n + 31) / 32; ++w)
                    b.warp_bar.push_back(std::make_unique<std::barrier<>>(std::min(32u, n - w * 32)));
                b.slots.assign(n, 0);
                blk = &b;
                std::vector<std::thread> ts;
                for (unsigned t = 0; t < n; ++t)
                    ts.emplace_back([&, t] {
                        threadIdx = dim3{t, 0, 0};
                        blockIdx = dim3{bx, by, bz};
                        kernel();
                        // An exited thread no longer takes part in barriers (as on the GPU).
                        blk->bar->arrive_and_drop();
                        blk->warp_bar[warp()]->arrive_and_drop();
                    });
                for (auto& t : ts) t.join();
            }
}
}  // namespace emu

#define LAUNCH(grid, block, fn, ...) emu::launch(grid, block, [&] { fn(__VA_ARGS__); })

inline void __syncthreads() { emu::blk->bar->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_sync(); }
template <class T>
inline T __shfl_xor_sync(unsigned, T v, int o) { return emu::exchange(v, emu::lane() ^ o); }
template <class T>
inline T __shfl_up_sync(unsigned, T v, int o) {
    int src = emu::lane() - o;
    T got = emu::exchange(v, src < 0 ? emu::lane() : src);
    return src < 0 ? v : got;
}
inline unsigned __match_any_sync(unsigned, int v) {
    emu::blk->slots[threadIdx.x] = (uint64_t)(uint32_t)v;
    emu::warp_sync();
    unsigned m = 0;
    int base = emu::warp() * 32;
    int width = std::min(32, (int)blockDim.x - base);
    for (int l = 0; l < width; ++l)
        if (emu::blk->slots[base + l] == (uint64_t)(uint32_t)v) m |= 1u << l;
    emu::warp_sync();
    return m;
}
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicMax(unsigned* p, unsigned v) {
    unsigned cur = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    while (cur < v && !__atomic_compare_exchange_n(p, &cur, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
    }
    return cur;
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(unsigned v) { return __builtin_ffs(v); }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
template <class T>
inline T __ldg(const T* p) { return *p; }
using std::max;
using std::min;
