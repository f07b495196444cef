//! Memory: the size the loader reported (PVH memory map) and a bump allocator for
//! applications over the free RAM after the image (no global allocator, nothing is freed).

use core::sync::atomic::{AtomicU64, Ordering};

/// The kit identity-maps (and so can use) physical memory below this address.
pub const MAPPED_LIMIT: u64 = 1 << 30;
/// Heap end assumed when the loader passed no memory map.
const FALLBACK_HEAP_END: u64 = 16 << 20;
/// E820 type of usable RAM.
const E820_RAM: u32 = 1;

static RAM_BYTES: AtomicU64 = AtomicU64::new(0);
static RAM_REGIONS: AtomicU64 = AtomicU64::new(0);
static HEAP_NEXT: AtomicU64 = AtomicU64::new(0);
static HEAP_END: AtomicU64 = AtomicU64::new(0);

extern "C" {
    static __kit_image_end: u8;
}

/// One entry of the PVH memory map (`hvm_memmap_table_entry`).
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct MemmapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
    pub reserved: u32,
}

/// Sets up the memory summary and the heap from the loader's memory map.
pub(crate) fn init(map: &[MemmapEntry]) {
    // Only the address of the linker-defined symbol is taken.
    let image_end = core::ptr::addr_of!(__kit_image_end) as u64;
    let mut heap_end = if map.is_empty() { FALLBACK_HEAP_END } else { image_end };
    let mut ram = 0;
    let mut regions = 0;
    for entry in map.iter().filter(|e| e.kind == E820_RAM) {
        ram += entry.size;
        regions += 1;
        let end = entry.addr.saturating_add(entry.size);
        if entry.addr <= image_end && image_end < end {
            heap_end = end;
        }
    }
    RAM_BYTES.store(ram, Ordering::Relaxed);
    RAM_REGIONS.store(regions, Ordering::Relaxed);
    HEAP_NEXT.store(image_end, Ordering::Relaxed);
    HEAP_END.store(heap_end.min(MAPPED_LIMIT).max(image_end), Ordering::Relaxed);
}

/// Usable RAM in bytes per the loader's memory map (`None` if it passed no map).
pub fn ram_bytes() -> Option<u64> {
    match RAM_BYTES.load(Ordering::Relaxed) {
        0 => None,
        bytes => Some(bytes),
    }
}

/// Number of usable-RAM regions in the loader's memory map.
pub fn ram_regions() -> u64 {
    RAM_REGIONS.load(Ordering::Relaxed)
}

/// Bytes the heap can still hand out.
pub fn heap_free() -> u64 {
    HEAP_END.load(Ordering::Relaxed) - HEAP_NEXT.load(Ordering::Relaxed)
}

/// Allocates `len` zeroed bytes aligned to `align` (a power of two) for the rest of the
/// guest's life. Panics when the heap is exhausted. Ring 3 only (not from interrupts).
pub fn alloc_zeroed(len: usize, align: usize) -> &'static mut [u8] {
    assert!(align.is_power_of_two());
    let next = HEAP_NEXT.load(Ordering::Relaxed);
    let start = (next + align as u64 - 1) & !(align as u64 - 1);
    let end = start.checked_add(len as u64).expect("allocation size overflows");
    let heap_end = HEAP_END.load(Ordering::Relaxed);
    assert!(end <= heap_end, "out of memory: {len} bytes wanted, {} free", heap_end.saturating_sub(start));
    HEAP_NEXT.store(end, Ordering::Relaxed);
    // SAFETY: [start, end) is RAM below 1 GiB (identity-mapped), past the image and handed
    // out exactly once.
    unsafe {
        let ptr = start as *mut u8;
        // The loader may have used this memory (command line, start info): zero it.
        core::ptr::write_bytes(ptr, 0, len);
        core::slice::from_raw_parts_mut(ptr, len)
    }
}

/// Allocates `len` zeroed `u64`s.
pub fn alloc_u64(len: usize) -> &'static mut [u64] {
    let bytes = alloc_zeroed(len * 8, 8);
    // SAFETY: 8-byte aligned, `len * 8` bytes long, and all-zero bytes are a valid u64.
    unsafe { core::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast(), len) }
}
