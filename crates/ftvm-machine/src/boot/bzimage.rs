//! Linux bzImage through the 64-bit boot protocol (Documentation/arch/x86/boot.rst).
//!
//! linux-loader places the protected-mode kernel at 1 MiB and returns its setup header; ftvm
//! fills `boot_params` (the "zero page"): the header with the loader's fields, the e820 memory
//! map, the command line and the initrd, and enters `startup_64` (load address + 0x200) in long
//! mode with `rsi` pointing at `boot_params`.

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{BzImage, KernelLoader};
use vm_memory::{ByteValued, Bytes, GuestAddress};

use super::{load_initrd, BootSpec, EntryState, KernelFormat, Loaded};
use crate::error::{Error, Result};
use crate::memory::{self, GuestMemoryMmap, CMDLINE, HIGH_RAM_START, ZERO_PAGE};

/// The kernel's initial stack (below the zero page, in conventional memory).
pub const BOOT_STACK: u64 = 0x8ff0;
/// "HdrS": the setup header signature.
pub const HDRS_MAGIC: u32 = 0x5372_6448;
/// type_of_loader: "undefined" loader id.
pub const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// xloadflags bit: the kernel has the 64-bit entry point at +0x200.
pub const XLF_KERNEL_64: u16 = 1 << 0;
/// loadflags bits.
pub const LOADED_HIGH: u8 = 1 << 0;
pub const CAN_USE_HEAP: u8 = 1 << 7;
/// The oldest boot protocol with the fields ftvm relies on (2.06: cmdline_size).
pub const MIN_PROTOCOL: u16 = 0x0206;

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
pub struct BootParams(pub boot_params);
// SAFETY: boot_params is a packed C struct of integers and arrays (bindgen output); every bit
// pattern is valid.
unsafe impl ByteValued for BootParams {}

pub fn load(mem: &GuestMemoryMmap, spec: &BootSpec, cmdline: &Cmdline) -> Result<Loaded> {
    let path = &spec.kernel;
    let mut file = super::open_image(path).map_err(|source| Error::KernelRead { path: path.clone(), source })?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    super::check_fits(mem, &format!("the kernel {}", path.display()), HIGH_RAM_START, HIGH_RAM_START + size)?;
    let result = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIGH_RAM_START)))
        .map_err(|e| Error::KernelLoad { path: path.clone(), detail: e.to_string() })?;
    let mut hdr = result
        .setup_header
        .ok_or_else(|| Error::KernelLoad { path: path.clone(), detail: "no setup header".into() })?;
    let version = hdr.version;
    if version < MIN_PROTOCOL {
        return Err(Error::KernelLoad {
            path: path.clone(),
            detail: format!("boot protocol {version:#06x} is older than 2.06"),
        });
    }
    if hdr.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(Error::KernelLoad {
            path: path.clone(),
            detail: "the kernel has no 64-bit entry point (XLF_KERNEL_64)".into(),
        });
    }
    let kernel_start = result.kernel_load.0;
    let kernel_end = result.kernel_end;
    // The kernel decompresses in place and needs init_size bytes from its load address.
    let init_size = u64::from(hdr.init_size);
    super::check_fits(
        mem,
        "the decompressed kernel (setup header init_size)",
        kernel_start,
        kernel_start + init_size.max(kernel_end - kernel_start),
    )?;

    let initrd = match &spec.initrd {
        Some(p) => Some(load_initrd(mem, p, kernel_start + init_size, u64::from(hdr.initrd_addr_max) + 1)?),
        None => None,
    };

    hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    hdr.loadflags |= LOADED_HIGH | CAN_USE_HEAP;
    hdr.heap_end_ptr = 0xfe00;
    hdr.cmd_line_ptr = CMDLINE as u32;
    hdr.cmdline_size = cmdline.as_cstring().map(|c| c.as_bytes().len() as u32).unwrap_or(0);
    if let Some((addr, size)) = initrd {
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
    }
    let mut params = boot_params { hdr, ..Default::default() };
    let map = memory::memory_map(mem);
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry { addr: e.addr, size: e.size, r#type: e.kind as u32 };
    }
    params.e820_entries = map.len().min(params.e820_table.len()) as u8;
    mem.write_obj(BootParams(params), GuestAddress(ZERO_PAGE))
        .map_err(|e| Error::GuestMemory { addr: ZERO_PAGE, detail: e.to_string() })?;

    Ok(Loaded {
        format: KernelFormat::BzImage,
        entry: EntryState::Linux64 { entry: kernel_start + 0x200, boot_params: ZERO_PAGE },
        kernel_start,
        kernel_end,
        initrd,
    })
}

/// Reads back the boot_params ftvm wrote (for tests and `ftvm` diagnostics).
pub fn read_boot_params(mem: &GuestMemoryMmap) -> Result<boot_params> {
    mem.read_obj::<BootParams>(GuestAddress(ZERO_PAGE))
        .map(|p| p.0)
        .map_err(|e| Error::GuestMemory { addr: ZERO_PAGE, detail: e.to_string() })
}
