//! The allocator of handlers built for `wasm32-unknown-unknown`.
//!
//! Rust's own allocator on that target takes every byte it hands out from
//! `memory.grow`, so a fresh instance grows its memory on its first
//! allocation. Growing changes the protection of the instance's memory in
//! the host, and the next instance in that memory slot changes it back: two
//! `mprotect` calls and a TLB shootdown per message, which cost more than
//! the instantiation itself. This allocator (dlmalloc, as Rust's) first
//! hands out memory the module starts with, zeroed and free until touched:
//!
//! 1. the initial memory's tail, from `__heap_base` (the end of the
//!    module's data, stack and `.bss`) to the initial size, which a build
//!    sets with `-C link-arg=--initial-memory=<bytes>`; by default it is
//!    what rounding up to a 64 KiB page left over;
//! 2. an arena of [`ARENA_BYTES`] in `.bss`, so that a handler built
//!    without that flag still serves its first 512 KiB without growing;
//!
//! and grows memory only once those are used up.

#[cfg(target_feature = "atomics")]
compile_error!("ordo-guest's heap assumes one thread: build without the `atomics` target feature");

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::ptr;

/// Bytes of the initial memory reserved for the heap in `.bss`.
const ARENA_BYTES: usize = 512 << 10;
const PAGE: usize = 64 << 10;

#[repr(C, align(16))]
struct Arena(UnsafeCell<[u8; ARENA_BYTES]>);

// SAFETY: wasm32-unknown-unknown without the atomics feature has one thread.
unsafe impl Sync for Arena {}

static ARENA: Arena = Arena(UnsafeCell::new([0; ARENA_BYTES]));

unsafe extern "C" {
    /// Set by the linker (wasm-ld): the first byte after the module's
    /// data, `.bss` and stack; nothing uses the memory from here on.
    static __heap_base: u8;
}

/// A region of memory not yet handed to dlmalloc.
#[derive(Clone, Copy)]
struct Region {
    start: usize,
    len: usize,
}

impl Region {
    const EMPTY: Region = Region { start: 0, len: 0 };
}

struct System {
    /// The regions not yet handed to dlmalloc, in the order they are
    /// offered: the initial memory's tail, then the arena. Read on the
    /// first request.
    regions: UnsafeCell<Option<[Region; 2]>>,
}

// SAFETY: one thread (see above).
unsafe impl Send for System {}

impl System {
    /// The initial memory's tail and the arena, read on the first request,
    /// before this allocator grew the memory.
    fn initial_regions() -> [Region; 2] {
        let base = ptr::addr_of!(__heap_base) as usize;
        let start = base.next_multiple_of(16);
        let end = core::arch::wasm32::memory_size(0) * PAGE;
        [
            Region {
                start,
                len: end.saturating_sub(start),
            },
            Region {
                start: ARENA.0.get() as usize,
                len: ARENA_BYTES,
            },
        ]
    }
}

unsafe impl dlmalloc::Allocator for System {
    fn alloc(&self, size: usize) -> (*mut u8, usize, u32) {
        // SAFETY: one thread, and nothing else touches the regions.
        let regions = unsafe { &mut *self.regions.get() };
        let regions = regions.get_or_insert_with(System::initial_regions);
        // A region too small for this request stays for a later, smaller one.
        for region in regions.iter_mut() {
            if region.len > 0 && region.len >= size {
                let taken = core::mem::replace(region, Region::EMPTY);
                return (taken.start as *mut u8, taken.len, 0);
            }
        }
        let pages = size.div_ceil(PAGE);
        let prev = core::arch::wasm32::memory_grow(0, pages);
        if prev == usize::MAX {
            return (ptr::null_mut(), 0, 0);
        }
        ((prev * PAGE) as *mut u8, pages * PAGE, 0)
    }

    fn remap(&self, _ptr: *mut u8, _old: usize, _new: usize, _can_move: bool) -> *mut u8 {
        ptr::null_mut()
    }

    fn free_part(&self, _ptr: *mut u8, _old: usize, _new: usize) -> bool {
        false
    }

    fn free(&self, _ptr: *mut u8, _size: usize) -> bool {
        false
    }

    fn can_release_part(&self, _flags: u32) -> bool {
        false
    }

    fn allocates_zeros(&self) -> bool {
        true
    }

    fn page_size(&self) -> usize {
        PAGE
    }
}

/// The global allocator of a handler built for `wasm32-unknown-unknown`.
pub struct Heap(UnsafeCell<dlmalloc::Dlmalloc<System>>);

// SAFETY: one thread (see above).
unsafe impl Sync for Heap {}

#[global_allocator]
static HEAP: Heap = Heap(UnsafeCell::new(dlmalloc::Dlmalloc::new_with_allocator(
    System {
        regions: UnsafeCell::new(None),
    },
)));

unsafe impl GlobalAlloc for Heap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: one thread; dlmalloc's contract is GlobalAlloc's.
        unsafe { (*self.0.get()).malloc(layout.size(), layout.align()) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        unsafe { (*self.0.get()).calloc(layout.size(), layout.align()) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { (*self.0.get()).free(ptr, layout.size(), layout.align()) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        unsafe { (*self.0.get()).realloc(ptr, layout.size(), layout.align(), new_size) }
    }
}
