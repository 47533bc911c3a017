//! DoRA unit tests: a hand calculation, the init identity, the cache's
//! staleness, merge and unmerge. Gradients against finite differences are
//! `peft-verify`'s `dora_gradients_match_fd`.

extern crate std;
use crate::method::{LinearAdapter, MergeTarget, WeightUpdate};
use std::vec;
use std::vec::Vec;

use super::*;
use crate::backend::Reference;
use crate::base::Dense;
use crate::matrix::{MatMut, MatRef};

#[test]
fn forward_and_merge_by_hand() {
    // W = [[3, 4], [0, 1]], A = [1, 0], B = [0, 1]^T, s = 1:
    // V = W + B A = [[3, 4], [1, 1]], n = [5, sqrt 2], m = [10, 1].
    // x = [1, 1]: z = x V^T = [7, 2], y = [10/5 * 7, 2 / sqrt 2] = [14, sqrt 2].
    let mut w = [3.0f64, 4.0, 0.0, 1.0];
    let cfg = LoraConfig::new(1, 1.0);
    let mut dora = Dora::new(&cfg, 2, 2, [1.0, 0.0], [0.0, 1.0], [10.0, 1.0], [0.0; 2]).unwrap();
    let x = [1.0, 1.0];
    let mut y = [0.0; 2];
    let mut scratch = [0.0; 8];
    {
        let base = Dense::new(&w, 2, 2).unwrap();
        let e = dora.forward(
            &Reference,
            &base,
            MatRef::new(&x, 1, 2).unwrap(),
            MatMut::new(&mut y, 1, 2).unwrap(),
            &mut scratch,
        );
        assert!(matches!(e, Err(Error::InvalidParameter { name: "DoRA norms", .. })), "stale at first");
        dora.refresh_norms(&Reference, &base, &mut scratch).unwrap();
        assert_eq!(dora.norms(), &[5.0, 2.0f64.sqrt()]);
        dora.forward(
            &Reference,
            &base,
            MatRef::new(&x, 1, 2).unwrap(),
            MatMut::new(&mut y, 1, 2).unwrap(),
            &mut scratch,
        )
        .unwrap();
    }
    assert_eq!(y[0], 14.0);
    assert!((y[1] - 2.0f64.sqrt()).abs() <= 1e-15);
    // Merged: W' = [[6, 8], [1/sqrt 2, 1/sqrt 2]] gives the same y.
    let mut norms = [0.0; 2];
    let merged = dora.merge_into(&Reference, MergeTarget::new(&mut w), &mut norms).unwrap();
    assert_eq!(&merged.weight()[..2], &[6.0, 8.0]);
    let mut ym = [0.0; 2];
    merged.forward(MatRef::new(&x, 1, 2).unwrap(), MatMut::new(&mut ym, 1, 2).unwrap()).unwrap();
    assert!((ym[0] - 14.0).abs() <= 1e-14 && (ym[1] - 2.0f64.sqrt()).abs() <= 1e-14, "{ym:?}");
    merged.unmerge().unwrap();
    let back = [3.0, 4.0, 0.0, 1.0];
    assert!(w.iter().zip(back).all(|(a, b)| (a - b).abs() <= 1e-15), "{w:?}");
    // A changed adapter is stale until refreshed.
    dora.adapter_mut().0[0] = 2.0;
    assert!(!dora.is_fresh());
}

#[test]
fn a_fresh_adapter_is_the_base_and_a_zero_magnitude_needs_a_backup() {
    let (n_in, n_out, t) = (5, 4, 3);
    let mut rng = Rng::new(1);
    let w: Vec<f64> = (0..n_in * n_out).map(|_| rng.uniform_range(-1.0, 1.0)).collect();
    let bias: Vec<f64> = (0..n_out).map(|_| rng.uniform_range(-1.0, 1.0)).collect();
    let x: Vec<f64> = (0..t * n_in).map(|_| rng.uniform_range(-1.0, 1.0)).collect();
    let base = Dense::new(&w, n_out, n_in).unwrap().with_bias(&bias).unwrap();
    let cfg = LoraConfig::new(2, 4.0);
    let mut dora =
        Dora::new(&cfg, n_in, n_out, vec![0.0; 2 * n_in], vec![0.0; n_out * 2], vec![0.0; n_out], vec![0.0; n_out])
            .unwrap();
    // One row of scratch at a time: the smallest buffer works.
    let mut scratch = vec![0.0; refresh_scratch_len(&base, 1)];
    dora.init_adapter(&Reference, &base, &mut rng, &mut scratch).unwrap();
    assert_eq!(dora.magnitude(), dora.norms(), "m = ||W||_row at init");
    let mut y = vec![0.0; t * n_out];
    let mut yb = vec![0.0; t * n_out];
    let mut sc = vec![0.0; 2 * t];
    dora.forward(&Reference, &base, MatRef::new(&x, t, n_in).unwrap(), MatMut::new(&mut y, t, n_out).unwrap(), &mut sc)
        .unwrap();
    base.forward(&Reference, MatRef::new(&x, t, n_in).unwrap(), MatMut::new(&mut yb, t, n_out).unwrap()).unwrap();
    assert_eq!(y, yb, "m / n = 1 and B = 0: exactly the base");
    dora.adapter_mut().2[1] = 0.0;
    let mut w2 = w.clone();
    let mut norms = vec![0.0; n_out];
    let e = dora.merge_into(&Reference, MergeTarget::new(&mut w2), &mut norms).map(|_| ()).unwrap_err();
    assert!(matches!(e, Error::InvalidParameter { name: "magnitude", .. }));
    assert_eq!(w2, w, "nothing written");
    let mut backup = vec![0.0; w.len()];
    dora.merge_into(&Reference, MergeTarget::new(&mut w2).with_backup(&mut backup), &mut norms)
        .unwrap()
        .unmerge()
        .unwrap();
    assert_eq!(w2, w, "restored from the backup bit for bit");
}
