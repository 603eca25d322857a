//! One output buffer written by several rayon tasks at once, each to its own part.
//!
//! Safe Rust hands tasks disjoint parts of a buffer through `chunks_mut`, which splits by
//! rows. Some kernels split by columns instead (each task fills a column range of every
//! row), which no safe split expresses; they share a [`DisjointRows`] and promise, at each
//! use, that their parts do not overlap.

use std::marker::PhantomData;

/// A row-major `f32` buffer (rows `stride` apart) shared by tasks that write disjoint
/// elements of it, for as long as the exclusive borrow it was made from.
#[derive(Clone, Copy)]
pub(crate) struct DisjointRows<'a> {
    ptr: *mut f32,
    stride: usize,
    _buf: PhantomData<&'a mut [f32]>,
}

// SAFETY: a `DisjointRows` is only made from an exclusively borrowed buffer, and every
// method that writes through it requires the caller to prove its part is its alone.
unsafe impl Send for DisjointRows<'_> {}
// SAFETY: as above.
unsafe impl Sync for DisjointRows<'_> {}

impl<'a> DisjointRows<'a> {
    /// Shares `buf`, whose rows are `stride` floats apart, for the borrow's duration.
    pub(crate) fn new(buf: &'a mut [f32], stride: usize) -> Self {
        DisjointRows {
            ptr: buf.as_mut_ptr(),
            stride,
            _buf: PhantomData,
        }
    }

    /// The same rows from column `first` on.
    ///
    /// # Safety
    /// Column `first` must lie inside every row the result is used for.
    pub(crate) unsafe fn columns(self, first: usize) -> Self {
        DisjointRows {
            // SAFETY: in bounds by the caller's guarantee.
            ptr: unsafe { self.ptr.add(first) },
            ..self
        }
    }

    /// The first element of row 0 (for kernels that take a pointer and a row stride).
    pub(crate) fn as_ptr(self) -> *mut f32 {
        self.ptr
    }

    /// Row `r`'s first `len` slots.
    ///
    /// # Safety
    /// They must lie inside the buffer and no other live reference may cover them.
    pub(crate) unsafe fn row(&self, r: usize, len: usize) -> &'a mut [f32] {
        // SAFETY: by the caller's guarantee.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(r * self.stride), len) }
    }
}
