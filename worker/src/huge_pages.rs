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

/// Whether a block of `layout` is placed on a cache line by [`lined_alloc`] (instead of
/// coming from `System` as asked). Decided by the layout alone, so `dealloc` and `realloc`
/// always know how a block was obtained.
fn lined(layout: Layout) -> bool {
    layout.size() >= ALIGN_MIN && layout.align() <= LINE
}

/// `size` bytes from the C heap starting on a cache line, with the heap's own pointer
/// stored in the 8 bytes before it. `calloc` when `zeroed`: asking `System` for a 64-byte
/// alignment instead would zero large blocks with a `memset` on the calling thread, where
/// `calloc` takes fresh pages the kernel already zeroed (4K prefill GEMM phases dropped
/// from 1.9 to 1.5–1.65 cores used that way).
///
/// # Safety
/// As `GlobalAlloc::alloc`; `size` is at least [`ALIGN_MIN`].
unsafe fn lined_alloc(size: usize, zeroed: bool) -> *mut u8 {
    let Some(total) = size.checked_add(LINE) else {
        return std::ptr::null_mut();
    };
    // SAFETY: plain C allocation calls; the result is checked for null.
    let raw = unsafe {
        if zeroed {
            libc::calloc(1, total)
        } else {
            libc::malloc(total)
        }
    } as *mut u8;
    if raw.is_null() {
        return raw;
    }
    // SAFETY: `raw` holds `size + LINE` bytes and `place` uses at most LINE before the data.
    unsafe { place(raw) }
}

/// The first line-aligned address at least 8 bytes into `raw` (at most [`LINE`] bytes in,
/// since C heap pointers are 8-byte aligned), with `raw` written just before it.
///
/// # Safety
/// `raw` must start a C heap block with room for that offset.
unsafe fn place(raw: *mut u8) -> *mut u8 {
    let offset = (raw as usize + 8).next_multiple_of(LINE) - raw as usize;
    // SAFETY: offset ≤ LINE lies inside the block, and the header slot is 8 bytes before
    // the returned address, after `raw`.
    unsafe {
        let p = raw.add(offset);
        p.cast::<*mut u8>().sub(1).write_unaligned(raw);
        p
    }
}

/// The C heap block behind a [`lined_alloc`] pointer.
///
/// # Safety
/// `p` must come from [`lined_alloc`] or [`lined_realloc`].
unsafe fn raw_of(p: *mut u8) -> *mut u8 {
    // SAFETY: `place` wrote the heap pointer just before `p`.
    unsafe { p.cast::<*mut u8>().sub(1).read_unaligned() }
}

/// Resizes a [`lined_alloc`] block of `old` bytes to `new` (both at least [`ALIGN_MIN`]),
/// keeping its first `min(old, new)` bytes; null (the old block intact) on failure.
///
/// # Safety
/// `p` must come from [`lined_alloc`] or [`lined_realloc`] with size `old`.
unsafe fn lined_realloc(p: *mut u8, old: usize, new: usize) -> *mut u8 {
    let Some(total) = new.checked_add(LINE) else {
        return std::ptr::null_mut();
    };
    // SAFETY: by the caller's guarantee `p`'s heap block is `raw`; `realloc` keeps its
    // bytes, and the data is moved inside the new block if its line offset changed.
    unsafe {
        let raw = raw_of(p);
        let old_offset = p as usize - raw as usize;
        let moved = libc::realloc(raw.cast(), total) as *mut u8;
        if moved.is_null() {
            return moved;
        }
        let offset = (moved as usize + 8).next_multiple_of(LINE) - moved as usize;
        if offset != old_offset {
            std::ptr::copy(moved.add(old_offset), moved.add(offset), old.min(new));
        }
        place(moved)
    }
}

// SAFETY: blocks of `lined` layouts come from the C heap through `lined_alloc` on a cache
// line (so at least as aligned as any layout with align ≤ 64 asks) and go back through
// `raw_of`; every other layout is forwarded to `System` unchanged. `lined` depends on the
// layout only, so each block is freed and resized by the scheme that made it.
unsafe impl GlobalAlloc for HugePageAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc`'s contract.
        let p = unsafe {
            if lined(layout) {
                lined_alloc(layout.size(), false)
            } else {
                System.alloc(layout)
            }
        };
        advise(p, layout.size());
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe {
            if lined(layout) {
                lined_alloc(layout.size(), true)
            } else {
                System.alloc_zeroed(layout)
            }
        };
        advise(p, layout.size());
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator under `layout`, so from the scheme
        // `lined(layout)` names.
        unsafe {
            if lined(layout) {
                libc::free(raw_of(ptr).cast());
            } else {
                System.dealloc(ptr, layout)
            }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let Ok(new) = Layout::from_size_align(new_size, layout.align()) else {
            return std::ptr::null_mut();
        };
        // SAFETY: `ptr` came from this allocator under `layout`; each branch resizes it
        // with the scheme that made it, or moves it between schemes by copying.
        let p = unsafe {
            match (lined(layout), lined(new)) {
                (true, true) => lined_realloc(ptr, layout.size(), new_size),
                (false, false) => System.realloc(ptr, layout, new_size),
                _ => {
                    let p = self.alloc(new);
                    if !p.is_null() {
                        std::ptr::copy_nonoverlapping(ptr, p, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                    p
                }
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
    fn large_zeroed_allocations_are_zero_and_on_a_cache_line() {
        let a = HugePageAlloc;
        for size in [ALIGN_MIN, 7 * ALIGN_MIN + 12] {
            let layout = Layout::from_size_align(size, 4).unwrap();
            // SAFETY: as above.
            unsafe {
                // Dirty a block of the same size first, so a reused one would show.
                let d = a.alloc(layout);
                std::ptr::write_bytes(d, 0x5A, size);
                a.dealloc(d, layout);
                let z = a.alloc_zeroed(layout);
                assert_eq!(z as usize % LINE, 0);
                assert!(std::slice::from_raw_parts(z, size).iter().all(|&b| b == 0));
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
