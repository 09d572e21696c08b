//! The bench's global allocator: `System`, or — once [`enable_clearing`] is called — the
//! broker's own `ZeroizingAlloc` (`broker/src/alloc.rs`), which wipes every block on free.
//! Running the echo floor both ways prices the clearing allocator on an otherwise identical
//! server.
#![allow(unsafe_code)]

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicBool, Ordering},
};

use secretd::alloc::ZeroizingAlloc;

static CLEARING: AtomicBool = AtomicBool::new(false);

/// Clear every block freed from now on (call first thing in `main`, before any thread).
pub fn enable_clearing() {
    CLEARING.store(true, Ordering::Relaxed);
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SwitchableAlloc;

// SAFETY: every method forwards to `System` or to the broker's `ZeroizingAlloc` (itself a
// sound `GlobalAlloc` over `System`). The switch is flipped once, before any thread and before
// the first allocation that could be freed under the other mode matters: both modes free
// through `System`, so a block allocated under one may be freed under the other.
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
        // SAFETY: forwarded unchanged; both allocators free through `System`.
        unsafe {
            if CLEARING.load(Ordering::Relaxed) {
                ZeroizingAlloc.dealloc(ptr, layout);
            } else {
                System.dealloc(ptr, layout);
            }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded unchanged; both allocators allocate and free through `System`.
        unsafe {
            if CLEARING.load(Ordering::Relaxed) {
                ZeroizingAlloc.realloc(ptr, layout, new_size)
            } else {
                System.realloc(ptr, layout, new_size)
            }
        }
    }
}
