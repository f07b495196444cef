//! The load-time rewrite of the program's `syscall` sites (`linux_abi::rewrite` plans it):
//! each rewritable `syscall` becomes a `jmp` to a per-site trampoline that enters the
//! system-call handler without a trap (on our KVM a ring-3 `syscall` costs PVM's switch out of
//! guest ring 3, 16-29 µs; a jump costs nothing). The trampolines go right after the program's
//! highest segment, page-aligned, before brk: memory the program never uses, within ±2 GiB of
//! its code, at an address that depends only on the binary (so a recording and its replay,
//! and both sides of a pair, rewrite identically). CPUID, RDTSC and RDTSCP sites become jumps
//! to trampolines that call their emulations (`crate::entry`), so that a program containing
//! them obeys the guest contract. `linux.rewrite=off` leaves the code as it is.

use alloc::vec::Vec;

use goblin::elf::program_header::{PF_X, PT_LOAD};
use goblin::elf::section_header::{SHF_ALLOC, SHF_EXECINSTR, SHT_NOBITS};
use goblin::elf::Elf;
use linux_abi::rewrite::{self, Program, Section, Skip};

/// What the rewrite did, for the boot console.
pub struct Done {
    pub rewritten: usize,
    pub sites: usize,
    pub end: u64,
    pub trampolines: (u64, usize),
    pub no_window: usize,
    pub unsynced: usize,
    pub encode: usize,
    /// CPUID, RDTSC and RDTSCP sites rewritten into their emulation (load addresses).
    pub emulated: Vec<u64>,
    /// Those left as they are.
    pub left: usize,
}

/// Rewrites the loaded program (segments already copied, `bias` added to link addresses);
/// the trampolines go at `base`. Returns the end of the trampolines with the counts.
pub fn apply(elf: &Elf, image: &[u8], bias: u64, base: u64) -> Done {
    let slice = |offset: u64, size: u64| image.get(offset as usize..(offset + size) as usize);
    let mut code = Vec::new();
    let mut data = Vec::new();
    for s in elf.section_headers.iter() {
        if s.sh_type == SHT_NOBITS || s.sh_flags & u64::from(SHF_ALLOC) == 0 || s.sh_size == 0 {
            continue;
        }
        let Some(bytes) = slice(s.sh_offset, s.sh_size) else { continue };
        let section = Section { address: s.sh_addr + bias, bytes };
        if s.sh_flags & u64::from(SHF_EXECINSTR) != 0 {
            code.push(section);
        } else {
            data.push(section);
        }
    }
    if code.is_empty() {
        // No section headers: the segments (code in the executable ones).
        for p in elf.program_headers.iter().filter(|p| p.p_type == PT_LOAD && p.p_filesz > 0) {
            let Some(bytes) = slice(p.p_offset, p.p_filesz) else { continue };
            let section = Section { address: p.p_vaddr + bias, bytes };
            if p.p_flags & PF_X != 0 {
                code.push(section);
            } else {
                data.push(section);
            }
        }
    }
    let symbols: Vec<u64> = elf.syms.iter().filter(|s| s.st_value != 0).map(|s| s.st_value + bias).collect();
    // A static-PIE's code pointers are relocation addends (its data holds zeros there).
    let pointers: Vec<u64> =
        elf.dynrelas.iter().filter_map(|r| r.r_addend).map(|a| (a as u64).wrapping_add(bias)).collect();
    let program = Program { code: &code, data: &data, symbols: &symbols, pointers: &pointers };
    let plan = rewrite::rewrite(&program, crate::entry::trampoline_entry(), base);
    // SAFETY: the trampolines go in the process window past the program's segments (the
    // caller keeps brk above them); the patches lie inside its executable segments, loaded.
    unsafe {
        core::ptr::copy_nonoverlapping(plan.trampolines.as_ptr(), base as *mut u8, plan.trampolines.len());
        for patch in &plan.patches {
            core::ptr::copy_nonoverlapping(patch.bytes.as_ptr(), patch.address as *mut u8, patch.bytes.len());
        }
    }
    let count = |skip: Skip| plan.skipped.iter().filter(|(_, s)| *s == skip).count();
    Done {
        rewritten: plan.patches.len(),
        sites: plan.sites,
        end: base + plan.trampolines.len() as u64,
        trampolines: (base, plan.trampolines.len()),
        no_window: count(Skip::NoWindow),
        unsynced: count(Skip::Unsynced),
        encode: count(Skip::Encode),
        emulated: plan.emulated.iter().map(|(address, _)| *address).collect(),
        left: plan.left.len(),
    }
}
