//! A global allocator that clears every heap block before it goes back to the system.
//!
//! A secret passes through more buffers than the store: the `OsString` that `std::env` hands
//! out at start-up, the `Vec<u8>` of a response, the HTTP/2 frame it is encoded into, the
//! aho-corasick tables a `Scan` builds, the file contents a `[sources.files]` reload reads. Each
//! is freed by code we do not own (prost, hyper, bytes), and a freed block keeps its bytes until
//! something reuses it — readable in a core dump or through `/proc/<pid>/mem`. Zeroizing each
//! type by hand cannot reach those buffers; clearing on free reaches all of them.
//!
//! What it guarantees: when `dealloc` (or a moving `realloc`) returns, the block's bytes are
//! zero. What it does not: bytes still live in a block that has not been freed, copies in
//! registers or on the stack, kernel socket buffers. The cost is one `memset` per free, measured
//! by `make bench`.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};

/// [`System`] plus a wipe on every free. Installed as the `#[global_allocator]` of the broker.
#[derive(Debug, Default, Clone, Copy)]
pub struct ZeroizingAlloc;

/// Overwrite `len` bytes at `ptr` with zeros in a way the optimizer cannot drop as a dead store
/// before `free`.
///
/// # Safety
/// `ptr` must be valid for writes of `len` bytes.
#[inline]
unsafe fn wipe(ptr: *mut u8, len: usize) {
    // SAFETY: the caller guarantees `ptr..ptr+len` is a live, writable allocation.
    unsafe { std::ptr::write_bytes(ptr, 0, len) };
    // `black_box` makes the compiler assume the zeroed bytes are read, so the memset above is
    // not eliminated even though the block is freed right after.
    std::hint::black_box(ptr);
}

// SAFETY: every method forwards to `System` with the same layout contract; the extra work only
// writes inside blocks the caller owns and is about to give up.
unsafe impl GlobalAlloc for ZeroizingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged; the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by us with `layout`, so it is writable for `layout.size()`.
        unsafe {
            wipe(ptr, layout.size());
            System.dealloc(ptr, layout);
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // `System.realloc` may move the block and free the old one without clearing it, so a
        // resize is always allocate + copy + wipe + free.
        // SAFETY: `new_size` is non-zero and does not overflow when rounded to `layout.align()`
        // (the caller's contract for `realloc`), so the new layout is valid.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: valid non-zero layout.
        let new = unsafe { System.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: both blocks are live, distinct, and at least `min(old, new)` bytes long;
            // the old one is ours (allocated with `layout`) and is released exactly once here.
            unsafe {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                wipe(ptr, layout.size());
                System.dealloc(ptr, layout);
            }
        }
        new
    }
}

/// Hand freed heap pages back to the kernel (glibc `malloc_trim(0)`: free pages anywhere in
/// every arena, not only at the top). The clearing `realloc` (allocate, copy, free) leaves the
/// heap fragmented after many short-lived connections, so RSS stays near its peak after a
/// flood ends unless free pages are returned; `server` calls this once connections have closed
/// in numbers. Costs a walk over the arenas (a few milliseconds at most): call it rarely and
/// off the async threads. The freed pages were cleared on free, so nothing secret is released.
/// Locked memory (`scrub`'s `mlockall`) is unlocked around the trim: locked pages cannot be
/// released.
pub fn release_free_memory() {
    crate::scrub::with_memory_unlocked(|| {
        // SAFETY: malloc_trim takes no pointers and is safe to call from any thread at any time.
        unsafe {
            libc::malloc_trim(0);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn realloc_preserves_contents_and_frees_zeroed() {
        let a = ZeroizingAlloc;
        let layout = Layout::from_size_align(64, 8).unwrap();
        // SAFETY: valid layout; every pointer is used within its size and freed once.
        unsafe {
            let p = a.alloc(layout);
            assert!(!p.is_null());
            for i in 0..64 {
                *p.add(i) = i as u8 + 1;
            }
            let q = a.realloc(p, layout, 4096);
            assert!(!q.is_null());
            for i in 0..64 {
                assert_eq!(*q.add(i), i as u8 + 1);
            }
            let q2 = a.realloc(q, Layout::from_size_align(4096, 8).unwrap(), 16);
            for i in 0..16 {
                assert_eq!(*q2.add(i), i as u8 + 1);
            }
            a.dealloc(q2, Layout::from_size_align(16, 8).unwrap());
        }
    }

    #[test]
    fn vec_growth_keeps_data() {
        // The global allocator of the test binary is this one (see lib.rs).
        let mut v = Vec::new();
        for i in 0..100_000u32 {
            v.push(i);
        }
        assert_eq!(v.iter().map(|&x| u64::from(x)).sum::<u64>(), 4_999_950_000);
    }
}
