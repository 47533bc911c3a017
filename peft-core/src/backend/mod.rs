mod reference;

pub use reference::Reference;

use core::fmt;

use crate::base::Product;
use crate::element::Element;
use crate::error::{Error, Operand, Result};
use crate::matrix::{MatMut, MatRef};
use crate::storage::StoredWeight;

/// What kind of failure a backend reported: what generic code (the methods
/// of this crate, `peft-verify`) may branch on without knowing the
/// backend's error type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// An operand's shape or length is wrong ([`Error::ShapeMismatch`],
    /// [`Error::SliceTooShort`], [`Error::BadStride`], [`Error::Overflow`]).
    Shape,
    /// A caller-provided buffer (scratch, staging) is too small.
    Scratch,
    /// A resource the backend needs is in use (for example a staging buffer
    /// borrowed by a gemm further up the same thread's stack).
    Busy,
    /// An invalid configuration or parameter value.
    Invalid,
    /// Any other failure of the backend's own (a device error, ...).
    Other,
}

/// The error of a [`Backend`]: printable, and classified by [`kind`](Self::kind).
///
/// The compute backend: one gemm, in faer's sense.
///
/// Every method in this crate is written against [`Backend`] alone, so a
/// backend that implements it (the portable [`Reference`] here, the SIMD faer
/// backend in `peft-faer`, or a user's DSP or GPU backend) runs all of them.
///
/// ```text
/// Accum::Replace:  C  = alpha * op(A) * op(B)     (C is never read)
/// Accum::Add:      C += alpha * op(A) * op(B)
/// ```
///
/// `op(X)` is `X` or `X^T` as [`Op`] says; `op(A)` is `m x k`, `op(B)` is
/// `k x n`, `C` is `m x n`. Products and sums run in the element's
/// accumulation type and each element of `C` is rounded once.
///
/// ## Errors belong to the backend
///
/// As embedded-hal's `ErrorType`, a backend brings its own error type,
/// [`Backend::Error`]: a GPU backend reports a lost device, the staged
/// half-precision faer backend a busy staging buffer, each in its own words.
/// Every method of this crate that runs a backend returns that type, so
/// nothing is lost on the way to the caller. Two bounds make that work:
///
/// * `From<`[`Error`]`>`: a method's own validation errors (a shape, a
///   scratch length) convert into the backend's type. The backends that can
///   fail only on shapes ([`Reference`], faer's f32/f64 backend) simply use
///   [`Error`] itself.
/// * [`BackendError`]: code generic over the backend still learns what
///   kind of failure it was, through [`BackendError::kind`].
pub trait BackendError: fmt::Debug + fmt::Display {
    /// The kind of failure.
    fn kind(&self) -> ErrorKind;
}

impl BackendError for Error {
    fn kind(&self) -> ErrorKind {
        match self {
            Error::SliceTooShort { .. } | Error::BadStride { .. } | Error::Overflow | Error::ShapeMismatch { .. } => {
                ErrorKind::Shape
            }
            Error::ScratchTooSmall { .. } => ErrorKind::Scratch,
            Error::InvalidRank { .. }
            | Error::InvalidAlpha
            | Error::InvalidHeads { .. }
            | Error::InvalidParameter { .. }
            | Error::TokenOutOfRange { .. }
            | Error::UnknownAdapter
            | Error::DuplicateAdapter
            | Error::SetFull { .. } => ErrorKind::Invalid,
            _ => ErrorKind::Other,
        }
    }
}

/// Whether a gemm overwrites or accumulates into its destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accum {
    /// `C = alpha * op(A) * op(B)`; the old contents of `C` are never read
    /// (they may be NaN).
    Replace,
    /// `C += alpha * op(A) * op(B)`.
    Add,
}

impl Accum {
    /// `*dst = v` ([`Replace`](Self::Replace), `dst` never read) or `*dst
    /// += v` ([`Add`](Self::Add)), in `E`'s accumulation type, rounded once
    /// into `E`.
    #[inline(always)]
    pub fn store<E: Element>(self, dst: &mut E, v: E::Accum) {
        *dst = match self {
            Accum::Replace => E::from_accum(v),
            Accum::Add => E::from_accum(dst.to_accum() + v),
        };
    }

    /// [`store`](Self::store) of an f64 value: the sum is formed in f64 and
    /// rounded once into `E`.
    #[inline(always)]
    pub fn store_f64<E: Element>(self, dst: &mut E, v: f64) {
        *dst = match self {
            Accum::Replace => E::from_f64(v),
            Accum::Add => E::from_f64(dst.to_f64() + v),
        };
    }
}

/// Whether an operand is used as stored or transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// As stored.
    N,
    /// Transposed.
    T,
}

impl Op {
    /// `(rows, cols)` of `op(m)`.
    #[inline]
    pub fn dims<E: Element>(self, m: &MatRef<'_, E>) -> (usize, usize) {
        match self {
            Op::N => (m.rows(), m.cols()),
            Op::T => (m.cols(), m.rows()),
        }
    }
}

/// A matrix-multiply engine over element type `E`.
pub trait Backend<E: Element> {
    /// The backend's error (see [`Backend`]'s docs). Backends that fail
    /// only on shapes use [`Error`].
    type Error: BackendError + From<Error>;

    /// `dst (=|+=) alpha * op(lhs) * op(rhs)`.
    ///
    /// Shapes: `op(lhs)` is `m x k`, `op(rhs)` is `k x n`, `dst` is `m x n`;
    /// `k = 0` is allowed (the product is zero).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (checked with [`check_gemm`] before anything
    /// is written), converted into [`Self::Error`]; and whatever the backend
    /// itself reports, in which case `dst` is unspecified.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        dst: MatMut<'_, E>,
        accum: Accum,
        lhs: MatRef<'_, E>,
        lhs_op: Op,
        rhs: MatRef<'_, E>,
        rhs_op: Op,
        alpha: E::Accum,
    ) -> core::result::Result<(), Self::Error>;

    /// `y (=|+=) x deq(W)^T` (`p.src = x [tokens, in]`, `p.dst = y
    /// [tokens, out]`) over a stored (half-precision or quantized) weight,
    /// without an f32 copy of `W`: what
    /// [`StoredLinear`](crate::storage::StoredLinear) runs. The provided
    /// version is the portable kernel [`storage::apply`](crate::storage::apply);
    /// a backend overrides it with faster ones.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (`Input`, `Output`) before anything is
    /// written; the backend's own errors.
    fn stored_apply(&self, w: &StoredWeight<'_>, p: Product<'_, E>) -> core::result::Result<(), Self::Error> {
        crate::storage::apply(w, p.src, p.dst, p.accum).map_err(Self::Error::from)
    }

    /// `grad_x (=|+=) grad_y deq(W)` (`p.src = grad_y [tokens, out]`,
    /// `p.dst = grad_x [tokens, in]`) over a stored weight (provided:
    /// [`storage::apply_transpose`](crate::storage::apply_transpose)).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (`GradOutput`, `GradInput`) before anything
    /// is written; the backend's own errors.
    fn stored_apply_transpose(&self, w: &StoredWeight<'_>, p: Product<'_, E>) -> core::result::Result<(), Self::Error> {
        crate::storage::apply_transpose(w, p.src, p.dst, p.accum).map_err(Self::Error::from)
    }

    /// Calls `f(i, backend)` once for every `i in 0..parts`, each call
    /// whole on one thread with `backend` (this backend's settings, for
    /// that thread). A backend with threads may run several parts at once
    /// and in any order, so a caller's parts must be independent and each
    /// must write only what is its own (a host splits attention by heads
    /// this way). The provided version calls them in order on the calling
    /// thread with `self`. It returns when every part has.
    fn for_each_part(&self, parts: usize, f: &(dyn Fn(usize, &Self) + Sync)) {
        (0..parts).for_each(|i| f(i, self));
    }
}

/// What a backend-driven operation returns: nothing, or the backend's
/// own error ([`Backend::Error`]).
pub type Outcome<E, B> = core::result::Result<(), <B as Backend<E>>::Error>;

/// Checks the shapes of a gemm and returns `(m, n, k)`.
///
/// Backends call this before touching `dst` so that a shape error is the
/// same typed error on every backend.
///
/// # Errors
/// [`Error::ShapeMismatch`] naming the first operand whose dimension
/// disagrees: `Rhs` for the inner dimension, `Dst` for the outer ones.
pub fn check_gemm<E: Element>(
    dst: &MatMut<'_, E>,
    lhs: &MatRef<'_, E>,
    lhs_op: Op,
    rhs: &MatRef<'_, E>,
    rhs_op: Op,
) -> Result<(usize, usize, usize)> {
    let (m, k) = lhs_op.dims(lhs);
    let (k2, n) = rhs_op.dims(rhs);
    if k2 != k {
        return Err(Error::ShapeMismatch { operand: Operand::Rhs, expected: k, found: k2 });
    }
    if dst.rows() != m {
        return Err(Error::ShapeMismatch { operand: Operand::Dst, expected: m, found: dst.rows() });
    }
    if dst.cols() != n {
        return Err(Error::ShapeMismatch { operand: Operand::Dst, expected: n, found: dst.cols() });
    }
    Ok((m, n, k))
}
