//! Frozen bases in every storage format ([`peft_core::storage`]): the
//! quantizers' error bounds, the forward and the input gradient against the
//! oracle over the dequantized `W`, and LoRA's gradients over a stored base
//! against finite differences, the stored bytes unchanged.
use peft_core::lora::{Lora, LoraConfig, LoraGrads};
use peft_core::method::LinearAdapter;
use peft_core::storage::{Format, QK, StoredLinear, StoredWeight, dequantize, error_bound};
use peft_core::storage::{Owned, OwnedWeight};
use peft_core::{Accum, Backend, FrozenLinear, MatMut, MatRef, Reference};
use proptest::prelude::*;

use super::vals;
use crate::oracle::{self, M};
use crate::{Config, Precision, Report, close, close_norm, narrow, run, wide};

/// `W [out, in]` (`in` whole blocks), rank-`r` LoRA factors, an input and
/// an upstream gradient (1 to 6 tokens: a backend's few-token and
/// many-token kernels both run), all in `[-1, 1)` (`W` scaled by `scale`, to reach
/// small and large block scales).
#[derive(Debug, Clone)]
pub struct StorageCase {
    out: usize,
    inn: usize,
    t: usize,
    r: usize,
    w: Vec<f64>,
    a: Vec<f64>,
    b: Vec<f64>,
    x: Vec<f64>,
    g: Vec<f64>,
}

fn storage_case() -> impl Strategy<Value = StorageCase> {
    (1usize..=4, 1usize..=2, 1usize..=6, 1usize..=2, prop_oneof![Just(1e-3), Just(1.0), Just(30.0)])
        .prop_map(|(out, blocks, t, r, scale)| (out, blocks, t, r.min(out), scale))
        .prop_flat_map(|(out, blocks, t, r, scale)| {
            let inn = blocks * QK;
            (Just((out, inn, t, r, scale)), vals(out * inn), vals(r * inn), vals(out * r), vals(t * inn), vals(t * out))
        })
        .prop_map(|((out, inn, t, r, scale), w, a, b, x, g)| StorageCase {
            out,
            inn,
            t,
            r,
            w: w.iter().map(|v| v * scale).collect(),
            a,
            b,
            x,
            g,
        })
}

fn fail(e: impl core::fmt::Display) -> TestCaseError {
    TestCaseError::fail(format!("unexpected error: {e}"))
}

/// The stored bytes of one format (owned), and views of them.
struct Stored {
    format: Format,
    owned: OwnedWeight,
    out: usize,
    inn: usize,
}

impl Stored {
    fn of(format: Format, w: &[f32], out: usize, inn: usize) -> Result<Self, TestCaseError> {
        Ok(Stored { format, owned: OwnedWeight::quantize(format, w, out, inn).map_err(fail)?, out, inn })
    }

    fn weight(&self) -> Result<StoredWeight<'_>, TestCaseError> {
        self.owned.weight().map_err(fail)
    }

    /// Every stored byte, for the "never written" check.
    fn bytes(&self) -> Vec<u64> {
        match self.owned.data() {
            Owned::F32(f) => f.iter().map(|v| u64::from(v.to_bits())).collect(),
            Owned::F16(h) | Owned::Bf16(h) => h.iter().map(|v| u64::from(*v)).collect(),
            Owned::Int8(q, s) => {
                let q = q.iter().map(|v| u64::from(*v as u8));
                q.chain(s.iter().map(|v| u64::from(v.to_bits()))).collect()
            }
            Owned::Q8_0(b) | Owned::Q4_0(b) | Owned::Blocks(_, b) => b.iter().map(|v| u64::from(*v)).collect(),
        }
    }

    /// `deq(W)` decoded here from the stored bytes, independently of
    /// `peft-core`'s decoder (GGUF's block layouts; f16 and bf16 through
    /// the `half` crate), and checked against `peft_core::storage::dequantize`.
    fn dequantized(&self) -> Result<Vec<f64>, TestCaseError> {
        let scale16 = |blk: &[u8]| half::f16::from_le_bytes([blk[0], blk[1]]).to_f64();
        let inn = self.inn;
        let d: Vec<f64> = match self.owned.data() {
            Owned::F32(f) => f.iter().map(|v| f64::from(*v)).collect(),
            Owned::F16(h) => h.iter().map(|v| half::f16::from_bits(*v).to_f64()).collect(),
            Owned::Bf16(h) => h.iter().map(|v| half::bf16::from_bits(*v).to_f64()).collect(),
            Owned::Int8(q, s) => q.iter().enumerate().map(|(i, q)| f64::from(f32::from(*q) * s[i / inn])).collect(),
            Owned::Q8_0(b) => b
                .chunks_exact(34)
                .flat_map(|blk| blk[2..].iter().map(move |q| f64::from(*q as i8) * scale16(blk)))
                .collect(),
            Owned::Q4_0(b) => b
                .chunks_exact(18)
                .flat_map(|blk| {
                    let lo = blk[2..].iter().map(move |q| f64::from(i32::from(q & 0x0F) - 8) * scale16(blk));
                    let hi = blk[2..].iter().map(move |q| f64::from(i32::from(q >> 4) - 8) * scale16(blk));
                    lo.chain(hi)
                })
                .collect(),
            // Pinned bit for bit to ggml's own decoder by peft-faer's GGUF
            // fixtures; here it is the reference the kernels are held to.
            Owned::Blocks(..) => {
                let mut core = vec![0.0f32; self.out * self.inn];
                dequantize(&self.weight()?, &mut core).map_err(fail)?;
                core.iter().map(|v| f64::from(*v)).collect()
            }
        };
        let mut core = vec![0.0f32; self.out * self.inn];
        dequantize(&self.weight()?, &mut core).map_err(fail)?;
        for (i, (a, b)) in d.iter().zip(&core).enumerate() {
            prop_assert!(
                *a == f64::from(*b),
                "{:?}: peft-core decodes element {} as {}, GGUF's layout as {}",
                self.format,
                i,
                b,
                a
            );
        }
        Ok(d)
    }
}

/// A matrix in one of GGUF's read-only block formats (Q4_1 to Q6_K):
/// `out` rows of `blocks` super-blocks of 256 values (8 blocks of 32 for
/// the 32-value formats), random bytes whose f16 fields (`d`, `m`,
/// `dmin`) are set to finite values of either sign from 1e-4 to 0.1; with
/// 1 to 6 tokens of input and upstream gradient in `[-1, 1)`.
#[derive(Debug, Clone)]
pub struct BlockCase {
    format: Format,
    out: usize,
    inn: usize,
    t: usize,
    bytes: Vec<u8>,
    x: Vec<f64>,
    g: Vec<f64>,
}

/// GGUF's formats without a quantizer here.
fn read_only_formats() -> Vec<Format> {
    Format::ALL.into_iter().filter(|f| !f.has_quantizer()).collect()
}

fn block_case() -> impl Strategy<Value = BlockCase> {
    (prop::sample::select(read_only_formats()), 1usize..=5, 1usize..=2, 1usize..=6)
        .prop_flat_map(|(format, out, blocks, t)| {
            let inn = blocks * peft_core::storage::QK_K;
            let len = out * format.row_bytes(inn).unwrap_or(0);
            let scales = prop::collection::vec((1e-4f32..0.1, any::<bool>()), len);
            (Just((format, out, inn, t)), prop::collection::vec(any::<u8>(), len), scales, vals(t * inn), vals(t * out))
        })
        .prop_map(|((format, out, inn, t), mut bytes, scales, x, g)| {
            let size = format.block().1;
            let fields = peft_core::storage::ggml::half_fields(format);
            for (b, block) in bytes.chunks_exact_mut(size).enumerate() {
                for (f, &at) in fields.iter().enumerate() {
                    let (v, neg) = scales[b * 2 + f];
                    let h = half::f16::from_f32(if neg { -v } else { v });
                    block[at..at + 2].copy_from_slice(&h.to_le_bytes());
                }
            }
            BlockCase { format, out, inn, t, bytes, x, g }
        })
}

pub fn run_all<E: Precision, B: Backend<E>>(backend: &B, config: &Config, report: &mut Report)
where
    Reference: Backend<E>,
{
    let name = E::NAME;

    run(report, config, "storage_block_formats_match_dequantized", name, block_case(), |c| {
        let w = StoredWeight::blocks(c.format, &c.bytes, c.out, c.inn).map_err(fail)?;
        let mut deq = vec![0.0f32; c.out * c.inn];
        dequantize(&w, &mut deq).map_err(fail)?;
        // Element access agrees with the block decoder everywhere.
        for (i, v) in deq.iter().enumerate() {
            let got = w.get(i / c.inn, i % c.inn);
            prop_assert!(got.map(f32::to_bits) == Some(v.to_bits()), "{:?}[{}]: {:?} vs {}", c.format, i, got, v);
        }
        let wm = M::new(c.out, c.inn, deq.iter().map(|v| f64::from(*v)).collect());
        let (x, g): (Vec<E>, Vec<E>) = (narrow(&c.x), narrow(&c.g));
        let (xm, gm) = (M::new(c.t, c.inn, wide(&x)), M::new(c.t, c.out, wide(&g)));
        let base = StoredLinear::<E>::new(w);
        let mut y = vec![E::ZERO; c.t * c.out];
        let (xv, yv) = (MatRef::new(&x, c.t, c.inn).map_err(fail)?, MatMut::new(&mut y, c.t, c.out).map_err(fail)?);
        base.forward(backend, xv, yv).map_err(fail)?;
        let (want, mag) = (xm.mul_t(&wm), xm.abs().mul_t(&wm.abs()));
        close::<E>(&format!("{:?} y", c.format), &wide(&y), &want.d, &mag.d, c.inn + 2)?;
        let mut gx = vec![E::from_f64(0.5); c.t * c.inn];
        let (gv, gxv) = (MatRef::new(&g, c.t, c.out).map_err(fail)?, MatMut::new(&mut gx, c.t, c.inn).map_err(fail)?);
        base.apply_transpose(backend, gv, gxv, Accum::Add).map_err(fail)?;
        let (want, mag) = (gm.mul(&wm), gm.abs().mul(&wm.abs()));
        let want: Vec<f64> = want.d.iter().map(|v| v + 0.5).collect();
        let mag: Vec<f64> = mag.d.iter().map(|v| v + 0.5).collect();
        close::<E>(&format!("{:?} grad_x", c.format), &wide(&gx), &want, &mag, c.out + 2)?;
        Ok(())
    });

    run(report, config, "storage_quantization_within_bound", name, storage_case(), |c| {
        let w: Vec<f32> = c.w.iter().map(|v| *v as f32).collect();
        for format in Format::QUANTIZERS {
            let deq = Stored::of(format, &w, c.out, c.inn)?.dequantized()?;
            for (i, (d, v)) in deq.iter().zip(&w).enumerate() {
                let group: &[f32] = match format {
                    Format::Int8 => &w[i / c.inn * c.inn..][..c.inn],
                    f if f.block().0 == QK => &w[i / QK * QK..][..QK],
                    _ => core::slice::from_ref(v),
                };
                let a = group.iter().fold(0f32, |m, v| m.max(v.abs()));
                let bound = error_bound(format, a);
                prop_assert!(
                    (d - f64::from(*v)).abs() <= bound,
                    "{:?}[{}]: {} -> {} (bound {})",
                    format,
                    i,
                    v,
                    d,
                    bound
                );
            }
        }
        Ok(())
    });

    run(report, config, "storage_forward_matches_dequantized", name, storage_case(), |c| {
        let w: Vec<f32> = c.w.iter().map(|v| *v as f32).collect();
        let (x, g): (Vec<E>, Vec<E>) = (narrow(&c.x), narrow(&c.g));
        let (xm, gm) = (M::new(c.t, c.inn, wide(&x)), M::new(c.t, c.out, wide(&g)));
        for format in Format::QUANTIZERS {
            let st = Stored::of(format, &w, c.out, c.inn)?;
            let wm = M::new(c.out, c.inn, st.dequantized()?);
            let base = StoredLinear::<E>::new(st.weight()?);
            let mut y = vec![E::ZERO; c.t * c.out];
            let (xv, yv) = (MatRef::new(&x, c.t, c.inn).map_err(fail)?, MatMut::new(&mut y, c.t, c.out).map_err(fail)?);
            base.forward(backend, xv, yv).map_err(fail)?;
            let (want, mag) = (xm.mul_t(&wm), xm.abs().mul_t(&wm.abs()));
            close::<E>(&format!("{format:?} y"), &wide(&y), &want.d, &mag.d, c.inn + 2)?;
            // grad_x = g deq(W), added to what is there.
            let mut gx = vec![E::from_f64(0.5); c.t * c.inn];
            let (gv, gxv) =
                (MatRef::new(&g, c.t, c.out).map_err(fail)?, MatMut::new(&mut gx, c.t, c.inn).map_err(fail)?);
            base.apply_transpose(backend, gv, gxv, Accum::Add).map_err(fail)?;
            let (want, mag) = (gm.mul(&wm), gm.abs().mul(&wm.abs()));
            let want: Vec<f64> = want.d.iter().map(|v| v + 0.5).collect();
            let mag: Vec<f64> = mag.d.iter().map(|v| v + 0.5).collect();
            close::<E>(&format!("{format:?} grad_x"), &wide(&gx), &want, &mag, c.out + 2)?;
        }
        Ok(())
    });

    run(report, config, "storage_lora_gradients_match_fd", name, storage_case(), |c| {
        let w: Vec<f32> = c.w.iter().map(|v| *v as f32).collect();
        let (x, g, a, b): (Vec<E>, Vec<E>, Vec<E>, Vec<E>) = (narrow(&c.x), narrow(&c.g), narrow(&c.a), narrow(&c.b));
        let cfg = LoraConfig::new(c.r, 2.0 * c.r as f64);
        let layer = Lora::new(&cfg, c.inn, c.out, &a[..], &b[..]).map_err(fail)?;
        for format in Format::QUANTIZERS {
            let st = Stored::of(format, &w, c.out, c.inn)?;
            let before = st.bytes();
            let base = StoredLinear::<E>::new(st.weight()?);
            let (mut ga, mut gb, mut gx) =
                (vec![E::ZERO; c.r * c.inn], vec![E::ZERO; c.out * c.r], vec![E::ZERO; c.t * c.inn]);
            let mut sc = vec![E::ZERO; layer.backward_scratch_len(c.t)];
            let (xv, gv) = (MatRef::new(&x, c.t, c.inn).map_err(fail)?, MatRef::new(&g, c.t, c.out).map_err(fail)?);
            let grads = LoraGrads::new(&mut ga, &mut gb);
            let gxv = MatMut::new(&mut gx, c.t, c.inn).map_err(fail)?;
            layer.backward(backend, &base, xv, gv, Some(gxv), grads, &mut sc).map_err(fail)?;
            prop_assert!(st.bytes() == before, "{:?}: the stored base changed", format);
            let wd = st.dequantized()?;
            let wmax = wd.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1.0);
            let (aw, bw, xw) = (wide(&a), wide(&b), wide(&x));
            let gm = M::new(c.t, c.out, wide(&g));
            let loss = |x: &[f64], a: &[f64], b: &[f64]| {
                let y = oracle::lora(
                    &M::new(c.t, c.inn, x.to_vec()),
                    &M::new(c.out, c.inn, wd.clone()),
                    None,
                    &M::new(c.r, c.inn, a.to_vec()),
                    &M::new(c.out, c.r, b.to_vec()),
                    2.0,
                );
                oracle::dot(&gm, &y)
            };
            let scale = 3.0 * wmax * (c.t * c.out * c.inn * c.r) as f64;
            let k = c.t + c.out + c.inn + c.r;
            let fa = oracle::grad_fd(&aw, 1e-6, |p| loss(&xw, p, &bw));
            close_norm::<E>(&format!("{format:?} dA"), &wide(&ga), &fa, scale, k)?;
            let fb = oracle::grad_fd(&bw, 1e-6, |p| loss(&xw, &aw, p));
            close_norm::<E>(&format!("{format:?} dB"), &wide(&gb), &fb, scale, k)?;
            let fx = oracle::grad_fd(&xw, 1e-6, |p| loss(p, &aw, &bw));
            close_norm::<E>(&format!("{format:?} dx"), &wide(&gx), &fx, scale, k)?;
        }
        Ok(())
    });
}

/// One token over a Q8_0 or Q4_0 `W [out, in]`: `W` scaled by 1e-3, 1 or
/// 30, the input by 1e-6, 1 or 300 per block (a block may be all zeros),
/// and for half the cases signed as row 0 of `W`.
#[derive(Debug, Clone)]
pub struct Int8Case {
    format: Format,
    out: usize,
    inn: usize,
    w: Vec<f64>,
    x: Vec<f64>,
}

fn int8_case() -> impl Strategy<Value = Int8Case> {
    let scale = || prop_oneof![Just(1e-3), Just(1.0), Just(30.0)];
    let x_scale = prop_oneof![Just(0.0), Just(1e-6), Just(1.0), Just(300.0)];
    (prop_oneof![Just(Format::Q8_0), Just(Format::Q4_0)], 1usize..=40, 1usize..=4, scale(), any::<bool>())
        .prop_flat_map(move |(format, out, blocks, ws, aligned)| {
            let inn = blocks * QK;
            let xs = proptest::collection::vec(x_scale.clone(), blocks);
            (Just((format, out, inn, ws, aligned)), vals(out * inn), vals(inn), xs)
        })
        .prop_map(|((format, out, inn, ws, aligned), w, x, xs)| Int8Case {
            format,
            out,
            inn,
            // `aligned`: every product of row 0 is positive, so that a
            // rounding biased toward zero adds up instead of cancelling.
            x: x.iter()
                .enumerate()
                .map(|(k, v)| if aligned { v.abs() * w[k].signum() } else { *v } * xs[k / QK])
                .collect(),
            w: w.iter().map(|v| v * ws).collect(),
        })
}

/// The opt-in integer path's contract (`peft-faer`'s
/// `Faer::int8_activations`; any backend's exact path meets it too): one
/// token's `x deq(W)^T` over Q8_0 and Q4_0, against the f64 oracle over
/// the dequantized `W`, within
///
/// ```text
/// sum_b d_b (1/2 + 2^-10) sum_{k in b} |w_k|  +  (n + 4) u sum_k m_k (|x_k| + d_b)
/// ```
///
/// per output, `d_b = max_{k in b} |x_k| / 127` (the activation's int8
/// step), `u = 2^-24`, `m_k = |w_k|` (Q8_0) or `|w_k| + 16 |dw_b|`
/// (Q4_0: the nibble and its offset of 8 are summed apart). The first term
/// is the input's rounding to int8; the second, f32 arithmetic.
pub fn run_int8_activations<B: Backend<f32>>(backend: &B, config: &Config, report: &mut Report) {
    run(report, config, "storage_int8_activations_within_bound", "f32", int8_case(), |c| {
        let w: Vec<f32> = c.w.iter().map(|v| *v as f32).collect();
        let x: Vec<f32> = c.x.iter().map(|v| *v as f32).collect();
        let st = Stored::of(c.format, &w, c.out, c.inn)?;
        let deq = st.dequantized()?;
        let mut y = vec![f32::NAN; c.out];
        let xv = MatRef::new(&x, 1, c.inn).map_err(fail)?;
        StoredLinear::<f32>::new(st.weight()?)
            .forward(backend, xv, MatMut::new(&mut y, 1, c.out).map_err(fail)?)
            .map_err(fail)?;
        let u = f64::from(f32::EPSILON) / 2.0;
        let step: Vec<f64> =
            x.chunks_exact(QK).map(|b| b.iter().fold(0f64, |m, v| m.max(f64::from(v.abs()))) / 127.0).collect();
        for j in 0..c.out {
            let row = &deq[j * c.inn..(j + 1) * c.inn];
            let (mut want, mut bound) = (0.0, 0.0);
            for (b, (wb, xb)) in row.chunks_exact(QK).zip(x.chunks_exact(QK)).enumerate() {
                // Q4_0's |dw| is max |w| / 8: its quantizer maps the
                // largest magnitude to -8.
                let dw = wb.iter().fold(0f64, |m, v| m.max(v.abs())) / 8.0;
                for (wk, xk) in wb.iter().zip(xb) {
                    let m = if c.format == Format::Q4_0 { wk.abs() + 16.0 * dw } else { wk.abs() };
                    want += wk * f64::from(*xk);
                    bound += step[b] * (0.5 + 2f64.powi(-10)) * wk.abs()
                        + (c.inn as f64 + 4.0) * u * m * (f64::from(xk.abs()) + step[b]);
                }
            }
            let err = (f64::from(y[j]) - want).abs();
            prop_assert!(err <= bound, "{:?} y[{}] = {} vs {} (bound {})", c.format, j, y[j], want, bound);
        }
        Ok(())
    });
}
