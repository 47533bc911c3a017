//! Merging the adapter into the base weight, and undoing it.
//!
//! ```text
//! merge:    W <- W + s B A     (one gemm with Accum::Add, alpha = s)
//! unmerge:  W <- backup        (bit-exact), or W <- W - s B A
//! ```
//!
//! After a merge, forward is a single matmul (the seed's mistake 6).
//!
//! ## Drift without a backup
//!
//! The reference and faer backends compute the product `p = s (B A)_ij` with
//! the same bits on merge and unmerge (the same operands, and the sign of
//! `alpha` only flips the sign of the rounded product). So one cycle is two
//! roundings, `W1 = fl(W + p)`, `W2 = fl(W1 - p)`, and in the element's unit
//! roundoff `u` (`2^-24` f32, `2^-53` f64, `2^-11` f16, `2^-8` bf16):
//!
//! ```text
//! |W2 - W| <= u |W + p| + u |W1 - p|  <=  u (2 |W| + |p|) (1 + u)
//! ```
//!
//! and `n` cycles drift by at most `n` times that (each cycle starts from
//! the previous one's result). Often the error is exactly zero (Sterbenz).
//! A caller who needs `W` back bit for bit passes a backup buffer to
//! [`LoraLinear::merge`].

use super::layer::LoraLinear;
use crate::backend::{Accum, Backend, Op};
use crate::element::Element;
use crate::error::{Error, Operand, Result, check_len};
use crate::matrix::{MatMut, MatRef};

impl<'a, E: Element> LoraLinear<'a, E> {
    /// `W += s B A` in place; the layer becomes merged.
    ///
    /// With `backup` (`[out, in]`), `W` is first copied into it, and
    /// [`unmerge`](Self::unmerge) restores it bit for bit. Without, unmerge
    /// subtracts `s B A` (drift bound in the [module docs](self)).
    ///
    /// # Errors
    /// [`Error::AlreadyMerged`] (a second merge would add `s B A` twice);
    /// [`Error::ShapeMismatch`] (`Backup`). Nothing is written on error.
    pub fn merge<B: Backend<E> + ?Sized>(&mut self, backend: &B, backup: Option<&'a mut [E]>) -> Result<()> {
        if self.merged {
            return Err(Error::AlreadyMerged);
        }
        if let Some(bk) = &backup {
            check_len(Operand::Backup, self.weight.len(), bk.len())?;
        }
        if let Some(bk) = backup {
            // Lengths were checked above.
            bk.copy_from_slice(self.weight);
            self.backup = Some(bk);
        }
        if let Err(e) = self.add_product(backend, 1.0) {
            self.backup = None;
            return Err(e);
        }
        self.merged = true;
        Ok(())
    }

    /// Undoes [`merge`](Self::merge): restores `W` from the backup if one was
    /// given, else `W -= s B A`. The layer becomes unmerged.
    ///
    /// # Errors
    /// [`Error::NotMerged`]; nothing is written.
    pub fn unmerge<B: Backend<E> + ?Sized>(&mut self, backend: &B) -> Result<()> {
        if !self.merged {
            return Err(Error::NotMerged);
        }
        match self.backup.take() {
            Some(bk) => {
                // Same length as W: checked when the backup was accepted.
                self.weight.copy_from_slice(bk);
            }
            None => self.add_product(backend, -1.0)?,
        }
        self.merged = false;
        Ok(())
    }

    /// `W += sign * s B A`.
    fn add_product<B: Backend<E> + ?Sized>(&mut self, backend: &B, sign: f64) -> Result<()> {
        let alpha = <E::Accum as Element>::from_f64(sign * self.scale);
        let a = MatRef::new(self.a, self.rank, self.in_features)?;
        let b = MatRef::new(self.b, self.out_features, self.rank)?;
        let w = MatMut::new(self.weight, self.out_features, self.in_features)?;
        backend.gemm(w, Accum::Add, b, Op::N, a, Op::N, alpha)
    }
}
