//! Memory: the size the loader reported (PVH memory map) and the heap: all free RAM after
//! the image, up to the end of its RAM region (at most 3 GiB, the start of the MMIO hole), managed by the `talc`
//! allocator as the global allocator, so applications can use `alloc` (Vec, BTreeMap,
//! String). `alloc_zeroed`/`alloc_u64` hand out memory for the rest of the guest's life.

use core::alloc::Layout;
use core::sync::atomic::{AtomicU64, Ordering};

use spinning_top::RawSpinlock;
use talc::source::Manual;
use talc::TalcLock;

/// The kit identity-maps (and so can use) physical memory below this address.
pub const MAPPED_LIMIT: u64 = 3 << 30;
/// Heap end assumed when the loader passed no memory map.
const FALLBACK_HEAP_END: u64 = 16 << 20;
/// E820 type of usable RAM.
const E820_RAM: u32 = 1;

static RAM_BYTES: AtomicU64 = AtomicU64::new(0);
static RAM_REGIONS: AtomicU64 = AtomicU64::new(0);
static HEAP_BYTES: AtomicU64 = AtomicU64::new(0);

/// The global allocator. The guest has one CPU and interrupt handlers never allocate, so
/// the spinlock is never contended; it only satisfies `GlobalAlloc`'s `Sync`.
#[global_allocator]
static HEAP: TalcLock<RawSpinlock, Manual> = TalcLock::new(Manual);

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

/// Sets up the memory summary and the heap from the loader's memory map, leaving out the
/// boot modules (the initrd stays readable for the guest's life). Runs once, in ring 3,
/// before the application.
pub(crate) fn init(map: &[MemmapEntry], modules: &[crate::boot::Module]) {
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
    let heap_end = heap_end.min(MAPPED_LIMIT).max(image_end);
    // The heap is [image_end, heap_end) less the modules: claimed piece by piece, in
    // address order (at most one piece more than there are modules).
    let mut holes = [(0u64, 0u64); 4];
    let mut n = 0;
    for module in modules.iter().take(holes.len()) {
        let start = module.paddr & !0xfff;
        let end = (module.paddr + module.size + 0xfff) & !0xfff;
        if end > image_end && start < heap_end {
            holes[n] = (start.max(image_end), end.min(heap_end));
            n += 1;
        }
    }
    holes[..n].sort_unstable();
    let mut start = image_end;
    let mut total = 0;
    for &(hole_start, hole_end) in holes[..n].iter().chain(core::iter::once(&(heap_end, heap_end))) {
        if hole_start > start {
            let size = (hole_start - start) as usize;
            // SAFETY: [start, hole_start) is RAM below 3 GiB (identity-mapped,
            // user-accessible) past the image and outside every module, which nothing else
            // uses; each piece is claimed exactly once, here. (The loader's start info and
            // command line may lie in it: both were read before this.)
            if unsafe { HEAP.lock().claim(start as *mut u8, size) }.is_some() {
                total += size as u64;
            }
        }
        start = start.max(hole_end);
    }
    HEAP_BYTES.store(total, Ordering::Relaxed);
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

/// Size of the heap the global allocator manages, in bytes.
pub fn heap_bytes() -> u64 {
    HEAP_BYTES.load(Ordering::Relaxed)
}

/// Allocates `len` zeroed bytes aligned to `align` (a power of two) for the rest of the
/// guest's life (from the global allocator, never freed). Panics when the heap is
/// exhausted. Ring 3 only (not from interrupts).
pub fn alloc_zeroed(len: usize, align: usize) -> &'static mut [u8] {
    let layout = Layout::from_size_align(len.max(1), align).expect("bad alignment");
    // SAFETY: the layout has a non-zero size.
    let ptr = unsafe { alloc::alloc::alloc_zeroed(layout) };
    if ptr.is_null() {
        alloc::alloc::handle_alloc_error(layout);
    }
    // SAFETY: `ptr` is a fresh, zeroed allocation of at least `len` bytes that is never
    // freed, so handing it out as 'static is sound.
    unsafe { core::slice::from_raw_parts_mut(ptr, len) }
}

/// Allocates `len` zeroed `u64`s for the rest of the guest's life.
pub fn alloc_u64(len: usize) -> &'static mut [u64] {
    let bytes = alloc_zeroed(len * 8, 8);
    // SAFETY: 8-byte aligned, `len * 8` bytes long, and all-zero bytes are a valid u64.
    unsafe { core::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast(), len) }
}
