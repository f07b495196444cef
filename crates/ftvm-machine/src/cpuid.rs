//! The CPUID policy: the table every guest sees, fixed by rule from what KVM supports.
//!
//! The guest contract forbids instructions whose results the VMM cannot control (RDTSC,
//! RDTSCP, RDPID, RDRAND, RDSEED); the table does not advertise them, nor a local APIC
//! (ftvm emulates the 8259 PIC only), nor KVM's paravirtual features, which would let KVM
//! write guest pages at host-timed moments (kvmclock, steal time, async page faults).
//! Note that on PVM, CPUID executed in ring 3 bypasses this table (platform.md); ring 0 sees it.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

use crate::error::{Error, Result};

/// First and last of the hypervisor leaves (KVM puts its paravirtual features here).
pub const HYPERVISOR_LEAF_FIRST: u32 = 0x4000_0000;
pub const HYPERVISOR_LEAF_LAST: u32 = 0x4000_00ff;
/// What leaf 0x40000000 reports instead of "KVMKVMKVM": a neutral hypervisor, no features.
pub const HYPERVISOR_SIGNATURE: &[u8; 12] = b"ftvmFTVMftvm";

mod bits {
    // Leaf 1 ECX
    pub const X2APIC: u32 = 1 << 21;
    pub const TSC_DEADLINE: u32 = 1 << 24;
    pub const RDRAND: u32 = 1 << 30;
    // Leaf 1 EDX
    pub const TSC: u32 = 1 << 4;
    pub const APIC: u32 = 1 << 9;
    pub const HTT: u32 = 1 << 28;
    // Leaf 7.0 EBX
    pub const TSC_ADJUST: u32 = 1 << 1;
    pub const RDSEED: u32 = 1 << 18;
    // Leaf 7.0 ECX
    pub const RDPID: u32 = 1 << 22;
    // Leaf 0x80000001 EDX
    pub const RDTSCP: u32 = 1 << 27;
    // Leaf 0x80000007 EDX
    pub const INVARIANT_TSC: u32 = 1 << 8;
}

/// The effective CPUID table for a VM on this host.
pub fn guest_cpuid(kvm: &Kvm) -> Result<CpuId> {
    let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(Error::kvm("KVM_GET_SUPPORTED_CPUID"))?;
    let entries = apply_policy(supported.as_slice());
    CpuId::from_entries(&entries).map_err(|_| Error::KvmCapability("a CPUID table of at most 256 entries"))
}

/// Applies ftvm's policy to KVM's supported entries. Pure, so it can be tested and reviewed.
pub fn apply_policy(supported: &[kvm_cpuid_entry2]) -> Vec<kvm_cpuid_entry2> {
    let mut out: Vec<kvm_cpuid_entry2> = supported
        .iter()
        .filter(|e| !(HYPERVISOR_LEAF_FIRST..=HYPERVISOR_LEAF_LAST).contains(&e.function))
        .copied()
        .collect();
    for e in &mut out {
        match (e.function, e.index) {
            (1, _) => {
                e.ecx &= !(bits::X2APIC | bits::TSC_DEADLINE | bits::RDRAND);
                e.edx &= !(bits::TSC | bits::APIC | bits::HTT);
                // One logical processor with APIC ID 0.
                e.ebx = (e.ebx & 0x0000_ffff) | (1 << 16);
            }
            (7, 0) => {
                e.ebx &= !(bits::TSC_ADJUST | bits::RDSEED);
                e.ecx &= !bits::RDPID;
            }
            (0xb, _) | (0x1f, _) => e.edx = 0, // x2APIC ID of the only vCPU
            // TSC and core crystal frequencies would leak host facts; there is no usable TSC.
            (0x15, _) | (0x16, _) => (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0),
            (0x8000_0001, _) => e.edx &= !bits::RDTSCP,
            (0x8000_0007, _) => e.edx &= !bits::INVARIANT_TSC,
            _ => {}
        }
    }
    let sig = HYPERVISOR_SIGNATURE;
    let word = |i: usize| u32::from_le_bytes([sig[i], sig[i + 1], sig[i + 2], sig[i + 3]]);
    out.push(kvm_cpuid_entry2 {
        function: HYPERVISOR_LEAF_FIRST,
        index: 0,
        flags: 0,
        eax: HYPERVISOR_LEAF_FIRST,
        ebx: word(0),
        ecx: word(4),
        edx: word(8),
        ..Default::default()
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, eax, ebx, ecx, edx, ..Default::default() }
    }

    #[test]
    fn hides_nondeterministic_features_and_kvm_leaves() {
        let supported = [
            entry(1, 0, 0x806f8, 0x0102_0800, !0, !0),
            entry(7, 0, 0, !0, !0, 0),
            entry(0x4000_0000, 0, 0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d),
            entry(0x4000_0001, 0, 0xffff, 0, 0, 0),
            entry(0x8000_0001, 0, 0, 0, 0, !0),
            entry(0x8000_0007, 0, 0, 0, 0, !0),
            entry(0x16, 0, 2000, 3000, 100, 0),
        ];
        let t = apply_policy(&supported);
        let get = |f: u32| *t.iter().find(|e| e.function == f).unwrap();
        assert_eq!(get(1).ecx & (1 << 30), 0, "RDRAND hidden");
        assert_eq!(get(1).edx & (1 << 9), 0, "no local APIC");
        assert_eq!(get(1).edx & (1 << 4), 0, "no TSC");
        assert_eq!(get(1).ebx >> 24, 0, "APIC ID 0");
        assert_eq!(get(7).ebx & (1 << 18), 0, "RDSEED hidden");
        assert_eq!(get(7).ecx & (1 << 22), 0, "RDPID hidden");
        assert_eq!(get(0x8000_0001).edx & (1 << 27), 0, "RDTSCP hidden");
        assert_eq!(get(0x8000_0007).edx & (1 << 8), 0);
        assert_eq!((get(0x16).eax, get(0x16).ebx), (0, 0));
        assert!(!t.iter().any(|e| e.function == 0x4000_0001), "KVM feature leaf hidden");
        let hv = get(0x4000_0000);
        assert_eq!(hv.eax, 0x4000_0000, "no further hypervisor leaves");
        let mut sig = Vec::new();
        for w in [hv.ebx, hv.ecx, hv.edx] {
            sig.extend_from_slice(&w.to_le_bytes());
        }
        assert_eq!(&sig, HYPERVISOR_SIGNATURE);
    }
}
