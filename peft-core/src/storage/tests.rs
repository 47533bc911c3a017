extern crate std;
use std::string::ToString;
use std::vec;
use std::vec::Vec;

use super::quantize::{OwnedWeight, Quantized};
use super::*;
use crate::backend::Reference;
use crate::base::Dense;
use crate::rng::Rng;

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| rng.uniform_range(-2.0, 2.0) as f32).collect()
}

#[test]
fn q4_0_and_q8_0_by_hand() {
    // One block: x_j = j - 16 (j = 0..31). Q8_0: amax 16, d = 16/127.
    let x: Vec<f32> = (0..32).map(|j| j as f32 - 16.0).collect();
    let mut q8 = vec![0u8; Q8_0_BYTES];
    quantize(&x, 1, 32, Quantized::Q8_0(&mut q8)).unwrap();
    assert_eq!(u16::from_le_bytes([q8[0], q8[1]]), half::f32_to_f16(16.0 / 127.0));
    assert_eq!(q8[2] as i8, -127, "x_0 = -16 is the extreme");
    assert_eq!(q8[2 + 16] as i8, 0);
    // Q4_0: max (the first value of largest |x|) = -16, d = -16 / -8 = 2,
    // q = min(15, trunc(x / 2 + 8.5)).
    let mut q4 = vec![0u8; Q4_0_BYTES];
    quantize(&x, 1, 32, Quantized::Q4_0(&mut q4)).unwrap();
    assert_eq!(half::f16_to_f32(u16::from_le_bytes([q4[0], q4[1]])), 2.0);
    assert_eq!(q4[2] & 0x0F, 0, "x_0 = -16: -8 + 8.5 -> 0");
    assert_eq!(q4[2] >> 4, 8, "x_16 = 0: 8.5 -> 8");
    assert_eq!(q4[2 + 15] >> 4, 15, "x_31 = 15: 7.5 + 8.5 = 16, clamped to 15");
    let w = StoredWeight::q4_0(&q4, 1, 32).unwrap();
    assert_eq!(w.get(0, 0), Some(-16.0));
    assert_eq!(w.get(0, 31), Some(14.0), "(15 - 8) 2: the clamp costs one step");
    assert_eq!(w.get(0, 17), Some(2.0), "x_17 = 1: 0.5 + 8.5 = 9 -> (9 - 8) 2");
}

#[test]
fn every_format_stays_within_its_bound_and_forwards_as_the_dequantized_base() {
    let (out, inn, t) = (3, 64, 2);
    let w = values(out * inn, 1);
    let x = values(t * inn, 2);
    for format in Format::QUANTIZERS {
        let owned = OwnedWeight::quantize(format, &w, out, inn).unwrap();
        let stored = owned.weight().unwrap();
        let mut deq = vec![0f32; out * inn];
        dequantize(&stored, &mut deq).unwrap();
        for (i, (d, v)) in deq.iter().zip(&w).enumerate() {
            let group: &[f32] = match format {
                Format::Int8 => &w[i / inn * inn..][..inn],
                f if f.block().0 == QK => &w[i / QK * QK..][..QK],
                _ => core::slice::from_ref(v),
            };
            let a = group.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = f64::from((d - v).abs());
            assert!(err <= error_bound(format, a), "{format:?}[{i}]: {v} -> {d}");
        }
        // The forward over the stored base equals the dense forward over deq(W).
        let base = StoredLinear::<f32>::new(stored);
        let (mut y, mut yd) = (vec![0f32; t * out], vec![0f32; t * out]);
        base.forward(&Reference, MatRef::new(&x, t, inn).unwrap(), MatMut::new(&mut y, t, out).unwrap()).unwrap();
        let dense = Dense::new(&deq, out, inn).unwrap();
        dense.forward(&Reference, MatRef::new(&x, t, inn).unwrap(), MatMut::new(&mut yd, t, out).unwrap()).unwrap();
        for (a, b) in y.iter().zip(&yd) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{format:?}: {a} vs {b}");
        }
        // And the transposed product.
        let (mut gx, mut gxd) = (vec![0f32; t * inn], vec![0f32; t * inn]);
        let g = values(t * out, 3);
        base.apply_transpose(
            &Reference,
            MatRef::new(&g, t, out).unwrap(),
            MatMut::new(&mut gx, t, inn).unwrap(),
            Accum::Replace,
        )
        .unwrap();
        dense
            .apply_transpose(
                &Reference,
                MatRef::new(&g, t, out).unwrap(),
                MatMut::new(&mut gxd, t, inn).unwrap(),
                Accum::Replace,
            )
            .unwrap();
        for (a, b) in gx.iter().zip(&gxd) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{format:?}: {a} vs {b}");
        }
    }
}

#[test]
fn bad_shapes_and_values_are_typed_errors() {
    assert!(matches!(StoredWeight::q8_0(&[0u8; 34], 1, 16), Err(Error::InvalidParameter { name: "in_features", .. })));
    assert!(matches!(
        StoredWeight::q4_0(&[0u8; 17], 1, 32),
        Err(Error::ShapeMismatch { operand: Operand::Weight, .. })
    ));
    assert!(matches!(StoredWeight::int8(&[0i8; 4], &[f32::NAN, 1.0], 2, 2), Err(Error::NonFinite { .. })));
    let mut b = vec![0u8; 34];
    let mut w = vec![0f32; 32];
    w[3] = f32::INFINITY;
    assert_eq!(
        quantize(&w, 1, 32, Quantized::Q8_0(&mut b)),
        Err(Error::NonFinite { operand: Operand::Weight, index: 3 })
    );
    // A finite value whose block scale f16 cannot hold is out of range, not
    // "non-finite" (issue 27, class 8), named by its block's first element.
    w[3] = 1e10;
    let err = quantize(&w, 1, 32, Quantized::Q8_0(&mut b));
    assert_eq!(err, Err(Error::OutOfRange { operand: Operand::Weight, index: 0 }));
    assert!(!err.unwrap_err().to_string().contains("NaN"));
    assert_eq!(b, vec![0u8; 34], "nothing written");
}

/// int8 rows at the ends of f32's range (issue 27, class 7): a row at
/// `f32::MAX` decodes finite (its `a / 127` rounded up made `127 s`
/// infinite), and rows of subnormals meet [`error_bound`] (their `1 / s`
/// overflowed f32, so every element became +-127 steps).
#[test]
fn int8_rows_at_the_ends_of_the_range_decode_within_the_bound() {
    let rows: [[f32; 4]; 4] = [
        [f32::MAX, -f32::MAX, 1.0, 0.0],
        [1e-40, -3e-41, 7e-45, 0.0],
        [1e-44, 3e-45, -1.4e-45, 0.0],
        [f32::MIN_POSITIVE, 1e-39, -5e-39, 2e-45],
    ];
    for row in rows {
        let owned = OwnedWeight::quantize(Format::Int8, &row, 1, 4).unwrap();
        let mut back = [0f32; 4];
        dequantize(&owned.weight().unwrap(), &mut back).unwrap();
        let a = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (x, d) in row.iter().zip(&back) {
            assert!(d.is_finite(), "{row:?}: {x} decodes to {d}");
            let err = (f64::from(*x) - f64::from(*d)).abs();
            assert!(err <= error_bound(Format::Int8, a), "{row:?}: {x} -> {d}, error {err:e}");
        }
    }
}

/// `check_int8_rows` against hand-computed limits: f32::MAX is about
/// 3.4028e38, so 128 * 2.65e36 = 3.392e38 is finite, 128 * 2.67e36 =
/// 3.418e38 is not, and 127 * 2.67e36 = 3.391e38 is.
#[test]
fn int8_rows_that_would_decode_to_infinity_are_refused() {
    let ok_scale = 2.65e36f32;
    let edge = 2.67e36f32;
    let rows = [-128i8, 5, 127, 1, 2, -127];
    assert_eq!(check_int8_rows(&rows, &[ok_scale, edge], 3), Ok(()), "-128 * 2.65e36 and 127 * 2.67e36 are finite");
    let rows = [1i8, 2, 3, 4, -128, 6];
    assert_eq!(
        check_int8_rows(&rows, &[1.0, edge], 3),
        Err(Error::OutOfRange { operand: Operand::Parameter, index: 1 }),
        "-128 * 2.67e36 overflows"
    );
    assert_eq!(
        check_int8_rows(&rows, &[f32::NAN, 1.0], 3),
        Err(Error::NonFinite { operand: Operand::Parameter, index: 0 })
    );
    assert!(matches!(check_int8_rows(&rows, &[1.0], 3), Err(Error::ShapeMismatch { .. })));
    // What the quantizer writes for a row at f32::MAX passes: it keeps 127 |s| finite.
    let row = [f32::MAX, -1.0, 0.5];
    let (mut q, mut scales) = ([0i8; 3], [0.0f32; 1]);
    quantize(&row, 1, 3, Quantized::Int8(&mut q, &mut scales)).unwrap();
    assert!(q.contains(&127) && (127.0 * scales[0]).is_finite());
    assert_eq!(check_int8_rows(&q, &scales, 3), Ok(()));
}

/// `rows(a, b)` is `W[a..b, :]`: each of its rows is the whole weight's
/// row `a + j` (same bytes), in every format; an empty or out-of-range
/// range is `None`.
#[test]
fn a_row_range_is_a_weight_of_those_rows() {
    let (out, inn) = (7, 64);
    let w: Vec<f32> = (0..out * inn).map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0).collect();
    for format in Format::ALL.into_iter().filter(|f| f.has_quantizer()) {
        let owned = OwnedWeight::quantize(format, &w, out, inn).unwrap();
        let sw = owned.weight().unwrap();
        let part = sw.rows(2, 5).unwrap();
        assert_eq!((part.out_features(), part.in_features(), part.format()), (3, inn, format));
        for j in 0..3 {
            assert_eq!(
                std::format!("{:?}", part.row(j).unwrap()),
                std::format!("{:?}", sw.row(2 + j).unwrap()),
                "{format:?}"
            );
        }
        assert!(part.row(3).is_none());
        assert!(sw.rows(3, 3).is_none() && sw.rows(5, 2).is_none() && sw.rows(0, out + 1).is_none());
        let last = |w: StoredWeight<'_>| w.row(out - 1).map(|r| std::format!("{r:?}"));
        assert_eq!(last(sw.rows(0, out).unwrap()), last(sw));
    }
}
