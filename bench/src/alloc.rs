//! The bench's global allocator: `System`, or — once [`enable_clearing`] is called — `System`
//! plus a wipe of every block on free, the same work the broker's `ZeroizingAlloc` does
//! (`broker/src/alloc.rs`). Running the echo floor both ways prices the broker's clearing
//! allocator on an otherwise identical server.
#![allow(unsafe_code)]

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicBool, Ordering},
};

static CLEARING: AtomicBool = AtomicBool::new(false);

/// Clear every block freed from now on (call first thing in `main`, before any thread).
pub fn enable_clearing() {
    CLEARING.store(true, Ordering::Relaxed);
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SwitchableAlloc;

/// # Safety
/// `ptr` must be valid for writes of `len` bytes.
#[inline]
unsafe fn wipe(ptr: *mut u8, len: usize) {
    // SAFETY: the caller guarantees `ptr..ptr+len` is a live, writable allocation.
    unsafe { std::ptr::write_bytes(ptr, 0, len) };
    std::hint::black_box(ptr);
}

// SAFETY: every method forwards to `System` with the caller's layout; the optional wipe only
// writes inside the block being released (as the broker's allocator does).
unsafe impl GlobalAlloc for SwitchableAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` is ours with `layout`, so writable for `layout.size()` bytes.
        unsafe {
            if CLEARING.load(Ordering::Relaxed) {
                wipe(ptr, layout.size());
            }
            System.dealloc(ptr, layout);
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !CLEARING.load(Ordering::Relaxed) {
            // SAFETY: forwarded unchanged.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        // As the broker does: allocate, copy, wipe, free (a moving realloc must not leave
        // the old bytes behind).
        // SAFETY: `new_size` is valid for `layout.align()` per `realloc`'s contract.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: valid non-zero layout.
        let new = unsafe { System.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: both blocks are live and distinct; the old one is released once.
            unsafe {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                wipe(ptr, layout.size());
                System.dealloc(ptr, layout);
            }
        }
        new
    }
}
