//! Hot swap: one adapter of a set is replaced, again and again, while other
//! threads run forwards through the same base (one without the set, the
//! others through the set behind a lock). Each reader sees the old adapter
//! or the new one, bit for bit, never a mix, and the base is never
//! disturbed.

use peft_core::method::LinearAdapter;
use std::sync::RwLock;

use peft_core::lora::{Lora, LoraConfig};
use peft_core::set::VecSet;
use peft_core::{Dense, FrozenLinear, MatMut, MatRef, Rng};
use peft_faer::Faer;

const D: usize = 48;
const T: usize = 4;
const R: usize = 4;

fn uniform(rng: &mut Rng, n: usize) -> Vec<f32> {
    let mut v = vec![0.0f32; n];
    rng.fill_uniform(&mut v, -0.5, 0.5);
    v
}

fn adapter(rng: &mut Rng) -> Lora<f32, Vec<f32>> {
    Lora::new(&LoraConfig::new(R, 8.0), D, D, uniform(rng, R * D), uniform(rng, D * R)).unwrap()
}

#[test]
fn readers_see_whole_adapters_while_one_is_swapped() {
    let mut rng = Rng::new(3);
    // The base lives for the whole program, as a checkpoint mapped once.
    let w: &'static [f32] = Vec::leak(uniform(&mut rng, D * D));
    let base = Dense::new(w, D, D).unwrap();
    let x = uniform(&mut rng, T * D);
    let xv = MatRef::new(&x, T, D).unwrap();
    let backend = Faer::with_threads(1);
    let (old, new) = (adapter(&mut rng), adapter(&mut rng));
    let run = |lora: &Lora<f32, Vec<f32>>| {
        let mut y = vec![0.0f32; T * D];
        let mut scratch = vec![0.0f32; lora.forward_scratch_len(T)];
        lora.forward(&backend, &base, xv, MatMut::new(&mut y, T, D).unwrap(), &mut scratch).unwrap();
        y
    };
    let (y_old, y_new) = (run(&old), run(&new));
    assert_ne!(y_old, y_new);
    let mut y_base = vec![0.0f32; T * D];
    base.forward(&backend, xv, MatMut::new(&mut y_base, T, D).unwrap()).unwrap();

    let mut set: VecSet<String, f32, Vec<f32>> = VecSet::new(D, D);
    set.insert("task".into(), old.clone()).unwrap();
    set.activate("task").unwrap();
    let set = RwLock::new(set);
    let swaps = 200;
    std::thread::scope(|s| {
        let readers: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    let (mut seen_old, mut seen_new) = (0, 0);
                    let mut y = vec![0.0f32; T * D];
                    let mut scratch = vec![0.0f32; R * T];
                    for _ in 0..2 * swaps {
                        let guard = set.read().unwrap();
                        guard.forward(&backend, &base, xv, MatMut::new(&mut y, T, D).unwrap(), &mut scratch).unwrap();
                        drop(guard);
                        if y == y_old {
                            seen_old += 1;
                        } else if y == y_new {
                            seen_new += 1;
                        } else {
                            panic!("a reader saw neither the old nor the new adapter");
                        }
                    }
                    (seen_old, seen_new)
                })
            })
            .collect();
        // A reader of the base alone, outside the set and its lock.
        let plain = s.spawn(|| {
            let mut y = vec![0.0f32; T * D];
            for _ in 0..2 * swaps {
                base.forward(&backend, xv, MatMut::new(&mut y, T, D).unwrap()).unwrap();
                assert_eq!(y, y_base, "the base changed under a swap");
            }
        });
        let mut current_is_new = false;
        for _ in 0..swaps {
            let next = if current_is_new { old.clone() } else { new.clone() };
            let _previous = set.write().unwrap().replace("task", next).unwrap();
            current_is_new = !current_is_new;
        }
        plain.join().unwrap();
        for r in readers {
            let (o, n) = r.join().unwrap();
            assert_eq!(o + n, 2 * swaps);
        }
    });
    assert_eq!(set.read().unwrap().get("task").unwrap().lora().lora_a(), old.lora_a(), "an even number of swaps");
}
