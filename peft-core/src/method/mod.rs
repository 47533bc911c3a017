//! One trait for every weight-adapting method, and one merge guard.
//!
//! A weight-adapting method changes what a frozen linear layer `y = x W^T
//! + b` computes, through tensors of its own. Hugging Face PEFT gives each
//! such method the same shape (`BaseTunerLayer`: `forward`, and
//! `get_delta_weight` behind one `merge`/`unmerge`); here it is two traits:
//!
//! * [`LinearAdapter`]: the passes. [`forward`](LinearAdapter::forward)
//!   and [`backward`](LinearAdapter::backward) are written once, here:
//!   they check the base, the activations, the gradients and the scratch,
//!   then call the method's own [`run_forward`](LinearAdapter::run_forward)
//!   and [`run_backward`](LinearAdapter::run_backward), which can take
//!   the shapes as given. Scratch lengths are methods of the adapter with
//!   one signature for every method.
//! * [`WeightUpdate`]: what merging does to `W` (and `b`), row block by
//!   row block: `W + dW` for the additive methods (LoRA, LoHa, LoKr, VeRA,
//!   LoRA on embeddings: [`UpdateKind::Additive`]), a transform of the
//!   rows for the others ((IA)^3 scales rows or columns, DoRA rescales the
//!   rows of `W + dW`, and rotations such as OFT's multiply each row by a
//!   matrix: [`UpdateKind::Multiplicative`]), or the adapter's own values
//!   in place of `W`'s (LN tuning's norm parameters, trainable tokens'
//!   embedding rows: [`UpdateKind::Replacement`], the originals kept in
//!   the merge's scratch for the unmerge). Row blocks are what a
//!   streaming merge of a large checkpoint needs, and every method's update
//!   is row-local: row `i` of the merged weight depends on row `i` of `W`
//!   alone.
//!
//! [`WeightUpdate::merge_into`] returns the one guard, [`Merged`], which
//! owns the weight (and bias) until it is restored, for every method.
//! [`METHODS`] is the one list of methods.
//!
//! ## Adding a method
//!
//! The recipe (CONTRIBUTING.md has the whole of it, the file I/O and the
//! registry included): one file (or folder) in `peft-core/src/` with the
//! adapter's type, its constructor and PEFT's initialization; an `impl
//! LinearAdapter` with its forward and backward (the derivation in the
//! module docs, every derivative checked against finite differences by
//! `peft-verify`); an `impl WeightUpdate` where the method can be merged.
//!
//! ## [`Merged`]: the one merge guard, for every [`WeightUpdate`]
//!
//! ```text
//! merge:    W <- W'          (WeightUpdate::update_rows, Direction::Merge, all rows)
//! unmerge:  W <- backup      (bit-exact), or W' <- W by the inverse update
//! ```
//!
//! [`WeightUpdate::merge_into`] takes the weight (and bias) by `&mut` and
//! returns a guard that owns those borrows, a shared borrow of the adapter
//! and the scratch the unmerge needs, until it is unmerged. While it
//! lives:
//!
//! * the only forward on offer is the merged base's own (one matmul,
//!   mistake 6 in `peft_verify::mistakes`): the weight cannot be handed to
//!   an adapter's forward, which would apply the update a second time;
//! * the weight cannot be merged again, and the adapter cannot be changed
//!   (its update is baked into `W`).
//!
//! Misuse does not compile:
//!
//! ```compile_fail
//! use peft_core::Dense;
//! use peft_core::lora::{Lora, LoraConfig};
//! use peft_core::method::{MergeTarget, WeightUpdate};
//! use peft_core::Reference;
//! let mut w = [0.5f32; 4];
//! let lora = Lora::new(&LoraConfig::new(1, 1.0), 2, 2, [1.0f32; 2], [1.0f32; 2]).unwrap();
//! let merged = lora.merge_into(&Reference, MergeTarget::new(&mut w), &mut []).unwrap();
//! // The weight is merged: reading it as a base for the adapter's forward
//! // would add s B A twice. `w` is borrowed by the guard.
//! let base = Dense::new(&w, 2, 2).unwrap();
//! drop(merged);
//! ```
//!
//! ```compile_fail
//! use peft_core::lora::{Lora, LoraConfig};
//! use peft_core::method::{MergeTarget, WeightUpdate};
//! use peft_core::Reference;
//! let mut w = [0.5f32; 4];
//! let lora = Lora::new(&LoraConfig::new(1, 1.0), 2, 2, [1.0f32; 2], [1.0f32; 2]).unwrap();
//! let first = lora.merge_into(&Reference, MergeTarget::new(&mut w), &mut []).unwrap();
//! let second = lora.merge_into(&Reference, MergeTarget::new(&mut w), &mut []).unwrap(); // merged twice
//! drop((first, second));
//! ```
//!
//! ```compile_fail
//! use peft_core::lora::{Lora, LoraConfig};
//! use peft_core::method::{MergeTarget, WeightUpdate};
//! use peft_core::Reference;
//! let mut w = [0.5f32; 4];
//! let mut lora = Lora::new(&LoraConfig::new(1, 1.0), 2, 2, [1.0f32; 2], [1.0f32; 2]).unwrap();
//! let merged = lora.merge_into(&Reference, MergeTarget::new(&mut w), &mut []).unwrap();
//! lora.adapter_mut().0[0] = 2.0; // the unmerge would subtract another product
//! drop(merged);
//! ```
//!
//! Dropping the guard unmerges, as a `MutexGuard` unlocks;
//! [`Merged::keep`] leaves the weight merged for good (PEFT's
//! `merge_and_unload`) and gives it back.
//!
//! ## Drift without a backup
//!
//! For an additive update the reference and faer backends compute `dW`
//! with the same bits on merge and unmerge (the same operands; the sign
//! only flips the rounded product), so one cycle is two roundings, `W1 =
//! fl(W + p)`, `W2 = fl(W1 - p)`, and in the element's unit roundoff `u`
//! (`2^-24` f32, `2^-53` f64, `2^-11` f16, `2^-8` bf16):
//!
//! ```text
//! |W2 - W| <= u |W + p| + u |W1 - p|  <=  u (2 |W| + |p|) (1 + u)
//! ```
//!
//! and `n` cycles drift by at most `n` times that. A multiplicative update
//! rounds once more per element (the scale back). A caller who needs `W`
//! back bit for bit passes a backup buffer.
//!
//! ## The one list of methods
//!
//! Every path that has to know every method reads [`METHODS`]: the `peft`
//! command's `--method` values and the order of `peft finetune`'s table,
//! the trainer's per-method setup (`peft_faer::llama::train`), the
//! learning-rate defaults, inspect's names, and the PEFT `peft_type` each
//! method's files carry. A test in `peft-faer` walks this list through
//! each of those paths, so a method added here and forgotten there fails
//! (libm's `check_coverage` does the same for its functions).
//!
//! Adding a method (the recipe is in CONTRIBUTING.md): its file in
//! `peft-core/src/`, its module in `peft-faer/src/`, its properties in
//! `peft-verify/src/props/`, and one line here.

mod merge;
mod registry;

pub use merge::{MergeTarget, Merged};
pub use registry::{Family, METHODS, MethodSpec, find};

use crate::backend::{Backend, Outcome};
use crate::base::{FrozenLinear, check_rows};
use crate::element::Element;
#[cfg(doc)]
use crate::error::Error;
use crate::error::{Operand, Result, check_io, check_len, check_scratch, check_shape};
use crate::matrix::{MatMut, MatRef};

/// A weight-adapting method on a linear layer `in -> out` over a frozen
/// base: forward, analytic backward, and their scratch.
///
/// Shapes, for every method: the base is `in -> out` (`W [out, in]`),
/// `x [tokens, in]`, `y [tokens, out]`, `grad_y [tokens, out]`, `grad_x
/// [tokens, in]`. The base is a read-only argument: there is no gradient
/// for it.
pub trait LinearAdapter<E: Element> {
    /// The gradient buffers of the method's trainable tensors, accumulated
    /// into (`+=`), so that micro-batches sum.
    type Grads<'g>
    where
        E: 'g;

    /// Input features `in`.
    fn in_features(&self) -> usize;

    /// Output features `out`.
    fn out_features(&self) -> usize;

    /// Scratch elements [`forward`](Self::forward) needs for `tokens` rows
    /// (saturating: a length no slice has when it overflows).
    fn forward_scratch_len(&self, tokens: usize) -> usize;

    /// Scratch elements [`backward`](Self::backward) needs for `tokens`
    /// rows (saturating).
    fn backward_scratch_len(&self, tokens: usize) -> usize;

    /// `Ok` when every buffer of `grads` has its tensor's length.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] naming the buffer.
    fn check_grads(&self, grads: &Self::Grads<'_>) -> Result<()>;

    /// Scratch elements [`prepare`](Self::prepare) needs over `base`: 0
    /// unless the method caches something that depends on the base.
    fn prepare_scratch_len<L: FrozenLinear<E> + ?Sized>(&self, base: &L) -> usize {
        let _ = base;
        0
    }

    /// Brings what the method caches from the base up to date (DoRA's row
    /// norms of `W + s B A`); a no-op for the others. A host calls it after
    /// the adapter's tensors change and before the next pass.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (`Weight`) for a base of other dimensions,
    /// [`Error::ScratchTooSmall`]; the backend's own errors.
    fn prepare<B: Backend<E> + ?Sized, L: FrozenLinear<E> + ?Sized>(
        &mut self,
        backend: &B,
        base: &L,
        scratch: &mut [E],
    ) -> Outcome<E, B> {
        let _ = (backend, scratch);
        self.check_base(base)?;
        Ok(())
    }

    /// `y = f(x)`: the adapted layer's output over the read-only `base`
    /// (`y` is overwritten, never read).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (`Weight`, `Input`, `Output`),
    /// [`Error::ScratchTooSmall`] (less than
    /// [`forward_scratch_len`](Self::forward_scratch_len)), before anything
    /// is written; the method's own refusals (DoRA over stale norms); the
    /// backend's own errors.
    fn forward<B: Backend<E> + ?Sized, L: FrozenLinear<E> + ?Sized>(
        &self,
        backend: &B,
        base: &L,
        x: MatRef<'_, E>,
        y: MatMut<'_, E>,
        scratch: &mut [E],
    ) -> Outcome<E, B> {
        self.check_base(base)?;
        check_io(x.rows(), x.cols(), self.in_features(), Operand::Output, y.rows(), y.cols(), self.out_features())?;
        check_scratch(self.forward_scratch_len(x.rows()), scratch.len())?;
        self.run_forward(ForwardPass { backend, base, x, y, scratch })
    }

    /// Accumulates the gradients of the method's tensors into `grads` and,
    /// when `grad_x` is given, writes `dL/dx` into it (overwriting), from
    /// the forward input `x` and `grad_y = dL/dy`.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (`Weight`, `Input`, `GradOutput`,
    /// `GradInput`, the gradient buffers), [`Error::ScratchTooSmall`],
    /// before anything is written; the backend's own errors.
    #[allow(clippy::too_many_arguments)]
    fn backward<B: Backend<E> + ?Sized, L: FrozenLinear<E> + ?Sized>(
        &self,
        backend: &B,
        base: &L,
        x: MatRef<'_, E>,
        grad_y: MatRef<'_, E>,
        grad_x: Option<MatMut<'_, E>>,
        grads: Self::Grads<'_>,
        scratch: &mut [E],
    ) -> Outcome<E, B> {
        self.check_base(base)?;
        check_backward_io((self.in_features(), self.out_features()), &x, &grad_y, grad_x.as_ref())?;
        self.check_grads(&grads)?;
        check_scratch(self.backward_scratch_len(x.rows()), scratch.len())?;
        self.run_backward(BackwardPass { backend, base, x, grad_y, grad_x, grads, scratch })
    }

    /// `Ok` when `base` is an `in -> out` layer like the adapter.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (`Weight`).
    fn check_base<L: FrozenLinear<E> + ?Sized>(&self, base: &L) -> Result<()> {
        check_len(Operand::Weight, self.in_features(), base.in_features())?;
        check_len(Operand::Weight, self.out_features(), base.out_features())
    }

    /// The method's forward, called by [`forward`](Self::forward) once the
    /// shapes and the scratch length are checked (callers use `forward`).
    ///
    /// # Errors
    /// The method's own refusals; the backend's own errors.
    fn run_forward<B: Backend<E> + ?Sized, L: FrozenLinear<E> + ?Sized>(
        &self,
        pass: ForwardPass<'_, E, B, L>,
    ) -> Outcome<E, B>;

    /// The method's backward, called by [`backward`](Self::backward) once
    /// the shapes, the gradient buffers and the scratch are checked.
    ///
    /// # Errors
    /// The method's own refusals; the backend's own errors.
    fn run_backward<B, L>(&self, pass: BackwardPass<'_, E, B, L, Self::Grads<'_>>) -> Outcome<E, B>
    where
        B: Backend<E> + ?Sized,
        L: FrozenLinear<E> + ?Sized;
}

/// The operands of one forward pass, checked by
/// [`LinearAdapter::forward`] and handed to
/// [`LinearAdapter::run_forward`]: `x [tokens, in]`, `y [tokens, out]`
/// (overwritten, never read), and at least
/// [`forward_scratch_len(tokens)`](LinearAdapter::forward_scratch_len)
/// scratch elements.
#[derive(Debug)]
pub struct ForwardPass<'a, E, B: ?Sized, L: ?Sized> {
    /// The backend that runs the products.
    pub backend: &'a B,
    /// The frozen base layer `in -> out`, read-only.
    pub base: &'a L,
    /// The input `[tokens, in]`.
    pub x: MatRef<'a, E>,
    /// The output `[tokens, out]`.
    pub y: MatMut<'a, E>,
    /// Scratch, contents unspecified on entry and on return.
    pub scratch: &'a mut [E],
}

/// The operands of one backward pass, checked by
/// [`LinearAdapter::backward`] and handed to
/// [`LinearAdapter::run_backward`]: the forward input `x [tokens, in]`,
/// `grad_y = dL/dy [tokens, out]`, `grad_x [tokens, in]` (overwritten with
/// `dL/dx` when given), the method's gradient buffers `G` (accumulated
/// into), and at least
/// [`backward_scratch_len(tokens)`](LinearAdapter::backward_scratch_len)
/// scratch elements.
#[derive(Debug)]
pub struct BackwardPass<'a, E, B: ?Sized, L: ?Sized, G> {
    /// The backend that runs the products.
    pub backend: &'a B,
    /// The frozen base layer `in -> out`, read-only.
    pub base: &'a L,
    /// The forward input `[tokens, in]`.
    pub x: MatRef<'a, E>,
    /// `dL/dy [tokens, out]`.
    pub grad_y: MatRef<'a, E>,
    /// `dL/dx [tokens, in]`, written when given.
    pub grad_x: Option<MatMut<'a, E>>,
    /// The method's gradient buffers.
    pub grads: G,
    /// Scratch, contents unspecified on entry and on return.
    pub scratch: &'a mut [E],
}

/// `Ok` when `x [tokens, in]`, `grad_y [tokens, out]` and, when given,
/// `grad_x [tokens, in]` fit a layer `(in, out)`.
///
/// # Errors
/// [`Error::ShapeMismatch`] (`Input`, `GradOutput`, `GradInput`).
pub(crate) fn check_backward_io<E: Element>(
    (n_in, n_out): (usize, usize),
    x: &MatRef<'_, E>,
    grad_y: &MatRef<'_, E>,
    grad_x: Option<&MatMut<'_, E>>,
) -> Result<()> {
    let tokens = x.rows();
    check_io(tokens, x.cols(), n_in, Operand::GradOutput, grad_y.rows(), grad_y.cols(), n_out)?;
    match grad_x {
        Some(gx) => check_shape(Operand::GradInput, gx.rows(), gx.cols(), tokens, n_in),
        None => Ok(()),
    }
}

/// How a method's update enters the weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpdateKind {
    /// `W' = W + dW`: the rows of `dW` are added (LoRA, LoHa, LoKr, VeRA,
    /// LoRA on embeddings). Several additive adapters on one weight commute.
    Additive,
    /// `W'` is a transform of `W`'s rows ((IA)^3's scaling, DoRA's
    /// normalization of `W + dW`, rotations). Merges of several adapters on
    /// one weight are applied in order and do not commute.
    Multiplicative,
    /// `W'` holds the adapter's own values in place of `W`'s (LN tuning's
    /// norm parameters, trainable tokens' embedding rows): the merge keeps
    /// the originals at the front of its scratch, and the unmerge puts them
    /// back bit for bit. Only one such adapter merges into a weight.
    Replacement,
}

/// Whether [`WeightUpdate::update_rows`] merges or undoes a merge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// `W <- W'`.
    Merge,
    /// `W' <- W` (the inverse, in the element's rounding).
    Unmerge,
}

/// One block of a merge or an unmerge, checked by
/// [`WeightUpdate::update_rows`] and handed to [`WeightUpdate::run_update`]:
/// rows `start..start + n` of the weight in `block [n, cols]`, and of the
/// bias in `bias [n]`.
#[derive(Debug)]
pub struct UpdateBlock<'a, E> {
    /// The first row.
    pub start: usize,
    /// The rows, updated in place.
    pub block: MatMut<'a, E>,
    /// The bias rows, when the caller merges the bias.
    pub bias: Option<&'a mut [E]>,
    /// Merge or unmerge.
    pub direction: Direction,
    /// At least [`WeightUpdate::update_scratch_len`]`(n)` elements; what a
    /// merge keeps for its unmerge is at the front.
    pub scratch: &'a mut [E],
}

/// What merging a method does to a weight `[rows, cols]` and its bias
/// `[rows]`, a block of rows at a time.
pub trait WeightUpdate<E: Element> {
    /// `(rows, cols)` of the weight the update applies to: `(out, in)` for
    /// a linear layer, `(vocab, dim)` for an embedding table.
    fn weight_dims(&self) -> (usize, usize);

    /// Additive (`W + dW`) or multiplicative.
    fn kind(&self) -> UpdateKind;

    /// Whether the update changes the bias (the output kind of (IA)^3).
    fn touches_bias(&self) -> bool {
        false
    }

    /// Scratch elements [`update_rows`](Self::update_rows) needs for a
    /// block of `rows` rows. Where an unmerge needs what the merge of the
    /// same rows computed (DoRA's norms), it is kept at the front of this
    /// scratch, which the caller hands back unchanged.
    fn update_scratch_len(&self, rows: usize) -> usize;

    /// `Ok` when a merge can be undone without a backup.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] naming what would be divided by zero.
    fn check_invertible(&self) -> Result<()> {
        Ok(())
    }

    /// Merges (or unmerges) rows `start..start + block.rows()` of the
    /// weight, held in `block [n, cols]`, and of the bias, in `bias [n]`
    /// when the update touches it.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (`Weight` for rows past the end, `Dst` for
    /// a block of another width, `Bias`), [`Error::ScratchTooSmall`],
    /// before anything is written; the backend's own errors.
    fn update_rows<B: Backend<E> + ?Sized>(
        &self,
        backend: &B,
        start: usize,
        block: MatMut<'_, E>,
        bias: Option<&mut [E]>,
        direction: Direction,
        scratch: &mut [E],
    ) -> Outcome<E, B> {
        let ((rows, cols), n) = (self.weight_dims(), block.rows());
        check_rows(start, n, rows, cols, &block)?;
        if let Some(b) = &bias {
            check_len(Operand::Bias, n, b.len())?;
        }
        check_scratch(self.update_scratch_len(n), scratch.len())?;
        self.run_update(backend, UpdateBlock { start, block, bias, direction, scratch })
    }

    /// The method's [`update_rows`](Self::update_rows), called once the
    /// rows, the bias length and the scratch length are checked (callers
    /// use `update_rows`).
    ///
    /// # Errors
    /// The method's own refusals; the backend's own errors.
    fn run_update<B: Backend<E> + ?Sized>(&self, backend: &B, block: UpdateBlock<'_, E>) -> Outcome<E, B>;

    /// Merges the update into `target`'s weight (and bias, when the update
    /// touches it and `target` has one) and returns the guard that owns
    /// them, and `scratch` (at least
    /// [`update_scratch_len(rows)`](Self::update_scratch_len)), until
    /// [`Merged::unmerge`] or the guard's drop restores them: from the
    /// backup bit for bit, else by the inverse update.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (`Weight`, `Bias`, `Backup`: the backup
    /// holds the weight, then the bias when one is merged),
    /// [`Error::ScratchTooSmall`], and without a backup
    /// [`check_invertible`](Self::check_invertible)'s refusal, all before
    /// anything is written; the backend's own errors (then the weight is
    /// restored from the backup if one was given).
    fn merge_into<'w, B: Backend<E> + ?Sized>(
        &'w self,
        backend: &'w B,
        target: MergeTarget<'w, E>,
        scratch: &'w mut [E],
    ) -> core::result::Result<Merged<'w, E, Self, B>, B::Error>
    where
        Self: Sized,
    {
        Merged::new(self, backend, target, scratch)
    }
}
