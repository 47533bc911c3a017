//! Instruction counts (iai-callgrind on valgrind's callgrind): deterministic
//! figures for regression tracking, unlike wall time on a shared machine.
//!
//! Every bench runs the portable reference backend at a small shape, so the
//! count depends on the code and the compiler alone, not on the CPU's
//! vector extensions (faer dispatches at run time). Inputs are built in
//! `setup` functions, which callgrind does not count. `benches/report`
//! reads the counts from `target/iai` and compares them with a saved
//! baseline (see the README's "Tracking performance").
//!
//! Run: `cargo bench -p peft-benches --bench icount` (needs `valgrind` and
//! `iai-callgrind-runner` 0.16.1 on the `PATH`; `.ci/run` installs both).

// iai-callgrind's macros generate public modules without docs at the crate
// root of this bench target.
#![allow(missing_docs)]
use peft_core::method::{LinearAdapter, MergeTarget, WeightUpdate};
use std::hint::black_box;

use iai_callgrind::{library_benchmark, library_benchmark_group, main};
use peft_core::adapter::{AdapterConfig, AdapterGrads, AdapterParams, BottleneckAdapter};
use peft_core::attention::forward as attention;
use peft_core::attention::{AttentionShape, Mask, Prefix};
use peft_core::format::{AdapterFile, Tensor, Value, encode, encoded_len};
use peft_core::lora::{Lora, LoraConfig, LoraGrads};
use peft_core::optim::Method;
use peft_core::prompt::PromptTuning;
use peft_core::{Accum, Backend, Dense, MatMut, MatRef, Op, Reference, Rng};

/// Tokens, width and rank of the method benches.
const T: usize = 8;
const D: usize = 64;
const R: usize = 4;

fn uniform(rng: &mut Rng, n: usize) -> Vec<f32> {
    let mut v = vec![0.0f32; n];
    rng.fill_uniform(&mut v, -0.5, 0.5);
    v
}

/// Everything one bench reads or writes.
struct Inputs {
    w: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
    x: Vec<f32>,
    gy: Vec<f32>,
    out: Vec<f32>,
    gx: Vec<f32>,
    ga: Vec<f32>,
    gb: Vec<f32>,
    scratch: Vec<f32>,
}

fn inputs() -> Inputs {
    let mut rng = Rng::new(11);
    Inputs {
        w: uniform(&mut rng, D * D),
        a: uniform(&mut rng, R * D),
        b: uniform(&mut rng, D * R),
        x: uniform(&mut rng, T * D),
        gy: uniform(&mut rng, T * D),
        out: vec![0.0; T * D],
        gx: vec![0.0; T * D],
        ga: vec![0.0; D * D],
        gb: vec![0.0; D * D],
        scratch: vec![0.0; 4 * T * D],
    }
}

/// `A [m, k]`, `B [n, k]`, `C [m, n]` and `(m, n, k)`.
type GemmInputs = (Vec<f32>, Vec<f32>, Vec<f32>, (usize, usize, usize));

/// The reference gemm `C = A B^T` at `m x k` times `k x n`.
fn gemm_inputs(m: usize, n: usize, k: usize) -> GemmInputs {
    let mut rng = Rng::new(5);
    (uniform(&mut rng, m * k), uniform(&mut rng, n * k), vec![0.0; m * n], (m, n, k))
}

#[library_benchmark]
#[bench::m8_n64_k64(gemm_inputs(8, 64, 64))]
#[bench::m32_n32_k129(gemm_inputs(32, 32, 129))]
fn reference_gemm(i: GemmInputs) -> Vec<f32> {
    let (a, b, mut c, (m, n, k)) = i;
    let (av, bv) = (MatRef::new(&a, m, k).unwrap(), MatRef::new(&b, n, k).unwrap());
    Reference.gemm(MatMut::new(&mut c, m, n).unwrap(), Accum::Replace, av, Op::N, bv, Op::T, 1.0).unwrap();
    black_box(c)
}

#[library_benchmark]
#[bench::t8_d64_r4(inputs())]
fn lora_forward(mut i: Inputs) -> Inputs {
    let base = Dense::new(&i.w, D, D).unwrap();
    let lora = Lora::new(&LoraConfig::new(R, 8.0), D, D, &i.a[..], &i.b[..]).unwrap();
    let (x, y) = (MatRef::new(&i.x, T, D).unwrap(), MatMut::new(&mut i.out, T, D).unwrap());
    lora.forward(&Reference, &base, x, y, &mut i.scratch).unwrap();
    black_box(i)
}

#[library_benchmark]
#[bench::t8_d64_r4(inputs())]
fn lora_backward(mut i: Inputs) -> Inputs {
    let base = Dense::new(&i.w, D, D).unwrap();
    let lora = Lora::new(&LoraConfig::new(R, 8.0), D, D, &i.a[..], &i.b[..]).unwrap();
    let (x, gy) = (MatRef::new(&i.x, T, D).unwrap(), MatRef::new(&i.gy, T, D).unwrap());
    let grads = LoraGrads::new(&mut i.ga[..R * D], &mut i.gb[..D * R]);
    let gx = MatMut::new(&mut i.gx, T, D).unwrap();
    lora.backward(&Reference, &base, x, gy, Some(gx), grads, &mut i.scratch).unwrap();
    black_box(i)
}

// A merge and its unmerge without a backup (`W += s B A`, `W -= s B A`).
#[library_benchmark]
#[bench::d64_r4(inputs())]
fn lora_merge_unmerge(mut i: Inputs) -> Inputs {
    let lora = Lora::new(&LoraConfig::new(R, 8.0), D, D, &i.a[..], &i.b[..]).unwrap();
    lora.merge_into(&Reference, MergeTarget::new(&mut i.w), &mut []).unwrap().unmerge().unwrap();
    black_box(i)
}

/// Bottleneck width of the adapter benches.
const M: usize = 16;

/// An adapter of width `M` whose four tensors are read from `w`.
fn adapter(w: &[f32]) -> BottleneckAdapter<f32, &[f32]> {
    let (wd, rest) = w.split_at(M * D);
    let (wu, rest) = rest.split_at(D * M);
    let (bd, bu) = (&rest[..M], &rest[M..M + D]);
    let params = AdapterParams { w_down: wd, b_down: bd, w_up: wu, b_up: bu };
    BottleneckAdapter::new(&AdapterConfig::width(M), D, params).unwrap()
}

#[library_benchmark]
#[bench::t8_d64_m16(inputs())]
fn adapter_forward(mut i: Inputs) -> Inputs {
    let ad = adapter(&i.w);
    let (x, h) = (MatRef::new(&i.x, T, D).unwrap(), MatMut::new(&mut i.out, T, D).unwrap());
    ad.forward(&Reference, x, h, &mut i.scratch).unwrap();
    black_box(i)
}

#[library_benchmark]
#[bench::t8_d64_m16(inputs())]
fn adapter_backward(mut i: Inputs) -> Inputs {
    let ad = adapter(&i.w);
    let (gwd, rest) = i.ga.split_at_mut(M * D);
    let (gwu, rest) = rest.split_at_mut(D * M);
    let (gbd, rest) = rest.split_at_mut(M);
    let grads = AdapterGrads { w_down: gwd, b_down: gbd, w_up: gwu, b_up: &mut rest[..D] };
    let (x, gh) = (MatRef::new(&i.x, T, D).unwrap(), MatRef::new(&i.gy, T, D).unwrap());
    ad.backward(&Reference, x, gh, Some(MatMut::new(&mut i.gx, T, D).unwrap()), grads, &mut i.scratch).unwrap();
    black_box(i)
}

/// Virtual tokens of the prompt bench.
const NV: usize = 4;

// Prompt tuning: prepend 4 virtual tokens, then the prompt's gradient.
#[library_benchmark]
#[bench::nv4_t8_d64(inputs())]
fn prompt_prepend_backward(mut i: Inputs) -> Inputs {
    let pt = PromptTuning::new(&i.a[..NV * D], NV, D).unwrap();
    let ext = &mut i.scratch[..(NV + T) * D];
    pt.prepend(&i.x, 1, T, ext).unwrap();
    pt.backward(ext, 1, T, &mut i.ga[..NV * D], None).unwrap();
    black_box(i)
}

// Prefix attention: 4 heads over 2 key/value heads of 16, 8 queries, a
// 4-position prefix, causal.
#[library_benchmark]
#[bench::h4_kv2_t8_p4(inputs())]
fn prefix_attention(mut i: Inputs) -> Inputs {
    let shape = AttentionShape::new(4, 2, 16).unwrap();
    let kv = shape.kv_width();
    let (k, v) = (MatRef::new(&i.w[..T * kv], T, kv).unwrap(), MatRef::new(&i.w[T * kv..2 * T * kv], T, kv).unwrap());
    let prefix = Prefix {
        keys: MatRef::new(&i.gy[..4 * kv], 4, kv).unwrap(),
        values: MatRef::new(&i.gy[4 * kv..8 * kv], 4, kv).unwrap(),
    };
    let q = MatRef::new(&i.x, T, D).unwrap();
    let out = MatMut::new(&mut i.out, T, D).unwrap();
    attention(&Reference, &shape, q, k, v, Some(&prefix), &Mask::causal(), out, &mut i.scratch).unwrap();
    black_box(i)
}

/// A LoRA adapter-only file of two 64x4 tensors, encoded.
fn adapter_file() -> Vec<u8> {
    let i = inputs();
    let tensors = [
        Tensor { name: "lora_A.weight", shape: &[R, D], data: &i.a[..] },
        Tensor { name: "lora_B.weight", shape: &[D, R], data: &i.b[..] },
    ];
    let cfg = [("r", Value::U64(R as u64)), ("lora_alpha", Value::F64(8.0))];
    let mut buf = vec![0u8; encoded_len(&cfg, &tensors).unwrap()];
    encode(Method::Lora, &cfg, &tensors, &mut buf).unwrap();
    buf
}

// Parsing (and checksumming) a `.peft` file in place.
#[library_benchmark]
#[bench::lora_r4_d64(adapter_file())]
fn peft_parse(bytes: Vec<u8>) -> usize {
    let f = AdapterFile::parse(&bytes).unwrap();
    black_box(f.num_tensors())
}

library_benchmark_group!(
    name = kernels;
    benchmarks = reference_gemm, lora_forward, lora_backward, lora_merge_unmerge, adapter_forward,
        adapter_backward, prompt_prepend_backward, prefix_attention, peft_parse
);

main!(library_benchmark_groups = kernels);
