//! The computation the firmware runs and the host repeats: fixed-seed
//! data, the reference backend, no heap. The frozen base `W` and its bias
//! are `static` (in flash on the device), computed at compile time; the
//! adapter, activations and scratch live on the stack, every buffer sized
//! by `peft-core`'s `const fn` scratch lengths. Each result is reduced to
//! an FNV-1a hash of its f32 bit patterns, so "equal" means bit-identical.
//!
//! Two more bases are stored, not f32: an int8 one (one f32 scale per
//! row) and a GGUF Q8_0 one (blocks of 32 i8 and an f16 scale), both
//! `static` byte tables in flash built at compile time. LoRA runs its
//! forward, backward and an AdamW step over each through
//! `peft_core::storage::StoredLinear`, which reads the stored bytes in
//! place (no f32 copy of `W`, no heap).
//!
//! An adapter Hugging Face PEFT wrote, converted to this project's
//! `.peft` file, is embedded in flash and parsed in place: the edge
//! deployment the format exists for.
//!
//! Shared by `src/main.rs` (Cortex-M4F) and `peft-verify/tests/firmware.rs`
//! (the host) through `#[path]`.
use peft_core::activation::Activation;
use peft_core::adapter::{self, AdapterConfig, AdapterParams, BottleneckAdapter};
use peft_core::attention::forward as attention;
use peft_core::attention::{self as attn, AttentionShape, Mask};
use peft_core::lora::{self, Lora, LoraConfig, LoraGrads};
use peft_core::method::{LinearAdapter, MergeTarget, WeightUpdate};
use peft_core::optim::{AdamW, Slot};
use peft_core::prefix::{PrefixConfig, PrefixTuning};
use peft_core::set::{FixedSet, Route};
use peft_core::storage::{Q8_0_BYTES, QK, StoredLinear, StoredWeight};
use peft_core::{Dense, FrozenLinear, MatMut, MatRef, Reference, Result, Rng};

/// Names of the checksums, in order.
pub const NAMES: [&str; 7] =
    ["lora_forward", "lora_grad_a", "lora_grad_b", "lora_grad_x", "adamw_step", "lora_merged_w", "adapter_forward"];

const T: usize = 4;
const IN: usize = 8;
const OUT: usize = 6;
const R: usize = 2;
/// Bottleneck width of the adapter.
const M: usize = 3;
/// Prefix attention: tokens, prefix positions.
const TQ: usize = 3;
const P: usize = 2;

/// The next output of a splitmix64 stream at `state` (advanced), usable
/// at compile time.
const fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `n` values in `[-scale, scale)` from a splitmix64 stream, at compile
/// time: the frozen weights are constants, so they sit in flash.
const fn const_uniform<const N: usize>(seed: u64, scale: f32) -> [f32; N] {
    let mut out = [0.0f32; N];
    let mut state = seed;
    let mut i = 0;
    while i < N {
        // 24 random bits -> [0, 1), exactly representable in f32.
        let unit = (splitmix64(&mut state) >> 40) as f32 / (1u64 << 24) as f32;
        out[i] = (2.0 * unit - 1.0) * scale;
        i += 1;
    }
    out
}

/// The frozen base `W [OUT, IN]`, read-only, in flash.
static W: [f32; OUT * IN] = const_uniform(2026, 0.5);
/// The frozen bias `[OUT]`, in flash.
static BIAS: [f32; OUT] = const_uniform(2027, 0.1);

/// Three LoRA adapters of an adapter set, in flash: `A [R, IN]`, `B [OUT, R]`.
static SET_A: [[f32; R * IN]; 3] = [const_uniform(31, 0.4), const_uniform(32, 0.4), const_uniform(33, 0.4)];
static SET_B: [[f32; OUT * R]; 3] = [const_uniform(41, 0.3), const_uniform(42, 0.3), const_uniform(43, 0.3)];

/// Inputs of the stored bases (a multiple of Q8_0's 32-value blocks).
const IN_Q: usize = 64;

/// `n` integers in `[-127, 127]` from a splitmix64 stream, at compile time.
const fn const_i8<const N: usize>(seed: u64) -> [i8; N] {
    let mut out = [0i8; N];
    let mut state = seed;
    let mut i = 0;
    while i < N {
        out[i] = (((splitmix64(&mut state) >> 32) % 255) as i32 - 127) as i8;
        i += 1;
    }
    out
}

/// The int8 base `[OUT, IN_Q]`: values, and one f32 scale per row.
static W_INT8: [i8; OUT * IN_Q] = const_i8(2028);
static W_INT8_SCALES: [f32; OUT] = [0.004, 0.003, 0.005, 0.0035, 0.0045, 0.0025];

/// The Q8_0 base `[OUT, IN_Q]`: GGUF `block_q8_0`s (f16 `d` little-endian,
/// then 32 i8), row-major; `d` cycles through the f16 values 2^-8, 2^-7,
/// 1.5 2^-7 and 2^-6.
static W_Q8_0: [u8; OUT * IN_Q / QK * Q8_0_BYTES] = {
    const D: [u16; 4] = [0x1C00, 0x2000, 0x2200, 0x2400];
    let q: [i8; OUT * IN_Q] = const_i8(2029);
    let mut out = [0u8; OUT * IN_Q / QK * Q8_0_BYTES];
    let mut blk = 0;
    while blk < OUT * IN_Q / QK {
        let d = D[blk % 4].to_le_bytes();
        out[blk * Q8_0_BYTES] = d[0];
        out[blk * Q8_0_BYTES + 1] = d[1];
        let mut j = 0;
        while j < QK {
            out[blk * Q8_0_BYTES + 2 + j] = q[blk * QK + j] as u8;
            j += 1;
        }
        blk += 1;
    }
    out
};

/// A PEFT adapter as this project's `.peft` file, embedded in flash:
/// `peft convert peft-faer/tests/fixtures/peft/lora_qv` (the LoRA Hugging
/// Face PEFT 0.21.2 wrote, r = 4, alpha = 8 on q and v of two layers),
/// byte for byte (`peft-faer/tests/hf.rs` checks it is still what the
/// converter writes).
static PEFT_FILE: &[u8] = include_bytes!("../adapters/lora_qv.peft");

/// `in` and `out` of the embedded adapter's `layers.0.q_proj`.
const QV: usize = 32;
/// Its rank.
const QV_R: usize = 4;
/// A frozen `q_proj` `[QV, QV]` for it, in flash.
static W_QV: [f32; QV * QV] = const_uniform(2030, 0.2);

/// Runs `layers.0.q_proj` of the embedded `.peft` file: parsed in place
/// (every length and the CRC checked, no heap), `r` and `lora_alpha` from
/// its configuration, `A` and `B` read into stack buffers, the LoRA
/// forward over [`W_QV`]. The checksum of `y`.
fn embedded_lora(x: &[f32; T * QV]) -> Result<u32> {
    let file = peft_core::format::AdapterFile::parse(PEFT_FILE)?;
    let r = file.get_u64("r")? as usize;
    let alpha = file.get_f64("lora_alpha")?;
    let (mut a, mut b) = ([0.0f32; QV_R * QV], [0.0f32; QV * QV_R]);
    file.tensor("layers.0.q_proj.lora_A.weight")?.read_into(&mut a)?;
    file.tensor("layers.0.q_proj.lora_B.weight")?.read_into(&mut b)?;
    let layer = Lora::new(&LoraConfig::new(r, alpha), QV, QV, &a[..], &b[..])?;
    let base = Dense::new(&W_QV, QV, QV)?;
    let mut y = [0.0f32; T * QV];
    let mut scratch = [0.0f32; lora::forward_scratch_len(T, QV_R)];
    layer.forward(&Reference, &base, MatRef::new(x, T, QV)?, MatMut::new(&mut y, T, QV)?, &mut scratch)?;
    Ok(fnv(&y))
}

/// LoRA forward, backward and one AdamW step over a stored base `[OUT,
/// IN_Q]`: checksums of `y`, `dx` and the stepped `[A, B]`.
fn stored_lora(base: &impl FrozenLinear<f32>, rng: &mut Rng) -> Result<[u32; 3]> {
    let mut x = [0.0f32; T * IN_Q];
    let mut gy = [0.0f32; T * OUT];
    rng.fill_normal(&mut x, 1.0);
    rng.fill_normal(&mut gy, 1.0);
    let (mut a, mut b) = ([0.0f32; R * IN_Q], [0.0f32; OUT * R]);
    let mut layer = Lora::new(&LoraConfig::new(R, 4.0), IN_Q, OUT, &mut a[..], &mut b[..])?;
    layer.init_adapter(rng);
    rng.fill_normal(layer.adapter_mut().1, 0.2);
    let mut scratch = [0.0f32; lora::backward_scratch_len(T, R)];
    let mut y = [0.0f32; T * OUT];
    layer.forward(&Reference, base, MatRef::new(&x, T, IN_Q)?, MatMut::new(&mut y, T, OUT)?, &mut scratch)?;
    let (mut ga, mut gb, mut gx) = ([0.0f32; R * IN_Q], [0.0f32; OUT * R], [0.0f32; T * IN_Q]);
    layer.backward(
        &Reference,
        base,
        MatRef::new(&x, T, IN_Q)?,
        MatRef::new(&gy, T, OUT)?,
        Some(MatMut::new(&mut gx, T, IN_Q)?),
        LoraGrads::new(&mut ga, &mut gb),
        &mut scratch,
    )?;
    let (mut sa, mut sb) = ([0.0f32; 2 * R * IN_Q], [0.0f32; 2 * OUT * R]);
    let (pa, pb) = layer.adapter_mut();
    let mut slots = [
        Slot { param: pa, grad: &ga, state: &mut sa, decay: true },
        Slot { param: pb, grad: &gb, state: &mut sb, decay: true },
    ];
    AdamW::new(1e-2).step(&mut slots, None)?;
    let mut after = [0.0f32; R * IN_Q + OUT * R];
    after[..R * IN_Q].copy_from_slice(layer.lora_a());
    after[R * IN_Q..].copy_from_slice(layer.lora_b());
    Ok([fnv(&y), fnv(&gx), fnv(&after)])
}

/// FNV-1a (32-bit) over the bit patterns.
pub fn fnv(v: &[f32]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for x in v {
        for b in x.to_bits().to_le_bytes() {
            h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
        }
    }
    h
}

/// Every checksum (the prefix-attention, adapter-set and stored-base ones
/// last).
pub fn run() -> Result<[(&'static str, u32); 16]> {
    let mut rng = Rng::new(2026);
    let base = Dense::new(&W, OUT, IN)?.with_bias(&BIAS)?;
    let mut x = [0.0f32; T * IN];
    let mut gy = [0.0f32; T * OUT];
    rng.fill_normal(&mut x, 1.0);
    rng.fill_normal(&mut gy, 1.0);
    let (mut a, mut b) = ([0.0f32; R * IN], [0.0f32; OUT * R]);
    let cfg = LoraConfig::new(R, 4.0);
    let mut layer = Lora::new(&cfg, IN, OUT, &mut a[..], &mut b[..])?;
    layer.init_adapter(&mut rng);
    // A trained-looking B, so every path carries signal.
    rng.fill_normal(layer.adapter_mut().1, 0.2);
    let mut scratch = [0.0f32; lora::backward_scratch_len(T, R)];
    let mut y = [0.0f32; T * OUT];
    layer.forward(&Reference, &base, MatRef::new(&x, T, IN)?, MatMut::new(&mut y, T, OUT)?, &mut scratch)?;
    let (mut ga, mut gb, mut gx) = ([0.0f32; R * IN], [0.0f32; OUT * R], [0.0f32; T * IN]);
    layer.backward(
        &Reference,
        &base,
        MatRef::new(&x, T, IN)?,
        MatRef::new(&gy, T, OUT)?,
        Some(MatMut::new(&mut gx, T, IN)?),
        LoraGrads::new(&mut ga, &mut gb),
        &mut scratch,
    )?;
    let mut opt = AdamW::new(1e-2);
    let (mut sa, mut sb) = ([0.0f32; 2 * R * IN], [0.0f32; 2 * OUT * R]);
    {
        let (pa, pb) = layer.adapter_mut();
        let mut slots = [
            Slot { param: pa, grad: &ga, state: &mut sa, decay: true },
            Slot { param: pb, grad: &gb, state: &mut sb, decay: true },
        ];
        opt.step(&mut slots, None)?;
    }
    let mut after = [0.0f32; R * IN + OUT * R];
    after[..R * IN].copy_from_slice(layer.lora_a());
    after[R * IN..].copy_from_slice(layer.lora_b());
    // Merging writes W, so it works on a RAM copy of the flash base.
    let mut w = W;
    let merged = fnv(layer.merge_into(&Reference, MergeTarget::new(&mut w), &mut [])?.keep());

    // Bottleneck adapter (d = 8, m = 3, GELU) on x, with trained-looking
    // up weights.
    let (mut wd, mut bd, mut wu, mut bu) = ([0.0f32; M * IN], [0.0f32; M], [0.0f32; IN * M], [0.0f32; IN]);
    let acfg = AdapterConfig::width(M).with_activation(Activation::GeluErf);
    let mut ad = BottleneckAdapter::new(
        &acfg,
        IN,
        AdapterParams { w_down: &mut wd[..], b_down: &mut bd[..], w_up: &mut wu[..], b_up: &mut bu[..] },
    )?;
    ad.init(&mut rng);
    rng.fill_normal(ad.params_mut().w_up, 0.3);
    let mut h = [0.0f32; T * IN];
    let mut ascratch = [0.0f32; adapter::forward_scratch_len(T, M)];
    ad.forward(&Reference, MatRef::new(&x, T, IN)?, MatMut::new(&mut h, T, IN)?, &mut ascratch)?;

    // Prefix attention: 2 query heads sharing 1 key/value head of size 4,
    // 3 tokens, 2 prefix positions, causal.
    let shape = AttentionShape::new(2, 1, 4)?;
    let pc = PrefixConfig::new(P, 1, &shape)?;
    let mut kv = [0.0f32; P * 2 * 4];
    let mut pt = PrefixTuning::new(pc, &mut kv)?;
    pt.init_normal(&mut rng);
    let (mut q, mut k, mut v) = ([0.0f32; TQ * 8], [0.0f32; TQ * 4], [0.0f32; TQ * 4]);
    rng.fill_normal(&mut q, 1.0);
    rng.fill_normal(&mut k, 1.0);
    rng.fill_normal(&mut v, 1.0);
    let mut o = [0.0f32; TQ * 8];
    let mut pscratch = [0.0f32; attn::forward_scratch_len(TQ, TQ, P)];
    let prefix = pt.layer(0)?;
    attention(
        &Reference,
        &shape,
        MatRef::new(&q, TQ, 8)?,
        MatRef::new(&k, TQ, 4)?,
        MatRef::new(&v, TQ, 4)?,
        Some(&prefix),
        &Mask::causal(),
        MatMut::new(&mut o, TQ, 8)?,
        &mut pscratch,
    )?;

    // A fixed-capacity set of three flash adapters over the flash base:
    // switch to each in turn, then one mixed batch (one row per adapter,
    // one through the base alone). No heap.
    let mut set: FixedSet<&'static str, f32, &'static [f32], 3> = FixedSet::new(IN, OUT);
    for (i, name) in ["de", "fr", "es"].into_iter().enumerate() {
        let lora = Lora::new(&cfg, IN, OUT, &SET_A[i][..], &SET_B[i][..])?;
        set.insert(name, lora).map_err(|r| r.error)?;
    }
    let mut outs = [0.0f32; 4 * T * OUT];
    let mut sscratch = [0.0f32; lora::backward_scratch_len(T, R)];
    for (i, name) in ["de", "fr", "es"].into_iter().enumerate() {
        set.activate_only(name)?;
        let dst = MatMut::new(&mut outs[i * T * OUT..(i + 1) * T * OUT], T, OUT)?;
        set.forward(&Reference, &base, MatRef::new(&x, T, IN)?, dst, &mut sscratch)?;
    }
    let routes = [Route::adapter(1, 0), Route::adapter(1, 1), Route::base(1), Route::adapter(1, 2)];
    let dst = MatMut::new(&mut outs[3 * T * OUT..], T, OUT)?;
    set.forward_mixed(&Reference, &base, MatRef::new(&x, T, IN)?, dst, &routes, &mut sscratch)?;

    // LoRA over the int8 and Q8_0 bases in flash.
    let int8 = StoredLinear::new(StoredWeight::int8(&W_INT8, &W_INT8_SCALES, OUT, IN_Q)?).with_bias(&BIAS)?;
    let [i8_y, i8_gx, i8_step] = stored_lora(&int8, &mut rng)?;
    let q8 = StoredLinear::new(StoredWeight::q8_0(&W_Q8_0, OUT, IN_Q)?).with_bias(&BIAS)?;
    let [q8_y, q8_gx, q8_step] = stored_lora(&q8, &mut rng)?;

    // The PEFT adapter embedded as a `.peft` file.
    let mut xq = [0.0f32; T * QV];
    rng.fill_normal(&mut xq, 1.0);
    let embedded = embedded_lora(&xq)?;

    Ok([
        (NAMES[0], fnv(&y)),
        (NAMES[1], fnv(&ga)),
        (NAMES[2], fnv(&gb)),
        (NAMES[3], fnv(&gx)),
        (NAMES[4], fnv(&after)),
        (NAMES[5], merged),
        (NAMES[6], fnv(&h)),
        ("prefix_attention", fnv(&o)),
        ("adapter_set", fnv(&outs)),
        ("int8_lora_forward", i8_y),
        ("int8_lora_grad_x", i8_gx),
        ("int8_adamw_step", i8_step),
        ("q8_0_lora_forward", q8_y),
        ("q8_0_lora_grad_x", q8_gx),
        ("q8_0_adamw_step", q8_step),
        ("peft_file_lora_forward", embedded),
    ])
}
