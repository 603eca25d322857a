//! The MLP on the device: dense SwiGLU, or MoE with the router in F32, routing on the device
//! (`moe_route`, the CPU's `model::moe::route`), routed experts run one GEMM per expert over
//! its tokens in expert order (as on the CPU), plus the shared experts; the result is added
//! into the residual.

use kernels::cuda::{CudaSlice, MoeRouting};

use super::model::{dev, GpuModel};
use super::weights::{Act, DevMlp, DevSwiGlu};
use crate::error::Result;

/// `y = alpha·down(silu(gate(x)) · up(x)) + beta·y` over `rows` rows.
fn swiglu(m: &GpuModel, s: &DevSwiGlu, x: &Act<'_>, rows: usize, y: &mut CudaSlice<f32>, beta: f32) -> Result<()> {
    let (k, g) = (&m.k, &m.gemm);
    let inter = s.gate.out;
    let mut gate = dev(k.zeros::<f32>(rows * inter))?;
    s.gate.forward(g, x, rows, &mut gate.slice_mut(..), 1.0, 0.0)?;
    let mut up = dev(k.zeros::<f32>(rows * inter))?;
    s.up.forward(g, x, rows, &mut up.slice_mut(..), 1.0, 0.0)?;
    dev(k.silu_mul(&mut gate.slice_mut(..), &up.slice(..)))?;
    let mut act16 = dev(k.zeros::<u16>(rows * inter))?;
    dev(k.to_bf16(&gate.slice(..), &mut act16.slice_mut(..)))?;
    let act = Act {
        f32: gate.slice(..),
        bf16: act16.slice(..),
    };
    s.down.forward(g, &act, rows, &mut y.slice_mut(..), 1.0, beta)
}

/// Runs the layer's MLP on the normalized rows `x` and adds it into `hidden`.
pub fn forward(m: &GpuModel, mlp: &DevMlp, x: &Act<'_>, rows: usize, hidden: &mut CudaSlice<f32>) -> Result<()> {
    let moe = match mlp {
        // The residual add rides on the down projection's GEMM.
        DevMlp::Dense(s) => return swiglu(m, s, x, rows, hidden, 1.0),
        DevMlp::Moe(moe) => moe,
    };
    let (k, g, c) = (&m.k, &m.gemm, &m.cfg);
    let (d, e, top) = (c.hidden_size, c.n_routed_experts, c.num_experts_per_tok);
    let mut logits = dev(k.zeros::<f32>(rows * e))?;
    moe.router.forward(g, x, rows, &mut logits.slice_mut(..), 1.0, 0.0)?;
    let routing = MoeRouting {
        n_group: c.n_group,
        topk_group: c.topk_group,
        top_k: top,
        norm_topk_prob: c.norm_topk_prob,
        routed_scaling_factor: c.routed_scaling_factor,
    };
    let mut ids = dev(k.zeros::<i32>(rows * top))?;
    let mut wts = dev(k.zeros::<f32>(rows * top))?;
    dev(k.moe_route(
        &logits.slice(..),
        &moe.bias.slice(..),
        &routing,
        &mut ids.slice_mut(..),
        &mut wts.slice_mut(..),
    ))?;
    // Group tokens by expert on the host (small: rows × top_k ids), as the CPU does.
    let (ids, wts) = (dev(k.download(&ids))?, dev(k.download(&wts))?);
    let mut assigned: Vec<(Vec<i32>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); e];
    for r in 0..rows {
        for j in 0..top {
            let ex = ids[r * top + j];
            if let Some(slot) = usize::try_from(ex).ok().and_then(|ex| assigned.get_mut(ex)) {
                slot.0.push(r as i32);
                slot.1.push(wts[r * top + j]);
            }
        }
    }
    let mut out = dev(k.zeros::<f32>(rows * d))?;
    if let Some(s) = &moe.shared {
        swiglu(m, s, x, rows, &mut out, 0.0)?;
    }
    for (ex, (toks, w)) in assigned.iter().enumerate() {
        if toks.is_empty() {
            continue;
        }
        let n = toks.len();
        let idx = dev(k.upload(toks))?;
        let wd = dev(k.upload(w))?;
        let mut xg = dev(k.zeros::<f32>(n * d))?;
        dev(k.gather_rows(&x.f32, d, &idx.slice(..), &mut xg.slice_mut(..)))?;
        let mut xg16 = dev(k.zeros::<u16>(n * d))?;
        dev(k.to_bf16(&xg.slice(..), &mut xg16.slice_mut(..)))?;
        let xa = Act {
            f32: xg.slice(..),
            bf16: xg16.slice(..),
        };
        let mut y = dev(k.zeros::<f32>(n * d))?;
        swiglu(m, &moe.experts[ex], &xa, n, &mut y, 0.0)?;
        dev(k.scatter_add_rows(&y.slice(..), d, &idx.slice(..), &wd.slice(..), &mut out.slice_mut(..)))?;
    }
    dev(k.add_in_place(&mut hidden.slice_mut(..), &out.slice(..)))
}
