// Runs every kernel under the emulator (emu.h) on small random inputs and compares with
// references that restate the CPU kernels' semantics. Build and run: kernels/cuda/emu/run.sh
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <string>

#include "emu.h"
// The kernels, exactly as NVRTC sees them (prelude first).
#include "../common.cuh"
#include "../norm.cu"
#include "../rope.cu"
#include "../activation.cu"
#include "../indexer.cu"
#include "../topk.cu"
#include "../attention.cu"
#include "../moe.cu"
#include "../sampling.cu"
#include "../rows.cu"

static int failures = 0;
#define CHECK(cond, ...)                                             \
    do {                                                             \
        if (!(cond)) {                                               \
            ++failures;                                              \
            std::printf("FAIL %s:%d: ", __FILE__, __LINE__);         \
            std::printf(__VA_ARGS__);                                \
            std::printf("\n");                                       \
            if (failures > 20) std::exit(1);                         \
        }                                                            \
    } while (0)

struct Rng {
    uint64_t s;
    explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull ^ 0xD1B54A32D192ED03ull) {}
    uint64_t next() {
        s += 0x9E3779B97F4A7C15ull;
        uint64_t z = s;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
    float f() { return (float)(next() >> 40) / (float)(1u << 24) * 2.0f - 1.0f; }
    double d() { return (double)(next() >> 11) / (double)(1ull << 53); }
    int below(int n) { return (int)(next() % (uint64_t)n); }
    std::vector<float> vec(size_t n, float scale = 1.0f) {
        std::vector<float> v(n);
        for (auto& x : v) x = f() * scale;
        return v;
    }
};

static bool close(double a, double e, double rtol, double atol) { return std::fabs(a - e) <= atol + rtol * std::fabs(e); }

// ---- top-k -------------------------------------------------------------------------------
static float fold_key(float s) { return std::isnan(s) ? -INFINITY : s; }
static std::vector<uint32_t> ref_topk(const float* s, int n, int k, bool fold) {
    std::vector<uint32_t> idx(n);
    std::iota(idx.begin(), idx.end(), 0);
    if (k >= n) return idx;
    auto total = [](float v) { return ir_ordered_bits_total(v); };
    std::sort(idx.begin(), idx.end(), [&](uint32_t a, uint32_t b) {
        if (fold) {
            float x = fold_key(s[a]), y = fold_key(s[b]);
            if (x != y) return x > y;
        } else {
            uint32_t x = total(s[a]), y = total(s[b]);
            if (x != y) return x > y;
        }
        return a < b;
    });
    idx.resize(k);
    std::sort(idx.begin(), idx.end());
    return idx;
}

static void check_topk() {
    Rng rng(1);
    struct Case { int n, k, rows; };
    for (Case c : {Case{1, 1, 1}, Case{10, 3, 2}, Case{1000, 17, 2}, Case{5000, 2048, 1}, Case{20000, 100, 1}, Case{9000, 8999, 1}}) {
        for (int kind = 0; kind < 4; ++kind) {
            std::vector<float> s((size_t)c.rows * c.n);
            for (auto& v : s) {
                switch (kind) {
                    case 0: v = rng.f(); break;
                    case 1: v = (float)(rng.below(50) - 25); break;
                    case 2: v = 1.0f + rng.below(4000) * 2.5e-7f; break;
                    default: {
                        int r = rng.below(6);
                        v = r == 0 ? NAN : r == 1 ? -0.0f : r == 2 ? 0.0f : r == 3 ? -INFINITY : r == 4 ? INFINITY : rng.f();
                    }
                }
            }
            for (int fold = 0; fold < 2; ++fold) {
                std::vector<int> lens(c.rows, c.n);
                std::vector<uint32_t> out((size_t)c.rows * c.k, 0xdeadbeef);
                std::vector<int> out_len(c.rows, -1);
                LAUNCH(dim3{(unsigned)c.rows}, dim3{TK_THREADS}, topk_rows_f32, s.data(), (long long)c.n, lens.data(), 0, c.k,
                       fold, out.data(), out_len.data());
                for (int r = 0; r < c.rows; ++r) {
                    auto want = ref_topk(&s[(size_t)r * c.n], c.n, c.k, fold);
                    CHECK(out_len[r] == (int)want.size(), "topk n=%d k=%d kind=%d fold=%d: len %d vs %zu", c.n, c.k, kind, fold,
                          out_len[r], want.size());
                    bool same = std::equal(want.begin(), want.end(), out.begin() + (size_t)r * c.k);
                    CHECK(same, "topk n=%d k=%d kind=%d fold=%d row %d: selection differs", c.n, c.k, kind, fold, r);
                }
            }
        }
    }
    std::printf("topk: done\n");
}

// ---- relay validation ----------------------------------------------------------------------
// The first row that breaks 1 <= lens[r] <= ld or has a used position past first_pos + r, or -1.
static int ref_first_bad(const std::vector<uint32_t>& sel, const std::vector<int>& lens, int ld, long long first_pos) {
    for (int r = 0; r < (int)lens.size(); ++r) {
        if (lens[r] < 1 || lens[r] > ld) return r;
        for (int j = 0; j < lens[r]; ++j)
            if ((long long)sel[(size_t)r * ld + j] > first_pos + r) return r;
    }
    return -1;
}

// Runs validate_topk_rows with fewer blocks than rows and fewer threads than ld (both strides
// taken); returns the first bad row it reports, or -1.
static int run_validate(const std::vector<uint32_t>& sel, const std::vector<int>& lens, int ld, long long first_pos) {
    const int rows = (int)lens.size();
    uint32_t bad = 0;
    LAUNCH(dim3{3}, dim3{32}, validate_topk_rows, sel.data(), lens.data(), rows, ld, first_pos, &bad);
    return bad == 0 ? -1 : rows - (int)bad;
}

static void check_validate() {
    Rng rng(7);
    const int rows = 7, ld = 70;
    for (long long first_pos : {0LL, 5LL, 100LL, 3000000000LL}) {
        // A valid relay: row r selects min(ld, first_pos + r + 1) positions up to its own.
        std::vector<uint32_t> sel((size_t)rows * ld, 0xffffffffu);  // unused slots are ignored
        std::vector<int> lens(rows);
        for (int r = 0; r < rows; ++r) {
            const long long pos = first_pos + r;
            lens[r] = (int)std::min<long long>(ld, pos + 1);
            for (int j = 0; j < lens[r]; ++j) sel[(size_t)r * ld + j] = (uint32_t)(pos - rng.below(lens[r]));
            sel[(size_t)r * ld + lens[r] - 1] = (uint32_t)pos;  // the row's own position is allowed
        }
        CHECK(ref_first_bad(sel, lens, ld, first_pos) == -1, "validate: the valid case is invalid");
        CHECK(run_validate(sel, lens, ld, first_pos) == -1, "validate first_pos=%lld: a valid relay was flagged", first_pos);
        struct Bad { const char* what; int row; };
        for (Bad b : {Bad{"past", 4}, Bad{"zero", 2}, Bad{"over", 6}, Bad{"negative", 0}, Bad{"past+zero", 5}}) {
            auto s2 = sel;
            auto l2 = lens;
            const std::string w = b.what;
            if (w == "past" || w == "past+zero") {
                // The last used slot of the row, one past the row's own position.
                s2[(size_t)b.row * ld + l2[b.row] - 1] = (uint32_t)(first_pos + b.row + 1);
            }
            if (w == "zero") l2[b.row] = 0;
            if (w == "over") l2[b.row] = ld + 1;
            if (w == "negative") l2[b.row] = -3;
            if (w == "past+zero") l2[6] = 0;  // a later bad row: the first one is reported
            const int want = ref_first_bad(s2, l2, ld, first_pos);
            CHECK(want == b.row, "validate %s: reference says row %d", b.what, want);
            const int got = run_validate(s2, l2, ld, first_pos);
            CHECK(got == want, "validate %s first_pos=%lld: row %d vs %d", b.what, first_pos, got, want);
        }
    }
    std::printf("validate: done\n");
}

// ---- indexer -----------------------------------------------------------------------------
static void check_indexer() {
    Rng rng(2);
    struct Case { int heads, dim, bs; std::vector<int> pos; };
    std::vector<Case> cases = {{5, 20, 3, {0, 6, 13, 70, 200, 201, 129}}, {64, 128, 64, {300, 301, 302, 5}}, {8, 16, 16, {1000}}};
    for (auto& c : cases) {
        int rows = (int)c.pos.size(), maxp = *std::max_element(c.pos.begin(), c.pos.end()), nk = maxp + 1;
        int nb = (nk + c.bs - 1) / c.bs;
        auto q = rng.vec((size_t)rows * c.heads * c.dim);
        auto w = rng.vec((size_t)rows * c.heads, 0.1f);
        auto keys = rng.vec((size_t)nb * c.bs * c.dim);
        // Physical block p+1 holds logical block perm[p]; block 0 is NaN poison.
        std::vector<int> table(nb);
        std::vector<int> perm(nb);
        std::iota(perm.begin(), perm.end(), 0);
        for (int i = nb - 1; i > 0; --i) std::swap(perm[i], perm[rng.below(i + 1)]);
        std::vector<float> pool((size_t)(nb + 1) * c.bs * c.dim, NAN);
        for (int l = 0; l < nb; ++l) {
            table[l] = perm[l] + 1;
            std::copy(keys.begin() + (size_t)l * c.bs * c.dim, keys.begin() + (size_t)(l + 1) * c.bs * c.dim,
                      pool.begin() + (size_t)table[l] * c.bs * c.dim);
        }
        long long ld = nk + 5;
        std::vector<float> scores((size_t)rows * ld, NAN);
        int hp = (c.heads + 7) & ~7, rb = IX_BM / hp;
        LAUNCH((dim3{(unsigned)((nk + IX_BN - 1) / IX_BN), (unsigned)((rows + rb - 1) / rb), 1}), dim3{IX_THREADS},
               indexer_score_f32, q.data(), w.data(), c.pos.data(), pool.data(), table.data(), scores.data(), rows, c.heads,
               c.dim, c.bs, ld);
        for (int r = 0; r < rows; ++r)
            for (int s = 0; s <= c.pos[r]; ++s) {
                double want = 0;
                for (int h = 0; h < c.heads; ++h) {
                    double dot = 0;
                    for (int d = 0; d < c.dim; ++d)
                        dot += (double)q[((size_t)r * c.heads + h) * c.dim + d] * keys[(size_t)s * c.dim + d];
                    want += w[(size_t)r * c.heads + h] * std::max(dot, 0.0);
                }
                CHECK(close(scores[(size_t)r * ld + s], want, 1e-4, 1e-5), "indexer heads=%d row %d key %d: %g vs %g", c.heads,
                      r, s, scores[(size_t)r * ld + s], want);
            }
    }
    std::printf("indexer: done\n");
}

// ---- attention ---------------------------------------------------------------------------
static void check_attention() {
    Rng rng(3);
    struct Case { int rows, heads, rank, rope, bs, ctx, sel, splits; };
    for (Case c : {Case{3, 3, 40, 6, 5, 90, 33, 1}, Case{2, 16, 512, 64, 16, 300, 100, 3}, Case{2, 20, 64, 8, 4, 50, 17, 2}}) {
        int nb = (c.ctx + c.bs - 1) / c.bs;
        auto ql = rng.vec((size_t)c.rows * c.heads * c.rank, 0.3f), qr = rng.vec((size_t)c.rows * c.heads * c.rope, 0.3f);
        std::vector<float> ckv((size_t)(nb + 1) * c.bs * c.rank, NAN), kpe((size_t)(nb + 1) * c.bs * c.rope, NAN);
        std::vector<int> table(nb);
        for (int l = 0; l < nb; ++l) table[l] = nb - l;  // reversed physical order, block 0 unused
        auto lat = [&](int pos) { return &ckv[((size_t)table[pos / c.bs] * c.bs + pos % c.bs) * c.rank]; };
        auto rp = [&](int pos) { return &kpe[((size_t)table[pos / c.bs] * c.bs + pos % c.bs) * c.rope]; };
        for (int p = 0; p < c.ctx; ++p) {
            for (int i = 0; i < c.rank; ++i) lat(p)[i] = rng.f();
            for (int i = 0; i < c.rope; ++i) rp(p)[i] = rng.f();
        }
        std::vector<uint32_t> sel((size_t)c.rows * c.sel);
        std::vector<int> lens(c.rows), starts(c.rows, 0);
        for (int r = 0; r < c.rows; ++r) {
            int n = r == 0 ? 1 : c.sel;  // row 0: a single key
            std::vector<int> all(c.ctx);
            std::iota(all.begin(), all.end(), 0);
            for (int i = c.ctx - 1; i > 0; --i) std::swap(all[i], all[rng.below(i + 1)]);
            std::sort(all.begin(), all.begin() + n);
            for (int i = 0; i < n; ++i) sel[(size_t)r * c.sel + i] = all[i];
            lens[r] = n;
        }
        float scale = 1.0f / std::sqrt((float)(c.rank + c.rope));
        size_t out_n = (size_t)c.rows * c.heads * c.rank;
        std::vector<float> out(out_n, NAN), po((size_t)c.splits * out_n, NAN), pml((size_t)c.splits * c.rows * c.heads * 2, NAN);
        LAUNCH((dim3{(unsigned)((c.heads + AT_HEADS - 1) / AT_HEADS), (unsigned)c.rows, (unsigned)c.splits}), dim3{AT_WARPS * 32},
               sparse_mla_attention_f32, ql.data(), qr.data(), ckv.data(), kpe.data(), table.data(), starts.data(), sel.data(),
               (long long)c.sel, lens.data(), out.data(), po.data(), pml.data(), c.rows, c.heads, c.rank, c.rope, c.bs, scale,
               c.splits);
        if (c.splits > 1)
            LAUNCH(dim3{(unsigned)(c.rows * c.heads)}, dim3{128}, mla_combine_f32, po.data(), pml.data(), out.data(), c.rows,
                   c.heads, c.rank, c.splits);
        for (int r = 0; r < c.rows; ++r)
            for (int h = 0; h < c.heads; ++h) {
                std::vector<double> logit(lens[r]);
                double mx = -INFINITY;
                for (int j = 0; j < lens[r]; ++j) {
                    int p = sel[(size_t)r * c.sel + j];
                    double d = 0;
                    for (int i = 0; i < c.rank; ++i) d += (double)ql[((size_t)r * c.heads + h) * c.rank + i] * lat(p)[i];
                    for (int i = 0; i < c.rope; ++i) d += (double)qr[((size_t)r * c.heads + h) * c.rope + i] * rp(p)[i];
                    logit[j] = d * scale;
                    mx = std::max(mx, logit[j]);
                }
                double den = 0;
                for (auto& l : logit) den += (l = std::exp(l - mx));
                for (int i = 0; i < c.rank; ++i) {
                    double o = 0;
                    for (int j = 0; j < lens[r]; ++j) o += logit[j] * lat(sel[(size_t)r * c.sel + j])[i];
                    o /= den;
                    float got = out[((size_t)r * c.heads + h) * c.rank + i];
                    CHECK(close(got, o, 1e-4, 1e-5), "attention rank=%d splits=%d row %d head %d col %d: %g vs %g", c.rank,
                          c.splits, r, h, i, got, o);
                }
            }
    }
    std::printf("attention: done\n");
}

// ---- MoE routing -------------------------------------------------------------------------
static std::vector<int> ref_top(const std::vector<float>& v, int k) {
    std::vector<int> idx(v.size());
    std::iota(idx.begin(), idx.end(), 0);
    std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) {
        uint32_t x = ir_ordered_bits_total(v[a]), y = ir_ordered_bits_total(v[b]);
        return x != y ? x > y : a < b;
    });
    idx.resize(k);
    return idx;
}

static void check_moe() {
    Rng rng(4);
    struct Case { int e, ng, tg, k, norm; float sc; };
    for (Case c : {Case{256, 8, 4, 8, 1, 2.5f}, Case{8, 2, 1, 2, 0, 2.0f}, Case{160, 1, 1, 8, 1, 1.0f}, Case{64, 32, 3, 6, 1, 1.5f}}) {
        int tokens = 9;
        auto logits = rng.vec((size_t)tokens * c.e, 4.0f), bias = rng.vec(c.e, 0.1f);
        // Exact ties: duplicate a logit within each token.
        for (int t = 0; t < tokens; ++t) logits[(size_t)t * c.e + c.e - 1] = logits[(size_t)t * c.e];
        std::vector<int> ex((size_t)tokens * c.k, -1);
        std::vector<float> wt((size_t)tokens * c.k, NAN);
        LAUNCH(dim3{(unsigned)((tokens + MOE_WARPS - 1) / MOE_WARPS)}, dim3{MOE_WARPS * 32}, moe_route_f32, logits.data(),
               bias.data(), tokens, c.e, c.ng, c.tg, c.k, c.norm, c.sc, ex.data(), wt.data());
        for (int t = 0; t < tokens; ++t) {
            std::vector<float> sc(c.e), ch(c.e);
            for (int i = 0; i < c.e; ++i) {
                sc[i] = 1.0f / (1.0f + std::exp(-logits[(size_t)t * c.e + i]));
                ch[i] = sc[i] + bias[i];
            }
            int per = c.e / c.ng;
            std::vector<float> gs(c.ng);
            for (int g = 0; g < c.ng; ++g) {
                std::vector<float> grp(ch.begin() + g * per, ch.begin() + (g + 1) * per);
                float s = -0.0f;
                for (int i : ref_top(grp, std::min(2, per))) s += grp[i];
                gs[g] = s;
            }
            std::vector<float> masked(c.e, -INFINITY);
            for (int g : ref_top(gs, c.tg))
                for (int i = g * per; i < (g + 1) * per; ++i) masked[i] = ch[i];
            auto want = ref_top(masked, c.k);
            std::vector<float> ww(c.k);
            float sum = -0.0f;
            for (int j = 0; j < c.k; ++j) sum += (ww[j] = sc[want[j]]);
            for (int j = 0; j < c.k; ++j) {
                if (c.norm) ww[j] /= (sum + 1e-20f);
                ww[j] *= c.sc;
                CHECK(ex[(size_t)t * c.k + j] == want[j], "moe e=%d token %d slot %d: expert %d vs %d", c.e, t, j,
                      ex[(size_t)t * c.k + j], want[j]);
                CHECK(close(wt[(size_t)t * c.k + j], ww[j], 1e-6, 1e-7), "moe e=%d token %d slot %d: weight", c.e, t, j);
            }
        }
    }
    std::printf("moe: done\n");
}

// ---- sampling ----------------------------------------------------------------------------
static int ref_sample(const float* x, int vocab, float T, float top_p, int top_k, double u) {
    std::vector<uint32_t> idx(vocab);
    std::iota(idx.begin(), idx.end(), 0);
    auto by = [&](uint32_t a, uint32_t b) {
        uint32_t p = ir_ordered_bits_total(x[a]), q = ir_ordered_bits_total(x[b]);
        return p != q ? p > q : a < b;
    };
    std::sort(idx.begin(), idx.end(), by);
    if (top_k > 0 && top_k < vocab) idx.resize(top_k);
    float mx = x[idx[0]];
    std::vector<double> pr(idx.size());
    double total = -0.0;
    for (size_t i = 0; i < idx.size(); ++i) total += (pr[i] = std::exp((double)((x[idx[i]] - mx) / T)));
    for (auto& p : pr) p /= total;
    size_t keep = pr.size();
    if (top_p < 1.0f) {
        double acc = 0;
        for (size_t i = 0; i < pr.size(); ++i)
            if ((acc += pr[i]) >= (double)top_p) { keep = i + 1; break; }
    }
    double kept = -0.0;
    for (size_t i = 0; i < keep; ++i) kept += pr[i];
    u *= kept;
    for (size_t i = 0; i < keep; ++i) {
        if (u < pr[i]) return (int)idx[i];
        u -= pr[i];
    }
    return (int)idx[keep - 1];
}

static void check_sampling() {
    Rng rng(5);
    int rows = 6, vocab = 1000;
    auto x = rng.vec((size_t)rows * vocab, 4.0f);
    x[vocab + 3] = 50.0f;
    x[vocab + 9] = 50.0f;      // tie at the max: lower id
    x[2 * vocab] = NAN;         // NaN first: CPU argmax returns 0
    x[3 * vocab + 7] = NAN;     // NaN elsewhere never wins
    std::vector<int> out(rows, -1);
    LAUNCH(dim3{(unsigned)rows}, dim3{SP_THREADS}, argmax_rows_f32, x.data(), vocab, out.data());
    for (int r = 0; r < rows; ++r) {
        const float* row = &x[(size_t)r * vocab];
        int best = 0;
        for (int i = 0; i < vocab; ++i)
            if (row[i] > row[best]) best = i;
        CHECK(out[r] == best, "argmax row %d: %d vs %d", r, out[r], best);
    }
    for (auto& v : x)
        if (std::isnan(v)) v = 0.0f;
    std::vector<double> us(rows);
    for (auto& u : us) u = rng.d();
    struct P { float T, p; int k; };
    for (P p : {P{1.0f, 1.0f, 0}, P{0.7f, 0.9f, 0}, P{1.3f, 0.5f, 50}, P{0.5f, 1.0f, 1}}) {
        int c = (p.k > 0 && p.k < vocab) ? p.k : vocab;
        std::vector<int> zeros(rows, 0), cand_len(rows, -1);
        std::vector<uint32_t> cand((size_t)rows * c);
        LAUNCH(dim3{(unsigned)rows}, dim3{TK_THREADS}, topk_rows_f32, x.data(), (long long)vocab, zeros.data(), vocab, c, 0,
               cand.data(), cand_len.data());
        LAUNCH(dim3{(unsigned)rows}, dim3{SP_THREADS}, sample_rows_f32, x.data(), vocab, cand.data(), (long long)c,
               cand_len.data(), p.T, p.p, us.data(), out.data());
        for (int r = 0; r < rows; ++r) {
            int want = ref_sample(&x[(size_t)r * vocab], vocab, p.T, p.p, p.k, us[r]);
            CHECK(out[r] == want, "sample T=%g p=%g k=%d row %d: %d vs %d", p.T, p.p, p.k, r, out[r], want);
        }
    }
    std::printf("sampling: done\n");
}

// ---- norms, RoPE, SwiGLU -----------------------------------------------------------------
static void check_elementwise() {
    Rng rng(6);
    int rows = 3, dim = 300;
    auto x = rng.vec((size_t)rows * dim, 3.0f), w = rng.vec(dim), b = rng.vec(dim);
    std::vector<float> out(x.size());
    LAUNCH(dim3{(unsigned)rows}, dim3{256}, rms_norm_f32, x.data(), w.data(), out.data(), rows, dim, 1e-6f);
    for (int r = 0; r < rows; ++r) {
        double ss = 0;
        for (int i = 0; i < dim; ++i) ss += (double)x[r * dim + i] * x[r * dim + i];
        float inv = 1.0f / std::sqrt((float)(ss / dim) + 1e-6f);
        for (int i = 0; i < dim; ++i) CHECK(out[r * dim + i] == (x[r * dim + i] * inv) * w[i], "rms_norm %d %d", r, i);
    }
    LAUNCH(dim3{(unsigned)rows}, dim3{256}, layer_norm_f32, x.data(), w.data(), b.data(), out.data(), rows, dim, 1e-5f);
    for (int r = 0; r < rows; ++r) {
        double m = 0, v = 0;
        for (int i = 0; i < dim; ++i) m += x[r * dim + i];
        m /= dim;
        for (int i = 0; i < dim; ++i) v += (x[r * dim + i] - m) * (x[r * dim + i] - m);
        v /= dim;
        float inv = 1.0f / std::sqrt((float)v + 1e-5f), mf = (float)m;
        for (int i = 0; i < dim; ++i)
            CHECK(close(out[r * dim + i], (x[r * dim + i] - mf) * inv * w[i] + b[i], 1e-6, 1e-6), "layer_norm %d %d", r, i);
    }
    // RoPE: 2 rows x 3 heads of [nope 4 | rope 2*half].
    int heads = 3, nope = 4, half = 5, stride = nope + 2 * half;
    for (int inter = 0; inter < 2; ++inter) {
        auto v = rng.vec((size_t)2 * heads * stride), cs = rng.vec(2 * half), sn = rng.vec(2 * half);
        auto got = v;
        LAUNCH(dim3{1}, dim3{256}, rope_f32, got.data(), cs.data(), sn.data(), 2 * heads, heads, stride, nope, half, inter);
        for (int vec = 0; vec < 2 * heads; ++vec)
            for (int i = 0; i < half; ++i) {
                int ia = inter ? 2 * i : i, ib = inter ? 2 * i + 1 : i + half, row = vec / heads;
                float a = v[vec * stride + nope + ia], bb = v[vec * stride + nope + ib];
                float c = cs[row * half + i], s = sn[row * half + i];
                CHECK(got[vec * stride + nope + ia] == a * c - bb * s && got[vec * stride + nope + ib] == bb * c + a * s,
                      "rope inter=%d vec %d pair %d", inter, vec, i);
            }
        for (int vec = 0; vec < 2 * heads; ++vec)
            for (int i = 0; i < nope; ++i) CHECK(got[vec * stride + i] == v[vec * stride + i], "rope touched the nope part");
    }
    auto g = rng.vec(1000, 8.0f), u = rng.vec(1000);
    auto gg = g;
    LAUNCH(dim3{2}, dim3{256}, silu_mul_f32, gg.data(), u.data(), 1000LL);
    for (int i = 0; i < 1000; ++i) CHECK(gg[i] == g[i] / (1.0f + std::exp(-g[i])) * u[i], "silu %d", i);
    std::printf("elementwise: done\n");
}

// ---- rows.cu: gathers, scatters, adds, F32 -> BF16 ----------------------------------------
static unsigned short ref_bf16(float v) {
    uint32_t b;
    std::memcpy(&b, &v, 4);
    if ((b & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((b >> 16) | 0x40u);
    // Round to nearest even on the 16 dropped bits, written out case by case.
    uint32_t hi = b >> 16, lo = b & 0xffffu;
    if (lo > 0x8000u || (lo == 0x8000u && (hi & 1u))) ++hi;
    return (unsigned short)hi;
}

static void check_rows() {
    Rng rng(7);
    int src_rows = 5, dim = 70, rows = 4;
    auto src = rng.vec((size_t)src_rows * dim);
    std::vector<int> idx = {3, 0, 7, 3};  // 7 is out of range: a zero row
    std::vector<float> out((size_t)rows * dim, 9.0f);
    LAUNCH(dim3{2}, dim3{256}, gather_rows_f32, src.data(), src_rows, idx.data(), out.data(), rows, dim);
    for (int i = 0; i < rows; ++i)
        for (int j = 0; j < dim; ++j) {
            float want = idx[i] < src_rows ? src[idx[i] * dim + j] : 0.0f;
            CHECK(out[i * dim + j] == want, "gather row %d col %d", i, j);
        }
    std::vector<float> pool((size_t)src_rows * dim, 1.5f), part = rng.vec((size_t)3 * dim);
    std::vector<int> slots = {4, 1, -2};  // -2 is skipped
    LAUNCH(dim3{1}, dim3{256}, scatter_rows_f32, part.data(), slots.data(), pool.data(), src_rows, 3, dim);
    for (int r = 0; r < src_rows; ++r)
        for (int j = 0; j < dim; ++j) {
            float want = r == 4 ? part[j] : r == 1 ? part[dim + j] : 1.5f;
            CHECK(pool[r * dim + j] == want, "scatter row %d col %d", r, j);
        }
    auto acc = rng.vec((size_t)src_rows * dim), before = acc;
    std::vector<float> w = {0.25f, -3.0f, 2.0f};
    LAUNCH(dim3{3}, dim3{64}, scatter_add_rows_f32, part.data(), slots.data(), w.data(), acc.data(), src_rows, 3, dim);
    for (int r = 0; r < src_rows; ++r)
        for (int j = 0; j < dim; ++j) {
            float want = before[r * dim + j];
            if (r == 4) want = want + 0.25f * part[j];
            if (r == 1) want = want + -3.0f * part[dim + j];
            CHECK(acc[r * dim + j] == want, "scatter_add row %d col %d", r, j);
        }
    auto a = rng.vec(1000), x = rng.vec(1000), a0 = a;
    LAUNCH(dim3{2}, dim3{256}, add_f32, a.data(), x.data(), 1000LL);
    for (int i = 0; i < 1000; ++i) CHECK(a[i] == a0[i] + x[i], "add %d", i);
    auto v = rng.vec(4000, 100.0f);
    const uint32_t special[] = {0x3f808000u, 0x3f818000u, 0x3f807fffu, 0x7f7fffffu, 0xff800000u, 0x7fc00001u, 0x80000000u};
    for (uint32_t bits : special) {
        float f;
        std::memcpy(&f, &bits, 4);
        v.push_back(f);
    }
    std::vector<unsigned short> h(v.size());
    LAUNCH(dim3{4}, dim3{256}, f32_to_bf16, v.data(), h.data(), (long long)v.size());
    for (size_t i = 0; i < v.size(); ++i) CHECK(h[i] == ref_bf16(v[i]), "bf16 %zu: %04x vs %04x", i, h[i], ref_bf16(v[i]));
    // Ties go to even: 1 + 2^-8 rounds down to 1.0, 1 + 3·2^-8 up to 1 + 2^-6.
    CHECK(h[4000] == 0x3f80 && h[4001] == 0x3f82 && h[4002] == 0x3f80, "bf16 ties");
    std::printf("rows: done\n");
}

int main(int argc, char** argv) {
    std::string only = argc > 1 ? argv[1] : "";
    auto want = [&](const char* n) { return only.empty() || only == n; };
    if (want("elementwise")) check_elementwise();
    if (want("topk")) check_topk();
    if (want("validate")) check_validate();
    if (want("indexer")) check_indexer();
    if (want("attention")) check_attention();
    if (want("moe")) check_moe();
    if (want("sampling")) check_sampling();
    if (want("rows")) check_rows();
    std::printf(failures ? "emu: %d mismatches\n" : "emu: every check matched%.0d\n", failures);
    return failures == 0 ? 0 : 1;
}
