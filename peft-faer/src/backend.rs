use core::cell::RefCell;

use faer::Par;
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use peft_core::storage::StoredWeight;
use peft_core::{Accum, Backend, Element, Error, MatMut, MatRef, Op, Product, Result};
use peft_core::{BackendError, ErrorKind, check_gemm};

/// Products with fewer multiply-adds than this run single-threaded
/// whatever [`Faer::with_threads`] says (measured on 2 cores: a
/// `1 x 1024 x 1024` product, 1 M, is slower on two threads than on one).
pub const PAR_MIN_MACS: usize = 1 << 22;

/// The faer backend for `f32` and `f64`.
///
/// `Copy` and cheap: it holds only the parallelism setting.
///
/// `peft-core`'s [`Backend`] on faer's SIMD matmul.
///
/// * [`Faer`] computes f32 and f64 gemms with
///   [`faer::linalg::matmul::matmul`]. `peft-core`'s row-major views map onto
///   faer's strided views with no copy: a view with row stride `s` is faer's
///   matrix with row stride `s` and column stride 1, and a transposed operand
///   is faer's `.transpose()` of it (a stride swap, not a copy).
/// * [`FaerHalf`] computes f16 and bf16 gemms: operands are widened to f32
///   into a staging buffer the caller provides once, multiplied by faer in
///   f32, and each result is rounded once to the element type
///   (round-to-nearest-even). It never allocates; a staging buffer shorter
///   than [`FaerHalf::staging_len`] makes it work in tiles.
///
/// Shapes are checked with [`check_gemm`] before faer is called, so a shape
/// error is `peft-core`'s typed [`Error`], never a faer panic.
///
/// ## Parallelism
///
/// The default is single-threaded ([`Faer::new`]): a service usually runs
/// one request per core, and the small LoRA products gain nothing from
/// threads. [`Faer::with_threads`] splits each gemm over `n` tasks of rayon's
/// global pool.
///
/// ## AVX-512 and `vzeroupper`
///
/// faer's AVX-512 kernels can return with the upper halves of the vector
/// registers dirty. SSE code that runs afterwards on the same thread (every
/// elementwise loop of a default, non-`target-cpu` build: activations,
/// softmax, the LoRA scale) then pays a state-transition penalty on every
/// instruction. After each faer call the backend therefore executes
/// `vzeroupper` when the CPU has AVX (runtime detection, cached by std).
/// [`Faer::clear_upper`] turns it off, only to measure the effect.
#[derive(Clone, Copy, Debug)]
pub struct Faer {
    par: Par,
    clear_upper: bool,
    int8_activations: bool,
}

impl Default for Faer {
    fn default() -> Self {
        Self::new()
    }
}

impl Faer {
    /// A single-threaded faer backend.
    pub fn new() -> Self {
        Self { par: Par::Seq, clear_upper: true, int8_activations: false }
    }

    /// A backend that splits each gemm over `threads` tasks on rayon's
    /// global pool; `0` or `1` means single-threaded.
    pub fn with_threads(threads: usize) -> Self {
        let par = if threads <= 1 { Par::Seq } else { Par::rayon(threads) };
        Self { par, clear_upper: true, int8_activations: false }
    }

    /// The number of tasks each gemm is split over.
    pub fn threads(&self) -> usize {
        match self.par {
            Par::Seq => 1,
            Par::Rayon(n) => n.get(),
        }
    }

    /// Whether to execute `vzeroupper` after each faer call (default
    /// `true`; see the module docs). Turning it off exists to measure the
    /// penalty in the benches; there is no other reason to.
    pub fn clear_upper(mut self, on: bool) -> Self {
        self.clear_upper = on;
        self
    }

    /// Opt in (`true`) to the integer path for one-token products over
    /// Q8_0 and Q4_0 bases: the input quantized to int8 per block of 32
    /// and dotted with the stored integers, as ggml's decode does
    /// ([`crate::stored`]'s `int8` module states the formula and its error
    /// bound). Off by default: the exact f32 product over the dequantized
    /// weights is the reference, and every other product (other formats,
    /// several tokens, gradients) stays on it either way.
    pub fn int8_activations(mut self, on: bool) -> Self {
        self.int8_activations = on;
        self
    }

    /// Whether [`Faer::int8_activations`] is on.
    pub fn uses_int8_activations(&self) -> bool {
        self.int8_activations
    }

    /// These settings on the calling thread only.
    pub(crate) fn single_threaded(&self) -> Self {
        Self { par: Par::Seq, ..*self }
    }

    /// The parallelism for an `m x n x k` product: products below
    /// [`PAR_MIN_MACS`] run on the calling thread, where waking a second
    /// one costs more than it saves (a one-token LoRA step is a handful of
    /// such products).
    fn par_for(&self, m: usize, n: usize, k: usize) -> Par {
        if m.saturating_mul(n).saturating_mul(k) < PAR_MIN_MACS { Par::Seq } else { self.par }
    }

    fn after_call(&self) {
        if self.clear_upper {
            zero_upper();
        }
    }
}

/// Clears the upper halves of the AVX registers when the CPU has AVX.
#[inline]
fn zero_upper() {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    if std::arch::is_x86_feature_detected!("avx") {
        #[cfg(target_arch = "x86")]
        use std::arch::x86::_mm256_zeroupper;
        #[cfg(target_arch = "x86_64")]
        use std::arch::x86_64::_mm256_zeroupper;
        // SAFETY: the intrinsic needs AVX, which was detected at run time
        // just above; it only clears register state.
        unsafe { _mm256_zeroupper() }
    }
}

/// faer's view of a `peft-core` view, transposed when `op` says so.
///
/// A view with at most one row never uses its stride; it is normalized to
/// `cols` so that a huge stride cannot wrap in faer's `isize` strides.
fn faer_ref<'a, T>(m: MatRef<'a, T>, op: Op) -> faer::MatRef<'a, T>
where
    T: Element,
{
    let stride = if m.rows() <= 1 { m.cols() } else { m.row_stride() };
    let v = faer::MatRef::from_row_major_slice_with_stride(m.as_slice(), m.rows(), m.cols(), stride);
    match op {
        Op::N => v,
        Op::T => v.transpose(),
    }
}

fn faer_mut<T: Element>(m: MatMut<'_, T>) -> faer::MatMut<'_, T> {
    let (rows, cols) = (m.rows(), m.cols());
    let stride = if rows <= 1 { cols } else { m.row_stride() };
    // Built as the transpose of a column-major view: faer 0.24.4's
    // `from_row_major_slice_with_stride_mut` passes its strides to
    // `from_raw_parts_mut` swapped (it builds the column-major matrix),
    // which `peft-faer/tests/agree.rs` catches.
    faer::MatMut::from_column_major_slice_with_stride_mut(m.into_slice(), cols, rows, stride).transpose_mut()
}

fn faer_accum(a: Accum) -> faer::Accum {
    match a {
        Accum::Replace => faer::Accum::Replace,
        Accum::Add => faer::Accum::Add,
    }
}

/// `Backend<$t> for Faer`: faer's gemm, and the stored-weight methods given
/// after it (f32 has its own kernels; f64 keeps the portable ones).
macro_rules! impl_faer {
    ($t:ty $(, $($stored:tt)*)?) => {
        impl Backend<$t> for Faer {
            type Error = Error;
$($($stored)*)?

            fn gemm(
                &self,
                dst: MatMut<'_, $t>,
                accum: Accum,
                lhs: MatRef<'_, $t>,
                lhs_op: Op,
                rhs: MatRef<'_, $t>,
                rhs_op: Op,
                alpha: $t,
            ) -> Result<()> {
                let (m, n, k) = check_gemm(&dst, &lhs, lhs_op, &rhs, rhs_op)?;
                faer::linalg::matmul::matmul(
                    faer_mut(dst),
                    faer_accum(accum),
                    faer_ref(lhs, lhs_op),
                    faer_ref(rhs, rhs_op),
                    alpha,
                    self.par_for(m, n, k),
                );
                self.after_call();
                Ok(())
            }

            /// Over the pool's helper threads (`pool.rs`) with
            /// [`Faer::threads`] of them, each part on a single-threaded
            /// copy of these settings, so a part's result does not depend
            /// on the thread count.
            fn for_each_part(&self, parts: usize, f: &(dyn Fn(usize, &Self) + Sync)) {
                let seq = self.single_threaded();
                crate::pool::run(self.threads(), parts, &|i| f(i, &seq));
            }
        }
    };
}

impl_faer!(f64);
impl_faer! {
    f32,
    /// [`crate::stored`]'s kernels: no f32 copy of `W`.
    fn stored_apply(&self, w: &StoredWeight<'_>, p: Product<'_, f32>) -> Result<()> {
        crate::stored::apply(self, w, p.src, p.dst, p.accum)
    }

    /// [`crate::stored`]'s kernels: decoded panels, each multiplied by faer.
    fn stored_apply_transpose(&self, w: &StoredWeight<'_>, p: Product<'_, f32>) -> Result<()> {
        crate::stored::apply_transpose(self, w, p.src, p.dst, p.accum)
    }
}

/// A half-precision element faer cannot multiply directly: widened to f32
/// for the product.
trait Half: Element<Accum = f32> {
    fn widen(src: &[Self], dst: &mut [f32]);
    fn narrow(src: &[f32], dst: &mut [Self]);
}

macro_rules! impl_half {
    ($t:ty) => {
        impl Half for $t {
            #[inline]
            fn widen(src: &[Self], dst: &mut [f32]) {
                // `half`'s slice conversions use F16C / SIMD where present.
                src.convert_to_f32_slice(dst);
            }
            #[inline]
            fn narrow(src: &[f32], dst: &mut [Self]) {
                // Round-to-nearest-even, as `from_f32`.
                dst.convert_from_f32_slice(src);
            }
        }
    };
}

impl_half!(f16);
impl_half!(bf16);

/// The faer backend for `f16` and `bf16`: storage in 16 bits, products and
/// sums in f32, each result rounded once.
///
/// ```text
/// Replace:  C = round(alpha * op(A) op(B))          (in f32)
/// Add:      C = round(f32(C) + alpha * op(A) op(B))
/// ```
///
/// `S` is the staging buffer (`Vec<f32>`, `Box<[f32]>`, `&mut [f32]`),
/// provided once; gemms borrow it in turn, so the backend is `!Sync` (give
/// each thread its own). With at least [`FaerHalf::staging_len`]`(m, n, k)`
/// elements a gemm is one faer call; with less it is split into row and
/// column tiles of the output (each tile still sums over all of `k`, so the
/// result is rounded once either way). The smallest workable buffer holds
/// `2 k + 1` elements.
#[derive(Debug)]
pub struct FaerHalf<S> {
    faer: Faer,
    staging: RefCell<S>,
}

impl<S: AsMut<[f32]>> FaerHalf<S> {
    /// A half-precision backend over `faer`'s settings and `staging`.
    pub fn new(faer: Faer, staging: S) -> Self {
        Self { faer, staging: RefCell::new(staging) }
    }

    /// Staging elements for an untiled `m x n x k` gemm:
    /// `k (m + n) + m n` (saturating).
    pub fn staging_len(m: usize, n: usize, k: usize) -> usize {
        k.saturating_mul(m.saturating_add(n)).saturating_add(m.saturating_mul(n))
    }

    /// Gives the staging buffer back.
    pub fn into_staging(self) -> S {
        self.staging.into_inner()
    }

    #[allow(clippy::too_many_arguments)]
    fn gemm_half<E: Half>(
        &self,
        mut dst: MatMut<'_, E>,
        accum: Accum,
        lhs: MatRef<'_, E>,
        lhs_op: Op,
        rhs: MatRef<'_, E>,
        rhs_op: Op,
        alpha: f32,
    ) -> core::result::Result<(), HalfError> {
        let (m, n, k) = check_gemm(&dst, &lhs, lhs_op, &rhs, rhs_op)?;
        if m == 0 || n == 0 {
            return Ok(());
        }
        let mut staging = self.staging.try_borrow_mut().map_err(|_| HalfError::StagingBusy)?;
        let buf = staging.as_mut();
        let (mb, nb) = tiles(m, n, k, buf.len())
            .ok_or(HalfError::StagingTooSmall { needed: k.saturating_mul(2).saturating_add(1), len: buf.len() })?;
        for j0 in (0..n).step_by(nb) {
            let nj = nb.min(n - j0);
            let (rhs_s, rest) = buf.split_at_mut(k * nj);
            // op(rhs)[:, j0..j0+nj], staged as the rows (Op::N) or columns
            // (Op::T) of `rhs` it reads, keeping the transposition flag.
            let rhs_f = match rhs_op {
                Op::N => stage(rhs, 0, k, j0, nj, rhs_s),
                Op::T => stage(rhs, j0, nj, 0, k, rhs_s),
            };
            for i0 in (0..m).step_by(mb) {
                let mi = mb.min(m - i0);
                let (lhs_s, rest) = rest.split_at_mut(mi * k);
                // `tiles` sized the buffer for `k nj + mi k + mi nj`.
                let dst_s = rest.get_mut(..mi * nj).ok_or(HalfError::Internal("staging tile"))?;
                let lhs_f = match lhs_op {
                    Op::N => stage(lhs, i0, mi, 0, k, lhs_s),
                    Op::T => stage(lhs, 0, k, i0, mi, lhs_s),
                };
                let mut tile = dst
                    .rb_mut()
                    .into_rows_range(i0, mi)
                    .and_then(|t| t.into_cols_range(j0, nj))
                    .ok_or(HalfError::Internal("output tile"))?;
                if accum == Accum::Add {
                    for (row, s) in tile.row_iter_mut().zip(dst_s.chunks_exact_mut(nj)) {
                        E::widen(row, s);
                    }
                }
                let dst_f = faer::MatMut::from_row_major_slice_mut(&mut *dst_s, mi, nj);
                let lhs_v = faer_ref(lhs_f?, lhs_op);
                let rhs_v = faer_ref(rhs_f?, rhs_op);
                faer::linalg::matmul::matmul(
                    dst_f,
                    faer_accum(accum),
                    lhs_v,
                    rhs_v,
                    alpha,
                    self.faer.par_for(mi, nj, k),
                );
                self.faer.after_call();
                for (row, s) in tile.row_iter_mut().zip(dst_s.chunks_exact(nj)) {
                    E::narrow(s, row);
                }
            }
        }
        Ok(())
    }
}

/// The error of [`FaerHalf`]: `peft-core`'s shape errors, and the staging
/// buffer's own failures.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum HalfError {
    /// A shape or length error (`peft-core`'s [`Error`]).
    Core(Error),
    /// The staging buffer is borrowed by a gemm further up this thread's
    /// stack (a backend shared with a callback that runs a gemm itself).
    StagingBusy,
    /// The staging buffer cannot hold even a `1 x 1` output tile of a
    /// product with inner dimension `k`: it needs `2 k + 1` elements.
    StagingTooSmall {
        /// Elements needed (`2 k + 1`).
        needed: usize,
        /// Elements the buffer has.
        len: usize,
    },
    /// A tile the tiling arithmetic sized did not fit: a bug in this
    /// backend, reported rather than panicking.
    Internal(&'static str),
}

impl From<Error> for HalfError {
    fn from(e: Error) -> Self {
        HalfError::Core(e)
    }
}

impl std::fmt::Display for HalfError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HalfError::Core(e) => e.fmt(f),
            HalfError::StagingBusy => f.write_str("the f32 staging buffer is in use by another gemm on this thread"),
            HalfError::StagingTooSmall { needed, len } => {
                write!(f, "f32 staging buffer of {len} elements is smaller than the {needed} one tile needs")
            }
            HalfError::Internal(what) => write!(f, "internal tiling error ({what}); please report"),
        }
    }
}

impl std::error::Error for HalfError {}

impl BackendError for HalfError {
    fn kind(&self) -> ErrorKind {
        match self {
            HalfError::Core(e) => e.kind(),
            HalfError::StagingBusy => ErrorKind::Busy,
            HalfError::StagingTooSmall { .. } => ErrorKind::Scratch,
            HalfError::Internal(_) => ErrorKind::Other,
        }
    }
}

/// Widens rows `r0..r0+nr`, columns `c0..c0+nc` of `m` into `out` (dense,
/// row-major) and returns the f32 view of them.
fn stage<'a, E: Half>(
    m: MatRef<'_, E>,
    r0: usize,
    nr: usize,
    c0: usize,
    nc: usize,
    out: &'a mut [f32],
) -> core::result::Result<MatRef<'a, f32>, HalfError> {
    let block = m.rows_range(r0, nr).and_then(|b| b.cols_range(c0, nc)).ok_or(Error::Overflow)?;
    let out = out.get_mut(..nr * nc).ok_or(HalfError::Internal("staging operand"))?;
    if nc > 0 {
        for (row, o) in block.row_iter().zip(out.chunks_exact_mut(nc)) {
            E::widen(row, o);
        }
    }
    Ok(MatRef::new(out, nr, nc)?)
}

/// Output tile sizes `(mb, nb)` whose staging `k nb + mb k + mb nb` fits in
/// `cap`, halving the larger side until it does; `None` if even `1 x 1`
/// does not fit.
fn tiles(m: usize, n: usize, k: usize, cap: usize) -> Option<(usize, usize)> {
    let need = |mb: usize, nb: usize| FaerHalf::<&mut [f32]>::staging_len(mb, nb, k);
    let (mut mb, mut nb) = (m, n);
    while need(mb, nb) > cap {
        if mb == 1 && nb == 1 {
            return None;
        }
        if mb >= nb {
            mb = mb.div_ceil(2);
        } else {
            nb = nb.div_ceil(2);
        }
    }
    Some((mb, nb))
}

macro_rules! impl_faer_half {
    ($t:ty) => {
        impl<S: AsMut<[f32]>> Backend<$t> for FaerHalf<S> {
            type Error = HalfError;

            fn gemm(
                &self,
                dst: MatMut<'_, $t>,
                accum: Accum,
                lhs: MatRef<'_, $t>,
                lhs_op: Op,
                rhs: MatRef<'_, $t>,
                rhs_op: Op,
                alpha: f32,
            ) -> core::result::Result<(), HalfError> {
                self.gemm_half(dst, accum, lhs, lhs_op, rhs, rhs_op, alpha)
            }
        }
    };
}

impl_faer_half!(f16);
impl_faer_half!(bf16);
