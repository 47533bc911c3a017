//! Speed targets of `peft`, as ratios against a baseline measured in the
//! same group of the same run (so machine noise and clock drift cancel).
//!
//! Group names are `<operation>.<shape>.<threads>t`; each group holds the
//! operation and its baseline. Throughput is in FLOPs (multiply and add
//! counted separately), so criterion prints FLOP/s. `cargo run -p
//! peft-benches --bin ratios` prints every ratio on one line after a run;
//! `benches/report` does both.
//!
//! | group | operation | baseline | target |
//! |---|---|---|---|
//! | `lora_forward_unmerged` | `x W^T + s (x A^T) B^T` | `base_gemm` (`x W^T`) | <= 1.05 |
//! | `lora_forward_merged` | `x W'^T` after merge | `base_gemm` | <= 1.02 |
//! | `lora_backward` | dA, dB, dx (no dW) | `base_gemm`, `full_backward` (dx + dW) | <= 1.10, <= 0.60 |
//! | `merge` | merge + unmerge (`W += s B A`, `W -= s B A`) | `copy_w` (W -> tmp -> W) | <= 2.0 |
//! | `reference` | the `no_std` reference backend | faer on the same call | visible gap |
//! | `gemm_rate` | faer `x W^T`, 128 x 1024 x 1024 | (absolute GFLOP/s) | >= 170 |
//! | `ref_vs_faer` | reference gemm, 32 x 768 x 768 | faer gemm | >= 0.15 of faer's FLOP/s |
//! | `dora_forward` | DoRA's unmerged forward, norms cached | LoRA's unmerged forward | <= 1.10 |
//! | `method_forward` | each newer method's unmerged forward at r = 16 or its equivalent (AdaLoRA: k = 16; MiSS balance: r = 16; HRA: 16 reflections; RoAd road_2, groups of 64; C3A, blocks of 256; SHiRA, r (in + out) positions; OFT, blocks of 32 (PEFT's default), the series of 5 terms; BOFT, blocks of 4 and one factor (PEFT's defaults), and blocks of 8 with two butterfly factors; FourierFT, PEFT's 1000 frequencies; RandLoRA at r = 32, PEFT's default: full rank, nb = 128; VB-LoRA at r = 16, 256 vectors of 256, top 2; LN tuning, a LayerNorm with a bias over the input; trainable tokens, the lookup of 128 ids in a `[4096, 4096]` table, 16 rows trained) | LoRA's unmerged forward | <= 1.3 |
//! | `mixed_batch` | 4 LoRA adapters (r 16) over 32 tokens each, one base gemm | one adapter over the 128 tokens | <= 1.15 |
//! | `storage` | LoRA forward over a stored base (f16, bf16, int8, q8_0, q4_0), t = 1, d = 4096, r = 16 | `stream`: one read of the stored bytes (a sum) | <= 1.3 |
//! | `storage` | the same through the `no_std` reference kernels | faer's path | faer time / reference time >= 0.25 |
//! | `storage_vs_f32_t1`, `storage_vs_f32_t128` | bf16 and q4_0 LoRA forward at t = 1; bf16 and q8_0 at t = 128 | f32 LoRA forward | t = 1: f32 / bf16 >= 1.7, f32 / q4_0 >= 4; t = 128: <= 1.15 |
//! | `vzeroupper` | adapter forward (2 gemms + GELU + residual) without `vzeroupper` | with it | the penalty avoided |
//! | `model` | SmolLM2-135M's shapes (random weights) in f32, q8_0 and q4_0: prefill of 128 tokens (last-row logits, what `generate` runs) and one decode step after them, plain and with a hosted LoRA (r = 16 on q and v), at 1 and 2 threads | the plain model at the same threads; the same pass at 1 thread | LoRA at most 1.075 of plain (0.93x its speed, issue 31); 2 threads at least 1.6x faster |
//! | `model_train` | one LoRA training step (r = 16 on q and v) of 8 sequences of 16 tokens, batched into one pass, at SmolLM2's shapes in f32 | the same at 1 thread | 2 threads at least 1.6x faster |
use peft_core::method::{LinearAdapter, MergeTarget, WeightUpdate};
use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main, measurement::WallTime};
use peft_core::activation::Activation;
use peft_core::adapter::{AdapterConfig, AdapterParams, BottleneckAdapter};
use peft_core::lora::{Lora, LoraConfig, LoraGrads};
use peft_core::storage::{Owned, OwnedWeight};
use peft_core::{Accum, Backend, Dense, Error, MatMut, MatRef, Op, Reference, Rng};
use peft_faer::Faer;
use peft_faer::llama::LlamaConfig;

/// A LoRA problem: `tokens x d_in -> tokens x d_out`, rank `r`.
#[derive(Clone, Copy)]
struct Shape {
    name: &'static str,
    tokens: usize,
    d_in: usize,
    d_out: usize,
    r: usize,
}

const SHAPES: [Shape; 2] = [
    Shape { name: "t128_4096_r16", tokens: 128, d_in: 4096, d_out: 4096, r: 16 },
    Shape { name: "t1_1024_r8", tokens: 1, d_in: 1024, d_out: 1024, r: 8 },
];

impl Shape {
    fn base_flops(&self) -> u64 {
        2 * (self.tokens * self.d_in * self.d_out) as u64
    }
    fn lora_forward_flops(&self) -> u64 {
        self.base_flops() + 2 * (self.tokens * self.r * (self.d_in + self.d_out)) as u64
    }
    /// `t = x A^T`, `dB += s G^T t`, `u = G B`, `dA += s u^T x`,
    /// `dx = G W + s u A`.
    fn lora_backward_flops(&self) -> u64 {
        self.base_flops() + 2 * (self.tokens * self.r * (3 * self.d_in + 2 * self.d_out)) as u64
    }
}

/// Owned tensors of one LoRA layer and its inputs, seeded.
struct Problem {
    s: Shape,
    w: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
    x: Vec<f32>,
    gy: Vec<f32>,
}

impl Problem {
    fn new(s: Shape) -> Self {
        let mut rng = Rng::new(7);
        let mut v = |n: usize| {
            let mut v = vec![0.0f32; n];
            rng.fill_uniform(&mut v, -0.5, 0.5);
            v
        };
        Self {
            s,
            w: v(s.d_out * s.d_in),
            a: v(s.r * s.d_in),
            // Non-zero B: a trained adapter, not the identity at init.
            b: v(s.d_out * s.r),
            x: v(s.tokens * s.d_in),
            gy: v(s.tokens * s.d_out),
        }
    }
}

fn configure(group: &mut BenchmarkGroup<'_, WallTime>, big: bool) {
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(if big { 4 } else { 2 }));
    group.sample_size(if big { 20 } else { 50 });
}

/// `y = x W^T`, the baseline of the forward and backward groups.
fn bench_base_gemm<B: Backend<f32>>(group: &mut BenchmarkGroup<'_, WallTime>, name: &str, backend: &B, p: &Problem) {
    let s = p.s;
    let mut y = vec![0.0f32; s.tokens * s.d_out];
    group.throughput(Throughput::Elements(s.base_flops()));
    group.bench_function(name, |bench| {
        bench.iter(|| {
            let x = MatRef::new(&p.x, s.tokens, s.d_in).unwrap();
            let w = MatRef::new(&p.w, s.d_out, s.d_in).unwrap();
            backend
                .gemm(MatMut::new(&mut y, s.tokens, s.d_out).unwrap(), Accum::Replace, x, Op::N, w, Op::T, 1.0)
                .unwrap();
            black_box(&y);
        })
    });
}

fn bench_lora_forward<B: Backend<f32>>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    backend: &B,
    p: &mut Problem,
    merged: bool,
) {
    let s = p.s;
    let cfg = LoraConfig::new(s.r, 2.0 * s.r as f64);
    let layer = Lora::new(&cfg, s.d_in, s.d_out, &p.a[..], &p.b[..]).unwrap();
    let mut y = vec![0.0f32; s.tokens * s.d_out];
    let x = MatRef::new(&p.x, s.tokens, s.d_in).unwrap();
    if merged {
        let merged = layer.merge_into(backend, MergeTarget::new(&mut p.w), &mut []).unwrap();
        group.throughput(Throughput::Elements(s.base_flops()));
        group.bench_function(name, |bench| {
            bench.iter(|| {
                merged.forward(x, MatMut::new(&mut y, s.tokens, s.d_out).unwrap()).unwrap();
                black_box(&y);
            })
        });
        merged.unmerge().unwrap();
    } else {
        let base = Dense::new(&p.w, s.d_out, s.d_in).unwrap();
        let mut scratch = vec![0.0f32; layer.forward_scratch_len(s.tokens)];
        group.throughput(Throughput::Elements(s.lora_forward_flops()));
        group.bench_function(name, |bench| {
            bench.iter(|| {
                let yv = MatMut::new(&mut y, s.tokens, s.d_out).unwrap();
                layer.forward(backend, &base, x, yv, &mut scratch).unwrap();
                black_box(&y);
            })
        });
    }
}

fn bench_lora_backward<B: Backend<f32, Error = Error>>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    backend: &B,
    p: &Problem,
) {
    let s = p.s;
    let cfg = LoraConfig::new(s.r, 2.0 * s.r as f64);
    let layer = Lora::new(&cfg, s.d_in, s.d_out, &p.a[..], &p.b[..]).unwrap();
    let base = Dense::new(&p.w, s.d_out, s.d_in).unwrap();
    let (mut ga, mut gb) = (vec![0.0f32; s.r * s.d_in], vec![0.0f32; s.d_out * s.r]);
    let mut gx = vec![0.0f32; s.tokens * s.d_in];
    let mut scratch = vec![0.0f32; layer.backward_scratch_len(s.tokens)];
    group.throughput(Throughput::Elements(s.lora_backward_flops()));
    group.bench_function("lora_backward", |bench| {
        bench.iter(|| {
            let x = MatRef::new(&p.x, s.tokens, s.d_in).unwrap();
            let gy = MatRef::new(&p.gy, s.tokens, s.d_out).unwrap();
            let gxv = MatMut::new(&mut gx, s.tokens, s.d_in).unwrap();
            let grads = LoraGrads::new(&mut ga, &mut gb);
            layer.backward(backend, &base, x, gy, Some(gxv), grads, &mut scratch).unwrap();
            black_box((&gx, &ga, &gb));
        })
    });
}

/// What full fine-tuning pays per layer: `dx = G W` and `dW += G^T x`.
fn bench_full_backward<B: Backend<f32>>(group: &mut BenchmarkGroup<'_, WallTime>, backend: &B, p: &Problem) {
    let s = p.s;
    let mut gx = vec![0.0f32; s.tokens * s.d_in];
    let mut gw = vec![0.0f32; s.d_out * s.d_in];
    group.throughput(Throughput::Elements(2 * s.base_flops()));
    group.bench_function("full_backward", |bench| {
        bench.iter(|| {
            let x = MatRef::new(&p.x, s.tokens, s.d_in).unwrap();
            let gy = MatRef::new(&p.gy, s.tokens, s.d_out).unwrap();
            let w = MatRef::new(&p.w, s.d_out, s.d_in).unwrap();
            backend
                .gemm(MatMut::new(&mut gx, s.tokens, s.d_in).unwrap(), Accum::Replace, gy, Op::N, w, Op::N, 1.0)
                .unwrap();
            backend.gemm(MatMut::new(&mut gw, s.d_out, s.d_in).unwrap(), Accum::Add, gy, Op::T, x, Op::N, 1.0).unwrap();
            black_box((&gx, &gw));
        })
    });
}

/// One merge and one unmerge (no backup: the unmerge subtracts), against
/// two plain copies of W: both read and write W twice.
fn bench_merge<B: Backend<f32>>(group: &mut BenchmarkGroup<'_, WallTime>, backend: &B, p: &mut Problem) {
    let s = p.s;
    let bytes = (s.d_out * s.d_in * 4) as u64;
    group.throughput(Throughput::Bytes(4 * bytes));
    let mut tmp = vec![0.0f32; s.d_out * s.d_in];
    group.bench_function("copy_w", |bench| {
        bench.iter(|| {
            tmp.copy_from_slice(&p.w);
            p.w.copy_from_slice(black_box(&tmp));
            black_box(&p.w);
        })
    });
    let cfg = LoraConfig::new(s.r, 2.0 * s.r as f64);
    let layer = Lora::new(&cfg, s.d_in, s.d_out, &p.a[..], &p.b[..]).unwrap();
    group.bench_function("merge", |bench| {
        bench.iter(|| {
            layer.merge_into(backend, MergeTarget::new(&mut p.w), &mut []).unwrap().unmerge().unwrap();
        })
    });
}

fn lora_groups(c: &mut Criterion) {
    for s in SHAPES {
        let big = s.tokens * s.d_in * s.d_out > 1 << 26;
        for threads in [1, 2] {
            let faer = Faer::with_threads(threads);
            let mut p = Problem::new(s);
            let tag = format!("{}.{threads}t", s.name);

            let mut g = c.benchmark_group(format!("lora_forward_unmerged.{tag}"));
            configure(&mut g, big);
            bench_base_gemm(&mut g, "base_gemm", &faer, &p);
            bench_lora_forward(&mut g, "lora_forward_unmerged", &faer, &mut p, false);
            g.finish();

            let mut g = c.benchmark_group(format!("lora_forward_merged.{tag}"));
            configure(&mut g, big);
            bench_base_gemm(&mut g, "base_gemm", &faer, &p);
            bench_lora_forward(&mut g, "lora_forward_merged", &faer, &mut p, true);
            g.finish();

            let mut g = c.benchmark_group(format!("lora_backward.{tag}"));
            configure(&mut g, big);
            bench_base_gemm(&mut g, "base_gemm", &faer, &p);
            bench_full_backward(&mut g, &faer, &p);
            bench_lora_backward(&mut g, &faer, &p);
            g.finish();

            let mut g = c.benchmark_group(format!("merge.{tag}"));
            configure(&mut g, big);
            bench_merge(&mut g, &faer, &mut p);
            g.finish();
        }
        // The no_std default on the same shape, single-threaded.
        let mut p = Problem::new(s);
        let mut g = c.benchmark_group(format!("reference.{}.1t", s.name));
        configure(&mut g, big);
        g.sample_size(10);
        bench_base_gemm(&mut g, "base_gemm", &Faer::new(), &p);
        bench_base_gemm(&mut g, "reference_base_gemm", &Reference, &p);
        bench_lora_forward(&mut g, "reference_lora_forward_unmerged", &Reference, &mut p, false);
        g.finish();
    }
}

/// Absolute faer f32 rate, and the reference backend's share of it.
fn gemm_groups(c: &mut Criterion) {
    let s = Shape { name: "t128_1024", tokens: 128, d_in: 1024, d_out: 1024, r: 1 };
    let p = Problem::new(s);
    let mut g = c.benchmark_group("gemm_rate.t128_1024.1t");
    configure(&mut g, false);
    bench_base_gemm(&mut g, "base_gemm", &Faer::new(), &p);
    g.finish();
    let mut g = c.benchmark_group("gemm_rate.t128_1024.2t");
    configure(&mut g, false);
    bench_base_gemm(&mut g, "base_gemm", &Faer::with_threads(2), &p);
    g.finish();

    let s = Shape { name: "t32_768", tokens: 32, d_in: 768, d_out: 768, r: 1 };
    let p = Problem::new(s);
    let mut g = c.benchmark_group("ref_vs_faer.t32_768.1t");
    configure(&mut g, false);
    bench_base_gemm(&mut g, "base_gemm", &Faer::new(), &p);
    bench_base_gemm(&mut g, "reference_base_gemm", &Reference, &p);
    g.finish();
}

/// A method that mixes faer calls with elementwise work: a bottleneck
/// adapter (d = 1024, m = 64, GELU) on 128 tokens. Without `vzeroupper`,
/// the GELU and residual loops (SSE in a default build) run after faer's
/// AVX-512 kernels with dirty upper register state.
fn vzeroupper_group(c: &mut Criterion) {
    const T: usize = 128;
    const D: usize = 1024;
    const M: usize = 64;
    let cfg = AdapterConfig::width(M).with_activation(Activation::GeluErf);
    let mut rng = Rng::new(3);
    let mut v = |n: usize| {
        let mut v = vec![0.0f32; n];
        rng.fill_uniform(&mut v, -0.5, 0.5);
        v
    };
    let (mut wd, mut bd, mut wu, mut bu, x) = (v(M * D), v(M), v(D * M), v(D), v(T * D));
    let params = AdapterParams { w_down: &mut wd, b_down: &mut bd, w_up: &mut wu, b_up: &mut bu };
    let adapter = BottleneckAdapter::new(&cfg, D, params).unwrap();
    let mut h = vec![0.0f32; T * D];
    let mut scratch = vec![0.0f32; adapter.forward_scratch_len(T)];
    let mut g = c.benchmark_group("vzeroupper.adapter_t128_1024_m64.1t");
    configure(&mut g, false);
    g.throughput(Throughput::Elements(2 * 2 * (T * D * M) as u64));
    for (name, backend) in
        [("adapter_forward", Faer::new()), ("adapter_forward_without_vzeroupper", Faer::new().clear_upper(false))]
    {
        g.bench_function(name, |bench| {
            bench.iter(|| {
                let xv = MatRef::new(&x, T, D).unwrap();
                adapter.forward(&backend, xv, MatMut::new(&mut h, T, D).unwrap(), &mut scratch).unwrap();
                black_box(&h);
            })
        });
    }
    g.finish();
}

/// Opening a base through its shard index against opening the shard
/// alone, at 160k tensors (one shard): the index's checks are linear, so
/// the index costs about as much as the shard's own header (they used to
/// be quadratic: 42 s against 1 s).
fn shard_index_group(c: &mut Criterion) {
    use peft_faer::hf::base::{Base, INDEX_FILE};
    use peft_faer::hf::st::{OutEntry, StFile, header};
    const N: usize = 160_000;
    let dir = std::env::temp_dir().join(format!("peft-bench-index-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let names: Vec<String> = (0..N).map(|i| format!("model.layers.{}.t{i}.weight", i % 80)).collect();
    let entries: Vec<OutEntry> =
        names.iter().map(|n| OutEntry::plain(n.clone(), safetensors::Dtype::F32, vec![1])).collect();
    let mut bytes = header(&entries, &Default::default()).unwrap();
    bytes.resize(bytes.len() + 4 * N, 0);
    let shard = dir.join("model-1.safetensors");
    std::fs::write(&shard, bytes).unwrap();
    let map: serde_json::Map<String, serde_json::Value> =
        names.iter().map(|n| (n.clone(), "model-1.safetensors".into())).collect();
    std::fs::write(dir.join(INDEX_FILE), serde_json::json!({ "weight_map": map }).to_string()).unwrap();
    let mut g = c.benchmark_group("shard_index.t160000");
    g.sample_size(10);
    g.bench_function("open_via_index", |b| b.iter(|| black_box(Base::open(&dir).unwrap())));
    g.bench_function("open_shard", |b| b.iter(|| black_box(StFile::open(&shard).unwrap())));
    g.finish();
    std::fs::remove_dir_all(&dir).ok();
}

/// A mixed-adapter batch: 4 LoRA adapters (r = 16) over 32 tokens each at
/// d = 4096, one thread, against one adapter's forward over the same 128
/// tokens. The base gemm runs once in both; the mixed batch adds three
/// more (small) low-rank paths.
fn mixed_batch_group(c: &mut Criterion) {
    use peft_core::set::{Route, VecSet};
    let s = SHAPES[0];
    let p = Problem::new(s);
    let backend = Faer::with_threads(1);
    let base = Dense::new(&p.w, s.d_out, s.d_in).unwrap();
    let cfg = LoraConfig::new(s.r, 2.0 * s.r as f64);
    let mut rng = Rng::new(11);
    let mut set: VecSet<String, f32, Vec<f32>> = VecSet::new(s.d_in, s.d_out);
    for i in 0..4 {
        let mut a = vec![0.0f32; s.r * s.d_in];
        let mut b = vec![0.0f32; s.d_out * s.r];
        rng.fill_uniform(&mut a, -0.5, 0.5);
        rng.fill_uniform(&mut b, -0.5, 0.5);
        set.insert(format!("a{i}"), Lora::new(&cfg, s.d_in, s.d_out, a, b).unwrap()).unwrap();
    }
    let routes = [Route::adapter(32, 0), Route::adapter(32, 1), Route::adapter(32, 2), Route::adapter(32, 3)];
    let single = Lora::new(&cfg, s.d_in, s.d_out, &p.a[..], &p.b[..]).unwrap();
    let x = MatRef::new(&p.x, s.tokens, s.d_in).unwrap();
    let mut y = vec![0.0f32; s.tokens * s.d_out];
    let mut scratch = vec![0.0f32; set.mixed_forward_scratch_len(&routes).max(single.forward_scratch_len(s.tokens))];
    let mut g = c.benchmark_group("mixed_batch.t128_4096_r16x4.1t");
    configure(&mut g, true);
    g.throughput(Throughput::Elements(s.lora_forward_flops()));
    g.bench_function("single_forward", |bench| {
        bench.iter(|| {
            let yv = MatMut::new(&mut y, s.tokens, s.d_out).unwrap();
            single.forward(&backend, &base, x, yv, &mut scratch).unwrap();
            black_box(&y);
        })
    });
    g.bench_function("mixed_forward", |bench| {
        bench.iter(|| {
            let yv = MatMut::new(&mut y, s.tokens, s.d_out).unwrap();
            set.forward_mixed(&backend, &base, x, yv, &routes, &mut scratch).unwrap();
            black_box(&y);
        })
    });
    g.finish();
}

/// DoRA's unmerged forward (norms cached by `refresh_norms`, as they are
/// between optimizer steps) against LoRA's, t = 128, d = 4096, r = 16, one
/// thread: DoRA adds one scaling of the output per element.
fn dora_group(c: &mut Criterion) {
    use peft_core::dora::{Dora, refresh_scratch_len};
    let s = SHAPES[0];
    let p = Problem::new(s);
    let backend = Faer::with_threads(1);
    let base = Dense::new(&p.w, s.d_out, s.d_in).unwrap();
    let cfg = LoraConfig::new(s.r, 2.0 * s.r as f64);
    let lora = Lora::new(&cfg, s.d_in, s.d_out, &p.a[..], &p.b[..]).unwrap();
    let mut rng = Rng::new(5);
    let mut m = vec![0.0f32; s.d_out];
    rng.fill_uniform(&mut m, 0.5, 1.5);
    let mut dora = Dora::new(&cfg, s.d_in, s.d_out, &p.a[..], &p.b[..], &m[..], vec![0.0f32; s.d_out]).unwrap();
    let mut sc = vec![0.0f32; refresh_scratch_len(&base, 64)];
    dora.refresh_norms(&backend, &base, &mut sc).unwrap();
    let x = MatRef::new(&p.x, s.tokens, s.d_in).unwrap();
    let mut y = vec![0.0f32; s.tokens * s.d_out];
    let mut scratch = vec![0.0f32; lora.forward_scratch_len(s.tokens)];
    let mut g = c.benchmark_group("dora_forward.t128_4096_r16.1t");
    configure(&mut g, true);
    g.throughput(Throughput::Elements(s.lora_forward_flops()));
    bench_adapter_forward(&mut g, "lora_forward", &backend, &base, x, &mut y, &mut scratch, &lora);
    bench_adapter_forward(&mut g, "dora_forward", &backend, &base, x, &mut y, &mut scratch, &dora);
    g.finish();
}

/// One method's unmerged forward over `base`, `y = f(x)`.
#[allow(clippy::too_many_arguments)]
fn bench_adapter_forward<A: LinearAdapter<f32>>(
    g: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    backend: &Faer,
    base: &Dense<'_, f32>,
    x: MatRef<'_, f32>,
    y: &mut [f32],
    scratch: &mut [f32],
    layer: &A,
) {
    let (t, n_out) = (x.rows(), layer.out_features());
    g.bench_function(name, |bench| {
        bench.iter(|| {
            let yv = MatMut::new(&mut *y, t, n_out).unwrap();
            layer.forward(backend, base, x, yv, &mut *scratch).unwrap();
            black_box(&*y);
        })
    });
}

/// Each newer method's unmerged forward against LoRA's, t = 128, d = 4096,
/// r = 16 (or the method's equivalent), one thread (issue 29's target).
fn method_group(c: &mut Criterion) {
    use peft_core::adalora::{AdaLora, scale};
    use peft_core::boft::Boft;
    use peft_core::c3a::C3a;
    use peft_core::fourierft::FourierFt;
    use peft_core::hra::Hra;
    use peft_core::miss::{Miss, MissVariant};
    use peft_core::oft::{Cayley, Oft, OftSpec};
    use peft_core::randlora::{RandLora, RandLoraBases};
    use peft_core::road::{Road, RoadVariant};
    use peft_core::shira::Shira;
    use peft_core::vblora::VbLora;
    let s = SHAPES[0];
    let p = Problem::new(s);
    let backend = Faer::with_threads(1);
    let base = Dense::new(&p.w, s.d_out, s.d_in).unwrap();
    let lora = Lora::new(&LoraConfig::new(s.r, 2.0 * s.r as f64), s.d_in, s.d_out, &p.a[..], &p.b[..]).unwrap();
    let mut e = vec![0.0f32; s.r];
    Rng::new(6).fill_uniform(&mut e, -1.0, 1.0);
    let ada_scale = scale(2.0 * s.r as f64, s.r).unwrap();
    let ada = AdaLora::new(s.r, s.d_in, s.d_out, ada_scale, &p.a[..], &e[..], &p.b[..]).unwrap();
    let x = MatRef::new(&p.x, s.tokens, s.d_in).unwrap();
    let mut y = vec![0.0f32; s.tokens * s.d_out];
    let mut scratch = vec![0.0f32; ada.forward_scratch_len(s.tokens).max(lora.forward_scratch_len(s.tokens))];
    let mut g = c.benchmark_group("method_forward.t128_4096_r16.1t");
    configure(&mut g, true);
    g.throughput(Throughput::Elements(s.lora_forward_flops()));
    bench_adapter_forward(&mut g, "lora_forward", &backend, &base, x, &mut y, &mut scratch, &lora);
    bench_adapter_forward(&mut g, "adalora_forward", &backend, &base, x, &mut y, &mut scratch, &ada);
    // MiSS balance at r = 16: D [16, out], the same count as LoRA's B.
    let miss = Miss::new(MissVariant::Balance, s.r, s.d_in, s.d_out, &p.b[..]).unwrap();
    let mut miss_scratch = vec![0.0f32; miss.forward_scratch_len(s.tokens)];
    bench_adapter_forward(&mut g, "miss_forward", &backend, &base, x, &mut y, &mut miss_scratch, &miss);
    // HRA at r = 16 reflections over a [4096, 16] U (p.a is [16, 4096]: same count).
    let hra = Hra::new(s.r, s.d_in, s.d_out, false, &p.a[..]).unwrap();
    let mut hra_scratch = vec![0.0f32; hra.forward_scratch_len(s.tokens)];
    bench_adapter_forward(&mut g, "hra_forward", &backend, &base, x, &mut y, &mut hra_scratch, &hra);
    // RoAd road_2 (one angle and scale per output; r has no meaning here).
    let (theta, alpha) = (vec![0.3f32; s.d_out], vec![1.1f32; s.d_out]);
    let road = Road::new(RoadVariant::Road2, 64, s.d_in, s.d_out, &theta[..], &alpha[..]).unwrap();
    let mut road_scratch = vec![0.0f32; road.forward_scratch_len(s.tokens)];
    bench_adapter_forward(&mut g, "road_forward", &backend, &base, x, &mut y, &mut road_scratch, &road);
    // C3A in blocks of 256 (PEFT's default): out in / 256 = 65536 parameters.
    let kernel = vec![0.01f32; s.d_out / 256 * s.d_in];
    let c3a = C3a::new(256, s.d_in, s.d_out, &kernel[..]).unwrap();
    let mut c3a_scratch = vec![0.0f32; c3a.forward_scratch_len(s.tokens)];
    bench_adapter_forward(&mut g, "c3a_forward", &backend, &base, x, &mut y, &mut c3a_scratch, &c3a);
    // SHiRA at r = 16: r (in + out) = 131072 positions, every 128th of W.
    let n = s.r * (s.d_in + s.d_out);
    let (rows, cols): (Vec<u32>, Vec<u32>) =
        (0..n).map(|k| ((k * 128 / s.d_in) as u32, (k * 128 % s.d_in) as u32)).unzip();
    let vals = vec![0.01f32; n];
    let shira = Shira::new(s.d_in, s.d_out, 1.0, &vals[..], &rows[..], &cols[..]).unwrap();
    let mut shira_scratch = vec![0.0f32; shira.forward_scratch_len(s.tokens)];
    bench_adapter_forward(&mut g, "shira_forward", &backend, &base, x, &mut y, &mut shira_scratch, &shira);
    // OFT in blocks of 32 (PEFT's default oft_block_size), 5 terms: in / 32 * 496 = 63488 parameters.
    let spec = OftSpec { block: 32, shared: false, cayley: Cayley::Neumann { terms: 5 }, coft_eps: None };
    let v = vec![0.01f32; s.d_in / 32 * 496];
    let oft = Oft::new(spec, s.d_in, s.d_out, &v[..]).unwrap();
    let mut oft_scratch = vec![0.0f32; oft.forward_scratch_len(s.tokens)];
    bench_adapter_forward(&mut g, "oft_forward", &backend, &base, x, &mut y, &mut oft_scratch, &oft);
    // BOFT: PEFT's defaults (blocks of 4, one factor), and a butterfly of two factors in blocks of 8.
    let s_out = vec![1.0f32; s.d_out];
    for (name, f, b) in [("boft_forward", 1, 4), ("boft_butterfly_forward", 2, 8)] {
        let r = vec![0.01f32; f * s.d_in * b];
        let boft = Boft::new(f, b, s.d_in, s.d_out, &r[..], &s_out[..]).unwrap();
        let mut sc = vec![0.0f32; boft.forward_scratch_len(s.tokens)];
        bench_adapter_forward(&mut g, name, &backend, &base, x, &mut y, &mut sc, &boft);
    }
    // FourierFT at PEFT's default 1000 frequencies (every 16771st position: spread over rows and columns).
    let (rows, cols): (Vec<u32>, Vec<u32>) =
        (0..1000u64).map(|k| ((k * 16771 / s.d_in as u64) as u32, (k * 16771 % s.d_in as u64) as u32)).unzip();
    let spectrum = vec![0.01f32; 1000];
    let fourierft = FourierFt::new(s.d_in, s.d_out, 150.0, &spectrum[..], &rows[..], &cols[..]).unwrap();
    let mut fourierft_scratch = vec![0.0f32; fourierft.forward_scratch_len(s.tokens)];
    bench_adapter_forward(&mut g, "fourierft_forward", &backend, &base, x, &mut y, &mut fourierft_scratch, &fourierft);
    // RandLoRA at PEFT's default r = 32: nb = 128 blocks, J = 4096 (full rank).
    let (rr, nb) = (32, s.d_in.min(s.d_out).div_ceil(32));
    let (ba, bb) = (vec![0.5f32; rr * s.d_in], vec![0.5f32; s.d_out * nb * rr]);
    let bases = RandLoraBases::new(rr, s.d_in.min(s.d_out), s.d_in.max(s.d_out), nb, &ba[..], &bb[..]).unwrap();
    let (lam, gam) = (vec![0.01f32; rr * nb], vec![0.01f32; nb * s.d_in.min(s.d_out)]);
    let randlora = RandLora::new(&bases, s.d_in, s.d_out, 20.0, &lam[..], &gam[..]).unwrap();
    let mut randlora_scratch = vec![0.0f32; randlora.forward_scratch_len(s.tokens)];
    bench_adapter_forward(&mut g, "randlora_forward", &backend, &base, x, &mut y, &mut randlora_scratch, &randlora);
    // VB-LoRA at r = 16 over PEFT's default bank (256 vectors of 256), top 2.
    let bank = vec![0.01f32; 256 * 256];
    let (la, lb) = (vec![0.1f32; 16 * (s.d_in / 256) * 256], vec![0.1f32; (s.d_out / 256) * 16 * 256]);
    let vblora = VbLora::new(16, 256, 2, s.d_in, s.d_out, &bank[..], &la[..], &lb[..]).unwrap();
    let mut vblora_scratch = vec![0.0f32; vblora.forward_scratch_len(s.tokens)];
    bench_adapter_forward(&mut g, "vblora_forward", &backend, &base, x, &mut y, &mut vblora_scratch, &vblora);
    // LN tuning: its forward is the tuned norm's (a LayerNorm with a bias
    // over the layer's input rows), the whole of what it adds to a model.
    let (lw, lb) = (vec![1.1f32; s.d_in], vec![0.1f32; s.d_in]);
    let ln =
        peft_core::ln_tuning::LnTuning::new(peft_core::ln_tuning::Norm::Layer, s.d_in, 1e-5, &lw[..], Some(&lb[..]));
    let (ln, mut ly) = (ln.unwrap(), vec![0.0f32; s.tokens * s.d_in]);
    g.bench_function("ln_tuning_forward", |bench| {
        bench.iter(|| {
            ln.forward(x, MatMut::new(&mut ly, s.tokens, s.d_in).unwrap()).unwrap();
            black_box(&ly);
        })
    });
    // Trainable tokens: the lookup of `tokens` ids in a table of `d_out`
    // rows (the layer's weight), 16 of whose rows are trained, every
    // fourth id one of them.
    let (indices, rows) = ((0..16u32).map(|i| 7 * i).collect::<Vec<_>>(), vec![0.5f32; 16 * s.d_in]);
    let tt = peft_core::trainable_tokens::TrainableTokens::new(s.d_out, s.d_in, &indices[..], &rows[..]).unwrap();
    let ids: Vec<usize> = (0..s.tokens).map(|t| if t % 4 == 0 { 7 * (t % 16) } else { (31 * t) % s.d_out }).collect();
    g.bench_function("trainable_tokens_forward", |bench| {
        bench.iter(|| {
            tt.forward(&p.w, &ids, MatMut::new(&mut ly, s.tokens, s.d_in).unwrap()).unwrap();
            black_box(&ly);
        })
    });
    g.finish();
}

/// SmolLM2-135M-Instruct's configuration (its `config.json`'s fields that
/// shape the model).
fn smollm2_135m() -> LlamaConfig {
    LlamaConfig::parse(
        r#"{"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
            "num_attention_heads": 9, "num_key_value_heads": 3, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
            "tie_word_embeddings": true}"#,
    )
    .unwrap()
}

/// Issue 31's model-level figures at SmolLM2-135M's shapes, random weights
/// (the speed does not depend on the values): prefill and decode in f32,
/// q8_0 and q4_0, plain and with a hosted LoRA, at 1 and 2 threads; a LoRA
/// training step in f32. Peers (llama.cpp, transformers) are not run here.
fn model_groups(c: &mut Criterion) {
    use peft_core::storage::Format;
    use peft_faer::llama::train::{MethodSetup, init_adapter};
    use peft_faer::llama::{KvCache, Llama, LlamaAdapter, LlamaGrads, Trace, lm_loss};
    let f32_model = Llama::random(smollm2_135m(), 31);
    let setup = MethodSetup::Lora { r: 16, alpha: 32.0, dora: false, targets: vec!["q_proj".into(), "v_proj".into()] };
    let mut rng = Rng::new(3);
    let ids: Vec<u32> = (0..129).map(|_| (rng.next_u64() % 49152) as u32).collect();
    let (prompt, next) = (&ids[..128], &ids[128..]);
    for (name, format) in [("f32", Format::F32), ("q8_0", Format::Q8_0), ("q4_0", Format::Q4_0)] {
        let model = if format == Format::F32 { f32_model.clone() } else { f32_model.quantized(format).unwrap() };
        let adapter = init_adapter(&model, &setup, 5).unwrap();
        let lora = LlamaAdapter::new(&model, &adapter).unwrap();
        let mut g = c.benchmark_group(format!("model.smollm2_135m.{name}"));
        g.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
        for threads in [1, 2] {
            let be = Faer::with_threads(threads);
            for (tag, a) in [("", None), ("_lora", Some(&lora))] {
                g.bench_function(format!("prefill{tag}_{threads}t"), |b| {
                    b.iter(|| black_box(model.forward_last(&be, prompt, a, &mut KvCache::new()).unwrap()))
                });
                let mut cache = KvCache::new();
                model.forward_last(&be, prompt, a, &mut cache).unwrap();
                g.bench_function(format!("decode{tag}_{threads}t"), |b| {
                    b.iter_batched_ref(
                        || cache.clone(),
                        |c| black_box(model.forward_last(&be, next, a, c).unwrap()),
                        criterion::BatchSize::LargeInput,
                    )
                });
            }
            if format != Format::F32 {
                // The opt-in integer path (int8 activations), and the
                // memory limit it is held to: one read of every byte a
                // decode step multiplies by, over the same threads.
                let fast = be.int8_activations(true);
                let mut cache = KvCache::new();
                model.forward_last(&be, prompt, None, &mut cache).unwrap();
                g.bench_function(format!("decode_int8_{threads}t"), |b| {
                    b.iter_batched_ref(
                        || cache.clone(),
                        |c| black_box(model.forward_last(&fast, next, None, c).unwrap()),
                        criterion::BatchSize::LargeInput,
                    )
                });
                let mats = model.decode_matrices();
                g.bench_function(format!("stream_weights_{threads}t"), |b| {
                    b.iter(|| black_box(stream_matrices(&mats, threads)))
                });
            }
        }
        g.finish();
    }
    // One training step: 8 sequences of 16 tokens in one pass, the loss's
    // gradient through the adapter (what `peft sft` runs per micro-batch).
    let adapter = init_adapter(&f32_model, &setup, 5).unwrap();
    let lora = LlamaAdapter::new(&f32_model, &adapter).unwrap();
    let seqs: Vec<&[u32]> = ids[..128].chunks(16).collect();
    let mut g = c.benchmark_group("model_train.smollm2_135m.f32");
    g.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(5));
    for threads in [1, 2] {
        let be = Faer::with_threads(threads);
        g.bench_function(format!("lora_step_{threads}t"), |b| {
            b.iter(|| {
                let mut trace = Trace::default();
                let logits = f32_model.forward_traced_batch(&be, &seqs, Some(&lora), &mut trace).unwrap();
                let mut dl = vec![0.0f32; logits.len()];
                for (k, s) in seqs.iter().enumerate() {
                    let rows = k * 16 * 49152..(k + 1) * 16 * 49152;
                    lm_loss(&logits[rows.clone()], 49152, 0, s, Some(&mut dl[rows]));
                }
                let mut grads = LlamaGrads::zeros(&lora);
                f32_model.backward(&be, Some(&lora), &trace, &dl, Some(&mut grads)).unwrap();
                black_box(grads)
            })
        });
    }
    g.finish();
}

/// One read of every byte of `b`: a sum the compiler vectorizes.
fn stream_bytes(b: &[u8]) -> u64 {
    u64::from(b.iter().fold(0u32, |a, v| a.wrapping_add(u32::from(*v))))
}

/// One read of every byte of `b`: a sum of its 8-byte words in four
/// independent chains, which the compiler vectorizes (16 bytes per add on
/// the baseline target, 2 to 8 times fewer operations than
/// [`stream_bytes`]'s widening byte sum: the loads set the pace). The
/// model-level memory limit.
fn stream_words(b: &[u8]) -> u64 {
    let mut acc = [0u64; 4];
    let mut chunks = b.chunks_exact(32);
    for c in &mut chunks {
        for (a, w) in acc.iter_mut().zip(c.chunks_exact(8)) {
            *a = a.wrapping_add(u64::from_le_bytes(w.try_into().unwrap_or([0; 8])));
        }
    }
    let tail = chunks.remainder().iter().fold(0u64, |a, v| a.wrapping_add(u64::from(*v)));
    acc.iter().fold(tail, |a, v| a.wrapping_add(*v))
}

/// One read of every stored byte of `st` (the memory-bound limit of a pass
/// over `W`): a sum the compiler vectorizes.
fn stream(st: &OwnedWeight) -> u64 {
    stream_owned(st.data())
}

/// One read of every byte of `mats`; with two threads, each reads one
/// half of every block-format matrix (as a decode step's products are
/// split by rows), the element formats on the first.
fn stream_matrices(mats: &[&peft_faer::llama::Matrix], threads: usize) -> u64 {
    fn blocks(m: &peft_faer::llama::Matrix) -> Option<&[u8]> {
        match &m.data {
            Owned::Q8_0(b) | Owned::Q4_0(b) | Owned::Blocks(_, b) => Some(b),
            _ => None,
        }
    }
    let half = |second: bool| {
        mats.iter().fold(0u64, |a, m| {
            let s = match blocks(m) {
                Some(b) if second => stream_words(&b[b.len() / 2..]),
                Some(b) if threads > 1 => stream_words(&b[..b.len() / 2]),
                Some(b) => stream_words(b),
                _ if second => 0,
                _ => stream_owned(&m.data),
            };
            a.wrapping_add(s)
        })
    };
    if threads <= 1 {
        return half(false);
    }
    std::thread::scope(|s| {
        let h = s.spawn(|| half(true));
        half(false).wrapping_add(h.join().unwrap_or(0))
    })
}

/// One read of every stored byte of `data`: a sum the compiler vectorizes.
fn stream_owned(data: &Owned) -> u64 {
    let bytes = |b: &[u8]| b.iter().fold(0u32, |a, v| a.wrapping_add(u32::from(*v)));
    let sum = match data {
        Owned::F32(f) => f.iter().fold(0u32, |a, v| a.wrapping_add(v.to_bits())),
        Owned::F16(h) | Owned::Bf16(h) => h.iter().fold(0u32, |a, v| a.wrapping_add(u32::from(*v))),
        Owned::Int8(q, s) => {
            let q = q.iter().fold(0u32, |a, v| a.wrapping_add(*v as u8 as u32));
            q.wrapping_add(s.iter().fold(0u32, |a, v| a.wrapping_add(v.to_bits())))
        }
        Owned::Q8_0(b) | Owned::Q4_0(b) | Owned::Blocks(_, b) => bytes(b),
    };
    u64::from(sum)
}

/// LoRA's forward over a stored base: `x deq(W)^T + s (x A^T) B^T`.
fn stored_lora_forward<B: Backend<f32>>(
    backend: &B,
    lora: &Lora<f32, &[f32]>,
    w: peft_core::storage::StoredWeight<'_>,
    x: MatRef<'_, f32>,
    y: &mut [f32],
    scratch: &mut [f32],
) {
    let base = peft_core::storage::StoredLinear::<f32>::new(w);
    let yv = MatMut::new(y, x.rows(), w.out_features()).unwrap();
    assert!(lora.forward(backend, &base, x, yv, scratch).is_ok());
}

/// Stored bases, one thread: each format's LoRA forward at t = 1 against a
/// single read of its bytes and against the portable reference kernels;
/// then bf16 and q4_0 (t = 1) and bf16 and q8_0 (t = 128) against f32.
fn storage_groups(c: &mut Criterion) {
    use peft_core::storage::Format;
    let (d, r) = (4096, 16);
    let backend = Faer::with_threads(1);
    let mut rng = Rng::new(11);
    let mut v = |n: usize| {
        let mut v = vec![0.0f32; n];
        rng.fill_uniform(&mut v, -0.5, 0.5);
        v
    };
    let (w, a, b, x) = (v(d * d), v(r * d), v(d * r), v(128 * d));
    let cfg = LoraConfig::new(r, 2.0 * r as f64);
    let lora = Lora::new(&cfg, d, d, &a[..], &b[..]).unwrap();
    let mut y = vec![0.0f32; 128 * d];
    let mut scratch = vec![0.0f32; lora.forward_scratch_len(128)];
    let x1 = MatRef::new(&x[..d], 1, d).unwrap();
    let stored: Vec<(Format, OwnedWeight)> =
        Format::QUANTIZERS.iter().map(|&f| (f, OwnedWeight::quantize(f, &w, d, d).unwrap())).collect();
    let flops = 2 * (d * d + r * 2 * d) as u64;
    for (format, st) in stored.iter().filter(|(f, _)| *f != Format::F32) {
        let mut g = c.benchmark_group(format!("storage.t1_4096_r16.{}.1t", format.name()));
        configure(&mut g, true);
        g.throughput(Throughput::Elements(flops));
        g.bench_function("stream", |bench| bench.iter(|| black_box(stream(st))));
        g.bench_function("lora_forward", |bench| {
            bench.iter(|| stored_lora_forward(&backend, &lora, st.weight().unwrap(), x1, &mut y[..d], &mut scratch))
        });
        g.bench_function("reference_lora_forward", |bench| {
            bench.iter(|| stored_lora_forward(&Reference, &lora, st.weight().unwrap(), x1, &mut y[..d], &mut scratch))
        });
        g.finish();
    }
    let find = |f: Format| &stored.iter().find(|(g, _)| *g == f).unwrap().1;
    for (tokens, formats) in [(1usize, [Format::Bf16, Format::Q4_0]), (128, [Format::Bf16, Format::Q8_0])] {
        let mut g = c.benchmark_group(format!("storage_vs_f32_t{tokens}.d4096_r16.1t"));
        configure(&mut g, true);
        g.throughput(Throughput::Elements(flops * tokens as u64));
        let xt = MatRef::new(&x[..tokens * d], tokens, d).unwrap();
        for f in [Format::F32, formats[0], formats[1]] {
            let st = find(f);
            g.bench_function(format!("{}_lora_forward", f.name()), |bench| {
                bench.iter(|| {
                    stored_lora_forward(&backend, &lora, st.weight().unwrap(), xt, &mut y[..tokens * d], &mut scratch)
                })
            });
        }
        g.finish();
    }
}

/// GGUF's formats, one thread, one token: the product `x deq(W)^T` over
/// llama.cpp's blocks against one read of the stored bytes, at SmolLM2's
/// `down_proj` (1536 in, 576 out: 1536 is whole K-quant super-blocks;
/// SmolLM2's hidden 576 is not) and at 4096 x 4096. The blocks are random
/// bytes with finite scales (the kernels' cost does not depend on the
/// values).
fn gguf_groups(c: &mut Criterion) {
    use peft_core::FrozenLinear;
    use peft_core::storage::{Format, StoredLinear, StoredWeight};
    let backend = Faer::with_threads(1);
    let mut rng = Rng::new(13);
    for (shape, out, inn) in [("smollm2_down_576x1536", 576usize, 1536usize), ("4096x4096", 4096, 4096)] {
        let mut x = vec![0.0f32; inn];
        rng.fill_uniform(&mut x, -1.0, 1.0);
        let xv = MatRef::new(&x, 1, inn).unwrap();
        let mut y = vec![0.0f32; out];
        for format in [Format::Q8_0, Format::Q4_1, Format::Q4_K, Format::Q6_K] {
            let (_, size) = format.block();
            let len = out * format.row_bytes(inn).unwrap();
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            for block in bytes.chunks_exact_mut(size) {
                for &at in peft_core::storage::ggml::half_fields(format) {
                    let h = half::f16::from_f32(0.01 + (rng.next_u64() % 100) as f32 * 1e-4);
                    block[at..at + 2].copy_from_slice(&h.to_le_bytes());
                }
            }
            let base = StoredLinear::<f32>::new(StoredWeight::blocks(format, &bytes, out, inn).unwrap());
            let mut g = c.benchmark_group(format!("gguf.t1_{shape}.{}.1t", format.name()));
            configure(&mut g, true);
            g.throughput(Throughput::Elements(2 * (out * inn) as u64));
            g.bench_function("stream", |bench| bench.iter(|| black_box(stream_bytes(&bytes))));
            g.bench_function("forward", |bench| {
                bench.iter(|| {
                    base.forward(&backend, xv, MatMut::new(&mut y, 1, out).unwrap()).unwrap();
                    black_box(&y);
                })
            });
            g.finish();
        }
    }
}

// `criterion_group!` makes an undocumented `pub fn`; it lives in a private
// module so the missing-docs lint has nothing to say.
mod group {
    use super::*;
    criterion_group!(
        benches,
        gemm_groups,
        vzeroupper_group,
        lora_groups,
        dora_group,
        method_group,
        mixed_batch_group,
        storage_groups,
        gguf_groups,
        model_groups,
        shard_index_group
    );
}
criterion_main!(group::benches);
