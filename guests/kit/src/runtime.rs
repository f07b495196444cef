//! The ring-3 side of start-up, the application entry and the panic handler.

use core::panic::PanicInfo;

use crate::mem::{MemmapEntry, MAPPED_LIMIT};

/// `hvm_start_info` (Xen public/arch-x86/hvm/start_info.h).
#[repr(C)]
struct StartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
    rsdp_paddr: u64,
    // version >= 1:
    memmap_paddr: u64,
    memmap_entries: u32,
    reserved: u32,
}

const START_INFO_MAGIC: u32 = 0x336e_c578;
const MAX_MEMMAP_ENTRIES: usize = 128;

extern "Rust" {
    /// Defined by the application through `entry!`.
    fn ftvm_guest_main();
}

/// Entered from ring 0 by `iretq` (see `boot`), in ring 3 with interrupts on.
#[no_mangle]
extern "C" fn kit_ring3_start() -> ! {
    crate::serial::init();
    read_start_info();
    crate::println!(
        "kit: ring 3 up, PIT {} Hz, local APIC {}",
        crate::pit::TICK_HZ,
        if crate::apic::virtual_wire() { "in virtual-wire mode" } else { "absent" }
    );
    // SAFETY: `entry!` defines this symbol as a plain `fn()`.
    unsafe { ftvm_guest_main() };
    crate::power::power_off()
}

/// Takes what the application may need from `hvm_start_info`: the command line (copied)
/// and the memory map (summarized). Without a valid one, both stay empty.
fn read_start_info() {
    let paddr = crate::boot::start_info_paddr();
    if paddr == 0 || paddr >= MAPPED_LIMIT - core::mem::size_of::<StartInfo>() as u64 {
        crate::mem::init(&[], &[]);
        return;
    }
    // SAFETY: identity-mapped below 3 GiB (checked); the loader wrote it before entry.
    let info = unsafe { core::ptr::read_unaligned(paddr as *const StartInfo) };
    if info.magic != START_INFO_MAGIC {
        crate::mem::init(&[], &[]);
        return;
    }
    crate::cmdline::capture(info.cmdline_paddr);
    let modules = crate::boot::capture_modules(info.nr_modules, info.modlist_paddr);
    let entries = if info.version >= 1 { info.memmap_entries as usize } else { 0 };
    let entries = entries.min(MAX_MEMMAP_ENTRIES);
    let table_bytes = (entries * core::mem::size_of::<MemmapEntry>()) as u64;
    let mut map = [MemmapEntry { addr: 0, size: 0, kind: 0, reserved: 0 }; MAX_MEMMAP_ENTRIES];
    if entries > 0 && info.memmap_paddr != 0 && info.memmap_paddr + table_bytes <= MAPPED_LIMIT {
        for (i, slot) in map.iter_mut().take(entries).enumerate() {
            let entry = (info.memmap_paddr as *const MemmapEntry).wrapping_add(i);
            // SAFETY: inside the identity-mapped table the loader described.
            *slot = unsafe { core::ptr::read_unaligned(entry) };
        }
        crate::mem::init(&map[..entries], modules);
    } else {
        crate::mem::init(&[], modules);
    }
}

/// The precompiled `core` is built for unwinding and refers to this symbol; with
/// `panic = "abort"` nothing ever calls it. (LTO builds drop the reference on their own.)
#[no_mangle]
extern "C" fn rust_eh_personality() {}

/// Likewise for the landing pads of the precompiled `alloc`: with `panic = "abort"` no
/// unwinding ever starts, so nothing resumes one.
#[no_mangle]
extern "C" fn _Unwind_Resume() -> ! {
    crate::power::power_off()
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    crate::println!("kit: {info}");
    crate::power::power_off()
}
