//! The PVH boot protocol (Xen's HVM direct boot, as QEMU microvm and Firecracker use it).
//!
//! The kernel is an ELF file whose PT_NOTE carries XEN_ELFNOTE_PHYS32_ENTRY. It is entered in
//! 32-bit protected mode with paging off and `ebx` = the physical address of `hvm_start_info`,
//! which points to the command line, a memory map and an optional module (the initrd).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use linux_loader::loader::{Elf, KernelLoader, PvhBootCapability};
use vm_memory::{ByteValued, Bytes, GuestAddress};

use super::{check_fits, load_initrd, BootSpec, EntryState, KernelFormat, Loaded};
use crate::error::{Error, Result};
use crate::memory::{self, GuestMemoryMmap, CMDLINE, HIGH_RAM_START, PVH_MEMMAP, PVH_MODLIST, PVH_START_INFO};

/// "xEn3" with the 0x80 bit set in the first byte.
pub const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

macro_rules! byte_valued {
    ($wrapper:ident, $inner:ty) => {
        #[derive(Clone, Copy, Default)]
        #[repr(transparent)]
        struct $wrapper($inner);
        // SAFETY: a plain C struct of integers (bindgen output) with no padding that matters
        // and no invalid bit patterns.
        unsafe impl ByteValued for $wrapper {}
    };
}
byte_valued!(StartInfo, hvm_start_info);
byte_valued!(MemmapEntry, hvm_memmap_table_entry);
byte_valued!(ModlistEntry, hvm_modlist_entry);

/// The extent of the ELF's loadable segments in physical memory, read from its program
/// headers, so that a guest too small for the image gets a precise error.
fn load_extent(file: &mut File) -> std::io::Result<Option<(u64, u64)>> {
    let mut ehdr = [0u8; 64];
    file.seek(SeekFrom::Start(0))?;
    file.read_exact(&mut ehdr)?;
    if ehdr[4] != 2 || ehdr[5] != 1 {
        return Ok(None); // not ELF64 little-endian: let the loader report it
    }
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let (phoff, phentsize, phnum) = (u64_at(&ehdr, 32), u16_at(&ehdr, 54), u16_at(&ehdr, 56));
    if phentsize < 56 || phnum == 0 {
        return Ok(None);
    }
    let (mut lo, mut hi) = (u64::MAX, 0u64);
    let mut ph = vec![0u8; usize::from(phentsize)];
    for i in 0..u64::from(phnum) {
        file.seek(SeekFrom::Start(phoff.saturating_add(i * u64::from(phentsize))))?;
        file.read_exact(&mut ph)?;
        let p_type = u32::from_le_bytes(ph[0..4].try_into().unwrap());
        if p_type == 1 {
            let (paddr, memsz) = (u64_at(&ph, 24), u64_at(&ph, 40));
            lo = lo.min(paddr);
            hi = hi.max(paddr.saturating_add(memsz));
        }
    }
    Ok((hi > lo).then_some((lo, hi)))
}

pub fn load(mem: &GuestMemoryMmap, spec: &BootSpec, cmdline: &Cmdline) -> Result<Loaded> {
    let path = &spec.kernel;
    let mut file = super::open_image(path).map_err(|source| Error::KernelRead { path: path.clone(), source })?;
    let extent = load_extent(&mut file)
        .map_err(|e| Error::KernelLoad { path: path.clone(), detail: format!("bad ELF header: {e}") })?;
    if let Some((lo, hi)) = extent {
        check_fits(mem, &format!("the kernel {}", path.display()), lo, hi)?;
    }
    let result = Elf::load(mem, None, &mut file, Some(GuestAddress(HIGH_RAM_START)))
        .map_err(|e| Error::KernelLoad { path: path.clone(), detail: e.to_string() })?;
    let entry = match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => addr.0,
        _ => return Err(Error::NoPvhEntry { path: path.clone() }),
    };
    let (kernel_start, kernel_end) = (result.kernel_load.0, result.kernel_end);

    let initrd = match &spec.initrd {
        Some(p) => Some(load_initrd(mem, p, kernel_end, u64::MAX)?),
        None => None,
    };
    write_start_info(mem, cmdline, initrd)?;
    Ok(Loaded {
        format: KernelFormat::PvhElf,
        entry: EntryState::Pvh { entry, start_info: PVH_START_INFO },
        kernel_start,
        kernel_end,
        initrd,
    })
}

fn write_start_info(mem: &GuestMemoryMmap, cmdline: &Cmdline, initrd: Option<(u64, u64)>) -> Result<()> {
    let write_err =
        |addr: u64| move |e: vm_memory::GuestMemoryError| Error::GuestMemory { addr, detail: e.to_string() };
    let map = memory::memory_map(mem);
    for (i, e) in map.iter().enumerate() {
        let entry =
            MemmapEntry(hvm_memmap_table_entry { addr: e.addr, size: e.size, type_: e.kind as u32, reserved: 0 });
        let addr = PVH_MEMMAP + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(entry, GuestAddress(addr)).map_err(write_err(addr))?;
    }
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: if cmdline.as_cstring().map(|c| c.as_bytes().is_empty()).unwrap_or(true) { 0 } else { CMDLINE },
        memmap_paddr: PVH_MEMMAP,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some((paddr, size)) = initrd {
        let module = ModlistEntry(hvm_modlist_entry { paddr, size, ..Default::default() });
        mem.write_obj(module, GuestAddress(PVH_MODLIST)).map_err(write_err(PVH_MODLIST))?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST;
    }
    mem.write_obj(StartInfo(info), GuestAddress(PVH_START_INFO)).map_err(write_err(PVH_START_INFO))
}
