//! The faer backend does not allocate per call: a counting global allocator
//! sees zero allocations across LoRA forward (unmerged and merged),
//! backward (dA, dB, dx) and merge/unmerge, in f32 and in bf16 (staged), once
//! the first call has warmed up faer's per-thread state.
//!
//! One test in its own binary, so no other test's threads allocate while it
//! counts.
use peft_core::method::{LinearAdapter, MergeTarget, WeightUpdate};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use half::bf16;
use peft_core::lora::{Lora, LoraConfig, LoraGrads};
use peft_core::{Backend, Dense, Element, MatMut, MatRef, Rng};
use peft_faer::{Faer, FaerHalf};

struct Counting;

static ALLOCS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to `System` unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const T: usize = 48;
const IN: usize = 96;
const OUT: usize = 80;
const R: usize = 8;

/// One LoRA training-and-deployment round: forward, backward with dx,
/// merge with backup, merged forward, unmerge. Returns the allocations it
/// made.
fn round<E: Element, B: Backend<E>>(backend: &B, seed: u64) -> usize {
    let mut rng = Rng::new(seed);
    let mut buf = |n: usize| {
        let mut v = vec![E::ZERO; n];
        rng.fill_uniform(&mut v, -1.0, 1.0);
        v
    };
    let (mut w, mut a, mut b, x, gy) = (buf(OUT * IN), buf(R * IN), buf(OUT * R), buf(T * IN), buf(T * OUT));
    let (mut y, mut gx, mut ga, mut gb, mut backup) = (
        vec![E::ZERO; T * OUT],
        vec![E::ZERO; T * IN],
        vec![E::ZERO; R * IN],
        vec![E::ZERO; OUT * R],
        vec![E::ZERO; OUT * IN],
    );
    let cfg = LoraConfig::new(R, 16.0);
    let layer = Lora::new(&cfg, IN, OUT, &mut a[..], &mut b[..]).unwrap();
    let mut scratch = vec![E::ZERO; layer.backward_scratch_len(T).max(layer.forward_scratch_len(T))];
    let xv = MatRef::new(&x, T, IN).unwrap();

    let before = ALLOCS.load(Ordering::SeqCst);
    {
        let base = Dense::new(&w, OUT, IN).unwrap();
        layer.forward(backend, &base, xv, MatMut::new(&mut y, T, OUT).unwrap(), &mut scratch).unwrap();
        let grads = LoraGrads::new(&mut ga, &mut gb);
        let gxv = MatMut::new(&mut gx, T, IN).unwrap();
        let gyv = MatRef::new(&gy, T, OUT).unwrap();
        layer.backward(backend, &base, xv, gyv, Some(gxv), grads, &mut scratch).unwrap();
    }
    let merged = layer.merge_into(backend, MergeTarget::new(&mut w).with_backup(&mut backup), &mut []).unwrap();
    merged.forward(xv, MatMut::new(&mut y, T, OUT).unwrap()).unwrap();
    merged.unmerge().unwrap();
    ALLOCS.load(Ordering::SeqCst) - before
}

#[test]
fn lora_through_faer_does_not_allocate() {
    let faer = Faer::new();
    // Warm-up: faer sizes its per-thread packing buffers on first use.
    round::<f32, _>(&faer, 1);
    assert_eq!(round::<f32, _>(&faer, 2), 0, "f32 allocations");

    let staging = vec![0.0f32; FaerHalf::<Vec<f32>>::staging_len(T, OUT, IN)];
    let half = FaerHalf::new(faer, staging);
    round::<bf16, _>(&half, 3);
    assert_eq!(round::<bf16, _>(&half, 4), 0, "bf16 allocations");
}
