//! One adapted projection of the Llama model: the module of each
//! weight-adapting method, its forward (`y = f(x)` through the frozen
//! matrix, which stays in its stored format) and its backward (`dL/dx`
//! and the module's gradients). LoRA runs on the backend directly; DoRA,
//! (IA)^3, LoHa, LoKr and VeRA through `peft-core`'s layers over a
//! [`StoredLinear`] base.
//!
//! DoRA's weight norms `||W + s B A||` are recomputed from the current `A`
//! and `B` at every pass (nothing is cached between passes, and a training
//! step changes `A` and `B`); their gradient is not propagated, as in
//! PEFT, which detaches the norm.
use peft_core::delta::DeltaRows;
use peft_core::method::{LinearAdapter, MergeTarget, WeightUpdate};
use peft_core::dora::{Dora, DoraGrads};
use peft_core::ia3::Ia3;
use peft_core::loha::{Loha, LohaGrads};
use peft_core::lokr::{Factor, Lokr, LokrGrads};
use peft_core::lora::LoraConfig;
use peft_core::storage::StoredLinear;
use peft_core::vera::{Vera, VeraGrads, VeraProjection};
use peft_core::{Accum, Backend, MatMut, MatRef, Op};

use super::Linear;
use crate::hf::{HfError, Ia3Module, LohaModule, LokrModule, LoraModule, VeraModule, VeraProjections};

/// The adapter module on one projection, borrowed from an
/// [`HfAdapter`](crate::hf::HfAdapter).
#[derive(Clone, Copy, Debug)]
pub enum Module<'a> {
    /// LoRA: `y = x W^T + b + s (x A^T) B^T (+ s lora_bias)`.
    Lora(&'a LoraModule),
    /// DoRA: `y = (m / ||W + s B A||) * (x (W + s B A)^T) + b` (row norms),
    /// with its LoRA configuration (rank, alpha, rsLoRA).
    Dora(&'a LoraModule, LoraConfig<'static>),
    /// (IA)^3: `y = (x W^T + b) * l`, or `(x * l) W^T + b` (feedforward).
    Ia3(&'a Ia3Module),
    /// LoHa: `dW = s (W1a W1b) * (W2a W2b)`.
    Loha(&'a LohaModule),
    /// LoKr: `dW = s kron(W1, W2)`.
    Lokr(&'a LokrModule),
    /// VeRA: `dW = diag(lambda_b) B diag(lambda_d) A`, the shared
    /// projections sliced to the layer.
    Vera(&'a VeraModule, &'a VeraProjections),
}

impl Module<'_> {
    /// The module's trainable tensors' lengths, in the order of its
    /// gradient buffers: LoRA `A, B`; DoRA `A, B, m`; (IA)^3 `l`; LoHa
    /// `W1a, W1b, W2a, W2b`; LoKr `W1`'s stored tensors then `W2`'s; VeRA
    /// `lambda_d, lambda_b`.
    pub fn tensor_lens(&self) -> Vec<usize> {
        match self {
            Module::Lora(m) => vec![m.a.len(), m.b.len()],
            Module::Dora(m, _) => vec![m.a.len(), m.b.len(), m.magnitude.as_ref().map_or(0, Vec::len)],
            Module::Ia3(m) => vec![m.l.len()],
            Module::Loha(m) => m.factors.iter().map(Vec::len).collect(),
            Module::Lokr(m) => m.w1.iter().chain(&m.w2).map(Vec::len).collect(),
            Module::Vera(m, _) => vec![m.lambda_d.len(), m.lambda_b.len()],
        }
    }
}

/// A LoKr factor's stored tensors as `peft-core`'s form.
fn factor(f: &[Vec<f32>]) -> Factor<&[f32]> {
    match f {
        [a, b] => Factor::LowRank(&a[..], &b[..]),
        [full, ..] => Factor::Full(&full[..]),
        [] => Factor::Full(&[][..]),
    }
}

/// LoKr's gradient buffers as `peft-core`'s form (`W1`'s then `W2`'s).
fn factor_grads<'g>(m: &LokrModule, g: &'g mut [Vec<f32>]) -> Option<LokrGrads<'g, f32>> {
    let (g1, g2) = g.split_at_mut(m.w1.len());
    let f = |g: &'g mut [Vec<f32>]| match g {
        [a, b] => Some(Factor::LowRank(&mut a[..], &mut b[..])),
        [full] => Some(Factor::Full(&mut full[..])),
        _ => None,
    };
    Some(LokrGrads { w1: f(g1)?, w2: f(g2)? })
}

/// The first `len` elements of `v`, grown (zeros) to hold them.
fn grow(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() < len {
        v.resize(len, 0.0);
    }
    &mut v[..len]
}

/// The frozen layer as `peft-core`'s base.
fn base(lin: &Linear) -> Result<StoredLinear<'_, f32>, HfError> {
    let b = StoredLinear::new(lin.weight.view()?);
    Ok(match &lin.bias {
        Some(bias) => b.with_bias(bias)?,
        None => b,
    })
}

/// `y = f(x)` for the projection `lin` through `module` (or the frozen
/// layer alone); `t` is scratch.
pub(super) fn forward<B: Backend<f32> + ?Sized>(
    backend: &B,
    lin: &Linear,
    module: Option<Module<'_>>,
    x: MatRef<'_, f32>,
    y: &mut [f32],
    t: &mut Vec<f32>,
) -> Result<(), HfError> {
    let (n, n_in, n_out) = (x.rows(), lin.weight.cols, lin.weight.rows);
    let be = HfError::backend;
    let yv = MatMut::new(y, n, n_out)?;
    match module {
        None | Some(Module::Lora(_)) => {
            backend.stored_apply(&lin.weight.view()?, x, yv, Accum::Replace).map_err(be)?;
            if let Some(b) = &lin.bias {
                y.chunks_exact_mut(n_out).for_each(|row| row.iter_mut().zip(b).for_each(|(y, b)| *y += b));
            }
            if let Some(Module::Lora(m)) = module {
                let s = m.scale as f32;
                let a = MatRef::new(&m.a, m.r, m.n_in)?;
                let b = MatRef::new(&m.b, m.n_out, m.r)?;
                let u = grow(t, n * m.r);
                backend.gemm(MatMut::new(u, n, m.r)?, Accum::Replace, x, Op::N, a, Op::T, 1.0).map_err(be)?;
                let u = MatRef::new(&t[..n * m.r], n, m.r)?;
                backend.gemm(MatMut::new(y, n, n_out)?, Accum::Add, u, Op::N, b, Op::T, s).map_err(be)?;
                if let Some(lb) = &m.lora_bias {
                    y.chunks_exact_mut(n_out).for_each(|row| row.iter_mut().zip(lb).for_each(|(y, b)| *y += s * b));
                }
            }
        }
        Some(Module::Dora(m, cfg)) => {
            let base = base(lin)?;
            let mag = m.magnitude.as_deref().unwrap_or(&[]);
            let mut layer = Dora::new(&cfg, n_in, n_out, &m.a[..], &m.b[..], mag, vec![0.0; n_out])?;
            let need = peft_core::dora::refresh_scratch_len(&base, n_out)
                .max(peft_core::dora::forward_scratch_len(n, cfg.rank));
            let s = grow(t, need);
            layer.refresh_norms(backend, &base, s).map_err(be)?;
            layer.forward(backend, &base, x, yv, s).map_err(be)?;
        }
        Some(Module::Ia3(m)) => {
            let layer = Ia3::new(n_in, n_out, m.feedforward, &m.l[..])?;
            layer.forward(backend, &base(lin)?, x, yv, grow(t, layer.forward_scratch_len(n))).map_err(be)?;
        }
        Some(Module::Loha(m)) => {
            let [f0, f1, f2, f3] = &m.factors;
            let layer = Loha::new(&LoraConfig::new(m.r, m.alpha), n_in, n_out, [&f0[..], &f1[..], &f2[..], &f3[..]])?;
            layer.forward(backend, &base(lin)?, x, yv, grow(t, layer.forward_scratch_len())).map_err(be)?;
        }
        Some(Module::Lokr(m)) => {
            let layer = Lokr::new(&LoraConfig::new(m.r, m.alpha), m.d1, m.d2, factor(&m.w1), factor(&m.w2))?;
            layer.forward(backend, &base(lin)?, x, yv, grow(t, layer.forward_scratch_len())).map_err(be)?;
        }
        Some(Module::Vera(m, p)) => {
            let proj = VeraProjection::new(p.r, p.max_in, p.max_out, &p.a[..], &p.b[..])?;
            let layer = Vera::new(m.r, n_in, n_out, &m.lambda_d[..], &m.lambda_b[..])?;
            layer.bound(&proj).forward(backend, &base(lin)?, x, yv, grow(t, layer.forward_scratch_len(n))).map_err(be)?;
        }
    }
    Ok(())
}

/// `gx += dL/dx` of [`forward`], the module's gradients (`grads`, in
/// [`Module::tensor_lens`]' order) accumulated.
pub(super) fn backward<B: Backend<f32> + ?Sized>(
    backend: &B,
    lin: &Linear,
    module: Option<(Module<'_>, &mut [Vec<f32>])>,
    x: MatRef<'_, f32>,
    gy: &[f32],
    gx: &mut [f32],
) -> Result<(), HfError> {
    let (n, n_in, n_out) = (x.rows(), lin.weight.cols, lin.weight.rows);
    let be = HfError::backend;
    let gyv = MatRef::new(gy, n, n_out)?;
    let bad = || HfError::Config { field: "grads".into(), reason: "must be LlamaGrads::zeros of the adapter".into() };
    let Some((module, grads)) = module else {
        let w = lin.weight.view()?;
        return backend.stored_apply_transpose(&w, gyv, MatMut::new(gx, n, n_in)?, Accum::Add).map_err(be);
    };
    if let Module::Lora(m) = module {
        let [ga, gb] = grads else { return Err(bad()) };
        let w = lin.weight.view()?;
        backend.stored_apply_transpose(&w, gyv, MatMut::new(gx, n, n_in)?, Accum::Add).map_err(be)?;
        let (r, s) = (m.r, m.scale as f32);
        let a = MatRef::new(&m.a, r, n_in)?;
        let b = MatRef::new(&m.b, n_out, r)?;
        let (mut u, mut t) = (vec![0.0f32; n * r], vec![0.0f32; n * r]);
        backend.gemm(MatMut::new(&mut u, n, r)?, Accum::Replace, gyv, Op::N, b, Op::N, 1.0).map_err(be)?;
        backend.gemm(MatMut::new(&mut t, n, r)?, Accum::Replace, x, Op::N, a, Op::T, 1.0).map_err(be)?;
        let (uv, tv) = (MatRef::new(&u, n, r)?, MatRef::new(&t, n, r)?);
        backend.gemm(MatMut::new(ga, r, n_in)?, Accum::Add, uv, Op::T, x, Op::N, s).map_err(be)?;
        backend.gemm(MatMut::new(gb, n_out, r)?, Accum::Add, gyv, Op::T, tv, Op::N, s).map_err(be)?;
        return backend.gemm(MatMut::new(gx, n, n_in)?, Accum::Add, uv, Op::N, a, Op::N, s).map_err(be);
    }
    // The other methods write dL/dx to `tmp`, then it is added to `gx`.
    let base = base(lin)?;
    let mut tmp = vec![0.0f32; n * n_in];
    let dx = Some(MatMut::new(&mut tmp, n, n_in)?);
    let mut scratch = Vec::new();
    match module {
        Module::Lora(_) => {}
        Module::Dora(m, cfg) => {
            let [ga, gb, gm] = grads else { return Err(bad()) };
            let mag = m.magnitude.as_deref().unwrap_or(&[]);
            let mut layer = Dora::new(&cfg, n_in, n_out, &m.a[..], &m.b[..], mag, vec![0.0; n_out])?;
            let need = peft_core::dora::refresh_scratch_len(&base, n_out)
                .max(peft_core::dora::backward_scratch_len(n, n_out, cfg.rank));
            let s = grow(&mut scratch, need);
            layer.refresh_norms(backend, &base, s).map_err(be)?;
            let g = DoraGrads { a: &mut ga[..], b: &mut gb[..], magnitude: &mut gm[..] };
            layer.backward(backend, &base, x, gyv, dx, g, s).map_err(be)?;
        }
        Module::Ia3(m) => {
            let [gl] = grads else { return Err(bad()) };
            let layer = Ia3::new(n_in, n_out, m.feedforward, &m.l[..])?;
            layer
                .backward(backend, &base, x, gyv, dx, &mut gl[..], grow(&mut scratch, layer.backward_scratch_len(n)))
                .map_err(be)?;
        }
        Module::Loha(m) => {
            let [g0, g1, g2, g3] = grads else { return Err(bad()) };
            let [f0, f1, f2, f3] = &m.factors;
            let layer = Loha::new(&LoraConfig::new(m.r, m.alpha), n_in, n_out, [&f0[..], &f1[..], &f2[..], &f3[..]])?;
            let g = LohaGrads { w1a: &mut g0[..], w1b: &mut g1[..], w2a: &mut g2[..], w2b: &mut g3[..] };
            layer
                .backward(backend, &base, x, gyv, dx, g, grow(&mut scratch, layer.backward_scratch_len()))
                .map_err(be)?;
        }
        Module::Lokr(m) => {
            let layer = Lokr::new(&LoraConfig::new(m.r, m.alpha), m.d1, m.d2, factor(&m.w1), factor(&m.w2))?;
            let g = factor_grads(m, grads).ok_or_else(bad)?;
            layer
                .backward(backend, &base, x, gyv, dx, g, grow(&mut scratch, layer.backward_scratch_len()))
                .map_err(be)?;
        }
        Module::Vera(m, p) => {
            let [gd, gb] = grads else { return Err(bad()) };
            let proj = VeraProjection::new(p.r, p.max_in, p.max_out, &p.a[..], &p.b[..])?;
            let layer = Vera::new(m.r, n_in, n_out, &m.lambda_d[..], &m.lambda_b[..])?;
            let g = VeraGrads { lambda_d: &mut gd[..], lambda_b: &mut gb[..] };
            layer
                .bound(&proj).backward(backend, &base, x, gyv, dx, g, grow(&mut scratch, layer.backward_scratch_len(n)))
                .map_err(be)?;
        }
    }
    gx.iter_mut().zip(&tmp).for_each(|(g, t)| *g += t);
    Ok(())
}
