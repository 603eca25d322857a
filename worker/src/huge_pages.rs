//! A global allocator that asks the kernel for transparent huge pages on large buffers.
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

// SAFETY: every method forwards to `System` with the caller's arguments unchanged; the
// advice touches no memory.
unsafe impl GlobalAlloc for HugePageAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged; the caller upholds `alloc`'s contract.
        let p = unsafe { System.alloc(layout) };
        advise(p, layout.size());
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.alloc_zeroed(layout) };
        advise(p, layout.size());
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
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
}
