//! One adapted projection of the Llama model: the module of each
//! weight-adapting method, its forward (`y = f(x)` through the frozen
//! matrix, which stays in its stored format) and its backward (`dL/dx`
//! and the module's gradients). Every method runs through `peft-core`'s
//! [`LinearAdapter`] over a [`StoredLinear`] base: no method's arithmetic
//! is written here. Scratch is sized by the trait and kept in a
//! [`SiteScratch`] for the whole pass.
//!
//! DoRA's weight norms `||W + s B A||` are recomputed from the current `A`
//! and `B` at every pass (nothing is cached between passes, and a training
//! step changes `A` and `B`); their gradient is not propagated, as in
//! PEFT, which detaches the norm.
use peft_core::adalora::AdaLoraGrads;
use peft_core::boft::BoftGrads;
use peft_core::dora::{Dora, DoraGrads};
use peft_core::ia3::Ia3;
use peft_core::loha::LohaGrads;
use peft_core::lokr::{Factor, LokrGrads};
use peft_core::lora::LoraGrads;
use peft_core::method::LinearAdapter;
use peft_core::randlora::RandLoraGrads;
use peft_core::road::RoadGrads;
use peft_core::storage::StoredLinear;
use peft_core::vblora::VbLoraGrads;
use peft_core::vera::VeraGrads;
use peft_core::{Accum, Backend, FrozenLinear, MatMut, MatRef};

use super::Linear;
use crate::hf::{
    AdaLoraModule, BoftModule, C3aModule, FourierFtModule, HfAdapter, HfError, HraModule, Ia3Module, LohaModule,
    LokrModule, LoraModule, MissModule, OftModule, RandLoraModule, RandLoraShared, RoadModule, ShiraModule, VbLoraBank,
    VbLoraModule, VeraModule, VeraProjections,
};

/// The adapter module on one projection, borrowed from an
/// [`HfAdapter`](crate::hf::HfAdapter).
#[derive(Clone, Copy, Debug)]
pub enum Module<'a> {
    /// LoRA: `y = x W^T + b + s (x A^T) B^T (+ s lora_bias)`.
    Lora(&'a LoraModule),
    /// DoRA: `y = (m / ||W + s B A||) * (x (W + s B A)^T) + b` (row norms),
    /// at the module's resolved scale.
    Dora(&'a LoraModule),
    /// (IA)^3: `y = (x W^T + b) * l`, or `(x * l) W^T + b` (feedforward).
    Ia3(&'a Ia3Module),
    /// LoHa: `dW = s (W1a W1b) * (W2a W2b)`.
    Loha(&'a LohaModule),
    /// LoKr: `dW = s kron(W1, W2)`.
    Lokr(&'a LokrModule),
    /// VeRA: `dW = diag(lambda_b) B diag(lambda_d) A`, the shared
    /// projections sliced to the layer.
    Vera(&'a VeraModule, &'a VeraProjections),
    /// AdaLoRA: `dW = s B diag(E) A`.
    AdaLora(&'a AdaLoraModule),
    /// MiSS: `dW[o, c] = D[c mod r, o]`, or bat's block update.
    Miss(&'a MissModule),
    /// HRA: `W' = W H`, a chain of Householder reflections.
    Hra(&'a HraModule),
    /// OFT: `W' = W R_bd^T`, block-diagonal Cayley rotations.
    Oft(&'a OftModule),
    /// BOFT: `W' = (W M^T) s`, butterfly factors of Cayley rotations.
    Boft(&'a BoftModule),
    /// FourierFT: `dW = Re(ifft2(S)) scaling`, a sparse spectrum.
    FourierFt(&'a FourierFtModule),
    /// RandLoRA: `dW = s UB UA` over the shared random bases.
    RandLora(&'a RandLoraModule, &'a RandLoraShared),
    /// VB-LoRA: `dW = B A` mixed from the shared bank (held frozen here).
    VbLora(&'a VbLoraModule, &'a VbLoraBank),
    /// RoAd: `y = R (x W^T + b)`, pairs of outputs rotated and scaled.
    Road(&'a RoadModule),
    /// C3A: `dW` block-circulant.
    C3a(&'a C3aModule),
    /// SHiRA: `dW` sparse, at saved positions.
    Shira(&'a ShiraModule),
}

impl Module<'_> {
    /// The module's trainable tensors' lengths, in the order of its
    /// gradient buffers: LoRA `A, B` (its `lora_bias` stays frozen); DoRA `A, B, m`; (IA)^3 `l`; LoHa
    /// `W1a, W1b, W2a, W2b`; LoKr `W1`'s stored tensors then `W2`'s; VeRA
    /// `lambda_d, lambda_b`; AdaLoRA `A, E, B`; MiSS `D`; HRA `U`; OFT `oft_R`; BOFT `boft_R, boft_s`; FourierFT the spectrum; RandLoRA `lambda, gamma`; VB-LoRA `logits_A, logits_B` (the bank frozen); RoAd `theta, alpha`; C3A the kernel; SHiRA `w`.
    pub fn tensor_lens(&self) -> Vec<usize> {
        match self {
            Module::Lora(m) => vec![m.a.len(), m.b.len()],
            Module::Dora(m) => vec![m.a.len(), m.b.len(), m.magnitude.as_ref().map_or(0, Vec::len)],
            Module::Ia3(m) => vec![m.l.len()],
            Module::Loha(m) => m.factors.iter().map(Vec::len).collect(),
            Module::Lokr(m) => m.w1.iter().chain(&m.w2).map(Vec::len).collect(),
            Module::Vera(m, _) => vec![m.lambda_d.len(), m.lambda_b.len()],
            Module::AdaLora(m) => vec![m.a.len(), m.e.len(), m.b.len()],
            Module::Miss(m) => vec![m.d.len()],
            Module::Hra(m) => vec![m.u.len()],
            Module::Oft(m) => vec![m.v.len()],
            Module::Boft(m) => vec![m.r.len(), m.s.len()],
            Module::FourierFt(m) => vec![m.spectrum.len()],
            Module::RandLora(m, _) => vec![m.lambda.len(), m.gamma.len()],
            Module::VbLora(m, _) => vec![m.logits_a.len(), m.logits_b.len()],
            Module::Road(m) => vec![m.theta.len(), m.alpha.len()],
            Module::C3a(m) => vec![m.kernel.len()],
            Module::Shira(m) => vec![m.weight.len()],
        }
    }

    /// `None` when the module, declared `[out, in]`, fits a weight `[rows,
    /// cols]`; else the adapter's side as an error names it. VeRA's layers
    /// read the first `in` columns of the shared projections; a MiSS block
    /// does not hold the input width and must fit the weight's shape.
    pub(super) fn misfit(&self, (out, inn): (usize, usize), (rows, cols): (usize, usize)) -> Option<String> {
        let fits = match self {
            Module::Vera(_, p) => out == rows && cols <= p.max_in,
            Module::Miss(m) => m.layer(cols, rows).is_ok(),
            // SHiRA's positions must lie inside the weight.
            Module::Shira(m) => m.layer(cols, rows).is_ok(),
            // OFT's blocks must be the ones PEFT gives the input width.
            Module::Oft(m) => !m.embedding && m.layer(cols, rows).is_ok(),
            Module::Boft(m) => m.layer(cols, rows).is_ok(),
            Module::FourierFt(m) => m.layer(cols, rows).is_ok(),
            Module::RandLora(m, p) => p.bases().is_ok_and(|b| m.layer(&b, cols, rows).is_ok()),
            Module::VbLora(m, bank) => m.layer(bank, cols, rows).is_ok(),
            // HRA's file holds the input width only.
            Module::Hra(m) => m.n_in == cols,
            // RoAd's file holds the output width only.
            Module::Road(m) => m.n_out == rows,
            _ => (out, inn) == (rows, cols),
        };
        match self {
            _ if fits => None,
            Module::Miss(m) => Some(format!("miss_block {:?}", m.shape)),
            Module::Shira(m) => {
                Some(format!("shira_indices reaching past [{rows}, {cols}] ({} positions)", m.rows.len()))
            }
            Module::Hra(m) => Some(format!("hra_u [{}, {}]", m.n_in, m.r)),
            Module::Oft(m) => Some(format!("oft_R: {} blocks of {}", m.rows, m.spec.block)),
            Module::Boft(m) => Some(format!("boft_R {:?}, boft_s [{}, 1]", m.shape, m.s.len())),
            Module::FourierFt(m) => Some(format!("fourierft_spectrum [{}]", m.spectrum.len())),
            Module::RandLora(m, _) => Some(format!("randlora_gamma {:?} over the shared bases", m.gamma_shape)),
            Module::VbLora(m, _) => {
                Some(format!("vblora_logits_A {:?}, vblora_logits_B {:?}", m.shapes[0], m.shapes[1]))
            }
            Module::Road(m) => Some(format!("[{}, in]", m.n_out)),
            _ => Some(format!("[{out}, {inn}]")),
        }
    }
}

/// The modules of the methods placed by name alone (LoHa, LoKr, AdaLoRA,
/// MiSS, HRA, OFT, BOFT, FourierFT, RoAd, C3A, SHiRA, and VeRA and
/// RandLoRA over their shared tensors), each with the `[out, in]` it declares (0 where
/// the file does not hold that side: [`Module::misfit`] checks the rest).
pub(super) fn placed(adapter: &HfAdapter) -> Vec<(&str, Module<'_>, (usize, usize))> {
    let mut out: Vec<(&str, Module<'_>, (usize, usize))> = Vec::new();
    out.extend(adapter.loha.iter().map(|m| (m.name.as_str(), Module::Loha(m), (m.n_out, m.n_in))));
    out.extend(adapter.lokr.iter().map(|m| (m.name.as_str(), Module::Lokr(m), m.dims())));
    out.extend(adapter.adalora.iter().map(|m| (m.name.as_str(), Module::AdaLora(m), (m.n_out, m.n_in))));
    out.extend(adapter.miss.iter().map(|m| (m.name.as_str(), Module::Miss(m), (0, 0))));
    out.extend(adapter.hra.iter().map(|m| (m.name.as_str(), Module::Hra(m), (0, m.n_in))));
    out.extend(adapter.oft.iter().map(|m| (m.name.as_str(), Module::Oft(m), (0, 0))));
    out.extend(adapter.boft.iter().map(|m| (m.name.as_str(), Module::Boft(m), (0, 0))));
    out.extend(adapter.fourierft.iter().map(|m| (m.name.as_str(), Module::FourierFt(m), (0, 0))));
    // The shared-projection methods: every module over the adapter's one set (the reader requires it).
    if let Some(p) = &adapter.vera_projections {
        out.extend(adapter.vera.iter().map(|m| (m.name.as_str(), Module::Vera(m, p), (m.n_out, p.max_in))));
    }
    if let Some(bank) = &adapter.vblora_bank {
        out.extend(adapter.vblora.iter().map(|m| (m.name.as_str(), Module::VbLora(m, bank), (0, 0))));
    }
    if let Some(p) = &adapter.randlora_bases {
        out.extend(adapter.randlora.iter().map(|m| (m.name.as_str(), Module::RandLora(m, p), (0, 0))));
    }
    out.extend(adapter.road.iter().map(|m| (m.name.as_str(), Module::Road(m), (m.n_out, 0))));
    out.extend(adapter.c3a.iter().map(|m| (m.name.as_str(), Module::C3a(m), (m.n_out, m.n_in))));
    out.extend(adapter.shira.iter().map(|m| (m.name.as_str(), Module::Shira(m), (0, 0))));
    out
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

/// The first `len` elements of `v`, grown (zeros) to hold them: the
/// buffers live as long as the forward or backward pass, so a site
/// allocates only the first time it needs more than any site before it.
fn grow(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() < len {
        v.resize(len, 0.0);
    }
    &mut v[..len]
}

/// The buffers the projections of one pass share, each sized by the
/// method's [`LinearAdapter`] scratch lengths and grown, never shrunk.
#[derive(Clone, Debug, Default)]
pub(super) struct SiteScratch {
    /// The method's scratch (the bottleneck adapters use it too).
    pub(super) scratch: Vec<f32>,
    /// `dL/dx` of one projection, before it is added to the sum.
    dx: Vec<f32>,
    /// DoRA's norm cache `[out]`.
    norms: Vec<f32>,
}

/// The frozen layer as `peft-core`'s base.
fn base(lin: &Linear) -> Result<StoredLinear<'_, f32>, HfError> {
    let b = StoredLinear::new(lin.weight.view()?);
    Ok(match &lin.bias {
        Some(bias) => b.with_bias(bias)?,
        None => b,
    })
}

/// DoRA over a module's tensors, its norm cache in a [`SiteScratch`].
type HostedDora<'a> = Dora<f32, &'a [f32], &'a mut [f32]>;

/// DoRA's layer, its norms refreshed over `base` (A and B may have changed
/// since the last pass: a training step changes them).
fn dora<'a, B: Backend<f32> + ?Sized>(
    backend: &B,
    base: &StoredLinear<'_, f32>,
    m: &'a LoraModule,
    ws: &'a mut SiteScratch,
) -> Result<(HostedDora<'a>, &'a mut Vec<f32>), HfError> {
    let mut layer = m.dora(grow(&mut ws.norms, m.n_out))?;
    let need = layer.prepare_scratch_len(base);
    layer.prepare(backend, base, grow(&mut ws.scratch, need)).map_err(HfError::backend)?;
    Ok((layer, &mut ws.scratch))
}

/// `y = f(x)` through any method, its scratch sized by the trait.
fn run_forward<A: LinearAdapter<f32>, B: Backend<f32> + ?Sized>(
    backend: &B,
    base: &StoredLinear<'_, f32>,
    layer: &A,
    x: MatRef<'_, f32>,
    y: MatMut<'_, f32>,
    scratch: &mut Vec<f32>,
) -> Result<(), HfError> {
    let s = grow(scratch, layer.forward_scratch_len(x.rows()));
    layer.forward(backend, base, x, y, s).map_err(HfError::backend)
}

/// `gx += dL/dx` and the method's gradients accumulated, through any
/// method.
#[allow(clippy::too_many_arguments)]
fn run_backward<A: LinearAdapter<f32>, B: Backend<f32> + ?Sized>(
    backend: &B,
    base: &StoredLinear<'_, f32>,
    layer: &A,
    x: MatRef<'_, f32>,
    gy: MatRef<'_, f32>,
    gx: &mut [f32],
    grads: A::Grads<'_>,
    scratch: &mut Vec<f32>,
    dx: &mut Vec<f32>,
) -> Result<(), HfError> {
    let (n, n_in) = (x.rows(), layer.in_features());
    let dx = grow(dx, n * n_in);
    let s = grow(scratch, layer.backward_scratch_len(n));
    layer.backward(backend, base, x, gy, Some(MatMut::new(&mut *dx, n, n_in)?), grads, s).map_err(HfError::backend)?;
    gx.iter_mut().zip(dx.iter()).for_each(|(g, d)| *g += d);
    Ok(())
}

/// [`run_backward`] for a method with one trainable tensor (`grads` its
/// one buffer).
#[allow(clippy::too_many_arguments)]
fn one_grad<A, B: Backend<f32> + ?Sized>(
    backend: &B,
    base: &StoredLinear<'_, f32>,
    layer: &A,
    x: MatRef<'_, f32>,
    gy: MatRef<'_, f32>,
    gx: &mut [f32],
    grads: &mut [Vec<f32>],
    ws: &mut SiteScratch,
) -> Result<(), HfError>
where
    A: for<'g> LinearAdapter<f32, Grads<'g> = &'g mut [f32]>,
{
    let [g] = grads else {
        return Err(HfError::Config {
            field: "grads".into(),
            reason: "must be LlamaGrads::zeros of the adapter".into(),
        });
    };
    run_backward(backend, base, layer, x, gy, gx, &mut g[..], &mut ws.scratch, &mut ws.dx)
}

/// `y = f(x)` for the projection `lin` through `module` (or the frozen
/// layer alone).
pub(super) fn forward<B: Backend<f32> + ?Sized>(
    backend: &B,
    lin: &Linear,
    module: Option<Module<'_>>,
    x: MatRef<'_, f32>,
    y: &mut [f32],
    ws: &mut SiteScratch,
) -> Result<(), HfError> {
    let (n, n_in, n_out) = (x.rows(), lin.weight.cols, lin.weight.rows);
    let base = base(lin)?;
    let y = MatMut::new(y, n, n_out)?;
    match module {
        None => base.forward(backend, x, y).map_err(HfError::backend),
        Some(Module::Lora(m)) => run_forward(backend, &base, &m.lora()?, x, y, &mut ws.scratch),
        Some(Module::Dora(m)) => {
            let (layer, scratch) = dora(backend, &base, m, ws)?;
            run_forward(backend, &base, &layer, x, y, scratch)
        }
        Some(Module::Ia3(m)) => {
            run_forward(backend, &base, &Ia3::new(n_in, n_out, m.feedforward, &m.l[..])?, x, y, &mut ws.scratch)
        }
        Some(Module::Loha(m)) => {
            let layer = m.layer()?;
            run_forward(backend, &base, &layer, x, y, &mut ws.scratch)
        }
        Some(Module::Lokr(m)) => {
            let layer = m.layer()?;
            run_forward(backend, &base, &layer, x, y, &mut ws.scratch)
        }
        Some(Module::Vera(m, p)) => {
            let (proj, layer) = (p.projection()?, m.layer(n_in)?);
            run_forward(backend, &base, &layer.bound(&proj), x, y, &mut ws.scratch)
        }
        Some(Module::AdaLora(m)) => run_forward(backend, &base, &m.layer()?, x, y, &mut ws.scratch),
        Some(Module::Miss(m)) => run_forward(backend, &base, &m.layer(n_in, n_out)?, x, y, &mut ws.scratch),
        Some(Module::Hra(m)) => run_forward(backend, &base, &m.layer(n_out)?, x, y, &mut ws.scratch),
        Some(Module::Oft(m)) => run_forward(backend, &base, &m.layer(n_in, n_out)?, x, y, &mut ws.scratch),
        Some(Module::Boft(m)) => run_forward(backend, &base, &m.layer(n_in, n_out)?, x, y, &mut ws.scratch),
        Some(Module::VbLora(m, bank)) => {
            run_forward(backend, &base, &m.layer(bank, n_in, n_out)?, x, y, &mut ws.scratch)
        }
        Some(Module::RandLora(m, p)) => {
            let bases = p.bases()?;
            run_forward(backend, &base, &m.layer(&bases, n_in, n_out)?, x, y, &mut ws.scratch)
        }
        Some(Module::FourierFt(m)) => run_forward(backend, &base, &m.layer(n_in, n_out)?, x, y, &mut ws.scratch),
        Some(Module::Road(m)) => run_forward(backend, &base, &m.layer(n_in)?, x, y, &mut ws.scratch),
        Some(Module::C3a(m)) => run_forward(backend, &base, &m.layer()?, x, y, &mut ws.scratch),
        Some(Module::Shira(m)) => run_forward(backend, &base, &m.layer(n_in, n_out)?, x, y, &mut ws.scratch),
    }
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
    ws: &mut SiteScratch,
) -> Result<(), HfError> {
    let (n, n_in, n_out) = (x.rows(), lin.weight.cols, lin.weight.rows);
    let base = base(lin)?;
    let gy = MatRef::new(gy, n, n_out)?;
    let bad = || HfError::Config { field: "grads".into(), reason: "must be LlamaGrads::zeros of the adapter".into() };
    let Some((module, grads)) = module else {
        return base.apply_transpose(backend, gy, MatMut::new(gx, n, n_in)?, Accum::Add).map_err(HfError::backend);
    };
    match module {
        Module::Lora(m) => {
            let [ga, gb] = grads else { return Err(bad()) };
            let g = LoraGrads::new(&mut ga[..], &mut gb[..]);
            run_backward(backend, &base, &m.lora()?, x, gy, gx, g, &mut ws.scratch, &mut ws.dx)
        }
        Module::Dora(m) => {
            let [ga, gb, gm] = grads else { return Err(bad()) };
            let mut dx = core::mem::take(&mut ws.dx);
            let (layer, scratch) = dora(backend, &base, m, ws)?;
            let g = DoraGrads { a: &mut ga[..], b: &mut gb[..], magnitude: &mut gm[..] };
            let done = run_backward(backend, &base, &layer, x, gy, gx, g, scratch, &mut dx);
            ws.dx = dx;
            done
        }
        Module::Ia3(m) => {
            let [gl] = grads else { return Err(bad()) };
            let layer = Ia3::new(n_in, n_out, m.feedforward, &m.l[..])?;
            run_backward(backend, &base, &layer, x, gy, gx, &mut gl[..], &mut ws.scratch, &mut ws.dx)
        }
        Module::Loha(m) => {
            let [g0, g1, g2, g3] = grads else { return Err(bad()) };
            let layer = m.layer()?;
            let g = LohaGrads { w1a: &mut g0[..], w1b: &mut g1[..], w2a: &mut g2[..], w2b: &mut g3[..] };
            run_backward(backend, &base, &layer, x, gy, gx, g, &mut ws.scratch, &mut ws.dx)
        }
        Module::Lokr(m) => {
            let layer = m.layer()?;
            let g = factor_grads(m, grads).ok_or_else(bad)?;
            run_backward(backend, &base, &layer, x, gy, gx, g, &mut ws.scratch, &mut ws.dx)
        }
        Module::Vera(m, p) => {
            let [gd, gb] = grads else { return Err(bad()) };
            let (proj, layer) = (p.projection()?, m.layer(n_in)?);
            let g = VeraGrads { lambda_d: &mut gd[..], lambda_b: &mut gb[..] };
            run_backward(backend, &base, &layer.bound(&proj), x, gy, gx, g, &mut ws.scratch, &mut ws.dx)
        }
        Module::AdaLora(m) => {
            let [ga, ge, gb] = grads else { return Err(bad()) };
            let g = AdaLoraGrads { a: &mut ga[..], e: &mut ge[..], b: &mut gb[..] };
            run_backward(backend, &base, &m.layer()?, x, gy, gx, g, &mut ws.scratch, &mut ws.dx)
        }
        Module::Miss(m) => one_grad(backend, &base, &m.layer(n_in, n_out)?, x, gy, gx, grads, ws),
        Module::Hra(m) => one_grad(backend, &base, &m.layer(n_out)?, x, gy, gx, grads, ws),
        Module::Oft(m) => one_grad(backend, &base, &m.layer(n_in, n_out)?, x, gy, gx, grads, ws),
        Module::VbLora(m, bank) => {
            let [ga, gb] = grads else { return Err(bad()) };
            let g = VbLoraGrads { logits_a: &mut ga[..], logits_b: &mut gb[..], bank: None };
            run_backward(backend, &base, &m.layer(bank, n_in, n_out)?, x, gy, gx, g, &mut ws.scratch, &mut ws.dx)
        }
        Module::RandLora(m, p) => {
            let [gl, gg] = grads else { return Err(bad()) };
            let bases = p.bases()?;
            let (layer, g) = (m.layer(&bases, n_in, n_out)?, RandLoraGrads { lambda: &mut gl[..], gamma: &mut gg[..] });
            run_backward(backend, &base, &layer, x, gy, gx, g, &mut ws.scratch, &mut ws.dx)
        }
        Module::FourierFt(m) => one_grad(backend, &base, &m.layer(n_in, n_out)?, x, gy, gx, grads, ws),
        Module::Boft(m) => {
            let [gr, gs] = grads else { return Err(bad()) };
            let (layer, g) = (m.layer(n_in, n_out)?, BoftGrads { r: &mut gr[..], s: &mut gs[..] });
            run_backward(backend, &base, &layer, x, gy, gx, g, &mut ws.scratch, &mut ws.dx)
        }
        Module::Road(m) => {
            let [gt, ga] = grads else { return Err(bad()) };
            let (layer, g) = (m.layer(n_in)?, RoadGrads { theta: &mut gt[..], alpha: &mut ga[..] });
            run_backward(backend, &base, &layer, x, gy, gx, g, &mut ws.scratch, &mut ws.dx)
        }
        Module::C3a(m) => one_grad(backend, &base, &m.layer()?, x, gy, gx, grads, ws),
        Module::Shira(m) => one_grad(backend, &base, &m.layer(n_in, n_out)?, x, gy, gx, grads, ws),
    }
}
