//! The guest contract, checked at load time (design.md §1): the program must not contain
//! RDTSC, RDTSCP, RDPID, RDRAND, RDSEED or CPUID (it all runs in ring 3, where on our KVM
//! they return host values untrapped). The same check `cargo xtask check-program` makes: a
//! linear sweep with iced-x86's decoder over every executable section (or, without section
//! headers, every executable segment); an undecodable byte is skipped.
//!
//! The load-time rewrite (`crate::rewrite`) turns CPUID, RDTSC, RDTSCP, RDRAND and RDSEED
//! sites into jumps to deterministic emulations (RDRAND and RDSEED return words from
//! virtio-rng, getrandom's source, whose data the recording logs); what it could not
//! rewrite, and every RDPID, still breaks the contract ([`verdict`]). RDPID is never
//! emulated: it has no use without RDTSCP's TSC_AUX.

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

/// What the scan found: instructions decoded, and the violations.
pub struct Scan {
    pub instructions: usize,
    pub violations: Vec<Violation>,
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
    let mut result = Scan { instructions: 0, violations: Vec::new() };
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
    result
}

/// Decides on a scanned image after the rewrite: `emulated` are the load addresses of the
/// sites the rewrite turned into emulations, `bias` what was added to link addresses. Prints
/// one line per forbidden instruction left (at most 16) and the verdict; Err if the program
/// breaks the contract and `linux.contract=off` does not say to run it anyway.
pub fn verdict(scan: &Scan, bias: u64, emulated: &[u64]) -> Result<(), String> {
    let anyway = ftvm_guest_kit::cmdline::param("linux.contract") == Some("off");
    let left: Vec<&Violation> = scan.violations.iter().filter(|v| !emulated.contains(&(v.address + bias))).collect();
    for v in left.iter().take(16) {
        ftvm_guest_kit::println!(
            "linux: guest contract: {} at {:#x} (file offset {:#x}): host-dependent, not trapped on our KVM",
            v.text,
            v.address,
            v.offset
        );
    }
    if !left.is_empty() && !anyway {
        return Err(alloc::format!(
            "breaks the guest contract ({} forbidden instruction(s) among {}; linux.contract=off runs it anyway, and it may diverge)",
            left.len(),
            scan.instructions
        ));
    }
    let rewritten = scan.violations.len() - left.len();
    let mut said = if left.is_empty() {
        String::from("none forbidden")
    } else {
        alloc::format!("{} forbidden, run anyway (linux.contract=off)", left.len())
    };
    if rewritten > 0 {
        said.push_str(&alloc::format!(" ({rewritten} cpuid/rdtsc/rdtscp/rdrand/rdseed emulated)"));
    }
    ftvm_guest_kit::println!("linux: guest contract: {} instructions scanned, {said}", scan.instructions);
    Ok(())
}
