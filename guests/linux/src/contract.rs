//! The guest contract, checked at load time (design.md §1): the program must not contain
//! RDTSC, RDTSCP, RDPID, RDRAND, RDSEED or CPUID (it all runs in ring 3, where on our KVM
//! they return host values untrapped). The same check `cargo xtask check-program` makes: a
//! linear sweep with iced-x86's decoder over every executable section (or, without section
//! headers, every executable segment); an undecodable byte is skipped.

use alloc::string::String;
use alloc::vec::Vec;

use goblin::elf::program_header::{PF_X, PT_LOAD};
use goblin::elf::section_header::{SHF_EXECINSTR, SHT_NOBITS};
use goblin::elf::Elf;
use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic};

const FORBIDDEN: &[Mnemonic] =
    &[Mnemonic::Rdtsc, Mnemonic::Rdtscp, Mnemonic::Rdpid, Mnemonic::Rdrand, Mnemonic::Rdseed, Mnemonic::Cpuid];

/// One forbidden instruction: link-time address, file offset, its name and bytes.
pub struct Violation {
    pub address: u64,
    pub offset: u64,
    pub text: String,
}

/// What the scan found: instructions decoded, and the violations (at most 16 listed).
pub struct Scan {
    pub instructions: usize,
    pub violations: Vec<Violation>,
    pub total: usize,
}

fn name(mnemonic: Mnemonic) -> &'static str {
    match mnemonic {
        Mnemonic::Rdtsc => "rdtsc",
        Mnemonic::Rdtscp => "rdtscp",
        Mnemonic::Rdpid => "rdpid",
        Mnemonic::Rdrand => "rdrand",
        Mnemonic::Rdseed => "rdseed",
        _ => "cpuid",
    }
}

pub fn scan(elf: &Elf, image: &[u8]) -> Scan {
    let mut ranges: Vec<(u64, u64, u64)> = elf
        .section_headers
        .iter()
        .filter(|s| s.sh_flags & u64::from(SHF_EXECINSTR) != 0 && s.sh_type != SHT_NOBITS && s.sh_size > 0)
        .map(|s| (s.sh_offset, s.sh_size, s.sh_addr))
        .collect();
    if ranges.is_empty() {
        ranges = elf
            .program_headers
            .iter()
            .filter(|p| p.p_type == PT_LOAD && p.p_flags & PF_X != 0)
            .map(|p| (p.p_offset, p.p_filesz, p.p_vaddr))
            .collect();
    }
    let mut result = Scan { instructions: 0, violations: Vec::new(), total: 0 };
    let mut instruction = Instruction::default();
    for (offset, size, address) in ranges {
        let Some(code) = image.get(offset as usize..(offset + size) as usize) else { continue };
        let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
        while decoder.can_decode() {
            let position = decoder.position();
            decoder.decode_out(&mut instruction);
            if instruction.is_invalid() {
                // Resume at the next byte (as the xtask check does).
                let _ = decoder.set_position(position + 1);
                decoder.set_ip(address + position as u64 + 1);
                continue;
            }
            result.instructions += 1;
            let mnemonic = instruction.mnemonic();
            if FORBIDDEN.contains(&mnemonic) {
                result.total += 1;
                if result.violations.len() < 16 {
                    let start = (instruction.ip() - address) as usize;
                    let bytes: Vec<String> =
                        code[start..start + instruction.len()].iter().map(|b| alloc::format!("{b:02x}")).collect();
                    result.violations.push(Violation {
                        address: instruction.ip(),
                        offset: offset + start as u64,
                        text: alloc::format!("{} [{}]", name(mnemonic), bytes.join(" ")),
                    });
                }
            }
        }
    }
    result
}
