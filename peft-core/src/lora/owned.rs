//! Owned buffers for hosts with a heap (feature `alloc`).
use alloc::vec;
use alloc::vec::Vec;

use crate::element::Element;
use crate::error::Result;
use crate::matrix::checked_len;

/// An adapter's tensors and their gradients, owned: `a [r, in]`,
/// `b [out, r]`, `grad_a`, `grad_b` of the same shapes, all zero at
/// creation. Lend `a` and `b` to [`Lora::new`](super::Lora::new)
/// and the gradients to [`LoraGrads`](super::LoraGrads).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraParams<E> {
    /// `A [r, in]`.
    pub a: Vec<E>,
    /// `B [out, r]`.
    pub b: Vec<E>,
    /// `dL/dA [r, in]`.
    pub grad_a: Vec<E>,
    /// `dL/dB [out, r]`.
    pub grad_b: Vec<E>,
}

impl<E: Element> LoraParams<E> {
    /// Zeroed buffers for a rank-`rank` adapter on an `in -> out` layer.
    ///
    /// # Errors
    /// [`Error::Overflow`](crate::Error::Overflow) if a size overflows.
    pub fn zeros(rank: usize, in_features: usize, out_features: usize) -> Result<Self> {
        let na = checked_len(rank, in_features)?;
        let nb = checked_len(out_features, rank)?;
        Ok(Self { a: vec![E::ZERO; na], b: vec![E::ZERO; nb], grad_a: vec![E::ZERO; na], grad_b: vec![E::ZERO; nb] })
    }

    /// Sets both gradients to zero (before the first micro-batch of a step).
    pub fn zero_grads(&mut self) {
        self.grad_a.fill(E::ZERO);
        self.grad_b.fill(E::ZERO);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::backend::Reference;
    use crate::base::Dense;
    use crate::error::Error;
    use crate::lora::{Lora, LoraConfig, LoraGrads};
    use crate::matrix::MatRef;
    use crate::method::LinearAdapter;

    #[test]
    fn owned_buffers_fit_a_layer() {
        let mut p = LoraParams::<f32>::zeros(2, 5, 3).unwrap();
        assert_eq!((p.a.len(), p.b.len()), (10, 6));
        let w = vec![1.0f32; 15];
        let base = Dense::new(&w, 3, 5).unwrap();
        let layer = Lora::new(&LoraConfig::new(2, 2.0), 5, 3, &p.a[..], &p.b[..]).unwrap();
        let x = [1.0f32; 5];
        let g = [1.0f32; 3];
        let mut s = vec![0.0f32; layer.backward_scratch_len(1)];
        let grads = LoraGrads::new(&mut p.grad_a, &mut p.grad_b);
        layer
            .backward(
                &Reference,
                &base,
                MatRef::new(&x, 1, 5).unwrap(),
                MatRef::new(&g, 1, 3).unwrap(),
                None,
                grads,
                &mut s,
            )
            .unwrap();
        // B = 0, so dL/dA = s B^T G^T x = 0; dL/dB = s G^T (x A^T) = 0 as A = 0.
        assert!(p.grad_a.iter().chain(&p.grad_b).all(|&v| v == 0.0));
        p.grad_a[0] = 1.0;
        p.zero_grads();
        assert_eq!(p.grad_a[0], 0.0);
        assert_eq!(LoraParams::<f32>::zeros(usize::MAX, 2, 2), Err(Error::Overflow));
    }
}
