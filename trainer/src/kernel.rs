//! The attention of one block (a query chunk against a key/value chunk) with
//! its log-sum-exp, forward and backward: what ring attention computes at each
//! step and merges.
//!
//! Two kernels compute it:
//! - [`Kernel::Fused`]: libtorch's flash-attention kernel for the CPU
//!   (`_scaled_dot_product_flash_attention_for_cpu` and its backward), which
//!   returns the log-sum-exp the merge needs.
//! - [`Kernel::Blockwise`]: the same mathematics in plain tensor operations
//!   (matrix products, a masked log-sum-exp), in fp32, over tiles of queries so
//!   the score matrix stays bounded. It runs on any device; tests hold it to
//!   the fused kernel. On GPUs it is what runs: libtorch's fused CUDA kernels
//!   that return the log-sum-exp have no backward in tch's bindings
//!   (`_scaled_dot_product_efficient_attention_backward` is not generated)
//!   or take only half-precision inputs (flash).
//!
//! Both use the scale 1/√E and, when causal, the top-left alignment: query i
//! sees keys 0..=i (ring attention is causal only on diagonal blocks, where the
//! two chunks are the same tokens). Outputs come back in the queries' kind and
//! log-sum-exps in fp32, `[B, H, L_q]`.
//!
//! `WEFT_ATTENTION=blockwise` makes the CPU run the blockwise kernel too
//! (to check it end to end, e.g. with `weft-trainer selfcheck`).

use std::sync::OnceLock;

use tch::{Kind, Tensor};

/// Which kernel computes a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    Fused,
    Blockwise,
}

/// Elements of fp32 scores one tile may hold (2^26: 256 MiB).
const TILE_SCORES: i64 = 1 << 26;

impl Kernel {
    /// The kernel for tensors on `device`: fused on the CPU (unless
    /// `WEFT_ATTENTION=blockwise`), blockwise elsewhere.
    pub fn for_device(device: tch::Device) -> Kernel {
        static FORCED: OnceLock<bool> = OnceLock::new();
        let forced = *FORCED.get_or_init(|| {
            std::env::var("WEFT_ATTENTION").is_ok_and(|v| v.eq_ignore_ascii_case("blockwise"))
        });
        if device == tch::Device::Cpu && !forced {
            Kernel::Fused
        } else {
            Kernel::Blockwise
        }
    }

    /// Attention of `q` `[B, H, L_q, E]` to `k`, `v` `[B, H, L_k, E]`:
    /// the output (in `q`'s kind) and the log-sum-exp (fp32).
    pub fn forward(
        self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        causal: bool,
    ) -> Result<(Tensor, Tensor), tch::TchError> {
        match self {
            Kernel::Fused => {
                let (out, lse) = Tensor::f_internal_scaled_dot_product_flash_attention_for_cpu(
                    q,
                    k,
                    v,
                    0.0,
                    causal,
                    None::<Tensor>,
                    None,
                )?;
                Ok((out, lse.f_to_kind(Kind::Float)?))
            }
            Kernel::Blockwise => blockwise_forward(q, k, v, causal, tile_rows(q, k)),
        }
    }

    /// Gradients of `q`, `k`, `v` (in their kinds) for output gradient `grad`,
    /// given the output `out` and log-sum-exp `lse` the queries finally had
    /// (in ring attention: the merged ones, so each block's share is exact).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        self,
        grad: &Tensor,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        lse: &Tensor,
        causal: bool,
    ) -> Result<(Tensor, Tensor, Tensor), tch::TchError> {
        match self {
            Kernel::Fused => {
                Tensor::f_internal_scaled_dot_product_flash_attention_for_cpu_backward(
                    grad,
                    q,
                    k,
                    v,
                    out,
                    lse,
                    0.0,
                    causal,
                    None::<Tensor>,
                    None,
                )
            }
            Kernel::Blockwise => {
                blockwise_backward(grad, q, k, v, out, lse, causal, tile_rows(q, k))
            }
        }
    }
}

/// Query rows per tile so that one tile's scores `[B, H, rows, L_k]` stay
/// within [`TILE_SCORES`].
fn tile_rows(q: &Tensor, k: &Tensor) -> i64 {
    let size = q.size();
    let per_row = size[0] * size[1] * k.size()[2];
    (TILE_SCORES / per_row.max(1)).max(1)
}

/// fp32 scores of query rows `start..start + rows` against every key, scaled,
/// with the keys a causal query may not see set to −∞.
fn scores(
    q: &Tensor,
    k: &Tensor,
    start: i64,
    rows: i64,
    causal: bool,
) -> Result<Tensor, tch::TchError> {
    let e = q.size()[3];
    let scale = 1.0 / (e as f64).sqrt();
    let qt = q.f_narrow(2, start, rows)?.f_to_kind(Kind::Float)?;
    let s = qt
        .f_matmul(&k.f_to_kind(Kind::Float)?.f_transpose(-2, -1)?)?
        .f_mul_scalar(scale)?;
    if !causal {
        return Ok(s);
    }
    let device = q.device();
    let lk = k.size()[2];
    let query =
        Tensor::f_arange_start(start, start + rows, (Kind::Int64, device))?.f_unsqueeze(1)?;
    let key = Tensor::f_arange(lk, (Kind::Int64, device))?.f_unsqueeze(0)?;
    let hidden = key.f_gt_tensor(&query)?; // [rows, L_k]
    s.f_masked_fill(&hidden, f64::NEG_INFINITY)
}

/// The blockwise forward, `tile` query rows at a time.
pub fn blockwise_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal: bool,
    tile: i64,
) -> Result<(Tensor, Tensor), tch::TchError> {
    let size = q.size();
    let (lq, lk) = (size[2], k.size()[2]);
    let device = q.device();
    if lq == 0 || lk == 0 {
        // No keys: nothing to attend to, a zero output of weight zero.
        let out = Tensor::f_zeros([size[0], size[1], lq, v.size()[3]], (q.kind(), device))?;
        let lse = Tensor::f_full(
            [size[0], size[1], lq],
            f64::NEG_INFINITY,
            (Kind::Float, device),
        )?;
        return Ok((out, lse));
    }
    let vf = v.f_to_kind(Kind::Float)?;
    let mut outs = Vec::new();
    let mut lses = Vec::new();
    let mut start = 0;
    while start < lq {
        let rows = tile.max(1).min(lq - start);
        let s = scores(q, k, start, rows, causal)?;
        let lse = s.f_logsumexp(&[-1i64][..], false)?;
        let p = s.f_sub(&lse.f_unsqueeze(-1)?)?.f_exp()?;
        outs.push(p.f_matmul(&vf)?);
        lses.push(lse);
        start += rows;
    }
    Ok((
        Tensor::f_cat(&outs, 2)?.f_to_kind(q.kind())?,
        Tensor::f_cat(&lses, 2)?,
    ))
}

/// The blockwise backward, `tile` query rows at a time: with P the
/// probabilities recomputed from `lse`, dV = Pᵀ·dO, dS = P ∘ (dO·Vᵀ − rowsum(dO ∘ O)),
/// dQ = dS·K·scale, dK = dSᵀ·Q·scale.
#[allow(clippy::too_many_arguments)]
pub fn blockwise_backward(
    grad: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    causal: bool,
    tile: i64,
) -> Result<(Tensor, Tensor, Tensor), tch::TchError> {
    let size = q.size();
    let (lq, lk) = (size[2], k.size()[2]);
    let scale = 1.0 / (size[3] as f64).sqrt();
    let kf = k.f_to_kind(Kind::Float)?;
    let vf = v.f_to_kind(Kind::Float)?;
    let mut dk = kf.f_zeros_like()?;
    let mut dv = vf.f_zeros_like()?;
    let mut dqs = Vec::new();
    let mut start = 0;
    while start < lq && lk > 0 {
        let rows = tile.max(1).min(lq - start);
        let part = |t: &Tensor| -> Result<Tensor, tch::TchError> {
            t.f_narrow(2, start, rows)?.f_to_kind(Kind::Float)
        };
        let (g, o, qt) = (part(grad)?, part(out)?, part(q)?);
        let l = lse.f_narrow(2, start, rows)?.f_to_kind(Kind::Float)?;
        let p = scores(q, k, start, rows, causal)?
            .f_sub(&l.f_unsqueeze(-1)?)?
            .f_exp()?;
        dv = dv.f_add(&p.f_transpose(-2, -1)?.f_matmul(&g)?)?;
        let dp = g.f_matmul(&vf.f_transpose(-2, -1)?)?;
        let row = g
            .f_mul(&o)?
            .f_sum_dim_intlist(Some(&[-1i64][..]), true, None)?;
        let ds = p.f_mul(&dp.f_sub(&row)?)?;
        dqs.push(ds.f_matmul(&kf)?.f_mul_scalar(scale)?);
        dk = dk.f_add(&ds.f_transpose(-2, -1)?.f_matmul(&qt)?.f_mul_scalar(scale)?)?;
        start += rows;
    }
    let dq = if dqs.is_empty() {
        q.f_zeros_like()?
    } else {
        Tensor::f_cat(&dqs, 2)?.f_to_kind(q.kind())?
    };
    Ok((dq, dk.f_to_kind(k.kind())?, dv.f_to_kind(v.kind())?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(shape: &[i64], seed: i64, kind: Kind) -> Tensor {
        crate::seeded(seed, || {
            Tensor::randn(shape, (Kind::Float, tch::Device::Cpu)).to_kind(kind)
        })
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a.to_kind(Kind::Float) - b.to_kind(Kind::Float))
            .abs()
            .max()
            .double_value(&[])
    }

    /// The blockwise kernel against libtorch's fused CPU kernel, forward and
    /// backward, causal or not, with tiles that do and do not divide the rows.
    #[test]
    fn blockwise_attention_matches_the_fused_kernel() {
        let cases = [
            (Kind::Float, 37, 37, true, 1e-5),
            (Kind::Float, 13, 29, false, 1e-5),
            (Kind::Float, 64, 64, true, 1e-5),
            // bf16 inputs: both accumulate in fp32, then round to bf16 once.
            (Kind::BFloat16, 33, 33, true, 3e-2),
            (Kind::BFloat16, 20, 45, false, 3e-2),
        ];
        for (n, (kind, lq, lk, causal, tol)) in cases.into_iter().enumerate() {
            let seed = 10 * n as i64;
            let q = random(&[2, 3, lq, 16], seed, kind);
            let k = random(&[2, 3, lk, 16], seed + 1, kind);
            let v = random(&[2, 3, lk, 16], seed + 2, kind);
            let grad = random(&[2, 3, lq, 16], seed + 3, kind);
            let (want_out, want_lse) = Kernel::Fused.forward(&q, &k, &v, causal).unwrap();
            let (want_dq, want_dk, want_dv) = Kernel::Fused
                .backward(&grad, &q, &k, &v, &want_out, &want_lse, causal)
                .unwrap();
            for tile in [1, 5, 16, 1000] {
                let (out, lse) = blockwise_forward(&q, &k, &v, causal, tile).unwrap();
                assert_eq!(out.kind(), kind);
                assert_eq!(lse.kind(), Kind::Float);
                let case = format!("case {n} tile {tile}");
                assert!(max_diff(&out, &want_out) < tol, "{case}: output");
                assert!(max_diff(&lse, &want_lse) < tol, "{case}: log-sum-exp");
                // The backward from the fused forward's output, as the ring
                // gives it the merged one.
                let (dq, dk, dv) =
                    blockwise_backward(&grad, &q, &k, &v, &want_out, &want_lse, causal, tile)
                        .unwrap();
                assert_eq!((dq.kind(), dk.kind(), dv.kind()), (kind, kind, kind));
                let scale = 1.0 + want_dq.abs().max().double_value(&[]);
                assert!(max_diff(&dq, &want_dq) < tol * scale, "{case}: dq");
                let scale = 1.0 + want_dk.abs().max().double_value(&[]);
                assert!(max_diff(&dk, &want_dk) < tol * scale, "{case}: dk");
                let scale = 1.0 + want_dv.abs().max().double_value(&[]);
                assert!(max_diff(&dv, &want_dv) < tol * scale, "{case}: dv");
            }
        }
    }

    #[test]
    fn a_block_without_keys_has_zero_weight_and_no_nan() {
        let q = random(&[1, 2, 4, 8], 1, Kind::Float);
        let empty = Tensor::zeros([1, 2, 0, 8], (Kind::Float, tch::Device::Cpu));
        let (out, lse) = blockwise_forward(&q, &empty, &empty, false, 3).unwrap();
        assert_eq!(out.size(), vec![1, 2, 4, 8]);
        assert_eq!(out.abs().max().double_value(&[]), 0.0);
        assert_eq!(lse.max().double_value(&[]), f64::NEG_INFINITY);
        let (dq, dk, _) = blockwise_backward(&q, &q, &empty, &empty, &out, &lse, false, 3).unwrap();
        assert_eq!(dq.abs().max().double_value(&[]), 0.0);
        assert_eq!(dk.size(), vec![1, 2, 0, 8]);
    }

    #[test]
    fn cpu_tensors_get_the_fused_kernel_unless_told_otherwise() {
        let forced =
            std::env::var("WEFT_ATTENTION").is_ok_and(|v| v.eq_ignore_ascii_case("blockwise"));
        let want = if forced {
            Kernel::Blockwise
        } else {
            Kernel::Fused
        };
        assert_eq!(Kernel::for_device(tch::Device::Cpu), want);
        assert_eq!(Kernel::for_device(tch::Device::Cuda(0)), Kernel::Blockwise);
    }
}
