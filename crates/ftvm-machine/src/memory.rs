//! Guest physical memory: the layout, allocation, and KVM memory slots.
//!
//! Layout (the PC convention that PVH and Linux guests expect):
//! - RAM from 0 up to the MMIO gap at 3 GiB; RAM beyond that continues at 4 GiB;
//! - the legacy hole 640 KiB..1 MiB is reported reserved in the memory map;
//! - fixed boot structures in low memory (see the constants below);
//! - the MMIO gap [3 GiB, 4 GiB) holds device MMIO windows (virtio) and the local APIC page.
//!
//! Guest memory carries an `AtomicBitmap`: every write the VMM makes through vm-memory marks
//! the page dirty, which snapshots and state transfer unite with KVM's dirty log.

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::error::{Error, Result};

/// Guest memory with a dirty bitmap of the VMM's own writes.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;

pub const PAGE_SIZE: u64 = 4096;
pub const MIB: u64 = 1 << 20;

/// Start of the MMIO gap below 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the MMIO gap (RAM resumes here).
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// End of conventional memory (640 KiB); 640 KiB..1 MiB is the legacy hole.
pub const LOW_RAM_END: u64 = 0xa_0000;
/// Where kernels are loaded: 1 MiB.
pub const HIGH_RAM_START: u64 = 0x10_0000;

/// Boot GDT (both protocols).
pub const BOOT_GDT: u64 = 0x500;
/// PVH `hvm_start_info`, then its module list.
pub const PVH_START_INFO: u64 = 0x6000;
pub const PVH_MODLIST: u64 = 0x6040;
/// PVH memory map table.
pub const PVH_MEMMAP: u64 = 0x7000;
/// Linux boot_params ("zero page") for the bzImage protocol.
pub const ZERO_PAGE: u64 = 0x7000;
/// Identity page tables for the 64-bit Linux entry: PML4, PDPT, PD.
pub const PML4: u64 = 0x9000;
pub const PDPT: u64 = 0xa000;
pub const PD: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE: u64 = 0x2_0000;
/// Longest command line ftvm passes (Linux's COMMAND_LINE_SIZE on x86).
pub const CMDLINE_MAX: usize = 2048;

/// Smallest guest ftvm accepts: enough for boot structures and a small kernel.
pub const MIN_MEM: u64 = 2 * MIB;
/// Largest guest ftvm accepts here (a sanity bound, well below what mmap allows).
pub const MAX_MEM: u64 = 1 << 40;

/// The RAM ranges for a guest of `size` bytes: (start, length).
pub fn ram_ranges(size: u64) -> Result<Vec<(GuestAddress, usize)>> {
    if size < MIN_MEM {
        return Err(Error::MemorySize(size, "at least 2 MiB is needed"));
    }
    if size > MAX_MEM {
        return Err(Error::MemorySize(size, "at most 1 TiB is supported"));
    }
    if size % PAGE_SIZE != 0 {
        return Err(Error::MemorySize(size, "must be a multiple of 4 KiB"));
    }
    Ok(if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![(GuestAddress(0), MMIO_GAP_START as usize), (GuestAddress(MMIO_GAP_END), (size - MMIO_GAP_START) as usize)]
    })
}

/// Allocates guest memory (anonymous, zeroed).
pub fn allocate(size: u64) -> Result<GuestMemoryMmap> {
    GuestMemoryMmap::from_ranges(&ram_ranges(size)?).map_err(|e| Error::MemoryAlloc(e.to_string()))
}

/// Registers every region with KVM, one slot each, optionally with dirty logging.
pub fn register(vm: &VmFd, mem: &GuestMemoryMmap, dirty_log: bool) -> Result<()> {
    for (slot, region) in mem.iter().enumerate() {
        let flags = if dirty_log { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
        let desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region's mapping lives as long as `mem`, which the VM keeps alive for
        // its whole life, and the slots do not overlap (regions never do).
        unsafe { vm.set_user_memory_region(desc) }.map_err(Error::kvm("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

/// One entry of the guest's memory map (e820 types).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryMapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: MemoryKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryKind {
    Ram = 1,
    Reserved = 2,
}

/// The memory map shown to the guest (e820 for Linux, the PVH memmap table).
pub fn memory_map(mem: &GuestMemoryMmap) -> Vec<MemoryMapEntry> {
    let mut map = vec![
        MemoryMapEntry { addr: 0, size: LOW_RAM_END, kind: MemoryKind::Ram },
        MemoryMapEntry { addr: LOW_RAM_END, size: HIGH_RAM_START - LOW_RAM_END, kind: MemoryKind::Reserved },
    ];
    for region in mem.iter() {
        let start = region.start_addr().raw_value().max(HIGH_RAM_START);
        let end = region.start_addr().raw_value() + region.len();
        if end > start {
            map.push(MemoryMapEntry { addr: start, size: end - start, kind: MemoryKind::Ram });
        }
    }
    map
}

/// Total RAM in bytes.
pub fn total_size(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

/// The highest RAM address below 4 GiB, plus one.
pub fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|r| r.start_addr().raw_value() + r.len()).filter(|&end| end <= MMIO_GAP_START).max().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_splits_around_the_mmio_gap() {
        assert_eq!(ram_ranges(256 * MIB).unwrap(), vec![(GuestAddress(0), (256 * MIB) as usize)]);
        let big = ram_ranges(4096 * MIB).unwrap();
        assert_eq!(big[0], (GuestAddress(0), MMIO_GAP_START as usize));
        assert_eq!(big[1], (GuestAddress(MMIO_GAP_END), (1024 * MIB) as usize));
        assert!(ram_ranges(MIB).is_err());
        assert!(ram_ranges(256 * MIB + 1).is_err());
    }

    #[test]
    fn memory_map_reserves_the_legacy_hole() {
        let mem = allocate(64 * MIB).unwrap();
        let map = memory_map(&mem);
        assert_eq!(map[0], MemoryMapEntry { addr: 0, size: 0xa_0000, kind: MemoryKind::Ram });
        assert_eq!(map[1].kind, MemoryKind::Reserved);
        assert_eq!(map[2], MemoryMapEntry { addr: MIB, size: 63 * MIB, kind: MemoryKind::Ram });
        assert_eq!(total_size(&mem), 64 * MIB);
        assert_eq!(low_ram_end(&mem), 64 * MIB);
    }
}
