//! Optimizers over adapter parameters only: SGD with momentum and AdamW,
//! with clipping by global gradient norm.
//!
//! An optimizer never sees the frozen base: a step takes a list of
//! [`Slot`]s, each one trainable tensor with its gradient and its optimizer
//! state, and the caller lists only adapter tensors. State lives in
//! caller-provided slices of the accumulation type (`f32` for f16/bf16
//! parameters), sized by `state_len`; nothing allocates.
//!
//! A step first checks every slot (lengths, finiteness of every gradient and
//! of the loss) and computes the global gradient norm; only then does it
//! write. A step that sees an infinite or NaN gradient or loss returns
//! [`Error::NonFinite`] and leaves parameters, state and the step counter
//! unchanged.
//!
//! ## Default learning rates
//!
//! Mistake 9 in `peft_verify::mistakes` is one learning rate for every method: prompt and
//! prefix tuning move a few vectors that the whole frozen network must
//! respond to, and need rates one to two orders of magnitude above LoRA's.
//! [`Method::default_lr`] gives AdamW rates from the methods' papers and
//! Hugging Face PEFT's examples (override freely):
//!
//! | method | lr | source |
//! |---|---|---|
//! | LoRA | `1e-3` | Hugging Face PEFT's quicktour; QLoRA (Dettmers et al. 2023) uses 1e-4 to 2e-4 on 7B-65B models |
//! | bottleneck adapter | `1e-3` | Houlsby et al. 2019 sweep 3e-5 to 3e-3; 1e-4 to 1e-3 is the usual range |
//! | prompt tuning | `3e-2` | PEFT's prompt-tuning example; Lester et al. 2021 use 0.3 with Adafactor |
//! | prefix tuning | `1e-2` | PEFT's prefix-tuning example (Li and Liang 2021 use 5e-5 with the MLP reparameterization on BART) |
//! | (IA)^3 | `3e-3` | Liu et al. 2022 (T-Few) train the vectors at 3e-3 |
//! | LoHa, LoKr | `1e-3` | as LoRA: low-rank factors of LoRA's kind; neither PEFT nor LyCORIS sets another default |
//! | VeRA | `1e-2` | our choice: only scaling vectors train, as for (IA)^3 and prompts, so an order above LoRA's |
//! | AdaLoRA | `1e-3` | as LoRA: PEFT's AdaLoRA examples train at LoRA's rates |
//! | MiSS | `1e-3` | as LoRA: a zero-initialized shard of the weight's size class; PEFT sets no other default |
//! | HRA | `1e-3` | as LoRA: PEFT sets no default; the paper trains reflections at LoRA's rates |
//! | C3A | `1e-3` | as LoRA: PEFT sets no default |
//! | SHiRA | `1e-3` | as LoRA: PEFT sets no default |
//! | OFT | `1e-3` | as LoRA: PEFT sets no default; zero-initialized rotations, trained at LoRA's rates in the paper's examples |
//! | BOFT | `1e-3` | as LoRA and OFT: PEFT sets no default |
//! | FourierFT | `6e-2` | PEFT's FourierFT notebook (`examples/sequence_classification`) trains the spectrum at 6e-2 |
//! | RandLoRA | `1e-3` | as LoRA: PEFT sets no default |
//! | VB-LoRA | `1e-3` | as LoRA: PEFT's VB-LoRA examples train the logits at LoRA's rates (the bank at a higher one, which this crate's trainer keeps frozen) |
//! | LN tuning | `1e-3` | as LoRA: PEFT's LN tuning examples train the norms at LoRA's rates |
//! | trainable tokens | `1e-3` | as LoRA: PEFT's trainable-tokens examples train the rows at LoRA's rates |
//! | RoAd | `3e-3` | as (IA)^3: one angle and one scale per output; our choice, PEFT sets no default |
//!
//! DoRA is a LoRA variant ([`Method::Lora`], `use_dora` in its configuration) and takes LoRA's rate.

use crate::element::{Element, Real};
use crate::error::{Error, Operand, Result, check_len};

/// One trainable tensor in an optimizer step.
#[derive(Debug)]
pub struct Slot<'a, E: Element> {
    /// The parameter, updated in place.
    pub param: &'a mut [E],
    /// Its gradient (same length).
    pub grad: &'a [E],
    /// Optimizer state, `state_len(param.len())` elements of the
    /// accumulation type, zero before the first step.
    pub state: &'a mut [E::Accum],
    /// Whether weight decay applies (PEFT and most recipes exclude biases
    /// and norms: pass `false` for them).
    pub decay: bool,
}

/// The PEFT method a parameter group belongs to, for its default learning
/// rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Method {
    /// LoRA / rsLoRA.
    Lora,
    /// Bottleneck adapters.
    Adapter,
    /// Prompt tuning.
    Prompt,
    /// Prefix tuning.
    Prefix,
    /// (IA)^3.
    Ia3,
    /// LoHa.
    Loha,
    /// LoKr.
    Lokr,
    /// VeRA.
    Vera,
    /// AdaLoRA.
    AdaLora,
    /// MiSS.
    Miss,
    /// HRA.
    Hra,
    /// RoAd.
    Road,
    /// C3A.
    C3a,
    /// SHiRA.
    Shira,
    /// OFT.
    Oft,
    /// BOFT.
    Boft,
    /// FourierFT.
    FourierFt,
    /// RandLoRA.
    RandLora,
    /// VB-LoRA.
    VbLora,
    /// LN tuning.
    LnTuning,
    /// Trainable tokens.
    TrainableTokens,
}

impl Method {
    /// The default AdamW learning rate (see the module docs for sources).
    pub const fn default_lr(self) -> f64 {
        match self {
            Method::Lora => 1e-3,
            Method::Adapter => 1e-3,
            Method::Prompt => 3e-2,
            Method::Prefix => 1e-2,
            Method::Ia3 => 3e-3,
            Method::Loha | Method::Lokr => 1e-3,
            Method::Vera => 1e-2,
            Method::AdaLora => 1e-3,
            Method::Miss => 1e-3,
            Method::Hra => 1e-3,
            Method::Road => 3e-3,
            Method::C3a => 1e-3,
            Method::Shira => 1e-3,
            Method::Oft => 1e-3,
            Method::Boft => 1e-3,
            Method::FourierFt => 6e-2,
            Method::RandLora => 1e-3,
            Method::VbLora => 1e-3,
            Method::LnTuning => 1e-3,
            Method::TrainableTokens => 1e-3,
        }
    }

    /// The lower-case name (`"lora"`, `"adapter"`, `"prompt"`, `"prefix"`,
    /// `"ia3"`, `"loha"`, `"lokr"`, `"vera"`, `"adalora"`, `"miss"`, `"hra"`, `"road"`, `"c3a"`, `"shira"`, `"oft"`, `"boft"`, `"fourierft"`, `"randlora"`, `"vblora"`, `"ln_tuning"`, `"trainable_tokens"`).
    pub const fn name(self) -> &'static str {
        match self {
            Method::Lora => "lora",
            Method::Adapter => "adapter",
            Method::Prompt => "prompt",
            Method::Prefix => "prefix",
            Method::Ia3 => "ia3",
            Method::Loha => "loha",
            Method::Lokr => "lokr",
            Method::Vera => "vera",
            Method::AdaLora => "adalora",
            Method::Miss => "miss",
            Method::Hra => "hra",
            Method::Road => "road",
            Method::C3a => "c3a",
            Method::Shira => "shira",
            Method::Oft => "oft",
            Method::Boft => "boft",
            Method::FourierFt => "fourierft",
            Method::RandLora => "randlora",
            Method::VbLora => "vblora",
            Method::LnTuning => "ln_tuning",
            Method::TrainableTokens => "trainable_tokens",
        }
    }
}

/// What a successful step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepInfo {
    /// Global gradient norm `sqrt(sum_i |g_i|^2)` over all slots, before
    /// clipping.
    pub grad_norm: f64,
    /// The factor gradients were multiplied by: `min(1, max_norm / norm)`,
    /// or 1 without clipping.
    pub clip_factor: f64,
}

/// Validates a step: lengths (state `per` times the parameter), finite
/// gradients and loss. Returns the global gradient norm (summed in f64).
fn check_step<E: Element>(slots: &[Slot<'_, E>], per: usize, loss: Option<f64>) -> Result<f64> {
    if let Some(l) = loss
        && !l.is_finite()
    {
        return Err(Error::NonFinite { operand: Operand::Loss, index: 0 });
    }
    let mut sum = 0.0f64;
    for (i, s) in slots.iter().enumerate() {
        check_len(Operand::Gradient, s.param.len(), s.grad.len())?;
        check_len(Operand::OptimizerState, s.param.len().checked_mul(per).ok_or(Error::Overflow)?, s.state.len())?;
        for g in s.grad {
            let g = g.to_f64();
            if !g.is_finite() {
                return Err(Error::NonFinite { operand: Operand::Gradient, index: i });
            }
            sum += g * g;
        }
    }
    let norm = sum.sqrt();
    if !norm.is_finite() {
        return Err(Error::NonFinite { operand: Operand::Gradient, index: 0 });
    }
    Ok(norm)
}

/// `min(1, max_norm / norm)` (1 if `norm` is 0 or there is no clipping).
fn clip_factor(max_norm: Option<f64>, norm: f64) -> f64 {
    match max_norm {
        Some(m) if norm > m => m / norm,
        _ => 1.0,
    }
}

/// `Ok` if `v` is finite and `ok`; otherwise names the parameter and the
/// `rule` that `ok` tested.
fn check_hyper(name: &'static str, v: f64, ok: bool, rule: &'static str) -> Result<()> {
    if v.is_finite() && ok { Ok(()) } else { Err(Error::InvalidParameter { name, rule }) }
}

/// SGD with momentum (PyTorch's `torch.optim.SGD`, dampening 0):
///
/// ```text
/// g' = c g + wd p          (c: clip factor; wd only where decay)
/// v  = mu v + g'           (v starts at 0)
/// p  = p - lr v            (mu = 0: p - lr g', no state)
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sgd {
    /// Learning rate (> 0).
    pub lr: f64,
    /// Momentum `mu` in `[0, 1)`.
    pub momentum: f64,
    /// L2 weight decay `wd >= 0`, added to the gradient.
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (None: no clipping).
    pub max_grad_norm: Option<f64>,
}

impl Sgd {
    /// Plain SGD at `lr`: no momentum, decay or clipping.
    pub const fn new(lr: f64) -> Self {
        Self { lr, momentum: 0.0, weight_decay: 0.0, max_grad_norm: None }
    }

    /// State elements for a parameter of `n` elements: `n` with momentum,
    /// 0 without.
    pub fn state_len(&self, n: usize) -> usize {
        if self.momentum == 0.0 { 0 } else { n }
    }

    /// One step over `slots`; `loss`, if given, must be finite too.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a bad hyper-parameter;
    /// [`Error::ShapeMismatch`] (`Gradient`, `OptimizerState`);
    /// [`Error::NonFinite`]. Nothing is written on error.
    pub fn step<E: Element>(&mut self, slots: &mut [Slot<'_, E>], loss: Option<f64>) -> Result<StepInfo> {
        check_hyper("lr", self.lr, self.lr > 0.0, "must be positive and finite")?;
        check_hyper("momentum", self.momentum, (0.0..1.0).contains(&self.momentum), "must be in [0, 1)")?;
        check_hyper("weight_decay", self.weight_decay, self.weight_decay >= 0.0, "must be finite and >= 0")?;
        if let Some(m) = self.max_grad_norm {
            check_hyper("max_grad_norm", m, m > 0.0, "must be positive and finite")?;
        }
        let per = usize::from(self.momentum != 0.0);
        let norm = check_step(slots, per, loss)?;
        let c = clip_factor(self.max_grad_norm, norm);
        let f = <E::Accum as Element>::from_f64;
        let (lr, mu, cc) = (f(self.lr), f(self.momentum), f(c));
        for s in slots.iter_mut() {
            let wd = f(if s.decay { self.weight_decay } else { 0.0 });
            if per == 0 {
                for (p, g) in s.param.iter_mut().zip(s.grad) {
                    let pa = p.to_accum();
                    let g2 = cc * g.to_accum() + wd * pa;
                    *p = E::from_accum(pa - lr * g2);
                }
            } else {
                for ((p, g), v) in s.param.iter_mut().zip(s.grad).zip(s.state.iter_mut()) {
                    let pa = p.to_accum();
                    let g2 = cc * g.to_accum() + wd * pa;
                    *v = mu * *v + g2;
                    *p = E::from_accum(pa - lr * *v);
                }
            }
        }
        Ok(StepInfo { grad_norm: norm, clip_factor: c })
    }
}

/// AdamW (Loshchilov and Hutter 2019; PyTorch's `torch.optim.AdamW`):
///
/// ```text
/// g  = c g                                  (c: clip factor)
/// p  = p (1 - lr wd)                        (decoupled; only where decay)
/// m  = b1 m + (1 - b1) g
/// v  = b2 v + (1 - b2) g^2
/// p  = p - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
/// ```
///
/// `t` counts successful steps from 1. State per parameter element: `m`
/// then `v`, so `state_len(n) = 2 n` laid out `[m (n) | v (n)]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    /// Learning rate (> 0).
    pub lr: f64,
    /// First-moment decay `b1` in `[0, 1)`.
    pub beta1: f64,
    /// Second-moment decay `b2` in `[0, 1)`.
    pub beta2: f64,
    /// `eps > 0`, added to the root of the second moment.
    pub eps: f64,
    /// Decoupled weight decay `wd >= 0`.
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (None: no clipping).
    pub max_grad_norm: Option<f64>,
    t: u64,
}

impl AdamW {
    /// PyTorch's defaults at `lr`: `b1 = 0.9`, `b2 = 0.999`, `eps = 1e-8`,
    /// `wd = 0.01`, no clipping.
    pub const fn new(lr: f64) -> Self {
        Self { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, max_grad_norm: None, t: 0 }
    }

    /// Sets the decoupled weight decay.
    pub const fn with_weight_decay(mut self, wd: f64) -> Self {
        self.weight_decay = wd;
        self
    }

    /// Clips the global gradient norm to `max` (None: no clipping).
    pub const fn with_max_grad_norm(mut self, max: Option<f64>) -> Self {
        self.max_grad_norm = max;
        self
    }

    /// Steps taken so far (refused steps do not count).
    pub fn steps(&self) -> u64 {
        self.t
    }

    /// Restores the step counter (when state is reloaded with the adapter).
    pub fn set_steps(&mut self, t: u64) {
        self.t = t;
    }

    /// State elements for a parameter of `n` elements: `2 n` (saturating).
    pub fn state_len(&self, n: usize) -> usize {
        n.saturating_mul(2)
    }

    /// One step over `slots`; `loss`, if given, must be finite too.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a bad hyper-parameter;
    /// [`Error::ShapeMismatch`] (`Gradient`, `OptimizerState`);
    /// [`Error::NonFinite`]. Nothing is written, and the step counter does
    /// not advance, on error.
    pub fn step<E: Element>(&mut self, slots: &mut [Slot<'_, E>], loss: Option<f64>) -> Result<StepInfo> {
        check_hyper("lr", self.lr, self.lr > 0.0, "must be positive and finite")?;
        check_hyper("beta1", self.beta1, (0.0..1.0).contains(&self.beta1), "must be in [0, 1)")?;
        check_hyper("beta2", self.beta2, (0.0..1.0).contains(&self.beta2), "must be in [0, 1)")?;
        check_hyper("eps", self.eps, self.eps > 0.0, "must be positive and finite")?;
        check_hyper("weight_decay", self.weight_decay, self.weight_decay >= 0.0, "must be finite and >= 0")?;
        if let Some(m) = self.max_grad_norm {
            check_hyper("max_grad_norm", m, m > 0.0, "must be positive and finite")?;
        }
        let norm = check_step(slots, 2, loss)?;
        let c = clip_factor(self.max_grad_norm, norm);
        let t = self.t.saturating_add(1);
        // Bias corrections in f64: b^t for t up to 2^63 without overflow.
        let t_exp = i32::try_from(t).unwrap_or(i32::MAX);
        let bc1 = 1.0 - libm::pow(self.beta1, f64::from(t_exp));
        let bc2 = 1.0 - libm::pow(self.beta2, f64::from(t_exp));
        let f = <E::Accum as Element>::from_f64;
        let (b1, b2, eps, cc) = (f(self.beta1), f(self.beta2), f(self.eps), f(c));
        let (one_b1, one_b2) = (f(1.0 - self.beta1), f(1.0 - self.beta2));
        let (step, inv_sqrt_bc2) = (f(self.lr / bc1), f(1.0 / libm::sqrt(bc2)));
        for s in slots.iter_mut() {
            let decay = f(if s.decay { 1.0 - self.lr * self.weight_decay } else { 1.0 });
            let n = s.param.len();
            let (m, v) = s.state.split_at_mut(n);
            for (((p, g), m), v) in s.param.iter_mut().zip(s.grad).zip(m.iter_mut()).zip(v.iter_mut()) {
                let g = cc * g.to_accum();
                *m = b1 * *m + one_b1 * g;
                *v = b2 * *v + one_b2 * g * g;
                let denom = v.sqrt() * inv_sqrt_bc2 + eps;
                *p = E::from_accum(p.to_accum() * decay - step * *m / denom);
            }
        }
        self.t = t;
        Ok(StepInfo { grad_norm: norm, clip_factor: c })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// AdamW against a hand-unrolled f64 oracle of PyTorch's update, two
    /// steps, with decay on one slot and not the other, and clipping.
    #[test]
    fn adamw_matches_hand_computation() {
        let mut p1 = [1.0f64, -2.0];
        let mut p2 = [0.5f64];
        let g1 = [0.3f64, -0.4];
        let g2 = [1.2f64];
        let (mut s1, mut s2) = ([0.0f64; 4], [0.0f64; 2]);
        let mut opt = AdamW { max_grad_norm: Some(1.0), ..AdamW::new(0.1) };
        // Oracle.
        let norm = (0.09f64 + 0.16 + 1.44).sqrt(); // 1.3
        let c = 1.0 / norm;
        let (lr, b1, b2, eps, wd) = (0.1, 0.9, 0.999, 1e-8, 0.01);
        let mut want = [1.0f64, -2.0, 0.5];
        let grads = [0.3 * c, -0.4 * c, 1.2 * c];
        let decays = [true, true, false];
        let (mut m, mut v) = ([0.0f64; 3], [0.0f64; 3]);
        for t in 1..=2 {
            for i in 0..3 {
                if decays[i] {
                    want[i] *= 1.0 - lr * wd;
                }
                m[i] = b1 * m[i] + (1.0 - b1) * grads[i];
                v[i] = b2 * v[i] + (1.0 - b2) * grads[i] * grads[i];
                let mh = m[i] / (1.0 - f64::powi(b1, t));
                let vh = v[i] / (1.0 - f64::powi(b2, t));
                want[i] -= lr * mh / (vh.sqrt() + eps);
            }
            let mut slots = [
                Slot { param: &mut p1, grad: &g1, state: &mut s1, decay: true },
                Slot { param: &mut p2, grad: &g2, state: &mut s2, decay: false },
            ];
            let info = opt.step(&mut slots, Some(0.5)).unwrap();
            assert!((info.grad_norm - 1.3).abs() < 1e-12);
        }
        for (got, want) in p1.iter().chain(&p2).zip(want) {
            assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        }
        assert_eq!(opt.steps(), 2);
        // First AdamW step moves each parameter by about lr (|m/sqrt v| = 1).
        let mut p = [0.0f32];
        let mut st = [0.0f32; 2];
        AdamW { weight_decay: 0.0, ..AdamW::new(0.1) }
            .step(&mut [Slot { param: &mut p, grad: &[-3.0], state: &mut st, decay: true }], None)
            .unwrap();
        assert!((p[0] - 0.1).abs() < 1e-6);
    }

    /// SGD with momentum: p1 = p0 - lr g; p2 = p1 - lr (mu g + g) (hand).
    #[test]
    fn sgd_momentum_matches_hand_computation() {
        let mut p = [1.0f32];
        let mut v = [0.0f32];
        let mut opt = Sgd { momentum: 0.5, ..Sgd::new(0.1) };
        for _ in 0..2 {
            opt.step(&mut [Slot { param: &mut p, grad: &[2.0], state: &mut v, decay: false }], None).unwrap();
        }
        // 1 - 0.1*2 = 0.8; v = 0.5*2 + 2 = 3; 0.8 - 0.3 = 0.5.
        assert!((p[0] - 0.5).abs() < 1e-6, "{}", p[0]);
        // Coupled weight decay: g' = g + wd p.
        let mut p = [2.0f32];
        Sgd { weight_decay: 0.5, ..Sgd::new(0.1) }
            .step(&mut [Slot { param: &mut p, grad: &[1.0], state: &mut [], decay: true }], None)
            .unwrap();
        assert!((p[0] - (2.0 - 0.1 * 2.0)).abs() < 1e-6);
    }

    /// A NaN or infinite gradient, or a NaN loss, is refused: parameters,
    /// state and the step counter stay as they were.
    #[test]
    fn non_finite_step_is_refused_and_changes_nothing() {
        let mut opt = AdamW::new(0.01);
        let (mut p1, mut p2) = ([1.0f32, 2.0], [3.0f32]);
        let (mut s1, mut s2) = ([0.25f32; 4], [0.5f32; 2]);
        opt.step(
            &mut [
                Slot { param: &mut p1, grad: &[0.1, 0.2], state: &mut s1, decay: true },
                Slot { param: &mut p2, grad: &[0.3], state: &mut s2, decay: true },
            ],
            None,
        )
        .unwrap();
        let before = (p1, p2, s1, s2, opt.steps());
        for (g2, loss, want) in [
            ([f32::NAN], None, Error::NonFinite { operand: Operand::Gradient, index: 1 }),
            ([f32::INFINITY], None, Error::NonFinite { operand: Operand::Gradient, index: 1 }),
            ([0.1], Some(f64::NAN), Error::NonFinite { operand: Operand::Loss, index: 0 }),
        ] {
            let err = opt
                .step(
                    &mut [
                        Slot { param: &mut p1, grad: &[0.1, 0.2], state: &mut s1, decay: true },
                        Slot { param: &mut p2, grad: &g2, state: &mut s2, decay: true },
                    ],
                    loss,
                )
                .unwrap_err();
            assert_eq!(err, want);
            assert_eq!((p1, p2, s1, s2, opt.steps()), before);
        }
        // SGD refuses as well.
        let mut v = [0.0f32];
        let err = Sgd { momentum: 0.9, ..Sgd::new(0.1) }
            .step(&mut [Slot { param: &mut p2, grad: &[f32::NAN], state: &mut v, decay: false }], None)
            .unwrap_err();
        assert_eq!(err, Error::NonFinite { operand: Operand::Gradient, index: 0 });
        assert_eq!((p2, v), (before.1, [0.0]));
    }

    #[test]
    fn bad_lengths_and_hyperparameters_are_typed_errors() {
        let mut p = [1.0f32, 2.0];
        let mut s = [0.0f32; 3];
        let err = AdamW::new(0.1)
            .step(&mut [Slot { param: &mut p, grad: &[0.0, 0.0], state: &mut s, decay: true }], None)
            .unwrap_err();
        assert_eq!(err, Error::ShapeMismatch { operand: Operand::OptimizerState, expected: 4, found: 3 });
        let err = Sgd::new(0.1)
            .step(&mut [Slot { param: &mut p, grad: &[0.0], state: &mut [], decay: true }], None)
            .unwrap_err();
        assert_eq!(err, Error::ShapeMismatch { operand: Operand::Gradient, expected: 2, found: 1 });
        let err = Sgd::new(-1.0).step::<f32>(&mut [], None).unwrap_err();
        assert_eq!(err, Error::InvalidParameter { name: "lr", rule: "must be positive and finite" });
        let err = AdamW { beta2: 1.0, ..AdamW::new(0.1) }.step::<f32>(&mut [], None).unwrap_err();
        assert_eq!(err, Error::InvalidParameter { name: "beta2", rule: "must be in [0, 1)" });
        assert_eq!(p, [1.0, 2.0]);
    }

    /// Mistake 9: prompt tuning's default rate is at least ten times LoRA's.
    #[test]
    fn default_learning_rates_are_method_aware() {
        assert!(Method::Prompt.default_lr() >= 10.0 * Method::Lora.default_lr());
        assert!(Method::Prefix.default_lr() >= 10.0 * Method::Lora.default_lr());
        assert!((1e-4..=1e-3).contains(&Method::Lora.default_lr()));
        assert!((1e-4..=1e-3).contains(&Method::Adapter.default_lr()));
    }
}
