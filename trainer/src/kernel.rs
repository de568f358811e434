//! The attention of one block (a query chunk against a key/value chunk) with
//! its log-sum-exp, forward and backward: what ring attention computes at each
//! step and merges.
//!
//! Three kernels compute it:
//! - [`Kernel::Fused`]: libtorch's flash-attention kernel for the CPU
//!   (`_scaled_dot_product_flash_attention_for_cpu` and its backward), which
//!   returns the log-sum-exp the merge needs.
//! - [`Kernel::Flash`]: libtorch's flash-attention kernel for CUDA
//!   (`_scaled_dot_product_flash_attention`, through weft's C++ shim since
//!   tch's bindings leave its forward out, and its backward), for bf16 and
//!   fp16 queries with heads of at most 256, a multiple of 8: what a GPU
//!   runs in mixed precision. Its backward takes the output and log-sum-exp
//!   the queries finally had (the merged ones) as they are, as ring
//!   attention needs, with no dropout (so no random state).
//! - [`Kernel::Blockwise`]: the same mathematics in plain tensor operations
//!   (matrix products, a masked log-sum-exp), in fp32, over tiles of queries so
//!   the score matrix stays bounded. It runs on any device and number
//!   format; tests hold it to the fused kernel. On a GPU it runs what flash
//!   does not take (fp32), and everything where flash does not run (a GPU
//!   older than Ampere, a libtorch built without it).
//!
//! All use the scale 1/√E and, when causal, equal query and key chunks (ring
//! attention is causal only on diagonal blocks, where the two chunks are the
//! same tokens): query i sees keys 0..=i. Outputs come back in the queries'
//! kind and log-sum-exps in fp32, `[B, H, L_q]`.
//!
//! `WEFT_ATTENTION=blockwise` makes every device run the blockwise kernel
//! (to check the others against it end to end, e.g. with `weft-trainer
//! selfcheck`).

use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, c_void};
use std::sync::{Mutex, OnceLock};

use tch::{Kind, Tensor};

/// Which kernel computes a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    Fused,
    Flash,
    Blockwise,
}

#[allow(unsafe_code)]
unsafe extern "C" {
    fn weft_flash_attention_forward(
        q: *const c_void,
        k: *const c_void,
        v: *const c_void,
        causal: c_int,
        out: *mut *mut c_void,
        err: *mut *mut c_char,
    ) -> c_int;
}

/// A causal block's queries and keys are the same tokens: the flash kernel
/// aligns its mask bottom-right, the others top-left, which agree only then.
fn check_causal_block(q: &Tensor, k: &Tensor, causal: bool) -> Result<(), tch::TchError> {
    let (lq, lk) = (q.size()[2], k.size()[2]);
    if causal && lq != lk {
        return Err(tch::TchError::Torch(format!(
            "a causal attention block needs as many queries as keys, got {lq} and {lk}"
        )));
    }
    Ok(())
}

/// libtorch's CUDA flash-attention forward: the output and the log-sum-exp.
#[allow(unsafe_code)]
fn flash_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal: bool,
) -> Result<(Tensor, Tensor), tch::TchError> {
    check_causal_block(q, k, causal)?;
    let mut out: [*mut c_void; 2] = [std::ptr::null_mut(); 2];
    crate::comm::call(|err| {
        // SAFETY: the three pointers are live tensors borrowed for the call;
        // on success the shim writes two new heap tensors into `out`.
        unsafe {
            weft_flash_attention_forward(
                q.as_ptr().cast(),
                k.as_ptr().cast(),
                v.as_ptr().cast(),
                c_int::from(causal),
                out.as_mut_ptr(),
                err,
            )
        }
    })
    .map_err(tch::TchError::Torch)?;
    // SAFETY: each is a `new at::Tensor` the shim handed over; tch frees it.
    let [o, lse] = out.map(|p| unsafe { Tensor::from_ptr(p.cast()) });
    Ok((o, lse))
}

/// Whether the CUDA flash kernel takes queries of `kind` with heads of
/// `head_dim`: half precision, heads of at most 256, a multiple of 8.
fn flash_takes(kind: Kind, head_dim: i64) -> bool {
    matches!(kind, Kind::BFloat16 | Kind::Half)
        && head_dim > 0
        && head_dim <= 256
        && head_dim % 8 == 0
}

/// Whether libtorch's CUDA flash kernel runs on `device` at all: it needs
/// an Ampere or newer GPU and a libtorch built with it. Tried once per GPU
/// on a small block; where it fails, that GPU runs the blockwise kernel.
fn flash_runs_on(device: tch::Device) -> bool {
    static TRIED: Mutex<BTreeMap<usize, bool>> = Mutex::new(BTreeMap::new());
    let tch::Device::Cuda(index) = device else {
        return false;
    };
    let mut tried = TRIED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    *tried.entry(index).or_insert_with(|| {
        Tensor::f_zeros([1, 1, 8, 8], (Kind::BFloat16, device))
            .and_then(|q| flash_forward(&q, &q, &q, true))
            .is_ok()
    })
}

/// `WEFT_ATTENTION`: whether it asks for the blockwise kernel everywhere
/// (`blockwise`), or not (unset or empty); any other value is refused.
fn blockwise_asked() -> Result<bool, String> {
    match std::env::var("WEFT_ATTENTION") {
        Ok(v) if v.eq_ignore_ascii_case("blockwise") => Ok(true),
        Ok(v) if !v.is_empty() => Err(format!(
            "WEFT_ATTENTION={v:?}: the one value it takes is \"blockwise\" (every device runs the blockwise attention kernel); unset, each device runs its own"
        )),
        _ => Ok(false),
    }
}

/// Refuses a `WEFT_ATTENTION` it does not take (the binary checks it
/// before anything runs; [`Kernel::of`] reads it as not set).
pub fn check_attention_setting() -> Result<(), String> {
    blockwise_asked().map(|_| ())
}

/// Elements of fp32 scores one tile may hold (2^26: 256 MiB).
const TILE_SCORES: i64 = 1 << 26;

impl Kernel {
    /// The kernel for queries `q` `[B, H, L, E]`: see [`Kernel::of`].
    pub fn for_query(q: &Tensor) -> Kernel {
        Kernel::of(q.device(), q.kind(), q.size().last().copied().unwrap_or(0))
    }

    /// The kernel for queries of `kind` with heads of `head_dim` on
    /// `device`: fused on the CPU, flash on a GPU where it takes them and
    /// runs, else blockwise (everywhere with `WEFT_ATTENTION=blockwise`).
    pub fn of(device: tch::Device, kind: Kind, head_dim: i64) -> Kernel {
        static FORCED: OnceLock<bool> = OnceLock::new();
        let forced = *FORCED.get_or_init(|| blockwise_asked().unwrap_or(false));
        let flash = !forced && flash_takes(kind, head_dim) && flash_runs_on(device);
        Kernel::choose(device, flash, forced)
    }

    /// The rule of [`Kernel::of`]: `flash` whether the flash kernel takes
    /// the queries and runs on the device, `forced` whether the blockwise
    /// kernel is asked for.
    fn choose(device: tch::Device, flash: bool, forced: bool) -> Kernel {
        match device {
            _ if forced => Kernel::Blockwise,
            tch::Device::Cpu => Kernel::Fused,
            tch::Device::Cuda(_) if flash => Kernel::Flash,
            _ => Kernel::Blockwise,
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
            Kernel::Flash => {
                let (out, lse) = flash_forward(q, k, v, causal)?;
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
            Kernel::Flash => {
                check_causal_block(q, k, causal)?;
                // The kernel takes every tensor in the queries' kind, and
                // no cumulative lengths (undefined: not a packed batch).
                // Its random state is read only with dropout, which
                // attention here never has: empty tensors stand for it.
                let kind = q.kind();
                let (lq, lk) = (q.size()[2], k.size()[2]);
                let no_rng = || Tensor::f_empty([], (Kind::Int64, tch::Device::Cpu));
                Tensor::f_internal_scaled_dot_product_flash_attention_backward(
                    &grad.f_to_kind(kind)?.f_contiguous()?,
                    q,
                    k,
                    v,
                    &out.f_to_kind(kind)?.f_contiguous()?,
                    &lse.f_to_kind(Kind::Float)?.f_contiguous()?,
                    &Tensor::new(),
                    &Tensor::new(),
                    lq,
                    lk,
                    0.0,
                    causal,
                    &no_rng()?,
                    &no_rng()?,
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

    /// The CPU runs the fused kernel; a GPU flash for the queries it takes
    /// (bf16 or fp16, heads of 8..=256 in steps of 8), blockwise for the
    /// rest; `WEFT_ATTENTION=blockwise` asks for blockwise everywhere.
    #[test]
    fn each_device_and_format_gets_its_kernel() {
        use tch::Device::{Cpu, Cuda};
        assert_eq!(Kernel::choose(Cpu, false, false), Kernel::Fused);
        assert_eq!(Kernel::choose(Cpu, true, false), Kernel::Fused);
        assert_eq!(Kernel::choose(Cuda(1), true, false), Kernel::Flash);
        assert_eq!(Kernel::choose(Cuda(0), false, false), Kernel::Blockwise);
        for device in [Cpu, Cuda(0)] {
            assert_eq!(Kernel::choose(device, true, true), Kernel::Blockwise);
        }
        assert!(flash_takes(Kind::BFloat16, 128) && flash_takes(Kind::Half, 8));
        assert!(flash_takes(Kind::BFloat16, 256) && flash_takes(Kind::BFloat16, 16));
        for (kind, head) in [
            (Kind::Float, 128),
            (Kind::BFloat16, 12),
            (Kind::BFloat16, 264),
            (Kind::BFloat16, 0),
        ] {
            assert!(!flash_takes(kind, head), "{kind:?} {head}");
        }
        let forced = blockwise_asked().unwrap_or(false);
        let cpu = Kernel::of(Cpu, Kind::Float, 16);
        assert_eq!(
            cpu,
            if forced {
                Kernel::Blockwise
            } else {
                Kernel::Fused
            }
        );
    }

    /// The flash kernel is libtorch's, through weft's C++ shim: where
    /// libtorch has no such kernel (the CPU) its refusal comes back as an
    /// error naming the operation, not a crash; and the backward's call
    /// is refused alike.
    #[test]
    fn the_flash_kernel_reaches_libtorch_through_the_shim() {
        let q = random(&[1, 2, 16, 16], 1, Kind::BFloat16);
        let err = Kernel::Flash
            .forward(&q, &q, &q, true)
            .expect_err("no flash kernel for CPU tensors");
        assert!(
            err.to_string()
                .contains("_scaled_dot_product_flash_attention"),
            "{err}"
        );
        // A causal block of other shapes is refused before any kernel runs
        // (flash's mask would be aligned otherwise than the others').
        let k = random(&[1, 2, 8, 16], 2, Kind::BFloat16);
        let err = Kernel::Flash.forward(&q, &k, &k, true).unwrap_err();
        assert!(
            err.to_string()
                .contains("a causal attention block needs as many queries as keys, got 16 and 8"),
            "{err}"
        );
        let lse = Tensor::zeros([1, 2, 16], (Kind::Float, tch::Device::Cpu));
        let err = Kernel::Flash
            .backward(&q, &q, &q, &q, &q, &lse, true)
            .expect_err("no flash backward for CPU tensors");
        assert!(
            err.to_string()
                .contains("_scaled_dot_product_flash_attention_backward"),
            "{err}"
        );
    }
}
