//! Bad input: a typed error, outputs untouched, no panic.

use peft_core::attention::forward as attn_forward;
use peft_core::attention::{AttentionShape, Mask};
use peft_core::lora::{Lora, LoraConfig};
use peft_core::method::LinearAdapter;
use peft_core::{Accum, Backend, BackendError, Dense, Error, ErrorKind, MatMut, MatRef, Op};
use proptest::prelude::*;

use crate::{Config, Precision, Report, panics, run};

#[derive(Debug, Clone)]
struct Bad {
    n_in: usize,
    n_out: usize,
    rank: usize,
    x_cols: usize,
    y_rows: usize,
    scratch_short: usize,
    heads: usize,
    kv: usize,
    inner: usize,
}

fn bad() -> impl Strategy<Value = Bad> {
    (1usize..8, 1usize..8, 0usize..10, 1usize..10, 1usize..5, 0usize..3, 0usize..5, 0usize..4, 0usize..6).prop_map(
        |(n_in, n_out, rank, x_cols, y_rows, scratch_short, heads, kv, inner)| Bad {
            n_in,
            n_out,
            rank,
            x_cols,
            y_rows,
            scratch_short,
            heads,
            kv,
            inner,
        },
    )
}

pub fn run_all<E: Precision, B: Backend<E>>(backend: &B, config: &Config, report: &mut Report) {
    run(report, config, "bad_input_is_typed", E::NAME, bad(), |b| {
        let sentinel = E::from_f64(7.0);
        let t = 3;
        // LoRA: rank 0 is InvalidRank (any positive rank is valid, above
        // min(in, out) too, as PEFT allows); wrong input width, output rows
        // or scratch are typed errors; y keeps its sentinel.
        let (w, a, bb) =
            (vec![E::ZERO; b.n_out * b.n_in], vec![E::ZERO; b.rank * b.n_in], vec![E::ZERO; b.n_out * b.rank]);
        let base = Dense::new(&w, b.n_out, b.n_in).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let cfg = LoraConfig::new(b.rank, 4.0);
        let made = Lora::new(&cfg, b.n_in, b.n_out, &a[..], &bb[..]);
        let valid_rank = b.rank >= 1;
        match made {
            Err(Error::InvalidRank { .. }) => prop_assert!(!valid_rank),
            Err(e) => return Err(TestCaseError::fail(format!("rank {}: unexpected {e}", b.rank))),
            Ok(layer) => {
                prop_assert!(valid_rank, "rank {} accepted for {}x{}", b.rank, b.n_out, b.n_in);
                let x = vec![E::from_f64(0.5); t * b.x_cols];
                let mut y = vec![sentinel; b.y_rows * b.n_out];
                let need = layer.forward_scratch_len(t);
                let mut scratch = vec![E::ZERO; need.saturating_sub(b.scratch_short)];
                let res = (|| -> Result<(), B::Error> {
                    layer.forward(
                        backend,
                        &base,
                        MatRef::new(&x, t, b.x_cols)?,
                        MatMut::new(&mut y, b.y_rows, b.n_out)?,
                        &mut scratch,
                    )
                })();
                let all_ok = b.x_cols == b.n_in && b.y_rows == t && b.scratch_short == 0;
                match res {
                    Ok(()) => prop_assert!(all_ok, "bad input accepted: {:?}", b),
                    Err(e) if matches!(e.kind(), ErrorKind::Shape | ErrorKind::Scratch) => {
                        prop_assert!(!all_ok, "good input rejected");
                        prop_assert!(
                            y.iter().all(|v| v.to_bits64() == sentinel.to_bits64()),
                            "output written on error"
                        );
                    }
                    Err(e) => return Err(TestCaseError::fail(format!("unexpected {e}"))),
                }
            }
        }
        // Attention: heads not a positive multiple of kv heads.
        let shape = AttentionShape::new(b.heads, b.kv, 2);
        let valid = b.heads > 0 && b.kv > 0 && b.heads % b.kv == 0;
        prop_assert_eq!(shape.is_ok(), valid, "heads {} kv {}", b.heads, b.kv);
        if let Ok(shape) = shape {
            // Keys with one column too many.
            let q = vec![E::ZERO; 2 * shape.q_width()];
            let k = vec![E::ZERO; 2 * (shape.kv_width() + 1)];
            let mut o = vec![sentinel; 2 * shape.q_width()];
            let mut scratch = vec![E::ZERO; 16];
            let res = attn_forward(
                backend,
                &shape,
                MatRef::new(&q, 2, shape.q_width()).map_err(|e| TestCaseError::fail(e.to_string()))?,
                MatRef::new(&k, 2, shape.kv_width() + 1).map_err(|e| TestCaseError::fail(e.to_string()))?,
                MatRef::new(&k, 2, shape.kv_width() + 1).map_err(|e| TestCaseError::fail(e.to_string()))?,
                None,
                &Mask::causal(),
                MatMut::new(&mut o, 2, shape.q_width()).map_err(|e| TestCaseError::fail(e.to_string()))?,
                &mut scratch,
            );
            prop_assert!(res.as_ref().is_err_and(|e| e.kind() == ErrorKind::Shape), "{:?}", res);
            prop_assert!(o.iter().all(|v| v.to_bits64() == sentinel.to_bits64()));
        }
        // gemm with a mismatched inner dimension: typed, untouched, no panic.
        let lhs = vec![E::ZERO; 2 * (b.inner + 1)];
        let rhs = vec![E::ZERO; b.inner * 3];
        let mut c = vec![sentinel; 6];
        let mut res = Ok(());
        let panicked = panics(|| {
            res = (|| -> Result<(), B::Error> {
                backend.gemm(
                    MatMut::new(&mut c, 2, 3)?,
                    Accum::Add,
                    MatRef::new(&lhs, 2, b.inner + 1)?,
                    Op::N,
                    MatRef::new(&rhs, b.inner, 3)?,
                    Op::N,
                    <E::Accum as peft_core::Element>::from_f64(1.0),
                )
            })();
        });
        prop_assert!(!panicked, "the backend panicked on a shape error");
        prop_assert!(res.as_ref().is_err_and(|e| e.kind() == ErrorKind::Shape), "{:?}", res);
        prop_assert!(c.iter().all(|v| v.to_bits64() == sentinel.to_bits64()), "gemm wrote on error");
        Ok(())
    });
}
