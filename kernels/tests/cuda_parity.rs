//! GPU vs CPU parity of the elementwise and per-row kernels (norms, RoPE, SwiGLU, MoE
//! routing, greedy and sampled token choice, cuBLAS projections). They need a CUDA GPU, so
//! they are ignored by default; `scripts/gpu-check.sh` runs them with `--ignored`.

mod cuda_util;

use cuda_util::{assert_bits_eq, assert_close, gpu, Rng};
use kernels::cuda::{CudaError, GemmShape, MoeRouting, RopeLayout};
use kernels::RopeStyle;

#[test]
#[ignore = "needs a CUDA GPU; run by scripts/gpu-check.sh"]
fn cuda_norms_match_cpu() {
    let k = gpu();
    let mut rng = Rng::new(1);
    for &(rows, d) in &[(1, 1), (3, 33), (5, 129), (40, 7168), (7, 2000)] {
        let x: Vec<f32> = rng.vec(rows * d).iter().map(|v| v * 3.0 + 0.5).collect();
        let (w, b) = (rng.vec(d), rng.vec(d));
        let (xd, wd, bd) = (k.upload(&x).unwrap(), k.upload(&w).unwrap(), k.upload(&b).unwrap());
        let mut od = k.zeros::<f32>(rows * d).unwrap();
        let mut cpu = vec![0.0; rows * d];

        kernels::rms_norm(&x, &w, 1e-6, &mut cpu);
        k.rms_norm(&xd.slice(..), &wd.slice(..), 1e-6, &mut od.slice_mut(..))
            .unwrap();
        // Statistics in f64 on both sides, same f32 expression after: equal up to the last
        // bit of the f64 sum's rounding.
        assert_close(&k.download(&od).unwrap(), &cpu, 5e-7, 1e-7, "rms_norm");

        kernels::layer_norm(&x, &w, &b, 1e-5, &mut cpu);
        k.layer_norm(&xd.slice(..), &wd.slice(..), &bd.slice(..), 1e-5, &mut od.slice_mut(..))
            .unwrap();
        assert_close(&k.download(&od).unwrap(), &cpu, 5e-7, 1e-6, "layer_norm");
    }
}

#[test]
#[ignore = "needs a CUDA GPU; run by scripts/gpu-check.sh"]
fn cuda_rope_matches_cpu_bit_for_bit_in_both_layouts() {
    let k = gpu();
    let mut rng = Rng::new(2);
    // Rows of `heads` vectors of [nope | rope] (the MLA query layout) and a bare rope layout.
    for &(rows, heads, nope, half) in &[(5, 4, 16, 8), (3, 1, 0, 32), (17, 16, 128, 32)] {
        let stride = nope + 2 * half;
        let x = rng.vec(rows * heads * stride);
        let theta: Vec<f64> = (0..rows * half).map(|_| rng.f32() as f64 * 3.0).collect();
        let cos: Vec<f32> = theta.iter().map(|t| t.cos() as f32).collect();
        let sin: Vec<f32> = theta.iter().map(|t| t.sin() as f32).collect();
        for style in [RopeStyle::Interleaved, RopeStyle::NeoX] {
            let mut cpu = x.clone();
            for (v, vec) in cpu.chunks_exact_mut(stride).enumerate() {
                let r = v / heads;
                let (c, s) = (&cos[r * half..][..half], &sin[r * half..][..half]);
                kernels::apply_rope(&mut vec[nope..], c, s, style);
            }
            let mut xd = k.upload(&x).unwrap();
            let (cd, sd) = (k.upload(&cos).unwrap(), k.upload(&sin).unwrap());
            let layout = RopeLayout {
                n_vecs: rows * heads,
                vecs_per_row: heads,
                stride,
                offset: nope,
                half,
            };
            k.rope(&mut xd.slice_mut(..), &cd.slice(..), &sd.slice(..), layout, style)
                .unwrap();
            assert_bits_eq(&k.download(&xd).unwrap(), &cpu, &format!("rope {style:?}"));
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU; run by scripts/gpu-check.sh"]
fn cuda_silu_mul_matches_cpu() {
    let k = gpu();
    let mut rng = Rng::new(3);
    for n in [1, 17, 100_003] {
        let g: Vec<f32> = rng.vec(n).iter().map(|v| v * 12.0).collect();
        let u = rng.vec(n);
        let mut cpu = g.clone();
        kernels::silu_mul(&mut cpu, &u);
        let (mut gd, ud) = (k.upload(&g).unwrap(), k.upload(&u).unwrap());
        k.silu_mul(&mut gd.slice_mut(..), &ud.slice(..)).unwrap();
        // expf on the device may differ from the host's exp by an ulp or two.
        assert_close(&k.download(&gd).unwrap(), &cpu, 1e-6, 1e-7, "silu_mul");
    }
}

/// The worker's `model::moe::route`, restated (kernels cannot depend on the worker).
fn route_reference(logits: &[f32], bias: &[f32], cfg: &MoeRouting) -> (Vec<i32>, Vec<f32>) {
    fn top(values: &[f32], k: usize) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..values.len()).collect();
        idx.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
        idx.truncate(k);
        idx
    }
    let e = logits.len();
    let scores: Vec<f32> = logits.iter().map(|&l| kernels::sigmoid(l)).collect();
    let choice: Vec<f32> = scores.iter().zip(bias).map(|(s, b)| s + b).collect();
    let per = e / cfg.n_group;
    let gs: Vec<f32> = choice
        .chunks_exact(per)
        .map(|g| top(g, 2.min(per)).iter().map(|&i| g[i]).sum())
        .collect();
    let mut masked = vec![f32::NEG_INFINITY; e];
    for g in top(&gs, cfg.topk_group) {
        masked[g * per..(g + 1) * per].copy_from_slice(&choice[g * per..(g + 1) * per]);
    }
    let experts = top(&masked, cfg.top_k);
    let mut w: Vec<f32> = experts.iter().map(|&i| scores[i]).collect();
    if cfg.norm_topk_prob {
        let sum: f32 = w.iter().sum::<f32>() + 1e-20;
        w.iter_mut().for_each(|v| *v /= sum);
    }
    w.iter_mut().for_each(|v| *v *= cfg.routed_scaling_factor);
    (experts.iter().map(|&i| i as i32).collect(), w)
}

#[test]
#[ignore = "needs a CUDA GPU; run by scripts/gpu-check.sh"]
fn cuda_moe_routing_matches_cpu() {
    let k = gpu();
    let mut rng = Rng::new(4);
    // DeepSeek-V3 (256 experts, 8 groups, 4 kept, 8 per token), GLM-like and tiny configs.
    let configs = [
        (256, 8, 4, 8, true, 2.5),
        (160, 1, 1, 8, true, 1.0),
        (8, 2, 1, 2, false, 2.0),
    ];
    for &(e, n_group, topk_group, top_k, norm, scaling) in &configs {
        let cfg = MoeRouting {
            n_group,
            topk_group,
            top_k,
            norm_topk_prob: norm,
            routed_scaling_factor: scaling,
        };
        let tokens = 67;
        let logits: Vec<f32> = rng.vec(tokens * e).iter().map(|v| v * 4.0).collect();
        let bias: Vec<f32> = rng.vec(e).iter().map(|v| v * 0.1).collect();
        let (ld, bd) = (k.upload(&logits).unwrap(), k.upload(&bias).unwrap());
        let mut ed = k.zeros::<i32>(tokens * top_k).unwrap();
        let mut wd = k.zeros::<f32>(tokens * top_k).unwrap();
        k.moe_route(
            &ld.slice(..),
            &bd.slice(..),
            &cfg,
            &mut ed.slice_mut(..),
            &mut wd.slice_mut(..),
        )
        .unwrap();
        let (got_e, got_w) = (k.download(&ed).unwrap(), k.download(&wd).unwrap());
        for t in 0..tokens {
            let (re, rw) = route_reference(&logits[t * e..(t + 1) * e], &bias, &cfg);
            assert_eq!(&got_e[t * top_k..(t + 1) * top_k], &re[..], "token {t} experts (e={e})");
            assert_close(&got_w[t * top_k..(t + 1) * top_k], &rw, 1e-6, 1e-7, "moe weights");
        }
    }
    // Out-of-range configurations are errors naming the field.
    let ld = k.upload(&[0.0f32; 8]).unwrap();
    let bd = k.upload(&[0.0f32; 8]).unwrap();
    let mut ed = k.zeros::<i32>(8).unwrap();
    let mut wd = k.zeros::<f32>(8).unwrap();
    let bad = MoeRouting {
        n_group: 3,
        topk_group: 1,
        top_k: 1,
        norm_topk_prob: false,
        routed_scaling_factor: 1.0,
    };
    let err = k
        .moe_route(
            &ld.slice(..),
            &bd.slice(..),
            &bad,
            &mut ed.slice_mut(..),
            &mut wd.slice_mut(..),
        )
        .unwrap_err();
    assert!(matches!(err, CudaError::Invalid { field: "n_group", .. }), "{err}");
}

/// The worker's `sampling::argmax`.
fn argmax_reference(logits: &[f32]) -> i32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as i32
}

/// The worker's `sampling::sample` for temperature > 0, with the uniform draw `u` given.
fn sample_reference(logits: &[f32], t: f32, top_p: f32, top_k: usize, u: f64) -> i32 {
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let by = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    if top_k > 0 && top_k < idx.len() {
        idx.select_nth_unstable_by(top_k - 1, by);
        idx.truncate(top_k);
    }
    idx.sort_unstable_by(by);
    let max = logits[idx[0] as usize];
    let mut probs: Vec<f64> = idx
        .iter()
        .map(|&i| (((logits[i as usize] - max) / t) as f64).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|q| *q /= total);
    if top_p < 1.0 {
        let (mut acc, mut keep) = (0.0, probs.len());
        for (i, q) in probs.iter().enumerate() {
            acc += q;
            if acc >= top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        idx.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut u = u * total;
    for (i, q) in probs.iter().enumerate() {
        if u < *q {
            return idx[i] as i32;
        }
        u -= q;
    }
    idx[probs.len() - 1] as i32
}

#[test]
#[ignore = "needs a CUDA GPU; run by scripts/gpu-check.sh"]
fn cuda_token_choice_matches_cpu() {
    let k = gpu();
    let mut rng = Rng::new(5);
    let (rows, vocab) = (16, 129_280);
    let mut logits: Vec<f32> = rng.vec(rows * vocab).iter().map(|v| v * 8.0).collect();
    // Ties at the maximum, a NaN at index 0 and NaNs elsewhere.
    logits[vocab + 10] = 100.0;
    logits[vocab + 20] = 100.0;
    logits[2 * vocab] = f32::NAN;
    logits[3 * vocab + 5] = f32::NAN;
    let ld = k.upload(&logits).unwrap();
    let mut out = k.zeros::<i32>(rows).unwrap();
    k.argmax_rows(&ld.slice(..), vocab, &mut out.slice_mut(..)).unwrap();
    let got = k.download(&out).unwrap();
    for r in 0..rows {
        assert_eq!(
            got[r],
            argmax_reference(&logits[r * vocab..(r + 1) * vocab]),
            "argmax row {r}"
        );
    }

    // Sampling: a small vocabulary (whole-vocabulary candidates) and top-k on the large one.
    let small_vocab = 1000;
    let small: Vec<f32> = rng.vec(rows * small_vocab).iter().map(|v| v * 4.0).collect();
    let uniforms: Vec<f64> = (0..rows).map(|_| rng.f64()).collect();
    let ud = k.upload(&uniforms).unwrap();
    let sd = k.upload(&small).unwrap();
    for &(t, top_p, top_k) in &[(1.0f32, 1.0f32, 0usize), (0.7, 0.9, 0), (1.3, 0.5, 50)] {
        k.sample_rows(
            &sd.slice(..),
            small_vocab,
            t,
            top_p,
            top_k,
            &ud.slice(..),
            &mut out.slice_mut(..),
        )
        .unwrap();
        let got = k.download(&out).unwrap();
        for r in 0..rows {
            let want = sample_reference(
                &small[r * small_vocab..(r + 1) * small_vocab],
                t,
                top_p,
                top_k,
                uniforms[r],
            );
            assert_eq!(got[r], want, "sample row {r} (t={t}, top_p={top_p}, top_k={top_k})");
        }
    }
    let big: Vec<f32> = logits.iter().map(|v| if v.is_nan() { 0.0 } else { *v }).collect();
    let bd = k.upload(&big).unwrap();
    k.sample_rows(
        &bd.slice(..),
        vocab,
        0.8,
        0.95,
        40,
        &ud.slice(..),
        &mut out.slice_mut(..),
    )
    .unwrap();
    let got = k.download(&out).unwrap();
    for r in 0..rows {
        let want = sample_reference(&big[r * vocab..(r + 1) * vocab], 0.8, 0.95, 40, uniforms[r]);
        assert_eq!(got[r], want, "top-k sample row {r}");
    }
    // The whole 129K vocabulary is more than the GPU sorts: a structured refusal.
    let err = k
        .sample_rows(&bd.slice(..), vocab, 1.0, 1.0, 0, &ud.slice(..), &mut out.slice_mut(..))
        .unwrap_err();
    assert!(matches!(err, CudaError::Unsupported(_)), "{err}");
}

fn to_bf16(v: f32) -> u16 {
    // Round to nearest even (inputs here are finite).
    let b = v.to_bits();
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

#[test]
#[ignore = "needs a CUDA GPU; run by scripts/gpu-check.sh"]
fn cuda_cublas_projections_match_cpu() {
    let k = gpu();
    let g = k.gemm().expect("cuBLAS");
    let mut rng = Rng::new(6);
    for &(m, kk, n) in &[(1, 7168, 512), (33, 512, 1000), (128, 1536, 4096)] {
        let x = rng.vec(m * kk);
        let w = rng.vec(n * kk);
        let mut cpu = vec![0.0; m * n];
        kernels::matmul_t(&x, &w, &mut cpu, m, kk, n);
        let (xd, wd) = (k.upload(&x).unwrap(), k.upload(&w).unwrap());
        let mut od = k.zeros::<f32>(m * n).unwrap();
        let shape = GemmShape { m, k: kk, n };
        g.matmul_t_f32(&xd.slice(..), &wd.slice(..), &mut od.slice_mut(..), shape)
            .unwrap();
        assert_close(&k.download(&od).unwrap(), &cpu, 1e-4, 2e-3, "sgemm");

        // BF16 in, F32 accumulate: against the f64 product of the rounded inputs.
        let (xb, wb): (Vec<u16>, Vec<u16>) = (
            x.iter().map(|&v| to_bf16(v)).collect(),
            w.iter().map(|&v| to_bf16(v)).collect(),
        );
        let mut want = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..kk)
                    .map(|t| from_bf16(xb[i * kk + t]) as f64 * from_bf16(wb[j * kk + t]) as f64)
                    .sum();
                want[i * n + j] = s as f32;
            }
        }
        let (xbd, wbd) = (k.upload(&xb).unwrap(), k.upload(&wb).unwrap());
        g.matmul_t_bf16(&xbd.slice(..), &wbd.slice(..), &mut od.slice_mut(..), shape)
            .unwrap();
        assert_close(&k.download(&od).unwrap(), &want, 1e-4, 2e-3, "bf16 gemm");
    }
}
