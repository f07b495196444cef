//! The guest-contract check (design.md §1): a guest must never execute RDTSC, RDTSCP, RDPID,
//! RDRAND or RDSEED (their results are host-dependent and not trapped on our KVM), nor CPUID
//! in ring 3 (ring-3 CPUID returns host values). Ring-0 code is confined by the guest kit's
//! linker script to the sections named in [`RING0_SECTIONS`]; CPUID is allowed only there.
//!
//! Every executable section is disassembled with a linear sweep, so the forbidden opcodes
//! are found as instructions, not as byte patterns: the same bytes inside an immediate or a
//! displacement of a longer instruction are not reported.

use std::fmt;

use anyhow::{bail, Context, Result};
use goblin::elf::program_header::PT_NOTE;
use goblin::elf::section_header::SHT_NOBITS;
use goblin::elf::Elf;
use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic};

/// Sections holding ring-0 code (the kit's linker script maps them).
pub const RING0_SECTIONS: &[&str] = &[".text.boot32", ".text.ring0"];
/// Sections holding 32-bit code (the PVH entry runs in 32-bit protected mode).
pub const CODE32_SECTIONS: &[&str] = &[".text.boot32"];
/// XEN_ELFNOTE_PHYS32_ENTRY: the PVH entry point note.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// Instructions no guest may contain at all.
const FORBIDDEN: &[Mnemonic] =
    &[Mnemonic::Rdtsc, Mnemonic::Rdtscp, Mnemonic::Rdpid, Mnemonic::Rdrand, Mnemonic::Rdseed];

/// One forbidden instruction found in an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub section: String,
    pub address: u64,
    /// The instruction as Intel syntax, with its bytes.
    pub instruction: String,
    pub reason: &'static str,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "section {} at {:#x}: {} ({})", self.section, self.address, self.instruction, self.reason)
    }
}

/// What was scanned in one executable section.
#[derive(Debug, Clone)]
pub struct SectionScan {
    pub name: String,
    pub address: u64,
    pub size: u64,
    pub bitness: u32,
    pub instructions: usize,
    /// Byte sequences that do not decode (padding or data in code); reported, not fatal.
    pub invalid: usize,
}

/// The result of checking one ELF image.
#[derive(Debug, Clone)]
pub struct Report {
    pub pvh_entry: u64,
    pub sections: Vec<SectionScan>,
    pub violations: Vec<Violation>,
}

impl Report {
    /// Instructions decoded in all executable sections.
    pub fn instructions(&self) -> usize {
        self.sections.iter().map(|s| s.instructions).sum()
    }
}

/// Checks an ELF image: it must be a PVH kernel (entry note) and its executable sections
/// must obey the guest contract.
pub fn check_elf(bytes: &[u8]) -> Result<Report> {
    let elf = Elf::parse(bytes).context("not an ELF file")?;
    let pvh_entry = pvh_entry(&elf, bytes)?;
    scan_sections(&elf, bytes, pvh_entry, true)
}

/// Checks a Linux program for the Linux personality (guests/linux): every executable section
/// is ring-3 code, so CPUID is forbidden everywhere too. `pvh_entry` reports its ELF entry.
pub fn check_program(bytes: &[u8]) -> Result<Report> {
    let elf = Elf::parse(bytes).context("not an ELF file")?;
    scan_sections(&elf, bytes, elf.entry, false)
}

fn scan_sections(elf: &Elf, bytes: &[u8], pvh_entry: u64, kernel: bool) -> Result<Report> {
    let mut sections = Vec::new();
    let mut violations = Vec::new();
    for header in &elf.section_headers {
        if !header.is_executable() || header.sh_type == SHT_NOBITS || header.sh_size == 0 {
            continue;
        }
        let name = elf.shdr_strtab.get_at(header.sh_name).unwrap_or("<unnamed>").to_string();
        let range = header.file_range().context("executable section without data")?;
        let code = bytes.get(range).with_context(|| format!("section {name} lies outside the file"))?;
        let bitness = if kernel && CODE32_SECTIONS.contains(&name.as_str()) { 32 } else { 64 };
        // A program's sections are all ring 3, whatever their names.
        let label = if kernel { name.clone() } else { format!("{name} (ring 3)") };
        let mut scan = scan_code(code, header.sh_addr, bitness, &label);
        for violation in &mut scan.violations {
            violation.section = name.clone();
        }
        violations.extend(scan.violations);
        sections.push(SectionScan {
            name,
            address: header.sh_addr,
            size: header.sh_size,
            bitness,
            instructions: scan.instructions,
            invalid: scan.invalid,
        });
    }
    if sections.is_empty() {
        bail!("no executable sections (section headers stripped?): nothing could be checked");
    }
    Ok(Report { pvh_entry, sections, violations })
}

/// The entry address from the XEN_ELFNOTE_PHYS32_ENTRY note in a PT_NOTE segment.
fn pvh_entry(elf: &Elf, bytes: &[u8]) -> Result<u64> {
    if !elf.program_headers.iter().any(|p| p.p_type == PT_NOTE) {
        bail!("no PT_NOTE segment: not a PVH kernel");
    }
    for note in elf.iter_note_headers(bytes).into_iter().flatten() {
        let note = note.context("malformed ELF note")?;
        if note.n_type == XEN_ELFNOTE_PHYS32_ENTRY && note.name.trim_end_matches('\0') == "Xen" {
            return match note.desc.len() {
                4 => Ok(u64::from(u32::from_le_bytes(note.desc.try_into()?))),
                8 => Ok(u64::from_le_bytes(note.desc.try_into()?)),
                n => bail!("PVH entry note has a {n}-byte descriptor"),
            };
        }
    }
    bail!("no Xen PHYS32_ENTRY (type 18) note: not a PVH kernel")
}

/// What a linear sweep over one code section found.
#[derive(Debug, Default)]
pub struct CodeScan {
    pub instructions: usize,
    pub invalid: usize,
    pub violations: Vec<Violation>,
}

/// Disassembles `code` (loaded at `address`, `bitness` 16/32/64) linearly and reports
/// forbidden instructions; CPUID is allowed only if `section` is a ring-0 section.
pub fn scan_code(code: &[u8], address: u64, bitness: u32, section: &str) -> CodeScan {
    let cpuid_allowed = RING0_SECTIONS.contains(&section);
    let mut decoder = Decoder::with_ip(bitness, code, address, DecoderOptions::NONE);
    let mut instruction = Instruction::default();
    let mut scan = CodeScan::default();
    while decoder.can_decode() {
        let position = decoder.position();
        decoder.decode_out(&mut instruction);
        if instruction.is_invalid() {
            // Resume at the next byte: iced may consume more than one byte of an invalid
            // sequence, which could skip over a real instruction right after it.
            scan.invalid += 1;
            decoder.set_position(position + 1).expect("position + 1 is within the buffer");
            decoder.set_ip(address + position as u64 + 1);
            continue;
        }
        scan.instructions += 1;
        let mnemonic = instruction.mnemonic();
        let reason = if FORBIDDEN.contains(&mnemonic) {
            "forbidden in guests: host-dependent and not trapped"
        } else if mnemonic == Mnemonic::Cpuid && !cpuid_allowed {
            "CPUID outside ring-0 code returns host values"
        } else {
            continue;
        };
        let start = (instruction.ip() - address) as usize;
        let raw = &code[start..start + instruction.len()];
        let hex: Vec<String> = raw.iter().map(|b| format!("{b:02x}")).collect();
        scan.violations.push(Violation {
            section: section.to_string(),
            address: instruction.ip(),
            instruction: format!("{instruction} [{}]", hex.join(" ")),
            reason,
        });
    }
    scan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flagged(code: &[u8], section: &str) -> Vec<u64> {
        scan_code(code, 0x1000, 64, section).violations.iter().map(|v| v.address).collect()
    }

    #[test]
    fn forbidden_instructions_are_flagged() {
        assert_eq!(flagged(&[0x0f, 0x31], ".text"), [0x1000]); // rdtsc
        assert_eq!(flagged(&[0x0f, 0x01, 0xf9], ".text"), [0x1000]); // rdtscp
        assert_eq!(flagged(&[0xf3, 0x0f, 0xc7, 0xf8], ".text"), [0x1000]); // rdpid rax
        assert_eq!(flagged(&[0x0f, 0xc7, 0xf0], ".text"), [0x1000]); // rdrand eax
        assert_eq!(flagged(&[0x48, 0x0f, 0xc7, 0xf8], ".text"), [0x1000]); // rdseed rax
        assert_eq!(flagged(&[0x0f, 0x31], ".text.ring0"), [0x1000], "forbidden in ring-0 code too");
    }

    #[test]
    fn violation_names_the_instruction_and_address() {
        // nop; rdtsc
        let scan = scan_code(&[0x90, 0x0f, 0x31], 0x10_0000, 64, ".text");
        assert_eq!(scan.instructions, 2);
        let v = &scan.violations[0];
        assert_eq!((v.section.as_str(), v.address), (".text", 0x10_0001));
        assert_eq!(v.instruction, "rdtsc [0f 31]");
    }

    #[test]
    fn opcode_bytes_inside_a_longer_instruction_are_not_flagged() {
        // mov eax, 0x310f: the immediate holds the bytes of rdtsc.
        assert!(flagged(&[0xb8, 0x0f, 0x31, 0x00, 0x00], ".text").is_empty());
        // mov rax, 0xa20f00000000310f: rdtsc and cpuid bytes in a 64-bit immediate.
        let movabs = [0x48, 0xb8, 0x0f, 0x31, 0, 0, 0, 0, 0x0f, 0xa2];
        assert!(flagged(&movabs, ".text").is_empty());
        // lea rax, [rip + 0xc70f]: the displacement holds rdrand's opcode bytes.
        assert!(flagged(&[0x48, 0x8d, 0x05, 0x0f, 0xc7, 0xf0, 0x00], ".text").is_empty());
        // ...but the same bytes after it, as an instruction, are.
        assert_eq!(flagged(&[0xb8, 0x0f, 0x31, 0x00, 0x00, 0x0f, 0x31], ".text"), [0x1005]);
    }

    #[test]
    fn cpuid_is_allowed_only_in_ring0_sections() {
        let cpuid = [0x0f, 0xa2];
        assert_eq!(flagged(&cpuid, ".text"), [0x1000]);
        assert_eq!(flagged(&cpuid, ".text.foo"), [0x1000]);
        assert!(flagged(&cpuid, ".text.ring0").is_empty());
        assert!(scan_code(&cpuid, 0, 32, ".text.boot32").violations.is_empty());
    }

    #[test]
    fn invalid_bytes_are_counted_not_fatal() {
        // 0x06 (push es) does not exist in 64-bit mode; the sweep goes on at the next byte
        // (iced alone would take 06 0f as one bad instruction and miss the rdtsc).
        let scan = scan_code(&[0x06, 0x0f, 0x31], 0, 64, ".text");
        assert_eq!(scan.invalid, 1);
        assert_eq!(scan.violations.len(), 1);
    }

    /// A minimal ELF64: a PT_NOTE segment with the PVH note, `.text.ring0` and `.text`
    /// (each holding `code`), and the section-name string table.
    fn tiny_elf(ring0_code: &[u8], text_code: &[u8], with_note: bool) -> Vec<u8> {
        let shstrtab = b"\0.note.pvh\0.text.ring0\0.text\0.shstrtab\0";
        let (note_name, ring0_name, text_name, shstr_name) = (1u32, 11u32, 23u32, 29u32);
        let mut note = Vec::new();
        for word in [4u32, 4, XEN_ELFNOTE_PHYS32_ENTRY] {
            note.extend(word.to_le_bytes());
        }
        note.extend(b"Xen\0");
        note.extend(0x10_0000u32.to_le_bytes());

        let phoff = 64usize;
        let data_start = phoff + 56;
        let mut data = Vec::new();
        let note_off = data_start;
        data.extend(&note);
        let ring0_off = data_start + data.len();
        data.extend(ring0_code);
        let text_off = data_start + data.len();
        data.extend(text_code);
        let shstr_off = data_start + data.len();
        data.extend(shstrtab);
        while (data_start + data.len()) % 8 != 0 {
            data.push(0);
        }
        let shoff = data_start + data.len();

        let mut elf = Vec::new();
        elf.extend(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
        elf.extend(2u16.to_le_bytes()); // ET_EXEC
        elf.extend(62u16.to_le_bytes()); // EM_X86_64
        elf.extend(1u32.to_le_bytes());
        elf.extend(0x10_0000u64.to_le_bytes()); // e_entry
        elf.extend((phoff as u64).to_le_bytes());
        elf.extend((shoff as u64).to_le_bytes());
        elf.extend(0u32.to_le_bytes()); // e_flags
        elf.extend(64u16.to_le_bytes()); // e_ehsize
        elf.extend(56u16.to_le_bytes()); // e_phentsize
        elf.extend(1u16.to_le_bytes()); // e_phnum
        elf.extend(64u16.to_le_bytes()); // e_shentsize
        elf.extend(5u16.to_le_bytes()); // e_shnum
        elf.extend(4u16.to_le_bytes()); // e_shstrndx

        // PT_NOTE (or PT_NULL when the note is left out).
        elf.extend((if with_note { PT_NOTE } else { 0 }).to_le_bytes());
        elf.extend(4u32.to_le_bytes()); // PF_R
        for value in [note_off, 0x10_0000, 0x10_0000, note.len(), note.len(), 4] {
            elf.extend((value as u64).to_le_bytes());
        }
        elf.extend(&data);

        let mut header = |name: u32, kind: u32, flags: u64, addr: u64, off: usize, size: usize| {
            elf.extend(name.to_le_bytes());
            elf.extend(kind.to_le_bytes());
            elf.extend(flags.to_le_bytes());
            elf.extend(addr.to_le_bytes());
            elf.extend((off as u64).to_le_bytes());
            elf.extend((size as u64).to_le_bytes());
            elf.extend(0u32.to_le_bytes()); // sh_link
            elf.extend(0u32.to_le_bytes()); // sh_info
            elf.extend(1u64.to_le_bytes()); // sh_addralign
            elf.extend(0u64.to_le_bytes()); // sh_entsize
        };
        const SHF_ALLOC_EXEC: u64 = 0x2 | 0x4;
        header(0, 0, 0, 0, 0, 0);
        header(note_name, 7, 0x2, 0x10_0000, note_off, note.len()); // SHT_NOTE
        header(ring0_name, 1, SHF_ALLOC_EXEC, 0x10_0100, ring0_off, ring0_code.len());
        header(text_name, 1, SHF_ALLOC_EXEC, 0x10_0200, text_off, text_code.len());
        header(shstr_name, 3, 0, 0, shstr_off, shstrtab.len()); // SHT_STRTAB
        elf
    }

    #[test]
    fn elf_check_reads_the_note_and_classifies_sections() {
        let cpuid = [0x0f, 0xa2];
        let report = check_elf(&tiny_elf(&cpuid, &[0x90, 0xc3], true)).unwrap();
        assert_eq!(report.pvh_entry, 0x10_0000);
        let names: Vec<&str> = report.sections.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, [".text.ring0", ".text"]);
        assert_eq!(report.instructions(), 3);
        assert!(report.violations.is_empty());

        let report = check_elf(&tiny_elf(&[0x90], &[0x90, 0x0f, 0xa2], true)).unwrap();
        assert_eq!(report.violations.len(), 1);
        assert_eq!(report.violations[0].section, ".text");
        assert_eq!(report.violations[0].address, 0x10_0201);
    }

    #[test]
    fn elf_without_pvh_note_is_rejected() {
        let error = check_elf(&tiny_elf(&[0x90], &[0x90], false)).unwrap_err();
        assert!(error.to_string().contains("PVH"), "{error}");
    }
}
