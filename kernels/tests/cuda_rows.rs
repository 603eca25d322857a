//! GPU vs host of what the worker's GPU forward pass adds around the kernels: strided batched
//! cuBLAS GEMMs (F32 and BF16, both weight layouts, alpha/beta) against
//! `StridedGemm::reference`, and `rows.cu` (gathers, scatters, weighted scatter-adds, adds,
//! F32 → BF16) against plain loops. They need a CUDA GPU, so they are ignored by default;
//! `scripts/gpu-check.sh` runs them with `--include-ignored`.

mod cuda_util;

use cuda_util::{assert_bits_eq, assert_close, gpu, Rng};
use kernels::cuda::{StridedGemm, WeightLayout};

fn bf16_bits(v: f32) -> u16 {
    // Round to nearest even; NaN stays quiet (half::bf16::from_f32).
    let b = v.to_bits();
    if b & 0x7fff_ffff > 0x7f80_0000 {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

#[test]
#[ignore = "needs a CUDA GPU; run by scripts/gpu-check.sh"]
fn cuda_strided_gemm_matches_the_reference() {
    let k = gpu();
    let g = k.gemm().unwrap();
    let mut rng = Rng::new(21);
    // The worker's absorb (per-head, InOut) and expand (per-head, OutIn) shapes, and a plain
    // linear with a residual accumulate.
    let (rows, h, dn, dv, r) = (5, 3, 16, 12, 32);
    let absorb = StridedGemm {
        m: rows,
        n: r,
        k: dn,
        batch: h,
        x_ld: h * dn,
        x_stride: dn,
        w_layout: WeightLayout::InOut,
        w_ld: r,
        w_stride: (dn + dv) * r,
        out_ld: h * r,
        out_stride: r,
        alpha: 1.0,
        beta: 0.0,
    };
    let expand = StridedGemm {
        m: rows,
        n: dv,
        k: r,
        batch: h,
        x_ld: h * r,
        x_stride: r,
        w_layout: WeightLayout::OutIn,
        w_ld: r,
        w_stride: (dn + dv) * r,
        out_ld: h * dv,
        out_stride: dv,
        alpha: 0.5,
        beta: 0.0,
    };
    let linear = StridedGemm {
        alpha: 1.0,
        beta: 1.0,
        ..StridedGemm::linear(7, 40, 33)
    };
    for (name, s, x_len, w_len, out_len) in [
        ("absorb", absorb, rows * h * dn, h * (dn + dv) * r, rows * h * r),
        (
            "expand",
            expand,
            rows * h * r,
            h * (dn + dv) * r - dn * r,
            rows * h * dv,
        ),
        ("linear", linear, 7 * 33, 40 * 33, 7 * 40),
    ] {
        let (x, w, out0) = (rng.vec(x_len), rng.vec(w_len), rng.vec(out_len));
        let mut want = out0.clone();
        s.reference(&x, &w, &mut want);
        let mut od = k.upload(&out0).unwrap();
        g.strided_f32(
            &k.upload(&x).unwrap().slice(..),
            &k.upload(&w).unwrap().slice(..),
            &mut od.slice_mut(..),
            &s,
        )
        .unwrap();
        assert_close(&k.download(&od).unwrap(), &want, 1e-5, 1e-5, &format!("{name} f32"));
        // BF16: the reference over the BF16-rounded inputs, F32 accumulation on both sides.
        let (x16, w16): (Vec<u16>, Vec<u16>) = (
            x.iter().map(|v| bf16_bits(*v)).collect(),
            w.iter().map(|v| bf16_bits(*v)).collect(),
        );
        let (xr, wr): (Vec<f32>, Vec<f32>) = (
            x16.iter().map(|h| from_bf16(*h)).collect(),
            w16.iter().map(|h| from_bf16(*h)).collect(),
        );
        let mut want = out0.clone();
        s.reference(&xr, &wr, &mut want);
        let mut od = k.upload(&out0).unwrap();
        g.strided_bf16(
            &k.upload(&x16).unwrap().slice(..),
            &k.upload(&w16).unwrap().slice(..),
            &mut od.slice_mut(..),
            &s,
        )
        .unwrap();
        assert_close(&k.download(&od).unwrap(), &want, 1e-4, 1e-4, &format!("{name} bf16"));
    }
    // A leading dimension shorter than a row is refused, not launched.
    let bad = StridedGemm {
        x_ld: 2,
        ..StridedGemm::linear(2, 2, 3)
    };
    let mut od = k.zeros::<f32>(4).unwrap();
    let err = g
        .strided_f32(
            &k.zeros::<f32>(8).unwrap().slice(..),
            &k.zeros::<f32>(8).unwrap().slice(..),
            &mut od.slice_mut(..),
            &bad,
        )
        .unwrap_err();
    assert!(err.to_string().contains("x_ld"), "{err}");
}

#[test]
#[ignore = "needs a CUDA GPU; run by scripts/gpu-check.sh"]
fn cuda_row_moves_and_bf16_match_the_host() {
    let k = gpu();
    let mut rng = Rng::new(22);
    let (src_rows, dim) = (9, 37);
    let src = rng.vec(src_rows * dim);
    let idx = vec![4i32, 0, 8, 4, 11, -1];
    let sd = k.upload(&src).unwrap();
    let mut od = k.zeros::<f32>(idx.len() * dim).unwrap();
    k.gather_rows(
        &sd.slice(..),
        dim,
        &k.upload(&idx).unwrap().slice(..),
        &mut od.slice_mut(..),
    )
    .unwrap();
    let want: Vec<f32> = idx
        .iter()
        .flat_map(|&i| match usize::try_from(i).ok().filter(|&i| i < src_rows) {
            Some(i) => src[i * dim..(i + 1) * dim].to_vec(),
            None => vec![0.0; dim],
        })
        .collect();
    assert_bits_eq(&k.download(&od).unwrap(), &want, "gather_rows");

    let part = rng.vec(3 * dim);
    let slots = vec![7i32, 2, 99];
    let pool0 = rng.vec(src_rows * dim);
    let mut pd = k.upload(&pool0).unwrap();
    let (partd, slotsd) = (k.upload(&part).unwrap(), k.upload(&slots).unwrap());
    k.scatter_rows(&partd.slice(..), dim, &slotsd.slice(..), &mut pd.slice_mut(..))
        .unwrap();
    let mut want = pool0.clone();
    want[7 * dim..8 * dim].copy_from_slice(&part[..dim]);
    want[2 * dim..3 * dim].copy_from_slice(&part[dim..2 * dim]);
    assert_bits_eq(&k.download(&pd).unwrap(), &want, "scatter_rows");

    let w = vec![0.5f32, -2.0, 3.0];
    let mut pd = k.upload(&pool0).unwrap();
    k.scatter_add_rows(
        &partd.slice(..),
        dim,
        &slotsd.slice(..),
        &k.upload(&w).unwrap().slice(..),
        &mut pd.slice_mut(..),
    )
    .unwrap();
    let mut want = pool0.clone();
    for (i, &s) in slots.iter().enumerate().take(2) {
        for j in 0..dim {
            want[s as usize * dim + j] += w[i] * part[i * dim + j];
        }
    }
    assert_bits_eq(&k.download(&pd).unwrap(), &want, "scatter_add_rows");

    let (a, b) = (rng.vec(1000), rng.vec(1000));
    let mut ad = k.upload(&a).unwrap();
    k.add_in_place(&mut ad.slice_mut(..), &k.upload(&b).unwrap().slice(..))
        .unwrap();
    let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
    assert_bits_eq(&k.download(&ad).unwrap(), &want, "add_in_place");

    let mut v: Vec<f32> = rng.vec(5000).iter().map(|x| x * 1e3).collect();
    v.extend([
        f32::NAN,
        f32::INFINITY,
        -0.0,
        f32::MAX,
        f32::from_bits(0x3f80_8000),
        f32::from_bits(0x3f81_8000),
    ]);
    let mut hd = k.zeros::<u16>(v.len()).unwrap();
    k.to_bf16(&k.upload(&v).unwrap().slice(..), &mut hd.slice_mut(..))
        .unwrap();
    let got = k.download(&hd).unwrap();
    for (i, (g, x)) in got.iter().zip(&v).enumerate() {
        assert_eq!(*g, bf16_bits(*x), "to_bf16 element {i} ({x})");
    }
}
