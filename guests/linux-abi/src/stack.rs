//! The initial stack of a Linux process, as the kernel's ELF loader (`create_elf_tables` in
//! fs/binfmt_elf.c) lays it out, and as musl's and glibc's start code read it:
//!
//! ```text
//!   sp ->  argc
//!          argv[0] .. argv[argc-1], NULL
//!          envp[0] .. envp[n-1], NULL
//!          auxv: (type, value) pairs ..., (AT_NULL, 0)
//!          padding
//!          16 random bytes (AT_RANDOM), "x86_64" (AT_PLATFORM)
//!          argv strings, envp strings, the executable's name (AT_EXECFN)
//!   top -> (8 zero bytes below it end the stack)
//! ```
//!
//! `sp` is 16-byte aligned (the x86-64 ABI's process entry state).

use alloc::vec;
use alloc::vec::Vec;

pub const AT_NULL: u64 = 0;
pub const AT_PHDR: u64 = 3;
pub const AT_PHENT: u64 = 4;
pub const AT_PHNUM: u64 = 5;
pub const AT_PAGESZ: u64 = 6;
pub const AT_BASE: u64 = 7;
pub const AT_FLAGS: u64 = 8;
pub const AT_ENTRY: u64 = 9;
pub const AT_UID: u64 = 11;
pub const AT_EUID: u64 = 12;
pub const AT_GID: u64 = 13;
pub const AT_EGID: u64 = 14;
pub const AT_PLATFORM: u64 = 15;
pub const AT_HWCAP: u64 = 16;
pub const AT_CLKTCK: u64 = 17;
pub const AT_SECURE: u64 = 23;
pub const AT_RANDOM: u64 = 25;
pub const AT_EXECFN: u64 = 31;
pub const AT_SYSINFO_EHDR: u64 = 33;

/// The built stack: `bytes` go at `[sp, top)`.
#[derive(Debug)]
pub struct Stack {
    pub sp: u64,
    pub bytes: Vec<u8>,
}

/// What [`build`] needs besides argv and envp.
pub struct Info<'a> {
    /// Entries other than AT_RANDOM, AT_PLATFORM, AT_EXECFN and AT_NULL (added here).
    pub auxv: &'a [(u64, u64)],
    pub random: [u8; 16],
    /// AT_EXECFN: the path the program was started from.
    pub execfn: &'a [u8],
}

/// Lays out the initial stack ending at `top` (16-byte aligned).
pub fn build(top: u64, argv: &[&[u8]], envp: &[&[u8]], info: &Info) -> Stack {
    assert_eq!(top % 16, 0, "stack top must be 16-byte aligned");
    // Strings and random bytes, from the top down; addresses relative to `top`.
    let mut below: Vec<u8> = vec![0; 8];
    let mut push = |data: &[u8], nul: bool| -> u64 {
        let mut item = data.to_vec();
        if nul {
            item.push(0);
        }
        let mut next = item;
        next.extend_from_slice(&below);
        below = next;
        top - below.len() as u64
    };
    let execfn = push(info.execfn, true);
    let mut env_ptrs: Vec<u64> = envp.iter().rev().map(|e| push(e, true)).collect();
    env_ptrs.reverse();
    let mut arg_ptrs: Vec<u64> = argv.iter().rev().map(|a| push(a, true)).collect();
    arg_ptrs.reverse();
    let platform = push(b"x86_64", true);
    let random = push(&info.random, false);
    let strings_low = top - below.len() as u64;

    let mut table: Vec<u64> = Vec::new();
    table.push(argv.len() as u64);
    table.extend_from_slice(&arg_ptrs);
    table.push(0);
    table.extend_from_slice(&env_ptrs);
    table.push(0);
    for &(key, value) in info.auxv {
        table.extend_from_slice(&[key, value]);
    }
    table.extend_from_slice(&[AT_RANDOM, random, AT_PLATFORM, platform, AT_EXECFN, execfn, AT_NULL, 0]);
    let sp = (strings_low - table.len() as u64 * 8) & !15;
    let mut bytes = vec![0u8; (top - sp) as usize];
    for (i, word) in table.iter().enumerate() {
        bytes[i * 8..i * 8 + 8].copy_from_slice(&word.to_le_bytes());
    }
    let off = (strings_low - sp) as usize;
    bytes[off..].copy_from_slice(&below);
    Stack { sp, bytes }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    fn word(s: &Stack, addr: u64) -> u64 {
        let off = (addr - s.sp) as usize;
        u64::from_le_bytes(s.bytes[off..off + 8].try_into().unwrap())
    }

    fn cstr(s: &Stack, addr: u64) -> &[u8] {
        let off = (addr - s.sp) as usize;
        let len = s.bytes[off..].iter().position(|&b| b == 0).unwrap();
        &s.bytes[off..off + len]
    }

    #[test]
    fn layout_is_what_libc_start_code_reads() {
        let top = 0x1000_0000;
        let auxv = [(AT_PAGESZ, 4096), (AT_PHDR, 0x400040), (AT_PHNUM, 6), (AT_ENTRY, 0x401000), (AT_SECURE, 0)];
        let info = Info { auxv: &auxv, random: [7; 16], execfn: b"/redis-server" };
        let s = build(top, &[b"/redis-server", b"/redis.conf"], &[b"HOME=/"], &info);
        assert_eq!(s.sp % 16, 0);
        assert_eq!(s.sp + s.bytes.len() as u64, top);
        assert_eq!(word(&s, s.sp), 2);
        assert_eq!(cstr(&s, word(&s, s.sp + 8)), b"/redis-server");
        assert_eq!(cstr(&s, word(&s, s.sp + 16)), b"/redis.conf");
        assert_eq!(word(&s, s.sp + 24), 0);
        assert_eq!(cstr(&s, word(&s, s.sp + 32)), b"HOME=/");
        assert_eq!(word(&s, s.sp + 40), 0);
        // auxv from sp + 48.
        let mut aux = std::collections::BTreeMap::new();
        let mut at = s.sp + 48;
        loop {
            let (k, v) = (word(&s, at), word(&s, at + 8));
            at += 16;
            if k == AT_NULL {
                break;
            }
            aux.insert(k, v);
        }
        assert_eq!(aux[&AT_PAGESZ], 4096);
        assert_eq!(aux[&AT_PHDR], 0x400040);
        assert_eq!(aux[&AT_ENTRY], 0x401000);
        assert_eq!(aux[&AT_SECURE], 0);
        let random = aux[&AT_RANDOM];
        let off = (random - s.sp) as usize;
        assert_eq!(&s.bytes[off..off + 16], &[7; 16]);
        assert_eq!(cstr(&s, aux[&AT_PLATFORM]), b"x86_64");
        assert_eq!(cstr(&s, aux[&AT_EXECFN]), b"/redis-server");
        // Strings lie above the table, inside the stack, and the last 8 bytes are zero.
        assert!(random >= at && random < top);
        assert_eq!(word(&s, top - 8), 0);
    }

    #[test]
    fn alignment_holds_for_any_counts() {
        for argc in 0..5usize {
            for envc in 0..4usize {
                let args: Vec<&[u8]> = (0..argc).map(|_| &b"abc"[..]).collect();
                let envs: Vec<&[u8]> = (0..envc).map(|_| &b"K=V1"[..]).collect();
                let info = Info { auxv: &[(AT_PAGESZ, 4096)], random: [0; 16], execfn: b"/x" };
                let s = build(0x8000_0000, &args, &envs, &info);
                assert_eq!(s.sp % 16, 0, "argc {argc} envc {envc}");
                assert_eq!(word(&s, s.sp), argc as u64);
                assert_eq!(word(&s, s.sp + 8 * (argc as u64 + 1)), 0);
            }
        }
    }
}
