//! Adapter-set unit tests. The `FixedSet` tests use no heap: arrays for the
//! adapters, a `static` base, `&'static str` names.

use super::*;
use crate::backend::Reference;
use crate::base::Dense;
use crate::lora::LoraConfig;
use crate::matrix::{MatMut, MatRef};

/// The identity 2 x 2, in "flash".
static W: [f32; 4] = [1.0, 0.0, 0.0, 1.0];

/// Rank 1, alpha 1: s = 1, delta y = (x . A) B.
fn rank1(a: [f32; 2], b: [f32; 2]) -> Lora<f32, [f32; 2]> {
    Lora::new(&LoraConfig::new(1, 1.0), 2, 2, a, b).unwrap()
}

fn run<C: SlotStore<AdapterSlot<&'static str, f32, [f32; 2]>>>(
    set: &AdapterSet<&'static str, f32, [f32; 2], C>,
) -> [f32; 2] {
    let base = Dense::new(&W, 2, 2).unwrap();
    let x = [1.0f32, 2.0];
    let mut y = [f32::NAN; 2];
    let mut scratch = [0.0f32; 1];
    let xv = MatRef::new(&x, 1, 2).unwrap();
    set.forward(&Reference, &base, xv, MatMut::new(&mut y, 1, 2).unwrap(), &mut scratch).unwrap();
    y
}

#[test]
fn fixed_set_switches_among_three_adapters_over_a_static_base() {
    // Expected outputs by hand for x = [1, 2], W = I:
    //   up   A=[1,0] B=[1,1]:   x.A = 1 -> [1,2] + [1,1]    = [2, 3]
    //   down A=[0,1] B=[-1,0]:  x.A = 2 -> [1,2] + [-2,0]   = [-1, 2]
    //   mix  A=[1,1] B=[0,.5]:  x.A = 3 -> [1,2] + [0,1.5]  = [1, 3.5]
    let mut set: FixedSet<&'static str, f32, [f32; 2], 3> = FixedSet::new(2, 2);
    assert_eq!(set.insert("up", rank1([1.0, 0.0], [1.0, 1.0])).unwrap(), 0);
    assert_eq!(set.insert("down", rank1([0.0, 1.0], [-1.0, 0.0])).unwrap(), 1);
    assert_eq!(set.insert("mix", rank1([1.0, 1.0], [0.0, 0.5])).unwrap(), 2);
    assert_eq!(run(&set), [1.0, 2.0], "inserted adapters start inactive: the plain base");
    for (name, want) in [("up", [2.0, 3.0]), ("down", [-1.0, 2.0]), ("mix", [1.0, 3.5]), ("up", [2.0, 3.0])] {
        set.activate_only(name).unwrap();
        assert_eq!(run(&set), want, "{name}");
    }
    // Several active: the deltas add ([1,1] + [-2,0]).
    set.activate("down").unwrap();
    assert_eq!(run(&set), [0.0, 3.0]);
    // A multiplier scales one adapter's delta only.
    set.set_multiplier("up", 2.0).unwrap();
    assert_eq!(run(&set), [1.0, 4.0]);
    set.deactivate_all();
    assert_eq!(run(&set), [1.0, 2.0]);
    // Hot swap keeps the slot, the activity and the multiplier.
    set.activate_only("up").unwrap();
    let old = set.replace("up", rank1([0.0, 1.0], [1.0, 0.0])).unwrap();
    assert_eq!(old.lora_a(), &[1.0, 0.0]);
    assert_eq!(run(&set), [5.0, 2.0], "2 * (x.A = 2) * [1, 0] added");
    assert_eq!(set.index_of("up"), Some(0));
}

#[test]
fn refusals_change_nothing_and_give_the_adapter_back() {
    let mut set: FixedSet<&'static str, f32, [f32; 2], 2> = FixedSet::new(2, 2);
    set.insert("a", rank1([1.0, 0.0], [1.0, 1.0])).unwrap();
    set.insert("b", rank1([0.0, 1.0], [1.0, 1.0])).unwrap();
    let full = set.insert("c", rank1([3.0, 3.0], [3.0, 3.0])).unwrap_err();
    assert_eq!(full.error, Error::SetFull { capacity: 2 });
    assert_eq!((full.name, full.lora.lora_a()), ("c", &[3.0f32, 3.0][..]));
    set.remove("a").unwrap();
    let dup = set.insert("b", rank1([3.0, 3.0], [3.0, 3.0])).unwrap_err();
    assert_eq!(dup.error, Error::DuplicateAdapter);
    assert_eq!(set.len(), 1);
    assert_eq!(set.index_of("b"), Some(1), "removing a leaves b's index alone");
    assert_eq!(set.insert("c", rank1([1.0, 1.0], [1.0, 1.0])).unwrap(), 0, "the freed slot is reused");
    assert_eq!(set.activate("zz"), Err(Error::UnknownAdapter));
    assert_eq!(
        set.set_multiplier("b", f64::NAN),
        Err(Error::InvalidParameter { name: "multiplier", rule: "must be finite" })
    );
    assert_eq!(set.get("b").unwrap().multiplier(), 1.0);
    assert_eq!(set.replace("zz", rank1([0.0; 2], [0.0; 2])).unwrap_err().error, Error::UnknownAdapter);
}

#[test]
fn an_adapter_of_another_shape_is_refused() {
    let mut set: FixedSet<&'static str, f32, &'static [f32], 1> = FixedSet::new(2, 2);
    let wide = Lora::new(&LoraConfig::new(1, 1.0), 3, 2, &[1.0f32, 1.0, 1.0][..], &[1.0f32, 0.0][..]).unwrap();
    let e = set.insert("w", wide).unwrap_err();
    assert_eq!(e.error, Error::ShapeMismatch { operand: Operand::Weight, expected: 2, found: 3 });
    assert!(set.is_empty());
}

/// The mixed-batch test holds its adapters in a `VecSet`.
#[cfg(feature = "alloc")]
mod mixed {
    extern crate std;
    use std::vec;
    use std::vec::Vec;

    use super::*;
    use crate::base::FrozenLinear;
    use crate::lora::LoraGrads;
    use crate::method::LinearAdapter;
    use crate::rng::Rng;

    /// f64 data for the mixed-batch tests.
    fn random(rng: &mut Rng, n: usize) -> Vec<f64> {
        (0..n).map(|_| rng.uniform_range(-1.0, 1.0)).collect()
    }

    #[test]
    fn mixed_rows_equal_each_adapters_own_pass() {
        let (n_in, n_out) = (5, 4);
        let mut rng = Rng::new(7);
        let w = random(&mut rng, n_in * n_out);
        let bias = random(&mut rng, n_out);
        let base = Dense::new(&w, n_out, n_in).unwrap().with_bias(&bias).unwrap();
        let mut set: VecSet<std::string::String, f64, Vec<f64>> = VecSet::new(n_in, n_out);
        for (name, r, alpha) in [("a", 2, 3.0), ("b", 3, 1.0), ("c", 1, 2.0)] {
            let lora = Lora::new(
                &LoraConfig::new(r, alpha),
                n_in,
                n_out,
                random(&mut rng, r * n_in),
                random(&mut rng, n_out * r),
            )
            .unwrap();
            set.insert(name.into(), lora).unwrap();
        }
        set.set_multiplier("c", -0.5).unwrap();
        let routes =
            [Route::adapter(2, 0), Route::base(1), Route::adapter(3, 2), Route::adapter(2, 0), Route::adapter(1, 1)];
        let tokens = 9;
        let x = random(&mut rng, tokens * n_in);
        let g = random(&mut rng, tokens * n_out);
        let xv = MatRef::new(&x, tokens, n_in).unwrap();
        let gv = MatRef::new(&g, tokens, n_out).unwrap();
        let mut y = vec![f64::NAN; tokens * n_out];
        let mut scratch = vec![0.0; set.mixed_backward_scratch_len(&routes)];
        set.forward_mixed(&Reference, &base, xv, MatMut::new(&mut y, tokens, n_out).unwrap(), &routes, &mut scratch)
            .unwrap();
        let mut gx = vec![f64::NAN; tokens * n_in];
        let mut grads_a: Vec<Vec<f64>> = set.iter().map(|(_, s)| vec![0.0; s.lora().lora_a().len()]).collect();
        let mut grads_b: Vec<Vec<f64>> = set.iter().map(|(_, s)| vec![0.0; s.lora().lora_b().len()]).collect();
        {
            let mut grads: Vec<Option<LoraGrads<'_, f64>>> =
                grads_a.iter_mut().zip(grads_b.iter_mut()).map(|(a, b)| Some(LoraGrads::new(a, b))).collect();
            grads[1] = None; // b stays frozen
            let gxv = MatMut::new(&mut gx, tokens, n_in).unwrap();
            set.backward_mixed(&Reference, &base, xv, gv, Some(gxv), &mut grads, &routes, &mut scratch).unwrap();
        }
        // Each route against the adapter's own forward and backward on its rows,
        // alone (the multiplier folded into a scaled copy of B).
        let mut want_a: Vec<Vec<f64>> = grads_a.iter().map(|v| vec![0.0; v.len()]).collect();
        let mut want_b: Vec<Vec<f64>> = grads_b.iter().map(|v| vec![0.0; v.len()]).collect();
        let mut start = 0;
        for route in routes {
            let n = route.rows;
            let xs = MatRef::new(&x[start * n_in..(start + n) * n_in], n, n_in).unwrap();
            let gs = MatRef::new(&g[start * n_out..(start + n) * n_out], n, n_out).unwrap();
            let mut ys = vec![0.0; n * n_out];
            let mut gxs = vec![0.0; n * n_in];
            match route.adapter {
                None => {
                    base.forward(&Reference, xs, MatMut::new(&mut ys, n, n_out).unwrap()).unwrap();
                    base.apply_transpose(
                        &Reference,
                        gs,
                        MatMut::new(&mut gxs, n, n_in).unwrap(),
                        crate::Accum::Replace,
                    )
                    .unwrap();
                }
                Some(i) => {
                    let slot = set.slot(i).unwrap();
                    let m = slot.multiplier();
                    let lora = slot.lora();
                    let cfg = LoraConfig::new(lora.rank(), lora.scale() * lora.rank() as f64);
                    let b: Vec<f64> = lora.lora_b().iter().map(|v| v * m).collect();
                    let own = Lora::new(&cfg, n_in, n_out, lora.lora_a().to_vec(), b).unwrap();
                    let mut sc = vec![0.0; own.backward_scratch_len(n)];
                    own.forward(&Reference, &base, xs, MatMut::new(&mut ys, n, n_out).unwrap(), &mut sc).unwrap();
                    let mut ga = vec![0.0; want_a[i].len()];
                    let mut gb = vec![0.0; want_b[i].len()];
                    let grads = LoraGrads::new(&mut ga, &mut gb);
                    own.backward(
                        &Reference,
                        &base,
                        xs,
                        gs,
                        Some(MatMut::new(&mut gxs, n, n_in).unwrap()),
                        grads,
                        &mut sc,
                    )
                    .unwrap();
                    // dB of the scaled copy is m times the set's dB; dA is the same.
                    want_a[i].iter_mut().zip(&ga).for_each(|(w, v)| *w += v);
                    want_b[i].iter_mut().zip(&gb).for_each(|(w, v)| *w += v * m);
                }
            }
            let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(p, q)| (p - q).abs() <= 1e-12 * (1.0 + q.abs()));
            assert!(close(&y[start * n_out..(start + n) * n_out], &ys), "forward rows {start}..{}", start + n);
            assert!(close(&gx[start * n_in..(start + n) * n_in], &gxs), "dx rows {start}..{}", start + n);
            start += n;
        }
        for i in [0, 2] {
            let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(p, q)| (p - q).abs() <= 1e-12 * (1.0 + q.abs()));
            assert!(close(&grads_a[i], &want_a[i]) && close(&grads_b[i], &want_b[i]), "grads of slot {i}");
        }
        assert!(grads_a[1].iter().chain(&grads_b[1]).all(|v| *v == 0.0), "a frozen adapter's buffers stay untouched");
        // Routes that do not cover the batch, or name a free slot, are refused.
        let mut y2 = y.clone();
        let bad = [Route::adapter(8, 0)];
        let e =
            set.forward_mixed(&Reference, &base, xv, MatMut::new(&mut y2, tokens, n_out).unwrap(), &bad, &mut scratch);
        assert_eq!(e, Err(Error::ShapeMismatch { operand: Operand::Routes, expected: 9, found: 8 }));
        let bad = [Route::adapter(9, 5)];
        let e =
            set.forward_mixed(&Reference, &base, xv, MatMut::new(&mut y2, tokens, n_out).unwrap(), &bad, &mut scratch);
        assert_eq!(e, Err(Error::UnknownAdapter));
        assert_eq!(y2, y, "nothing written");
    }
}
