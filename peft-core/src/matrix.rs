use crate::element::Element;
use crate::error::{Error, Result};

/// Elements a `rows x cols` view with `row_stride` needs.
fn needed_len(rows: usize, cols: usize, row_stride: usize) -> Result<usize> {
    if row_stride < cols {
        return Err(Error::BadStride { row_stride, cols });
    }
    if rows == 0 || cols == 0 {
        return Ok(0);
    }
    (rows - 1).checked_mul(row_stride).and_then(|n| n.checked_add(cols)).ok_or(Error::Overflow)
}

/// `rows * cols`, or [`Error::Overflow`].
pub fn checked_len(rows: usize, cols: usize) -> Result<usize> {
    rows.checked_mul(cols).ok_or(Error::Overflow)
}

/// An immutable row-major view.
///
/// Row-major matrix views over slices.
///
/// A view is `rows x cols` with element `(i, j)` at `data[i * row_stride + j]`
/// (`row_stride >= cols`). Constructors check, with `checked_mul`, that the
/// slice holds `(rows - 1) * row_stride + cols` elements, so no access through
/// a view can go out of bounds. A view with zero rows or columns is valid and
/// empty.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a, E> {
    data: &'a [E],
    rows: usize,
    cols: usize,
    row_stride: usize,
}

/// A mutable row-major view.
#[derive(Debug)]
pub struct MatMut<'a, E> {
    data: &'a mut [E],
    rows: usize,
    cols: usize,
    row_stride: usize,
}

/// `rows()`, `cols()` and `row_stride()`, the same for both views.
macro_rules! dims {
    () => {
        /// Number of rows.
        #[inline]
        pub fn rows(&self) -> usize {
            self.rows
        }

        /// Number of columns.
        #[inline]
        pub fn cols(&self) -> usize {
            self.cols
        }

        /// Distance between the starts of consecutive rows.
        #[inline]
        pub fn row_stride(&self) -> usize {
            self.row_stride
        }
    };
}

/// `Ok` when a slice of `len` elements holds a `rows x cols` view with
/// rows `row_stride` apart.
fn check_view(len: usize, rows: usize, cols: usize, row_stride: usize) -> Result<()> {
    let needed = needed_len(rows, cols, row_stride)?;
    if len < needed {
        return Err(Error::SliceTooShort { needed, len });
    }
    Ok(())
}

impl<'a, E: Element> MatRef<'a, E> {
    /// The `0 x 0` view.
    pub const fn empty() -> Self {
        Self { data: &[], rows: 0, cols: 0, row_stride: 0 }
    }

    /// A dense `rows x cols` view of `data` (row stride `cols`).
    ///
    /// # Errors
    /// [`Error::SliceTooShort`] if `data.len() < rows * cols`;
    /// [`Error::Overflow`] if `rows * cols` overflows.
    pub fn new(data: &'a [E], rows: usize, cols: usize) -> Result<Self> {
        Self::with_stride(data, rows, cols, cols)
    }

    /// A `rows x cols` view of `data` whose rows start `row_stride` elements
    /// apart.
    ///
    /// # Errors
    /// [`Error::BadStride`] if `row_stride < cols`; [`Error::SliceTooShort`]
    /// if the slice is shorter than `(rows - 1) * row_stride + cols`;
    /// [`Error::Overflow`].
    pub fn with_stride(data: &'a [E], rows: usize, cols: usize, row_stride: usize) -> Result<Self> {
        check_view(data.len(), rows, cols, row_stride)?;
        Ok(Self { data, rows, cols, row_stride })
    }

    dims!();

    /// The underlying slice: element `(i, j)` is at `i * row_stride + j`.
    /// It holds at least `(rows - 1) * row_stride + cols` elements (when
    /// the view is not empty), and may hold more; a backend that hands the
    /// view to another library maps it through this and the stride.
    #[inline]
    pub fn as_slice(&self) -> &'a [E] {
        self.data
    }

    /// Row `i` (`cols` elements), or an empty slice if `i >= rows`.
    #[inline]
    pub fn row(&self, i: usize) -> &'a [E] {
        if i >= self.rows {
            return &[];
        }
        let start = i * self.row_stride;
        self.data.get(start..start + self.cols).unwrap_or(&[])
    }

    /// Element `(i, j)`, or `None` out of bounds.
    #[inline]
    pub fn get(&self, i: usize, j: usize) -> Option<E> {
        if j >= self.cols {
            return None;
        }
        self.row(i).get(j).copied()
    }

    /// The rows, in order.
    pub fn row_iter(&self) -> impl Iterator<Item = &'a [E]> + '_ {
        (0..self.rows).map(move |i| self.row(i))
    }

    /// The sub-view of columns `start..start + n`, or `None` if out of range.
    pub fn cols_range(&self, start: usize, n: usize) -> Option<MatRef<'a, E>> {
        if start.checked_add(n)? > self.cols {
            return None;
        }
        let data = if self.rows == 0 || n == 0 { &[][..] } else { self.data.get(start..)? };
        MatRef::with_stride(data, self.rows, n, self.row_stride.max(n)).ok()
    }

    /// The sub-view of rows `start..start + n`, or `None` if out of range.
    pub fn rows_range(&self, start: usize, n: usize) -> Option<MatRef<'a, E>> {
        let end = start.checked_add(n)?;
        if end > self.rows {
            return None;
        }
        let offset = if n == 0 { 0 } else { start * self.row_stride };
        let data = self.data.get(offset..)?;
        MatRef::with_stride(data, n, self.cols, self.row_stride).ok()
    }
}

impl<'a, E: Element> MatMut<'a, E> {
    /// A dense `rows x cols` mutable view of `data`.
    ///
    /// # Errors
    /// As [`MatRef::new`].
    pub fn new(data: &'a mut [E], rows: usize, cols: usize) -> Result<Self> {
        Self::with_stride(data, rows, cols, cols)
    }

    /// A strided mutable view.
    ///
    /// # Errors
    /// As [`MatRef::with_stride`].
    pub fn with_stride(data: &'a mut [E], rows: usize, cols: usize, row_stride: usize) -> Result<Self> {
        check_view(data.len(), rows, cols, row_stride)?;
        Ok(Self { data, rows, cols, row_stride })
    }

    dims!();

    /// An immutable view of the same elements.
    #[inline]
    pub fn as_ref(&self) -> MatRef<'_, E> {
        MatRef { data: self.data, rows: self.rows, cols: self.cols, row_stride: self.row_stride }
    }

    /// A shorter-lived mutable view of the same elements.
    #[inline]
    pub fn rb_mut(&mut self) -> MatMut<'_, E> {
        MatMut { data: self.data, rows: self.rows, cols: self.cols, row_stride: self.row_stride }
    }

    /// The mutable sub-view of columns `start..start + n`, or `None` if out
    /// of range.
    pub fn cols_range_mut(&mut self, start: usize, n: usize) -> Option<MatMut<'_, E>> {
        self.rb_mut().into_cols_range(start, n)
    }

    /// The columns `start..start + n` as a view of the same lifetime,
    /// consuming `self`; `None` if out of range.
    pub fn into_cols_range(self, start: usize, n: usize) -> Option<MatMut<'a, E>> {
        if start.checked_add(n)? > self.cols {
            return None;
        }
        let (rows, stride) = (self.rows, self.row_stride.max(n));
        let data = if rows == 0 || n == 0 { &mut [][..] } else { self.data.get_mut(start..)? };
        MatMut::with_stride(data, rows, n, stride).ok()
    }

    /// The rows `start..start + n` as a view of the same lifetime,
    /// consuming `self`; `None` if out of range.
    pub fn into_rows_range(self, start: usize, n: usize) -> Option<MatMut<'a, E>> {
        if start.checked_add(n)? > self.rows {
            return None;
        }
        let offset = if n == 0 { 0 } else { start * self.row_stride };
        let (cols, stride) = (self.cols, self.row_stride);
        MatMut::with_stride(self.data.get_mut(offset..)?, n, cols, stride).ok()
    }

    /// Row `i` mutably, or an empty slice if `i >= rows`.
    #[inline]
    pub fn row_mut(&mut self, i: usize) -> &mut [E] {
        if i >= self.rows {
            return &mut [];
        }
        let start = i * self.row_stride;
        self.data.get_mut(start..start + self.cols).unwrap_or(&mut [])
    }

    /// The rows, mutably, in order.
    pub fn row_iter_mut(&mut self) -> impl Iterator<Item = &mut [E]> + '_ {
        let (rows, cols) = (self.rows, self.cols);
        let stride = self.row_stride.max(1);
        self.data.chunks_mut(stride).take(rows).map(move |r| r.get_mut(..cols).unwrap_or(&mut []))
    }

    /// The underlying slice (including any stride padding).
    #[inline]
    pub fn into_slice(self) -> &'a mut [E] {
        self.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constructors_check_lengths() {
        let d = [0.0f32; 6];
        assert!(MatRef::new(&d, 2, 3).is_ok());
        assert_eq!(MatRef::new(&d, 3, 3).unwrap_err(), Error::SliceTooShort { needed: 9, len: 6 });
        // Stride 4, 2 rows of 2: needs 4 + 2 = 6.
        assert!(MatRef::with_stride(&d, 2, 2, 4).is_ok());
        assert_eq!(MatRef::with_stride(&d, 2, 3, 2).unwrap_err(), Error::BadStride { row_stride: 2, cols: 3 });
        assert_eq!(MatRef::new(&d, usize::MAX, 2).unwrap_err(), Error::Overflow);
        let empty: [f32; 0] = [];
        assert!(MatRef::new(&empty, 0, 5).is_ok());
    }

    #[test]
    fn strided_rows() {
        let d = [1.0f64, 2.0, 9.0, 3.0, 4.0];
        let m = MatRef::with_stride(&d, 2, 2, 3).unwrap();
        assert_eq!(m.row(0), &[1.0, 2.0]);
        assert_eq!(m.row(1), &[3.0, 4.0]);
        assert_eq!(m.row(2), &[] as &[f64]);
        assert_eq!(m.get(1, 1), Some(4.0));
        assert_eq!(m.get(0, 2), None);
        let mut d2 = d;
        let mut mm = MatMut::with_stride(&mut d2, 2, 2, 3).unwrap();
        for r in mm.row_iter_mut() {
            r[0] = 0.0;
        }
        assert_eq!(d2, [0.0, 2.0, 9.0, 0.0, 4.0]);
    }
}
