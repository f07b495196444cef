//! Load-time rewriting of a program's `syscall` instructions into jumps to per-site
//! trampolines, so that a system call enters the personality's handler without a trap.
//!
//! On our KVM every ring-3 `syscall` costs PVM's switch out of guest ring 3 (16-29 µs,
//! docs/linux-personality.md, Cost); a `jmp` costs nothing. For each `syscall` the rewrite
//! picks a **window** of whole instructions around it (at least 5 bytes, for a `jmp rel32`),
//! copies the window's other instructions into a trampoline (re-encoded at their new address
//! by iced-x86's `BlockEncoder`, which fixes relative branches and RIP-relative operands), and
//! overwrites the window with `jmp trampoline` followed by `int3` padding. The trampoline runs
//! the displaced instructions before the `syscall`, then does what `syscall` would, without a
//! trap and **without touching the program's stack** (its red zone survives):
//!
//! ```text
//!     <displaced instructions before the syscall>
//!     mov  %rsp, user_rsp(%rip)        # what the entry's first two instructions do
//!     mov  kstack_top(%rip), %rsp      # the current thread's kernel stack
//!     pushfq                           # R11 = RFLAGS, pushed on the kernel stack
//!     pop  %r11
//!     or   $0x200, %r11                # IF, as ring 3 always has it
//!     mov  $continuation, %ecx         # RCX = where the call returns to
//!     jmp  handler                     # the entry's ring-3 part
//! ```
//!
//! The continuation is the original code right after the window when the window ends with
//! the `syscall` (the usual case: `mov $nr, %eax; syscall`), else a second piece of the
//! trampoline that runs the displaced instructions after the `syscall` and jumps back.
//!
//! A window is refused, and the `syscall` stays as it is (it still works, through the trap),
//! when an instruction boundary inside it could be reached other than by falling through:
//! a direct branch or call target, a symbol, a code address found in the program's data (a
//! jump table, a function pointer; a position-independent jump table's 4-byte offsets), in
//! a static-PIE's relocations or in an immediate or RIP-relative operand; when it holds an instruction that
//! cannot move (a call, whose return address would point into the trampoline; another
//! `syscall`; an interrupt or exception); or when the linear sweep may be out of step with
//! the code (the nearest symbol below is not an instruction start). Everything here depends
//! only on the program's bytes and the trampoline address, so a recording and its replay
//! (and both sides of a pair) rewrite identically.
//!
//! **CPUID, RDTSC and RDTSCP** sites are rewritten the same way (the same windows, the same
//! refusals), into trampolines that emulate them: the guest contract forbids them in ring 3,
//! where on our KVM they return host values untrapped. The trampoline runs the displaced
//! instructions before the site, switches to the kernel stack with two `mov`s (the
//! program's stack and red zone untouched, RFLAGS unchanged), `call`s the personality's
//! emulation there, switches back, runs the displaced instructions after the site and jumps
//! back (see `emulation`). **RDRAND and RDSEED** the same way, into an emulation that returns
//! a word from virtio-rng (getrandom's source, which a recording logs) and reports success
//! (see `random_emulation`). A site with no window stays, and the contract check refuses it.
//! No forbidden instruction (RDPID included) ever moves into a window.

use alloc::vec;
use alloc::vec::Vec;

use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Code, Decoder, DecoderOptions, FlowControl, Instruction, InstructionBlock,
    MemoryOperand, Mnemonic, OpKind, Register,
};

/// Bytes of code (or data) at their load address.
#[derive(Clone, Copy)]
pub struct Section<'a> {
    pub address: u64,
    pub bytes: &'a [u8],
}

/// Where the trampolines enter the personality.
#[derive(Clone, Copy, Debug)]
pub struct Entry {
    /// The slot where the entry keeps the program's RSP (`linux_user_rsp`).
    pub user_rsp: u64,
    /// The current thread's kernel stack top (`linux_kstack_top`).
    pub kstack_top: u64,
    /// The ring-3 part of the entry (`linux_syscall_ring3`): expects RSP = kernel stack top,
    /// the program's RSP in `user_rsp`, RCX = return address, R11 = RFLAGS.
    pub handler: u64,
    /// The emulations of CPUID, RDTSC and RDTSCP, called (`call`) on the kernel stack with
    /// the program's registers: each sets what the instruction sets (EAX, EBX, ECX, EDX for
    /// CPUID; EDX:EAX, and ECX for RDTSCP, upper halves zero) and preserves every other
    /// register and RFLAGS.
    pub cpuid: u64,
    pub rdtsc: u64,
    pub rdtscp: u64,
    /// The emulation of RDRAND and RDSEED, called the same way: returns a random word in
    /// RAX and RFLAGS as a successful RDRAND sets them (CF = 1; OF, SF, ZF, AF, PF = 0),
    /// preserving every other register (the trampoline keeps RAX and sets the destination).
    pub random: u64,
}

/// What a site holds: a system call, or an instruction the guest contract forbids in
/// ring 3 (host values, untrapped on our KVM) that the personality emulates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Syscall,
    Cpuid,
    Rdtsc,
    Rdtscp,
    Rdrand,
    Rdseed,
}

impl Kind {
    fn of(mnemonic: Mnemonic) -> Option<Kind> {
        match mnemonic {
            Mnemonic::Syscall => Some(Kind::Syscall),
            Mnemonic::Cpuid => Some(Kind::Cpuid),
            Mnemonic::Rdtsc => Some(Kind::Rdtsc),
            Mnemonic::Rdtscp => Some(Kind::Rdtscp),
            Mnemonic::Rdrand => Some(Kind::Rdrand),
            Mnemonic::Rdseed => Some(Kind::Rdseed),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Syscall => "syscall",
            Kind::Cpuid => "cpuid",
            Kind::Rdtsc => "rdtsc",
            Kind::Rdtscp => "rdtscp",
            Kind::Rdrand => "rdrand",
            Kind::Rdseed => "rdseed",
        }
    }
}

/// Instructions that never move into a trampoline: those the guest contract forbids (a
/// moved one would escape both the emulation and the contract check's address list).
const UNMOVABLE: &[Mnemonic] =
    &[Mnemonic::Cpuid, Mnemonic::Rdtsc, Mnemonic::Rdtscp, Mnemonic::Rdpid, Mnemonic::Rdrand, Mnemonic::Rdseed];

/// What to rewrite.
pub struct Program<'a> {
    /// The executable code.
    pub code: &'a [Section<'a>],
    /// Loaded data (read for code addresses: jump tables, function pointers).
    pub data: &'a [Section<'a>],
    /// Symbol addresses (any type); empty for a stripped program.
    pub symbols: &'a [u64],
    /// Other code addresses the program may jump to: a static-PIE's relocation addends
    /// (its function pointers and jump tables, zero in the file until it relocates itself).
    pub pointers: &'a [u64],
}

/// Bytes to write over the program's code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Patch {
    pub address: u64,
    pub bytes: Vec<u8>,
}

/// Why a `syscall` was left as it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// Every window of whole instructions around it has a boundary inside that is (or may be)
    /// reached by a jump, or an instruction that cannot move.
    NoWindow,
    /// The sweep may be out of step here (the nearest symbol below is no instruction start).
    Unsynced,
    /// iced-x86 could not re-encode the displaced instructions.
    Encode,
}

/// The result: patches for the code, the trampolines (to be placed at `base`), and the
/// `syscall` instructions left alone.
pub struct Rewrite {
    /// `syscall` instructions found.
    pub sites: usize,
    pub patches: Vec<Patch>,
    pub base: u64,
    pub trampolines: Vec<u8>,
    /// `syscall` sites left alone.
    pub skipped: Vec<(u64, Skip)>,
    /// CPUID, RDTSC, RDTSCP, RDRAND and RDSEED sites rewritten into jumps to their emulation.
    pub emulated: Vec<(u64, Kind)>,
    /// Those left as they are (the guest contract check still refuses them).
    pub left: Vec<(u64, Kind, Skip)>,
}

/// At most this many instructions move before / after the `syscall`.
const MAX_BEFORE: usize = 4;
const MAX_AFTER: usize = 4;
const JMP_LEN: u64 = 5;
const INT3: u8 = 0xcc;

/// One code section after the linear sweep: instruction starts (offsets) and lengths.
struct Swept<'a> {
    section: Section<'a>,
    starts: Vec<u32>,
    lens: Vec<u8>,
}

impl Swept<'_> {
    fn address(&self, index: usize) -> u64 {
        self.section.address + u64::from(self.starts[index])
    }

    fn end(&self) -> u64 {
        self.section.address + self.section.bytes.len() as u64
    }

    fn decode(&self, index: usize) -> Instruction {
        let offset = self.starts[index] as usize;
        let bytes = &self.section.bytes[offset..offset + usize::from(self.lens[index])];
        let mut decoder = Decoder::with_ip(64, bytes, self.address(index), DecoderOptions::NONE);
        decoder.decode()
    }

    fn is_start(&self, address: u64) -> bool {
        address >= self.section.address
            && address < self.end()
            && self.starts.binary_search(&((address - self.section.address) as u32)).is_ok()
    }
}

fn sweep<'a>(
    section: Section<'a>,
    targets: &mut Vec<u64>,
    sites: &mut Vec<(usize, usize, Kind)>,
    index: usize,
) -> Swept<'a> {
    let mut swept = Swept { section, starts: Vec::new(), lens: Vec::new() };
    let mut decoder = Decoder::with_ip(64, section.bytes, section.address, DecoderOptions::NONE);
    let mut instruction = Instruction::default();
    while decoder.can_decode() {
        let position = decoder.position();
        decoder.decode_out(&mut instruction);
        if instruction.is_invalid() {
            // As the contract check: resume at the next byte.
            let _ = decoder.set_position(position + 1);
            decoder.set_ip(section.address + position as u64 + 1);
            continue;
        }
        if let Some(kind) = Kind::of(instruction.mnemonic()) {
            sites.push((index, swept.starts.len(), kind));
        }
        swept.starts.push(position as u32);
        swept.lens.push(instruction.len() as u8);
        for op in 0..instruction.op_count() {
            match instruction.op_kind(op) {
                OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => {
                    targets.push(instruction.near_branch_target())
                }
                // A code address loaded into a register (a function pointer, a label).
                OpKind::Immediate32 | OpKind::Immediate32to64 | OpKind::Immediate64 => {
                    targets.push(instruction.immediate(op))
                }
                OpKind::Memory if instruction.is_ip_rel_memory_operand() => {
                    targets.push(instruction.ip_rel_memory_address())
                }
                _ => {}
            }
        }
    }
    swept
}

/// Whether `instruction` may move into a trampoline; `last` if nothing after it in the
/// window runs by falling through from it.
fn movable(instruction: &Instruction, last: bool) -> bool {
    if UNMOVABLE.contains(&instruction.mnemonic()) {
        return false;
    }
    match instruction.flow_control() {
        FlowControl::Next | FlowControl::ConditionalBranch => true,
        FlowControl::UnconditionalBranch | FlowControl::IndirectBranch | FlowControl::Return => last,
        // Calls (their return address), interrupts (syscall, int3), exceptions (ud2), xbegin.
        _ => false,
    }
}

/// The window's instruction indices `first..=last` around the site at `site`, if
/// one can be rewritten.
fn window(swept: &Swept, site: usize, reached: &dyn Fn(u64) -> bool, free_from: u64) -> Option<(usize, usize)> {
    let count = swept.starts.len();
    let mut order = Vec::new();
    for before in 1..=MAX_BEFORE {
        order.push((before, 0));
    }
    for after in 1..=MAX_AFTER {
        for before in 0..=MAX_BEFORE {
            order.push((before, after));
        }
    }
    'candidates: for (before, after) in order {
        if site < before || site + after >= count {
            continue;
        }
        let (first, last) = (site - before, site + after);
        for i in first..last {
            if u64::from(swept.starts[i]) + u64::from(swept.lens[i]) != u64::from(swept.starts[i + 1]) {
                continue 'candidates; // an undecodable byte in between
            }
        }
        let start = swept.address(first);
        let end = swept.address(last) + u64::from(swept.lens[last]);
        if end - start < JMP_LEN || start < free_from {
            continue;
        }
        // Minimal: a shorter window of the same kind was long enough (and was refused).
        if before > 0 && after == 0 && end - swept.address(first + 1) >= JMP_LEN {
            continue;
        }
        if after > 0 && swept.address(last) - start >= JMP_LEN {
            continue;
        }
        if (first + 1..=last).any(|i| reached(swept.address(i))) {
            continue;
        }
        for i in first..=last {
            if i != site && !movable(&swept.decode(i), i == last && i > site) {
                continue 'candidates;
            }
        }
        return Some((first, last));
    }
    None
}

fn encode(instructions: &[Instruction], rip: u64) -> Option<Vec<u8>> {
    BlockEncoder::encode(64, InstructionBlock::new(instructions, rip), BlockEncoderOptions::NONE)
        .ok()
        .map(|r| r.code_buffer)
}

fn jmp(target: u64) -> Instruction {
    Instruction::with_branch(Code::Jmp_rel32_64, target).expect("jmp rel32 is a branch")
}

/// The trampoline of a window: `(code, entry offset)` for placing at `rip`.
fn trampoline(displaced: &[Instruction], site: usize, resume: u64, entry: Entry, rip: u64) -> Option<(Vec<u8>, u64)> {
    let (before, after) = (&displaced[..site], &displaced[site + 1..]);
    let mut code = Vec::new();
    let continuation = if after.is_empty() {
        resume
    } else {
        let mut tail: Vec<Instruction> = after.to_vec();
        tail.push(jmp(resume));
        code = encode(&tail, rip)?;
        rip
    };
    let head_rip = rip + code.len() as u64;
    let mut head: Vec<Instruction> = before.to_vec();
    let rip_rel = |address: u64| MemoryOperand::with_base_displ(Register::RIP, address as i64);
    head.push(Instruction::with2(Code::Mov_rm64_r64, rip_rel(entry.user_rsp), Register::RSP).ok()?);
    head.push(Instruction::with2(Code::Mov_r64_rm64, Register::RSP, rip_rel(entry.kstack_top)).ok()?);
    head.push(Instruction::with(Code::Pushfq));
    head.push(Instruction::with1(Code::Pop_r64, Register::R11).ok()?);
    // IF as a ring-3 program always has it (and as Linux's R11 shows it).
    head.push(Instruction::with2(Code::Or_rm64_imm32, Register::R11, 0x200u32).ok()?);
    head.push(match u32::try_from(continuation) {
        Ok(c) => Instruction::with2(Code::Mov_r32_imm32, Register::ECX, c).ok()?,
        Err(_) => Instruction::with2(Code::Mov_r64_imm64, Register::RCX, continuation).ok()?,
    });
    head.push(jmp(entry.handler));
    code.extend(encode(&head, head_rip)?);
    Some((code, head_rip - rip))
}

/// The trampoline of an emulated instruction's window, for placing at `rip` (entered at its
/// start): the displaced instructions before the site, then, without touching the
/// program's stack, the program's RSP saved in `user_rsp` and the kernel stack loaded, a
/// `call` of the emulation there (its return address goes on the kernel stack), RSP back,
/// the displaced instructions after the site, and a jump back to `resume`. Only `mov`s and
/// the `call`: RFLAGS stays as the program had it (the emulations preserve it too).
///
/// Reusing the entry's `user_rsp` slot is safe: one CPU, and the slot only lives between an
/// entry's first instruction and its push of it, which no emulation can interrupt (an
/// interrupt runs on the ring-0 stack, and threads switch only inside system calls).
fn emulation(
    displaced: &[Instruction],
    site: usize,
    handler: u64,
    resume: u64,
    entry: Entry,
    rip: u64,
) -> Option<Vec<u8>> {
    let call = Instruction::with_branch(Code::Call_rel32_64, handler).ok()?;
    on_kernel_stack(displaced, site, &[call], resume, entry, rip)
}

/// The frame every emulation's trampoline has (see [`emulation`]): the displaced
/// instructions before the site, RSP saved and switched to the kernel stack, `body`, RSP
/// back, the displaced instructions after the site, and the jump back to `resume`.
fn on_kernel_stack(
    displaced: &[Instruction],
    site: usize,
    body: &[Instruction],
    resume: u64,
    entry: Entry,
    rip: u64,
) -> Option<Vec<u8>> {
    let rip_rel = |address: u64| MemoryOperand::with_base_displ(Register::RIP, address as i64);
    let mut code: Vec<Instruction> = displaced[..site].to_vec();
    code.push(Instruction::with2(Code::Mov_rm64_r64, rip_rel(entry.user_rsp), Register::RSP).ok()?);
    code.push(Instruction::with2(Code::Mov_r64_rm64, Register::RSP, rip_rel(entry.kstack_top)).ok()?);
    code.extend_from_slice(body);
    code.push(Instruction::with2(Code::Mov_r64_rm64, Register::RSP, rip_rel(entry.user_rsp)).ok()?);
    code.extend_from_slice(&displaced[site + 1..]);
    code.push(jmp(resume));
    encode(&code, rip)
}

/// The trampoline of an RDRAND or RDSEED site (`dest`: its register): as [`emulation`], with
/// RAX saved in a 16-byte slot on the kernel stack (the alignment `emulation`'s call has),
/// the value moved from RAX into `dest` as the instruction writes it (a 32-bit register
/// zero-extended, a 16-bit one merged), and RAX restored; `mov` and `lea` leave the
/// emulation's RFLAGS as they are.
fn random_emulation(
    displaced: &[Instruction],
    site: usize,
    dest: Register,
    resume: u64,
    entry: Entry,
    rip: u64,
) -> Option<Vec<u8>> {
    let slot = || MemoryOperand::with_base(Register::RSP);
    let full = dest.full_register();
    if full == Register::RSP || !dest.is_gpr() {
        return None;
    }
    let mut body = vec![
        Instruction::with2(Code::Lea_r64_m, Register::RSP, MemoryOperand::with_base_displ(Register::RSP, -16)).ok()?,
        Instruction::with2(Code::Mov_rm64_r64, slot(), Register::RAX).ok()?,
        Instruction::with_branch(Code::Call_rel32_64, entry.random).ok()?,
    ];
    if dest.is_gpr64() {
        if full != Register::RAX {
            body.push(Instruction::with2(Code::Mov_rm64_r64, dest, Register::RAX).ok()?);
        }
    } else if dest.is_gpr32() {
        // Also for EAX: the upper half is zeroed, as RDRAND r32 does.
        body.push(Instruction::with2(Code::Mov_rm32_r32, dest, Register::EAX).ok()?);
    } else if dest.is_gpr16() {
        // Into the saved RAX for AX, so that its other bits stay.
        let to = if full == Register::RAX {
            Instruction::with2(Code::Mov_rm16_r16, slot(), Register::AX)
        } else {
            Instruction::with2(Code::Mov_rm16_r16, dest, Register::AX)
        };
        body.push(to.ok()?);
    } else {
        return None;
    }
    // RAX back, unless it holds the value (RAX, EAX); for AX the merged slot is RAX.
    if full != Register::RAX || dest.is_gpr16() {
        body.push(Instruction::with2(Code::Mov_r64_rm64, Register::RAX, slot()).ok()?);
    }
    body.push(
        Instruction::with2(Code::Lea_r64_m, Register::RSP, MemoryOperand::with_base_displ(Register::RSP, 16)).ok()?,
    );
    on_kernel_stack(displaced, site, &body, resume, entry, rip)
}

/// Plans the rewrite of `program`, its trampolines to be placed at `base`.
pub fn rewrite(program: &Program, entry: Entry, base: u64) -> Rewrite {
    let mut code: Vec<Section> = program.code.to_vec();
    code.sort_by_key(|s| s.address);
    let mut targets = Vec::new();
    let mut sites = Vec::new();
    let swept: Vec<Swept> = code.iter().enumerate().map(|(i, s)| sweep(*s, &mut targets, &mut sites, i)).collect();
    let in_code = |v: u64| code.iter().any(|s| v >= s.address && v < s.address + s.bytes.len() as u64);
    for data in program.data {
        for chunk in data.bytes.chunks_exact(8) {
            let value = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            if in_code(value) {
                targets.push(value);
            }
        }
    }
    // Position-independent jump tables: 4-byte offsets from the table's own address, which
    // the code takes with a RIP-relative `lea`. From every RIP-relative address in the data,
    // the entries that land in the code (until the first that does not) count as targets.
    let mut tables: Vec<u64> = targets.iter().copied().filter(|&t| !in_code(t)).collect();
    tables.sort_unstable();
    tables.dedup();
    for table in tables {
        let Some(data) = program.data.iter().find(|d| table >= d.address && table < d.address + d.bytes.len() as u64)
        else {
            continue;
        };
        let entries = data.bytes[(table - data.address) as usize..].chunks_exact(4);
        for entry in entries.take(4096) {
            let offset = i32::from_le_bytes(entry.try_into().expect("4 bytes"));
            let target = table.wrapping_add(offset as i64 as u64);
            if !in_code(target) {
                break;
            }
            targets.push(target);
        }
    }
    targets.extend_from_slice(program.pointers);
    targets.retain(|&t| in_code(t));
    targets.extend(program.symbols.iter().copied().filter(|&s| in_code(s)));
    targets.sort_unstable();
    targets.dedup();
    let mut symbols: Vec<u64> = program.symbols.iter().copied().filter(|&s| in_code(s)).collect();
    symbols.sort_unstable();
    let reached = |address: u64| targets.binary_search(&address).is_ok();

    let mut result = Rewrite {
        sites: sites.iter().filter(|s| s.2 == Kind::Syscall).count(),
        patches: Vec::new(),
        base,
        trampolines: Vec::new(),
        skipped: Vec::new(),
        emulated: Vec::new(),
        left: Vec::new(),
    };
    let mut free_from = 0;
    for (section, site, kind) in sites {
        let swept = &swept[section];
        let address = swept.address(site);
        let refuse = |result: &mut Rewrite, skip: Skip| match kind {
            Kind::Syscall => result.skipped.push((address, skip)),
            _ => result.left.push((address, kind, skip)),
        };
        // The sweep is in step at the section's start and, if the nearest symbol below is an
        // instruction start, from there on (decoding is deterministic from a boundary).
        let below = symbols.partition_point(|&s| s <= address);
        if below > 0 {
            let symbol = symbols[below - 1];
            if symbol >= swept.section.address && !swept.is_start(symbol) {
                refuse(&mut result, Skip::Unsynced);
                continue;
            }
        }
        let Some((first, last)) = window(swept, site, &reached, free_from) else {
            refuse(&mut result, Skip::NoWindow);
            continue;
        };
        let displaced: Vec<Instruction> = (first..=last).map(|i| swept.decode(i)).collect();
        let start = swept.address(first);
        let end = swept.address(last) + u64::from(swept.lens[last]);
        while !result.trampolines.len().is_multiple_of(16) {
            result.trampolines.push(INT3);
        }
        let rip = base + result.trampolines.len() as u64;
        let planned = match kind {
            Kind::Syscall => trampoline(&displaced, site - first, end, entry, rip),
            Kind::Cpuid => emulation(&displaced, site - first, entry.cpuid, end, entry, rip).map(|c| (c, 0)),
            Kind::Rdtsc => emulation(&displaced, site - first, entry.rdtsc, end, entry, rip).map(|c| (c, 0)),
            Kind::Rdtscp => emulation(&displaced, site - first, entry.rdtscp, end, entry, rip).map(|c| (c, 0)),
            Kind::Rdrand | Kind::Rdseed => {
                let dest = displaced[site - first].op0_register();
                random_emulation(&displaced, site - first, dest, end, entry, rip).map(|c| (c, 0))
            }
        };
        let Some((bytes, head)) = planned else {
            refuse(&mut result, Skip::Encode);
            continue;
        };
        let Ok(rel) = i32::try_from((rip + head) as i64 - (start + JMP_LEN) as i64) else {
            refuse(&mut result, Skip::Encode);
            continue;
        };
        if kind != Kind::Syscall {
            result.emulated.push((address, kind));
        }
        result.trampolines.extend(bytes);
        let mut patch = vec![INT3; (end - start) as usize];
        patch[0] = 0xe9;
        patch[1..5].copy_from_slice(&rel.to_le_bytes());
        result.patches.push(Patch { address: start, bytes: patch });
        free_from = end;
    }
    result
}

#[cfg(test)]
mod tests;
