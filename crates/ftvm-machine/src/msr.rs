//! The MSR policy: which MSR accesses leave KVM for ftvm, and what ftvm answers.
//!
//! MSRs that would reveal host time are filtered out of KVM and answered from the guest clock
//! (the event source), so that record and replay see the same values. The paravirtual MSRs
//! that would make KVM write guest pages at host-timed moments (kvmclock, steal time, async
//! page faults) are refused with #GP; the CPUID policy does not advertise them either.

use kvm_bindings::{kvm_enable_cap, KVM_CAP_X86_USER_SPACE_MSR, KVM_MSR_EXIT_REASON_FILTER};
use kvm_ioctls::{MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VmFd};

use crate::error::{Error, Result};

pub const IA32_TSC: u32 = 0x10;
pub const MSR_KVM_WALL_CLOCK: u32 = 0x11;
pub const MSR_KVM_SYSTEM_TIME: u32 = 0x12;
pub const IA32_TSC_ADJUST: u32 = 0x3b;
pub const IA32_MPERF: u32 = 0xe7;
pub const IA32_APERF: u32 = 0xe8;
pub const IA32_TSC_AUX: u32 = 0xc000_0103;
/// MSR_KVM_WALL_CLOCK_NEW .. MSR_KVM_ASYNC_PF_ACK (kvmclock, async PF, steal time, PV EOI,
/// poll control, async PF interrupt and ack).
pub const KVM_PV_MSR_FIRST: u32 = 0x4b56_4d00;
pub const KVM_PV_MSR_LAST: u32 = 0x4b56_4d07;

/// Ranges (first MSR, count) whose reads and writes exit to ftvm.
pub const FILTERED: &[(u32, u32)] = &[
    (IA32_TSC, 3), // 0x10-0x12: TSC and the old kvmclock MSRs
    (IA32_TSC_ADJUST, 1),
    (IA32_MPERF, 2),
    (IA32_TSC_AUX, 1),
    (KVM_PV_MSR_FIRST, KVM_PV_MSR_LAST - KVM_PV_MSR_FIRST + 1),
];

/// Enables user-space MSR exits for the filtered MSRs only.
pub fn install_filter(vm: &VmFd) -> Result<()> {
    let mut cap = kvm_enable_cap { cap: KVM_CAP_X86_USER_SPACE_MSR, ..Default::default() };
    cap.args[0] = u64::from(KVM_MSR_EXIT_REASON_FILTER);
    vm.enable_cap(&cap).map_err(Error::kvm("KVM_ENABLE_CAP(X86_USER_SPACE_MSR)"))?;
    // A zero bit denies the access in KVM, which turns it into an exit to user space.
    let deny_all = [0u8; 1];
    let ranges: Vec<MsrFilterRange<'_>> = FILTERED
        .iter()
        .map(|&(base, msr_count)| MsrFilterRange {
            flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
            base,
            msr_count,
            bitmap: &deny_all,
        })
        .collect();
    vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &ranges).map_err(Error::kvm("KVM_X86_SET_MSR_FILTER"))
}

/// Whether ftvm handles this MSR (it is in a filtered range).
pub fn is_filtered(index: u32) -> bool {
    FILTERED.iter().any(|&(base, n)| index >= base && index - base < n)
}

/// The guest's TSC frequency as far as MSR reads are concerned: 1 GHz, so one tick is one
/// nanosecond of guest time.
pub const GUEST_TSC_HZ: u64 = 1_000_000_000;

/// An MSR access the guest is not allowed to make; it gets #GP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused;

/// Answers a filtered MSR read. `now` is called only for time-dependent MSRs (each call is a
/// time-dependent read through the event source).
pub fn read(index: u32, now: impl FnOnce() -> u64) -> std::result::Result<u64, Refused> {
    match index {
        IA32_TSC | IA32_MPERF | IA32_APERF => Ok(now()),
        IA32_TSC_ADJUST | IA32_TSC_AUX => Ok(0),
        _ => Err(Refused),
    }
}

/// Handles a filtered MSR write: time MSRs ignore writes (the guest clock is not the guest's
/// to set), paravirtual MSRs are refused.
pub fn write(index: u32, _value: u64) -> std::result::Result<(), Refused> {
    match index {
        IA32_TSC | IA32_TSC_ADJUST | IA32_MPERF | IA32_APERF | IA32_TSC_AUX => Ok(()),
        _ => Err(Refused),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_msrs_come_from_the_guest_clock_and_pv_msrs_are_refused() {
        assert_eq!(read(IA32_TSC, || 1234), Ok(1234));
        assert_eq!(read(IA32_TSC_AUX, || unreachable!()), Ok(0));
        for pv in [MSR_KVM_WALL_CLOCK, MSR_KVM_SYSTEM_TIME, KVM_PV_MSR_FIRST, 0x4b56_4d03, KVM_PV_MSR_LAST] {
            assert!(is_filtered(pv));
            assert_eq!(read(pv, || unreachable!()), Err(Refused));
            assert_eq!(write(pv, 1), Err(Refused));
        }
        assert_eq!(write(IA32_TSC, 5), Ok(()));
        assert!(!is_filtered(0x1b));
        assert!(!is_filtered(0x4b56_4d08));
    }
}
