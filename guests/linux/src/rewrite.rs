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

/// Plans the rewrite of an image loaded with `bias` added to its link addresses, its
/// trampolines at `base`; only code inside `within` (load addresses) when given.
fn plan(elf: &Elf, image: &[u8], bias: u64, base: u64, within: Option<(u64, u64)>) -> rewrite::Rewrite {
    let slice = |offset: u64, size: u64| image.get(offset as usize..offset.checked_add(size)? as usize);
    let inside = |address: u64, size: u64| within.is_none_or(|(lo, hi)| address >= lo && address + size <= hi);
    let mut code = Vec::new();
    let mut data = Vec::new();
    for s in elf.section_headers.iter() {
        if s.sh_type == SHT_NOBITS || s.sh_flags & u64::from(SHF_ALLOC) == 0 || s.sh_size == 0 {
            continue;
        }
        let Some(bytes) = slice(s.sh_offset, s.sh_size) else { continue };
        let section = Section { address: s.sh_addr.wrapping_add(bias), bytes };
        if s.sh_flags & u64::from(SHF_EXECINSTR) != 0 {
            if inside(section.address, s.sh_size) {
                code.push(section);
            }
        } else {
            data.push(section);
        }
    }
    if code.is_empty() {
        // No section headers: the segments (code in the executable ones).
        for p in elf.program_headers.iter().filter(|p| p.p_type == PT_LOAD && p.p_filesz > 0) {
            let Some(bytes) = slice(p.p_offset, p.p_filesz) else { continue };
            let section = Section { address: p.p_vaddr.wrapping_add(bias), bytes };
            if p.p_flags & PF_X != 0 {
                if inside(section.address, p.p_filesz) {
                    code.push(section);
                }
            } else {
                data.push(section);
            }
        }
    }
    // Symbols: the symbol table's and, in a shared object (most are stripped), the dynamic ones.
    let symbols: Vec<u64> = elf
        .syms
        .iter()
        .chain(elf.dynsyms.iter())
        .filter(|s| s.st_value != 0)
        .map(|s| s.st_value.wrapping_add(bias))
        .collect();
    // A static-PIE's or a shared object's code pointers are relocation addends (its data
    // holds zeros there).
    let pointers: Vec<u64> =
        elf.dynrelas.iter().filter_map(|r| r.r_addend).map(|a| (a as u64).wrapping_add(bias)).collect();
    let program = Program { code: &code, data: &data, symbols: &symbols, pointers: &pointers };
    rewrite::rewrite(&program, crate::entry::trampoline_entry(), base)
}

/// Writes a plan's trampolines and patches.
///
/// # Safety
/// The trampolines' range (at `plan.base`) must be program memory nothing else uses, and
/// the patches must lie in the image's loaded code.
unsafe fn write(plan: &rewrite::Rewrite) {
    // SAFETY: the caller's promise.
    unsafe {
        core::ptr::copy_nonoverlapping(plan.trampolines.as_ptr(), plan.base as *mut u8, plan.trampolines.len());
        for patch in &plan.patches {
            core::ptr::copy_nonoverlapping(patch.bytes.as_ptr(), patch.address as *mut u8, patch.bytes.len());
        }
    }
}

fn done(plan: &rewrite::Rewrite) -> Done {
    let count = |skip: Skip| plan.skipped.iter().filter(|(_, s)| *s == skip).count();
    Done {
        rewritten: plan.patches.len(),
        sites: plan.sites,
        end: plan.base + plan.trampolines.len() as u64,
        trampolines: (plan.base, plan.trampolines.len()),
        no_window: count(Skip::NoWindow),
        unsynced: count(Skip::Unsynced),
        encode: count(Skip::Encode),
        emulated: plan.emulated.iter().map(|(address, _)| *address).collect(),
        left: plan.left.len(),
    }
}

/// Rewrites the loaded program (segments already copied, `bias` added to link addresses);
/// the trampolines go at `base`. Returns the end of the trampolines with the counts.
pub fn apply(elf: &Elf, image: &[u8], bias: u64, base: u64) -> Done {
    let plan = plan(elf, image, bias, base, None);
    // SAFETY: the trampolines go in the process window past the program's segments (the
    // caller keeps brk above them); the patches lie inside its executable segments, loaded.
    unsafe { write(&plan) };
    done(&plan)
}

/// The rewrite of a file mapped with PROT_EXEC at `addr` (`len` bytes from file offset
/// `offset`): a shared library that the interpreter maps, rewritten before it runs, as the
/// program was at load time. The trampolines go in memory mapped for them (where mmap finds
/// room: within 2 GiB of everything the program has). `None` when the file is no ELF image
/// with an executable segment there (nothing to rewrite, nothing emulated), else the counts
/// and the bias.
pub fn mapped(mem: &mut crate::mem::ProcMem, image: &[u8], addr: u64, len: u64, offset: u64) -> Option<Mapped> {
    let elf = Elf::parse(image).ok()?;
    if !elf.is_64 || elf.header.e_machine != goblin::elf::header::EM_X86_64 {
        return None;
    }
    let segment = elf
        .program_headers
        .iter()
        .find(|p| p.p_type == PT_LOAD && p.p_flags & PF_X != 0 && p.p_offset >= offset && p.p_offset < offset + len)?;
    // File offset o is at addr + (o - offset); the segment's link address at its offset.
    let bias = (addr + (segment.p_offset - offset)).wrapping_sub(segment.p_vaddr);
    let within = (addr, addr + len);
    // Planned once to learn the size, then again where the room was found (the size may
    // change with the distance of relocated branches: room for twice as much is taken).
    let guess = plan(&elf, image, bias, addr, Some(within));
    if guess.patches.is_empty() {
        return Some(Mapped { done: done(&guess), bias });
    }
    let room = crate::mem::page_up(guess.trampolines.len() as u64 * 2 + 64);
    let base = mem.map(crate::mem::Place::Anywhere, room, true)?;
    let plan = plan(&elf, image, bias, base, Some(within));
    if plan.trampolines.len() as u64 > room {
        mem.unmap(base, base + room);
        return None;
    }
    // SAFETY: the trampolines go in memory just mapped for them; the patches lie in the
    // executable segment just copied to [addr, addr + len) (`within`).
    unsafe { write(&plan) };
    Some(Mapped { done: done(&plan), bias })
}

/// What [`mapped`] did.
pub struct Mapped {
    pub done: Done,
    pub bias: u64,
}

/// The boot console's line for a rewrite that took `ticks`.
pub fn summary(done: &Done, ticks: u64) -> alloc::string::String {
    let mut left = alloc::string::String::new();
    for (n, why) in
        [(done.no_window, "no safe window"), (done.unsynced, "decoding not certain"), (done.encode, "not re-encodable")]
    {
        if n > 0 {
            left.push_str(&alloc::format!(", {n} left: {why}"));
        }
    }
    let emulations = done.emulated.len() + done.left;
    if emulations > 0 {
        left.push_str(&alloc::format!(
            "; {} of {emulations} cpuid/rdtsc/rdtscp/rdrand/rdseed sites into emulations",
            done.emulated.len()
        ));
    }
    alloc::format!(
        "rewrote {} of {} syscall sites into jumps ({} bytes of trampolines at {:#x}, {ticks} ticks{left})",
        done.rewritten - done.emulated.len(),
        done.sites,
        done.trampolines.1,
        done.trampolines.0,
    )
}

/// A file just mapped with PROT_EXEC: its sites rewritten (see [`mapped`]) unless
/// `linux.rewrite=off`, then the guest contract over the code mapped. Err (to end the
/// program with) when it breaks the contract and `linux.contract=off` does not say to run it.
pub fn exec_mapping(
    mem: &mut crate::mem::ProcMem,
    image: &[u8],
    addr: u64,
    len: u64,
    offset: u64,
    name: &str,
) -> Result<(), alloc::string::String> {
    let Ok(elf) = Elf::parse(image) else { return Ok(()) };
    let t0 = ftvm_guest_kit::time::ticks();
    let mut bias = None;
    let mut emulated = Vec::new();
    if ftvm_guest_kit::cmdline::param("linux.rewrite") != Some("off") {
        if let Some(m) = mapped(mem, image, addr, len, offset) {
            ftvm_guest_kit::println!(
                "linux: {name} mapped executable at {addr:#x}: {}",
                summary(&m.done, ftvm_guest_kit::time::ticks() - t0)
            );
            bias = Some(m.bias);
            emulated = m.done.emulated;
        }
    }
    let bias = match bias {
        Some(bias) => bias,
        None => {
            let Some(segment) = elf.program_headers.iter().find(|p| {
                p.p_type == PT_LOAD && p.p_flags & PF_X != 0 && p.p_offset >= offset && p.p_offset < offset + len
            }) else {
                return Ok(());
            };
            (addr + (segment.p_offset - offset)).wrapping_sub(segment.p_vaddr)
        }
    };
    let mut scan = crate::contract::scan(&elf, image);
    scan.violations.retain(|v| {
        let at = v.address.wrapping_add(bias);
        at >= addr && at < addr + len
    });
    crate::contract::verdict(&scan, bias, &emulated)
}
