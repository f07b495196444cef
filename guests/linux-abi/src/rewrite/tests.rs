//! Hand-assembled snippets (bytes from `as`), each with the window the rewrite must choose
//! or refuse, and the trampoline decoded back.

extern crate std;

use super::*;
use alloc::string::String;

const CODE: u64 = 0x40_1000;
const BASE: u64 = 0x1000_0000;
const ENTRY: Entry = Entry {
    user_rsp: 0x20_0000,
    kstack_top: 0x20_0008,
    handler: 0x18_0000,
    cpuid: 0x18_1000,
    rdtsc: 0x18_2000,
    rdtscp: 0x18_3000,
    random: 0x18_4000,
};

fn run(bytes: &[u8], symbols: &[u64], data: &[u8]) -> Rewrite {
    let code = [Section { address: CODE, bytes }];
    let data = [Section { address: 0x60_0000, bytes: data }];
    rewrite(&Program { code: &code, data: &data, symbols, pointers: &[] }, ENTRY, BASE)
}

/// The trampoline's instructions from `at`, up to and including the jump to the handler.
fn decode_from(r: &Rewrite, at: u64) -> Vec<Instruction> {
    let offset = (at - r.base) as usize;
    let mut decoder = Decoder::with_ip(64, &r.trampolines[offset..], at, DecoderOptions::NONE);
    let mut out = Vec::new();
    while decoder.can_decode() {
        let i = decoder.decode();
        out.push(i);
        if i.flow_control() == FlowControl::UnconditionalBranch {
            break;
        }
    }
    out
}

fn jump_target(patch: &Patch) -> u64 {
    assert_eq!(patch.bytes[0], 0xe9);
    assert!(patch.bytes[5..].iter().all(|&b| b == INT3), "padding is int3: {:x?}", patch.bytes);
    let rel = i32::from_le_bytes(patch.bytes[1..5].try_into().unwrap());
    (patch.address as i64 + 5 + i64::from(rel)) as u64
}

/// Checks the glue after the displaced instructions: RSP saved and switched, R11 = RFLAGS,
/// RCX = `continuation`, the jump to the handler. Returns the displaced instructions.
fn check_head(head: &[Instruction], continuation: u64) -> Vec<Instruction> {
    let n = head.len();
    assert!(n >= 7, "{head:?}");
    let glue = &head[n - 7..];
    assert_eq!(glue[0].code(), Code::Mov_rm64_r64);
    assert_eq!(glue[0].ip_rel_memory_address(), ENTRY.user_rsp);
    assert_eq!(glue[0].op1_register(), Register::RSP);
    assert_eq!(glue[1].code(), Code::Mov_r64_rm64);
    assert_eq!(glue[1].op0_register(), Register::RSP);
    assert_eq!(glue[1].ip_rel_memory_address(), ENTRY.kstack_top);
    assert_eq!(glue[2].code(), Code::Pushfq);
    assert_eq!((glue[3].code(), glue[3].op0_register()), (Code::Pop_r64, Register::R11));
    assert_eq!(
        (glue[4].mnemonic(), glue[4].op0_register(), glue[4].immediate32()),
        (Mnemonic::Or, Register::R11, 0x200)
    );
    assert_eq!((glue[5].code(), glue[5].op0_register()), (Code::Mov_r32_imm32, Register::ECX));
    assert_eq!(u64::from(glue[5].immediate32()), continuation);
    assert_eq!(glue[6].near_branch_target(), ENTRY.handler);
    // Nothing in the glue touches the program's stack: only the two moves use memory.
    assert!(glue.iter().all(|i| i.op_count() == 0
        || !(0..i.op_count()).any(|o| i.op_kind(o) == OpKind::Memory)
        || i.is_ip_rel_memory_operand()));
    head[..n - 7].to_vec()
}

fn text(i: &Instruction) -> String {
    alloc::format!("{:?}", i.code())
}

#[test]
fn window_ends_at_the_syscall() {
    // mov $0x27,%eax; syscall; ret
    let code = [0xb8, 0x27, 0, 0, 0, 0x0f, 0x05, 0xc3];
    let r = run(&code, &[], &[]);
    assert_eq!((r.sites, r.patches.len(), r.skipped.len()), (1, 1, 0));
    let p = &r.patches[0];
    assert_eq!((p.address, p.bytes.len()), (CODE, 7));
    let head = decode_from(&r, jump_target(p));
    let moved = check_head(&head, CODE + 7);
    assert_eq!(moved.len(), 1);
    assert_eq!((moved[0].code(), moved[0].immediate32()), (Code::Mov_r32_imm32, 0x27));
}

#[test]
fn a_syscall_that_is_a_branch_target_moves_with_what_follows() {
    // 0: xor %eax,%eax; 2: mov $0x27,%eax; 7: syscall; 9: mov %rax,%rdi; c: jmp 7; e: ret
    let code = [0x31, 0xc0, 0xb8, 0x27, 0, 0, 0, 0x0f, 0x05, 0x48, 0x89, 0xc7, 0xeb, 0xf9, 0xc3];
    let r = run(&code, &[], &[]);
    assert_eq!(r.patches.len(), 1, "{:?}", r.skipped);
    let p = &r.patches[0];
    assert_eq!((p.address, p.bytes.len()), (CODE + 7, 5));
    let entry = jump_target(p);
    // The continuation (the displaced `mov %rax,%rdi` and a jump back) comes first.
    let tail_at = entry - 8; // mov (3) + jmp rel32 (5)
    let tail = decode_from(&r, tail_at);
    assert_eq!(tail.len(), 2);
    assert_eq!(text(&tail[0]), "Mov_rm64_r64");
    assert_eq!(tail[1].near_branch_target(), CODE + 12);
    assert!(check_head(&decode_from(&r, entry), tail_at).is_empty());
}

#[test]
fn symbols_and_data_pointers_inside_refuse_a_window() {
    // mov $0x27,%eax; syscall; mov %rax,%rdi; ret
    let code = [0xb8, 0x27, 0, 0, 0, 0x0f, 0x05, 0x48, 0x89, 0xc7, 0xc3];
    // A symbol at the syscall: the backward window is out, the forward one is fine.
    let r = run(&code, &[CODE, CODE + 5], &[]);
    assert_eq!(r.patches.len(), 1);
    assert_eq!(r.patches[0].address, CODE + 5);
    // And a code address in the data at the instruction after it: nothing fits.
    let r = run(&code, &[CODE, CODE + 5], &(CODE + 7).to_le_bytes());
    assert_eq!((r.patches.len(), r.skipped.as_slice()), (0, &[(CODE + 5, Skip::NoWindow)][..]));
    // An immediate operand naming the syscall's address (a label loaded into a register).
    let mut code2 = alloc::vec![0x48, 0xc7, 0xc0];
    code2.extend_from_slice(&((CODE + 12) as u32).to_le_bytes()); // mov $CODE+12,%rax (7)
    code2.extend_from_slice(&[0xb8, 0x27, 0, 0, 0, 0x0f, 0x05, 0xc3]);
    let r = run(&code2, &[], &[]);
    assert_eq!(r.skipped, [(CODE + 12, Skip::NoWindow)]);
}

#[test]
fn position_independent_jump_tables_count() {
    // lea 0x5ff0(%rip),%rdx (the table at 0x60_0000 + 0: code at CODE, 7 bytes, so
    // CODE + 7 + 0x1feff9 = 0x60_0000); mov $0x27,%eax; syscall; ret. The table's entry
    // (an offset from the table) points at the syscall.
    let lea_disp = (0x60_0000 - (CODE + 7)) as u32;
    let mut code = alloc::vec![0x48, 0x8d, 0x15];
    code.extend_from_slice(&lea_disp.to_le_bytes());
    code.extend_from_slice(&[0xb8, 0x27, 0, 0, 0, 0x0f, 0x05, 0xc3]);
    let syscall = CODE + 12;
    let table = ((syscall as i64 - 0x60_0000) as i32).to_le_bytes();
    let r = run(&code, &[], &table);
    assert_eq!(r.skipped, [(syscall, Skip::NoWindow)]);
    // Without the table the window is fine.
    assert_eq!(run(&code, &[], &[0; 4]).patches.len(), 1);
}

#[test]
fn calls_are_never_moved() {
    // call +0; syscall; ret: the call's return address is the syscall
    let code = [0xe8, 0, 0, 0, 0, 0x0f, 0x05, 0xc3, 0x90, 0x90, 0x90];
    let r = run(&code, &[], &[]);
    assert_eq!(r.skipped, [(CODE + 5, Skip::NoWindow)]);
    assert!(r.patches.is_empty());
}

#[test]
fn another_syscall_never_moves() {
    // syscall; syscall; syscall; mov %rax,%rdi (a symbol: reached); ret. The third's only
    // window of 5 bytes or more ending with it holds the other two.
    let code = [0x0f, 0x05, 0x0f, 0x05, 0x0f, 0x05, 0x48, 0x89, 0xc7, 0xc3];
    let r = run(&code, &[CODE, CODE + 6], &[]);
    assert_eq!(r.sites, 3);
    assert!(r.patches.is_empty(), "{:x?}", r.patches);
}

#[test]
fn nothing_after_an_unconditional_jump_or_return_moves() {
    // mov %rdi,%rax (3, a branch target: the syscall start is reached); syscall; ret; next function...
    let code = [0x48, 0x89, 0xf8, 0x0f, 0x05, 0xc3, 0x55, 0x48, 0x89, 0xe5];
    let r = run(&code, &[CODE + 3], &[]);
    assert_eq!(r.skipped, [(CODE + 3, Skip::NoWindow)]);
}

#[test]
fn rip_relative_operands_and_branches_are_relocated() {
    // 0: mov 0x100(%rip),%eax (6; refers to CODE+0x106); 6: syscall; 8: test %eax,%eax;
    // a: js +0x10 (to CODE+0x1c); c: ret. The syscall is reached (symbol), so the forward window.
    let code = [0x8b, 0x05, 0, 1, 0, 0, 0x0f, 0x05, 0x85, 0xc0, 0x78, 0x10, 0xc3];
    let r = run(&code, &[], &[]);
    let p = &r.patches[0];
    assert_eq!((p.address, p.bytes.len()), (CODE, 8));
    let moved = check_head(&decode_from(&r, jump_target(p)), CODE + 8);
    assert_eq!(moved.len(), 1);
    assert_eq!(moved[0].ip_rel_memory_address(), CODE + 0x106);

    let r = run(&code, &[CODE + 6], &[]);
    let p = &r.patches[0];
    assert_eq!((p.address, p.bytes.len()), (CODE + 6, 6)); // syscall, test, js
    let entry = jump_target(p);
    let head = decode_from(&r, entry);
    let continuation = u64::from(head[head.len() - 2].immediate32());
    assert_eq!(head[head.len() - 2].code(), Code::Mov_r32_imm32);
    let tail = decode_from(&r, continuation);
    assert_eq!(text(&tail[0]), "Test_rm32_r32");
    assert_eq!(tail[1].mnemonic(), Mnemonic::Js);
    assert_eq!(tail[1].near_branch_target(), CODE + 0x1c);
    assert_eq!(tail[2].near_branch_target(), CODE + 12);
}

#[test]
fn musl_cancellation_point() {
    // __syscall_cp_asm's end: mov %r11,8(%rsp); syscall; __cp_end: ret
    let code = [0x4c, 0x89, 0x5c, 0x24, 0x08, 0x0f, 0x05, 0xc3];
    let r = run(&code, &[CODE, CODE + 7], &[]);
    let p = &r.patches[0];
    assert_eq!((p.address, p.bytes.len()), (CODE, 7));
    let moved = check_head(&decode_from(&r, jump_target(p)), CODE + 7);
    assert_eq!(text(&moved[0]), "Mov_rm64_r64");
    assert_eq!(moved[0].memory_base(), Register::RSP);
    assert_eq!(moved[0].memory_displacement64(), 8);
}

#[test]
fn neighbouring_sites_do_not_overlap() {
    // mov $1,%eax; syscall; mov $2,%eax; syscall; syscall; ret
    let code = [0xb8, 1, 0, 0, 0, 0x0f, 0x05, 0xb8, 2, 0, 0, 0, 0x0f, 0x05, 0x0f, 0x05, 0xc3];
    let r = run(&code, &[], &[]);
    assert_eq!(r.sites, 3);
    let windows: Vec<(u64, usize)> = r.patches.iter().map(|p| (p.address, p.bytes.len())).collect();
    assert_eq!(windows, [(CODE, 7), (CODE + 7, 7)]);
    assert_eq!(r.skipped, [(CODE + 14, Skip::NoWindow)]);
}

#[test]
fn out_of_step_sweeps_are_left_alone() {
    // A symbol in the middle of the first instruction: the sweep may not be the real code.
    let code = [0xb8, 0x27, 0, 0, 0, 0x0f, 0x05, 0xc3];
    let r = run(&code, &[CODE + 2], &[]);
    assert_eq!(r.skipped, [(CODE + 5, Skip::Unsynced)]);
}

/// The real program, when scripts/fetch-redis.sh has built it: counts, and every patch
/// and trampoline decodes.
#[test]
fn redis_server_if_built() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/test-assets/redis-server");
    let Ok(image) = std::fs::read(path) else {
        std::eprintln!("{path} not built: skipped");
        return;
    };
    let elf = goblin::elf::Elf::parse(&image).unwrap();
    let mut code = Vec::new();
    let mut data = Vec::new();
    for s in elf.section_headers.iter() {
        if s.sh_type == goblin::elf::section_header::SHT_NOBITS || s.sh_addr == 0 || s.sh_size == 0 {
            continue;
        }
        let bytes = &image[s.sh_offset as usize..(s.sh_offset + s.sh_size) as usize];
        let section = Section { address: s.sh_addr, bytes };
        if s.sh_flags & u64::from(goblin::elf::section_header::SHF_EXECINSTR) != 0 {
            code.push(section);
        } else if s.sh_flags & u64::from(goblin::elf::section_header::SHF_ALLOC) != 0 {
            data.push(section);
        }
    }
    let symbols: Vec<u64> = elf.syms.iter().map(|s| s.st_value).filter(|&v| v != 0).collect();
    let r = rewrite(&Program { code: &code, data: &data, symbols: &symbols, pointers: &[] }, ENTRY, BASE);
    std::eprintln!(
        "redis-server: rewrote {} of {} syscall sites, {} bytes of trampolines; skipped {:x?}",
        r.patches.len(),
        r.sites,
        r.trampolines.len(),
        r.skipped
    );
    assert!(r.patches.len() * 10 >= r.sites * 9, "fewer than 90% rewritten");
    // A function of the binary (and the base) only: a recording and its replay, and both
    // sides of a pair, get the same code.
    let again = rewrite(&Program { code: &code, data: &data, symbols: &symbols, pointers: &[] }, ENTRY, BASE);
    assert_eq!((&again.patches, &again.trampolines), (&r.patches, &r.trampolines));
    for p in &r.patches {
        assert!(jump_target(p) >= BASE && jump_target(p) < BASE + r.trampolines.len() as u64);
    }
}

/// `REWRITE_DUMP=ELF cargo test -p linux-abi dump -- --nocapture`: every window and the
/// trampolines (to /tmp/trampolines.bin, for `objdump -D -b binary -m i386:x86-64`).
#[test]
fn dump() {
    let Ok(path) = std::env::var("REWRITE_DUMP") else { return };
    let image = std::fs::read(path).unwrap();
    let elf = goblin::elf::Elf::parse(&image).unwrap();
    let mut code = Vec::new();
    let mut data = Vec::new();
    for s in elf.section_headers.iter() {
        if s.sh_type == goblin::elf::section_header::SHT_NOBITS || s.sh_addr == 0 || s.sh_size == 0 {
            continue;
        }
        let bytes = &image[s.sh_offset as usize..(s.sh_offset + s.sh_size) as usize];
        let section = Section { address: s.sh_addr, bytes };
        if s.sh_flags & u64::from(goblin::elf::section_header::SHF_EXECINSTR) != 0 {
            code.push(section);
        } else if s.sh_flags & u64::from(goblin::elf::section_header::SHF_ALLOC) != 0 {
            data.push(section);
        }
    }
    let symbols: Vec<u64> = elf.syms.iter().map(|s| s.st_value).filter(|&v| v != 0).collect();
    let r = rewrite(&Program { code: &code, data: &data, symbols: &symbols, pointers: &[] }, ENTRY, BASE);
    for p in &r.patches {
        std::eprintln!("{:#x} +{} -> {:#x}", p.address, p.bytes.len(), jump_target(p));
    }
    std::fs::write("/tmp/trampolines.bin", &r.trampolines).unwrap();
}

/// The whole trampoline of an emulated site from `at`, up to its jump back: the displaced
/// instructions before, the glue (RSP saved and switched, the `call`, RSP back), the
/// displaced instructions after. Checks the glue; returns (before, after).
fn check_emulation(r: &Rewrite, at: u64, handler: u64, resume: u64) -> (Vec<Instruction>, Vec<Instruction>) {
    let all = decode_from(r, at);
    let call = all.iter().position(|i| i.code() == Code::Call_rel32_64).expect("a call");
    assert!(call >= 2 && call + 2 < all.len(), "{all:?}");
    let (save, switch, back) = (&all[call - 2], &all[call - 1], &all[call + 1]);
    assert_eq!(
        (save.code(), save.ip_rel_memory_address(), save.op1_register()),
        (Code::Mov_rm64_r64, ENTRY.user_rsp, Register::RSP)
    );
    assert_eq!(
        (switch.code(), switch.op0_register(), switch.ip_rel_memory_address()),
        (Code::Mov_r64_rm64, Register::RSP, ENTRY.kstack_top)
    );
    assert_eq!(all[call].near_branch_target(), handler);
    assert_eq!(
        (back.code(), back.op0_register(), back.ip_rel_memory_address()),
        (Code::Mov_r64_rm64, Register::RSP, ENTRY.user_rsp)
    );
    let last = all.last().unwrap();
    assert_eq!((last.code(), last.near_branch_target()), (Code::Jmp_rel32_64, resume));
    // Nothing in the glue writes RFLAGS or touches the program's stack.
    for i in [save, switch, back] {
        assert_eq!(i.rflags_modified(), 0, "{i:?}");
    }
    (all[..call - 2].to_vec(), all[call + 2..all.len() - 1].to_vec())
}

#[test]
fn cpuid_is_emulated_with_the_instructions_that_set_its_leaf() {
    // 0: mov $1,%eax; 5: xor %ecx,%ecx; 7: cpuid; 9: ret
    let code = [0xb8, 1, 0, 0, 0, 0x31, 0xc9, 0x0f, 0xa2, 0xc3];
    let r = run(&code, &[], &[]);
    assert_eq!((r.sites, r.emulated.as_slice(), r.left.len()), (0, &[(CODE + 7, Kind::Cpuid)][..], 0));
    let p = &r.patches[0];
    assert_eq!((p.address, p.bytes.len()), (CODE, 9));
    let (before, after) = check_emulation(&r, jump_target(p), ENTRY.cpuid, CODE + 9);
    assert_eq!(before.iter().map(text).collect::<Vec<_>>(), ["Mov_r32_imm32", "Xor_rm32_r32"]);
    assert!(after.is_empty());
}

#[test]
fn rdtsc_and_rdtscp_at_a_section_start_move_with_what_follows() {
    // 0: rdtsc; 2: shl $32,%rdx; 6: or %rdx,%rax; 9: ret
    let code = [0x0f, 0x31, 0x48, 0xc1, 0xe2, 0x20, 0x48, 0x09, 0xd0, 0xc3];
    let r = run(&code, &[CODE], &[]);
    assert_eq!(r.emulated, [(CODE, Kind::Rdtsc)]);
    let p = &r.patches[0];
    assert_eq!((p.address, p.bytes.len()), (CODE, 6));
    let (before, after) = check_emulation(&r, jump_target(p), ENTRY.rdtsc, CODE + 6);
    assert!(before.is_empty());
    assert_eq!(after.iter().map(text).collect::<Vec<_>>(), ["Shl_rm64_imm8"]);
    // 0: rdtscp; 3: mov %eax,%edi; 5: ret
    let code = [0x0f, 0x01, 0xf9, 0x89, 0xc7, 0xc3];
    let r = run(&code, &[CODE], &[]);
    assert_eq!(r.emulated, [(CODE, Kind::Rdtscp)]);
    let (_, after) = check_emulation(&r, jump_target(&r.patches[0]), ENTRY.rdtscp, CODE + 5);
    assert_eq!(after.iter().map(text).collect::<Vec<_>>(), ["Mov_rm32_r32"]);
}

#[test]
fn an_emulated_site_with_no_window_is_left_for_the_contract_check() {
    // cpuid; ret: three bytes, nothing around them.
    let r = run(&[0x0f, 0xa2, 0xc3], &[], &[]);
    assert!(r.patches.is_empty() && r.emulated.is_empty());
    assert_eq!(r.left, [(CODE, Kind::Cpuid, Skip::NoWindow)]);
    // A branch target just after the rdtsc: the window must end there, and is too short.
    // 0: mov $1,%ecx; 5: rdtsc; 7: dec %ecx; 9: jnz 7
    let code = [0xb9, 1, 0, 0, 0, 0x0f, 0x31, 0xff, 0xc9, 0x75, 0xfc];
    let r = run(&code, &[], &[]);
    assert_eq!(r.emulated, [(CODE + 5, Kind::Rdtsc)], "{:?}", r.left);
    assert_eq!((r.patches[0].address, r.patches[0].bytes.len()), (CODE, 7));
}

#[test]
fn forbidden_instructions_never_move_into_a_window() {
    // 0: rdpid %rax; 4: syscall; 6: ret: the only windows hold the rdpid.
    let r = run(&[0xf3, 0x0f, 0xc7, 0xf8, 0x0f, 0x05, 0xc3], &[], &[]);
    assert_eq!((r.patches.len(), r.skipped.as_slice()), (0, &[(CODE + 4, Skip::NoWindow)][..]));
    // 0: cpuid; 2: rdtsc; 4: nop; 5: nop; 6: nop; 7: ret: each window would hold the other.
    let code = [0x0f, 0xa2, 0x0f, 0x31, 0x90, 0x90, 0x90, 0xc3];
    let r = run(&code, &[CODE], &[]);
    assert_eq!(r.emulated, [(CODE + 2, Kind::Rdtsc)]);
    assert_eq!(r.left, [(CODE, Kind::Cpuid, Skip::NoWindow)]);
}

/// An instruction as its code and register operands (iced-x86's formatter is not built).
fn show(i: &Instruction) -> String {
    let mut out = text(i);
    for op in 0..i.op_count() {
        match i.op_kind(op) {
            OpKind::Register => out += &alloc::format!(" {:?}", i.op_register(op)),
            OpKind::Memory => out += &alloc::format!(" [{:?}{:+}]", i.memory_base(), i.memory_displacement64() as i64),
            _ => {}
        }
    }
    out
}

/// The glue of an RDRAND/RDSEED trampoline from `at` (RAX saved on the kernel stack, the
/// call, the value into the destination, RAX back), as instruction names, up to the jump
/// back; also checks the call's target and the jump's.
fn random_glue(r: &Rewrite, at: u64, resume: u64) -> Vec<String> {
    let all = decode_from(r, at);
    let call = all.iter().position(|i| i.code() == Code::Call_rel32_64).expect("a call");
    assert_eq!(all[call].near_branch_target(), ENTRY.random);
    let last = all.last().unwrap();
    assert_eq!((last.code(), last.near_branch_target()), (Code::Jmp_rel32_64, resume));
    // Nothing after the call writes RFLAGS: the emulation's CF = 1 reaches the program.
    for i in &all[call..] {
        assert_eq!(i.rflags_modified(), 0, "{i:?}");
    }
    all.iter().map(show).collect()
}

#[test]
fn rdrand_and_rdseed_are_emulated_into_their_register() {
    // 0: rdrand %ecx; 3: jae 0 (retry while CF = 0: a branch back to the site itself);
    // 5: mov %ecx,%eax; 7: ret. The window is the rdrand and the jae (its target, the
    // window's start, is now the jump to the trampoline: a retry runs the emulation again).
    let code = [0x0f, 0xc7, 0xf1, 0x73, 0xfb, 0x89, 0xc8, 0xc3];
    let r = run(&code, &[CODE], &[]);
    assert_eq!(r.emulated, [(CODE, Kind::Rdrand)], "{:?}", r.left);
    let glue = random_glue(&r, jump_target(&r.patches[0]), CODE + 5);
    let call = glue.iter().position(|t| t.starts_with("Call")).unwrap();
    assert_eq!(
        &glue[call - 4..call + 5],
        [
            "Mov_rm64_r64 [RIP+2097152] RSP",
            "Mov_r64_rm64 RSP [RIP+2097160]",
            "Lea_r64_m RSP [RSP-16]",
            "Mov_rm64_r64 [RSP+0] RAX",
            "Call_rel32_64",
            "Mov_rm32_r32 ECX EAX",
            "Mov_r64_rm64 RAX [RSP+0]",
            "Lea_r64_m RSP [RSP+16]",
            "Mov_r64_rm64 RSP [RIP+2097152]",
        ]
    );
    // rdseed %rax; then three bytes to fill the window.
    let r = run(&[0x48, 0x0f, 0xc7, 0xf8, 0x90, 0x90, 0xc3], &[CODE], &[]);
    assert_eq!(r.emulated, [(CODE, Kind::Rdseed)]);
    let glue = random_glue(&r, jump_target(&r.patches[0]), CODE + 5);
    let call = glue.iter().position(|t| t.starts_with("Call")).unwrap();
    assert_eq!(
        &glue[call + 1..call + 3],
        ["Lea_r64_m RSP [RSP+16]", "Mov_r64_rm64 RSP [RIP+2097152]"],
        "RAX keeps the value"
    );
    // rdrand %ax: its low 16 bits go into the saved RAX, whose upper bits stay.
    let r = run(&[0x66, 0x0f, 0xc7, 0xf0, 0x90, 0x90, 0xc3], &[CODE], &[]);
    let glue = random_glue(&r, jump_target(&r.patches[0]), CODE + 5);
    let call = glue.iter().position(|t| t.starts_with("Call")).unwrap();
    assert_eq!(&glue[call + 1..call + 3], ["Mov_rm16_r16 [RSP+0] AX", "Mov_r64_rm64 RAX [RSP+0]"]);
    // rdrand %eax: zero-extended, as the instruction does; nothing restored.
    let r = run(&[0x0f, 0xc7, 0xf0, 0x90, 0x90, 0xc3], &[CODE], &[]);
    let glue = random_glue(&r, jump_target(&r.patches[0]), CODE + 5);
    let call = glue.iter().position(|t| t.starts_with("Call")).unwrap();
    assert_eq!(&glue[call + 1..call + 3], ["Mov_rm32_r32 EAX EAX", "Lea_r64_m RSP [RSP+16]"]);
}
