use core::fmt;

/// `Result` with [`Error`].
pub type Result<T> = core::result::Result<T, Error>;

/// Which operand of an operation an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Operand {
    /// The input activations `x`.
    Input,
    /// The output `y`.
    Output,
    /// The frozen base weight `W`.
    Weight,
    /// The base bias `b`.
    Bias,
    /// The LoRA down-projection `A`.
    LoraA,
    /// The LoRA up-projection `B`.
    LoraB,
    /// The upstream gradient `dL/dy`.
    GradOutput,
    /// The input gradient `dL/dx`.
    GradInput,
    /// The gradient buffer of `A`.
    GradA,
    /// The gradient buffer of `B`.
    GradB,
    /// A backup buffer for the base weight.
    Backup,
    /// The left operand of a gemm.
    Lhs,
    /// The right operand of a gemm.
    Rhs,
    /// The destination of a gemm.
    Dst,
    /// The adapter's down-projection `W_down` (or its gradient).
    AdapterDown,
    /// The adapter's up-projection `W_up` (or its gradient).
    AdapterUp,
    /// An adapter bias (`b_down` or `b_up`, or a gradient).
    AdapterBias,
    /// A soft prompt or its gradient.
    Prompt,
    /// Input embeddings, or their gradient.
    Embeddings,
    /// An attention mask.
    Mask,
    /// Position ids.
    Positions,
    /// Token ids.
    TokenIds,
    /// An embedding table.
    EmbeddingTable,
    /// Attention queries `Q` (or their gradient).
    Query,
    /// Attention keys `K` (or their gradient).
    Key,
    /// Attention values `V` (or their gradient).
    Value,
    /// Prefix keys and values (or their gradient).
    Prefix,
    /// A parameter of the prefix reparameterization MLP (or its gradient).
    PrefixEncoder,
    /// A trainable parameter tensor (optimizer step).
    Parameter,
    /// A gradient handed to an optimizer.
    Gradient,
    /// Optimizer state (momentum, Adam moments).
    OptimizerState,
    /// The loss of a training step.
    Loss,
    /// The per-adapter gradient list of an adapter set (one entry per slot).
    AdapterGrads,
    /// The routes of a mixed-adapter batch (their rows must sum to the batch's).
    Routes,
}

/// Everything that can go wrong in `peft-core`.
///
/// The error type of `peft-core`.
///
/// Every variant is `Copy` and carries enough numbers to say what was wrong.
/// A function that returns an error has written nothing to its outputs.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// A slice is too short for the view asked of it
    /// (`(rows - 1) * row_stride + cols` elements are needed).
    SliceTooShort {
        /// Elements the view needs.
        needed: usize,
        /// Elements the slice has.
        len: usize,
    },
    /// A row stride smaller than the number of columns.
    BadStride {
        /// The stride given.
        row_stride: usize,
        /// The number of columns.
        cols: usize,
    },
    /// A dimension product overflows `usize`.
    Overflow,
    /// An operand's dimension does not match what the operation requires.
    ShapeMismatch {
        /// The operand at fault.
        operand: Operand,
        /// The size the operation requires.
        expected: usize,
        /// The size given.
        found: usize,
    },
    /// Rank 0, or a rank above what the operation allows (an SVD's
    /// `min(in, out)`; LoRA itself takes any positive rank, as PEFT does).
    InvalidRank {
        /// The rank given.
        rank: usize,
        /// The largest rank allowed (0 when only the rank 0 is at fault).
        max: usize,
    },
    /// `alpha` is zero, infinite or NaN.
    InvalidAlpha,
    /// The caller's scratch buffer is shorter than the `*_scratch_len`
    /// function says.
    ScratchTooSmall {
        /// Elements needed.
        needed: usize,
        /// Elements given.
        len: usize,
    },
    /// Query heads not a positive multiple of key/value heads, or a zero
    /// head count or head size.
    InvalidHeads {
        /// Query heads.
        heads: usize,
        /// Key/value heads.
        kv_heads: usize,
        /// Size of one head.
        head_dim: usize,
    },
    /// A configuration value breaks its rule: `name` says which value
    /// (`"n_virtual"`, `"lr"`, `"layer index"`, ...) and `rule` the rule it
    /// broke (`"must be positive"`, `"must be in [0, 1)"`, ...).
    InvalidParameter {
        /// The parameter's name.
        name: &'static str,
        /// The rule the value broke, as a phrase after the name.
        rule: &'static str,
    },
    /// A token id at or beyond the vocabulary size.
    TokenOutOfRange {
        /// The id.
        id: usize,
        /// The vocabulary size.
        vocab: usize,
    },
    /// An infinite or NaN value where only finite ones are allowed: in a
    /// training step's gradient or loss (the step is refused, parameters and
    /// optimizer state unchanged), or in a weight or scale to be stored.
    NonFinite {
        /// Where: [`Operand::Gradient`] or [`Operand::Loss`] for a step,
        /// [`Operand::Weight`] or [`Operand::Parameter`] (a stored scale).
        operand: Operand,
        /// For a step, the index of the offending tensor in its list (0 for
        /// the loss); otherwise the element's (or scale's) index.
        index: usize,
    },
    /// A finite value beyond what its storage holds: above 65504 for f16,
    /// or a block whose scale would pass f16's 65504 (`|x|` above `65504 *
    /// 127` for Q8_0, `65504 * 8` for Q4_0); or a stored int8 row whose
    /// scale times its largest value overflows f32 (`Parameter`, the row).
    OutOfRange {
        /// Where ([`Operand::Weight`]).
        operand: Operand,
        /// The element's index (for a block format, its block's first).
        index: usize,
    },
    /// An adapter file is malformed; see [`FormatError`](crate::format::FormatError).
    Format(crate::format::FormatError),
    /// An adapter set holds no adapter of the name (or index) given.
    UnknownAdapter,
    /// An adapter set already holds an adapter of the name given.
    DuplicateAdapter,
    /// A fixed-capacity adapter set is full.
    SetFull {
        /// Its capacity.
        capacity: usize,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::SliceTooShort { needed, len } => {
                write!(f, "slice of {len} elements is too short for a view of {needed}")
            }
            Error::BadStride { row_stride, cols } => {
                write!(f, "row stride {row_stride} is smaller than {cols} columns")
            }
            Error::Overflow => f.write_str("dimension product overflows usize"),
            Error::ShapeMismatch { operand, expected, found } => {
                write!(f, "{operand:?}: expected dimension {expected}, found {found}")
            }
            Error::InvalidRank { rank: 0, .. } => f.write_str("rank 0 is invalid: it must be at least 1"),
            Error::InvalidRank { rank, max } => {
                write!(f, "rank {rank} is invalid: it must be in 1..={max} (min(in, out))")
            }
            Error::InvalidAlpha => f.write_str("alpha must be finite and non-zero"),
            Error::ScratchTooSmall { needed, len } => {
                write!(f, "scratch of {len} elements is smaller than the {needed} needed")
            }
            Error::InvalidHeads { heads, kv_heads, head_dim } => write!(
                f,
                "{heads} query heads, {kv_heads} key/value heads, head size {head_dim}: \
                 heads must be positive and a multiple of key/value heads"
            ),
            Error::InvalidParameter { name, rule } => write!(f, "invalid {name}: it {rule}"),
            Error::TokenOutOfRange { id, vocab } => write!(f, "token id {id} is outside a vocabulary of {vocab}"),
            Error::NonFinite { operand: operand @ (Operand::Gradient | Operand::Loss), index } => {
                write!(f, "non-finite value in {operand:?} #{index}: step refused, nothing changed")
            }
            Error::NonFinite { operand, index } => write!(f, "element {index} of the {operand:?} is NaN or infinite"),
            Error::OutOfRange { operand: Operand::Parameter, index } => {
                write!(f, "int8 row {index}: its scale times its largest value overflows f32")
            }
            Error::OutOfRange { operand, index } => write!(
                f,
                "element {index} of the {operand:?} is beyond what its format stores (f16: |x| <= 65504; \
                 a Q8_0 or Q4_0 block's scale must fit f16)"
            ),
            Error::Format(e) => write!(f, "adapter file: {e}"),
            Error::UnknownAdapter => f.write_str("the adapter set holds no adapter of that name"),
            Error::DuplicateAdapter => f.write_str("the adapter set already holds an adapter of that name"),
            Error::SetFull { capacity } => write!(f, "the adapter set is full ({capacity} adapters)"),
        }
    }
}

impl core::error::Error for Error {}

impl From<crate::format::FormatError> for Error {
    fn from(e: crate::format::FormatError) -> Self {
        Error::Format(e)
    }
}

/// `Ok` if a slice's length `found` is the `expected` one.
pub(crate) fn check_len(operand: Operand, expected: usize, found: usize) -> Result<()> {
    if expected == found { Ok(()) } else { Err(Error::ShapeMismatch { operand, expected, found }) }
}

/// `Ok` if a `rows x cols` operand has the required `want_rows x want_cols`
/// shape; otherwise the first dimension that differs.
pub(crate) fn check_shape(
    operand: Operand,
    rows: usize,
    cols: usize,
    want_rows: usize,
    want_cols: usize,
) -> Result<()> {
    check_len(operand, want_rows, rows)?;
    check_len(operand, want_cols, cols)
}

/// Checks an input `x [tokens, in_features]` and an operand `[tokens,
/// out_features]` that goes with it (an output or a gradient).
pub(crate) fn check_io(
    x_rows: usize,
    x_cols: usize,
    in_features: usize,
    operand: Operand,
    rows: usize,
    cols: usize,
    out_features: usize,
) -> Result<()> {
    check_len(Operand::Input, in_features, x_cols)?;
    check_shape(operand, rows, cols, x_rows, out_features)
}

/// Two disjoint `n`-element temporaries from the front of `scratch`.
///
/// Always inlined: the callers' loops over the two halves then know their
/// lengths (bounds checks elided; the adapter backward ran 4% more
/// instructions when a new caller made LLVM outline it).
#[inline(always)]
pub(crate) fn scratch_pair<E>(scratch: &mut [E], n: usize) -> Result<(&mut [E], &mut [E])> {
    check_scratch(n.checked_mul(2).ok_or(Error::Overflow)?, scratch.len())?;
    let (first, rest) = scratch.split_at_mut(n);
    Ok((first, rest.get_mut(..n).unwrap_or(&mut [])))
}

/// The first `n` elements of `scratch`.
pub(crate) fn scratch_prefix<E>(scratch: &mut [E], n: usize) -> Result<&mut [E]> {
    let len = scratch.len();
    scratch.get_mut(..n).ok_or(Error::ScratchTooSmall { needed: n, len })
}

/// `Ok` if a scratch slice of `len` elements holds the `needed` ones.
pub(crate) fn check_scratch(needed: usize, len: usize) -> Result<()> {
    if len >= needed { Ok(()) } else { Err(Error::ScratchTooSmall { needed, len }) }
}

/// The first `n` elements of a scratch buffer and the rest;
/// [`Error::ScratchTooSmall`] when it is shorter (never a panic, whatever
/// a pass's own accounting says).
pub(crate) fn split_scratch<E>(buf: &mut [E], n: usize) -> Result<(&mut [E], &mut [E])> {
    let len = buf.len();
    buf.split_at_mut_checked(n).ok_or(Error::ScratchTooSmall { needed: n, len })
}
