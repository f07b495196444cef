//! The boot GDT and the segment state a kernel expects at entry.
//!
//! KVM loads segment registers from `kvm_sregs`, not from memory, but the GDT is still
//! written to guest memory so that the descriptors the registers claim to come from exist
//! (a kernel that reloads a selector before installing its own GDT still works).

use kvm_bindings::{kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use crate::error::{Error, Result};
use crate::memory::{GuestMemoryMmap, BOOT_GDT, PD, PDPT, PML4};

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Access byte + flags nibble of a descriptor, as (flags << 8 | access).
mod kind {
    /// 32-bit code, execute/read, accessed, 4 KiB granularity.
    pub const CODE32: u16 = 0xc09b;
    /// 64-bit code.
    pub const CODE64: u16 = 0xa09b;
    /// Data, read/write, accessed, 32-bit, 4 KiB granularity.
    pub const DATA: u16 = 0xc093;
    /// 32-bit TSS, busy.
    pub const TSS: u16 = 0x008b;
}

pub const SEL_CODE: u16 = 0x08;
pub const SEL_DATA: u16 = 0x10;
pub const SEL_TSS: u16 = 0x18;

/// Encodes a segment descriptor.
pub fn descriptor(kind: u16, base: u32, limit: u32) -> u64 {
    let (base, limit, kind) = (u64::from(base), u64::from(limit), u64::from(kind));
    (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | ((kind & 0xff) << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (((kind >> 12) & 0xf) << 52)
        | (((base >> 24) & 0xff) << 56)
}

/// The register form of a descriptor.
pub fn segment(selector: u16, descriptor: u64) -> kvm_segment {
    let bit = |n: u32| ((descriptor >> n) & 1) as u8;
    let granular = bit(55) == 1;
    let raw_limit = ((descriptor & 0xffff) | ((descriptor >> 32) & 0xf_0000)) as u32;
    kvm_segment {
        base: ((descriptor >> 16) & 0xff_ffff) | (((descriptor >> 56) & 0xff) << 24),
        limit: if granular { (raw_limit << 12) | 0xfff } else { raw_limit },
        selector,
        type_: ((descriptor >> 40) & 0xf) as u8,
        present: bit(47),
        dpl: ((descriptor >> 45) & 3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        unusable: 0,
        padding: 0,
    }
}

fn write_gdt(mem: &GuestMemoryMmap, code: u16) -> Result<[u64; 4]> {
    let gdt = [0, descriptor(code, 0, 0xfffff), descriptor(kind::DATA, 0, 0xfffff), descriptor(kind::TSS, 0, 0x67)];
    for (i, d) in gdt.iter().enumerate() {
        let addr = BOOT_GDT + 8 * i as u64;
        mem.write_obj(*d, GuestAddress(addr)).map_err(|e| Error::GuestMemory { addr, detail: e.to_string() })?;
    }
    Ok(gdt)
}

fn load_segments(sregs: &mut kvm_sregs, gdt: &[u64; 4]) {
    sregs.gdt.base = BOOT_GDT;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = segment(SEL_CODE, gdt[1]);
    let data = segment(SEL_DATA, gdt[2]);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = segment(SEL_TSS, gdt[3]);
}

/// 32-bit protected mode, paging off: the PVH entry state.
pub fn setup_protected_mode(mem: &GuestMemoryMmap, sregs: &mut kvm_sregs) -> Result<()> {
    let gdt = write_gdt(mem, kind::CODE32)?;
    load_segments(sregs, &gdt);
    sregs.cr0 = CR0_PE | CR0_ET;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    Ok(())
}

/// Long mode with the first GiB identity-mapped by 2 MiB pages: the 64-bit Linux entry state.
pub fn setup_long_mode(mem: &GuestMemoryMmap, sregs: &mut kvm_sregs) -> Result<()> {
    let gdt = write_gdt(mem, kind::CODE64)?;
    load_segments(sregs, &gdt);
    let write = |addr: u64, v: u64| {
        mem.write_obj(v, GuestAddress(addr)).map_err(|e| Error::GuestMemory { addr, detail: e.to_string() })
    };
    write(PML4, PDPT | 0x3)?;
    write(PDPT, PD | 0x3)?;
    for i in 0..512u64 {
        write(PD + i * 8, (i << 21) | 0x83)?;
    }
    sregs.cr3 = PML4;
    sregs.cr4 = CR4_PAE;
    sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
    sregs.efer = EFER_LME | EFER_LMA;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_round_trip_to_segments() {
        let code = descriptor(kind::CODE64, 0, 0xfffff);
        assert_eq!(code, 0x00af_9b00_0000_ffff);
        let s = segment(SEL_CODE, code);
        assert_eq!((s.l, s.db, s.g, s.present, s.type_, s.limit), (1, 0, 1, 1, 0xb, 0xffff_ffff));
        let d = segment(SEL_DATA, descriptor(kind::DATA, 0, 0xfffff));
        assert_eq!((d.db, d.s, d.type_), (1, 1, 3));
        let tss = segment(SEL_TSS, descriptor(kind::TSS, 0x1234_5678, 0x67));
        assert_eq!((tss.base, tss.limit, tss.s, tss.type_, tss.g), (0x1234_5678, 0x67, 0, 0xb, 0));
    }
}
