//! A global allocator that asks the kernel for transparent huge pages on large buffers
//! and starts buffers of 64 KiB and more on a cache line.
//!
//! A prefill chunk allocates activations of tens of MiB per layer (4096 rows × 16 heads ×
//! 192 floats of queries alone are 48 MiB). glibc serves such sizes with a fresh `mmap`
//! and unmaps them on free, so every layer faults in and zeroes them again, 4 KiB at a
//! time. Marking those ranges `MADV_HUGEPAGE` (what glibc's `glibc.malloc.hugetlb=1`
//! tunable does, which a process cannot set for itself once started) faults them in 2 MiB
//! at a time: `dsa_bench` 4K all-Full prefill measured 13.2–13.5 s with huge pages against
//! 15.0–16.2 s without, alternating runs on the same binary. Hosts whose
//! `/sys/kernel/mm/transparent_hugepage/enabled` is `never` ignore the advice.

use std::alloc::{GlobalAlloc, Layout, System};

/// Allocations at least this large are advised; smaller ones come from the malloc heap,
/// where advising would only split its mapping.
const ADVISE_MIN: usize = 4 << 20;

/// The system allocator, plus `madvise(MADV_HUGEPAGE)` on allocations of 4 MiB and more.
/// Install it in a binary with `#[global_allocator]`.
pub struct HugePageAlloc;

/// Advises the whole pages inside `ptr .. ptr + len`.
fn advise(ptr: *mut u8, len: usize) {
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        if ptr.is_null() || len < ADVISE_MIN {
            return;
        }
        let start = (ptr as usize).next_multiple_of(PAGE);
        let end = (ptr as usize + len) / PAGE * PAGE;
        if end > start {
            // SAFETY: the range lies inside an allocation we just obtained; madvise with
            // MADV_HUGEPAGE is only a hint and never changes its contents. Its result is
            // ignored on purpose: without THP support the allocation still works.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (ptr, len);
}

/// Allocations at least this large start on a cache line. Kernels load their rows as whole
/// vectors, and with rows a multiple of 16 floats long a buffer that starts 16 bytes past a
/// line (what glibc's `mmap`-backed chunks do) makes every such load touch two lines:
/// `kernel-bench chunk` ran the prefill attention 18% faster (medians of 10 alternations)
/// with its buffers aligned.
const ALIGN_MIN: usize = 64 << 10;

/// A cache line.
const LINE: usize = 64;

/// The layout actually requested from `System` for `layout`: raised to a cache line's
/// alignment from [`ALIGN_MIN`] bytes on. Every method maps layouts through this, so
/// `dealloc` and `realloc` always see the layout the block was obtained with.
fn widened(layout: Layout) -> Layout {
    if layout.size() >= ALIGN_MIN && layout.align() < LINE {
        Layout::from_size_align(layout.size(), LINE).unwrap_or(layout)
    } else {
        layout
    }
}

// SAFETY: every method forwards to `System` with the layout mapped through `widened`,
// consistently (a block is always freed or resized under the layout it was allocated
// with), which only ever raises the alignment; the advice touches no memory.
unsafe impl GlobalAlloc for HugePageAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: `widened` keeps the size and only raises the alignment; the caller
        // upholds `alloc`'s contract for the rest.
        let p = unsafe { System.alloc(widened(layout)) };
        advise(p, layout.size());
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.alloc_zeroed(widened(layout)) };
        advise(p, layout.size());
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator under `layout`, hence from `System` under
        // `widened(layout)`.
        unsafe { System.dealloc(ptr, widened(layout)) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = widened(layout);
        let Ok(new) = Layout::from_size_align(new_size, layout.align()).map(widened) else {
            return std::ptr::null_mut();
        };
        let p = if old.align() == new.align() {
            // SAFETY: `ptr` was obtained under `old`; the caller upholds the rest.
            unsafe { System.realloc(ptr, old, new_size) }
        } else {
            // Crossing ALIGN_MIN changes the alignment, which `realloc` cannot: move.
            // SAFETY: `new` is non-zero sized (the caller's contract); on success the old
            // block is copied up to the smaller size and then freed under `old`.
            unsafe {
                let p = System.alloc(new);
                if !p.is_null() {
                    std::ptr::copy_nonoverlapping(ptr, p, layout.size().min(new_size));
                    System.dealloc(ptr, old);
                }
                p
            }
        };
        advise(p, new_size);
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_and_small_allocations_keep_their_contents() {
        let a = HugePageAlloc;
        for size in [64, ADVISE_MIN - 1, ADVISE_MIN, 3 * ADVISE_MIN + 123] {
            let layout = Layout::from_size_align(size, 64).unwrap();
            // SAFETY: layouts are non-zero sized; every pointer is checked and freed once
            // with the layout it was obtained with.
            unsafe {
                let z = a.alloc_zeroed(layout);
                assert!(!z.is_null());
                assert!(std::slice::from_raw_parts(z, size).iter().all(|&b| b == 0));
                let p = a.alloc(layout);
                assert!(!p.is_null());
                std::ptr::write_bytes(p, 0xA5, size);
                let grown = a.realloc(p, layout, size * 2);
                assert!(!grown.is_null());
                assert!(std::slice::from_raw_parts(grown, size).iter().all(|&b| b == 0xA5));
                a.dealloc(grown, Layout::from_size_align(size * 2, 64).unwrap());
                a.dealloc(z, layout);
            }
        }
    }

    #[test]
    fn large_allocations_start_on_a_cache_line_and_keep_contents_across_resizes() {
        let a = HugePageAlloc;
        // Float buffers (align 4) below, at and above ALIGN_MIN, resized across it both ways.
        for (from, to) in [
            (100, ALIGN_MIN + 4),
            (ALIGN_MIN, 3 * ALIGN_MIN),
            (5 * ALIGN_MIN, 400),
            (ALIGN_MIN - 4, ALIGN_MIN - 8),
        ] {
            let layout = Layout::from_size_align(from, 4).unwrap();
            // SAFETY: as above; each block is freed once with its current size.
            unsafe {
                let p = a.alloc(layout);
                assert!(!p.is_null());
                if from >= ALIGN_MIN {
                    assert_eq!(p as usize % LINE, 0, "{from} bytes");
                }
                for i in 0..from {
                    *p.add(i) = (i % 251) as u8;
                }
                let q = a.realloc(p, layout, to);
                assert!(!q.is_null());
                if to >= ALIGN_MIN {
                    assert_eq!(q as usize % LINE, 0, "{from} -> {to} bytes");
                }
                for i in 0..from.min(to) {
                    assert_eq!(*q.add(i), (i % 251) as u8, "byte {i} of {from} -> {to}");
                }
                a.dealloc(q, Layout::from_size_align(to, 4).unwrap());
            }
        }
    }
}
