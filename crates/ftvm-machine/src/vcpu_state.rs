//! The vCPU's complete architectural state, saved and restored exactly (snapshots, sync
//! points, state transfer): registers, segment and control registers, the FPU/SSE/AVX state
//! (XSAVE, which contains the legacy FPU area), XCRs, pending events, debug registers, the
//! multiprocessing state and the MSRs KVM lets user space save.

use kvm_bindings::{kvm_debugregs, kvm_mp_state, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// MSRs left out of the saved state, and why:
/// - IA32_TSC (0x10), TSC_ADJUST (0x3b), TSC_DEADLINE (0x6e0): the host's time, which the
///   guest never sees (its TSC reads come from the guest clock through the MSR filter);
/// - the kvmclock, steal-time, async-PF, PV-EOI and poll-control MSRs (0x11, 0x12,
///   0x4b564d00-0x4b564d07): refused to the guest (KVM would write guest pages at host-timed
///   moments), and 0x4b564d06 cannot even be written back on PVM.
fn saved(index: u32) -> bool {
    !matches!(index, 0x10 | 0x11 | 0x12 | 0x3b | 0x6e0 | 0x4b56_4d00..=0x4b56_4d07)
}

/// The MSR indices a vCPU state holds on this host (KVM's list, less the excluded ones).
pub fn msr_indices(kvm: &Kvm) -> Result<Vec<u32>> {
    let list = kvm.get_msr_index_list().map_err(Error::kvm("KVM_GET_MSR_INDEX_LIST"))?;
    Ok(list.as_slice().iter().copied().filter(|&i| saved(i)).collect())
}

/// Everything KVM holds about the vCPU. (Not `Clone`: KVM's XSAVE struct is not.)
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub events: kvm_vcpu_events,
    pub debugregs: kvm_debugregs,
    pub mp_state: kvm_mp_state,
    /// (index, value), in the order of [`msr_indices`].
    pub msrs: Vec<(u32, u64)>,
}

impl VcpuState {
    /// Reads the vCPU's state. The caller must have completed any pending I/O first (a
    /// KVM_RUN with `immediate_exit`): until then, an IN's data is not yet in RAX.
    pub fn capture(vcpu: &VcpuFd, msr_indices: &[u32]) -> Result<Self> {
        let entries: Vec<_> =
            msr_indices.iter().map(|&index| kvm_bindings::kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| Error::Capture(format!("MSR list: {e:?}")))?;
        let read = vcpu.get_msrs(&mut msrs).map_err(Error::kvm("KVM_GET_MSRS"))?;
        if read != entries.len() {
            return Err(Error::Capture(format!(
                "KVM_GET_MSRS read {read} of {} MSRs; MSR {:#x} cannot be saved",
                entries.len(),
                msr_indices.get(read).copied().unwrap_or(0)
            )));
        }
        Ok(VcpuState {
            regs: vcpu.get_regs().map_err(Error::kvm("KVM_GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?,
            xsave: vcpu.get_xsave().map_err(Error::kvm("KVM_GET_XSAVE"))?,
            xcrs: vcpu.get_xcrs().map_err(Error::kvm("KVM_GET_XCRS"))?,
            events: vcpu.get_vcpu_events().map_err(Error::kvm("KVM_GET_VCPU_EVENTS"))?,
            debugregs: vcpu.get_debug_regs().map_err(Error::kvm("KVM_GET_DEBUGREGS"))?,
            mp_state: vcpu.get_mp_state().map_err(Error::kvm("KVM_GET_MP_STATE"))?,
            msrs: msrs.as_slice().iter().map(|e| (e.index, e.data)).collect(),
        })
    }

    /// Puts the state into a vCPU (of a VM built with the same CPUID table). The order is
    /// the one that round-trips on our KVM: segments and control registers before the MSRs
    /// that depend on them (EFER), general registers, then the extended state and events.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<()> {
        vcpu.set_sregs(&self.sregs).map_err(Error::kvm("KVM_SET_SREGS"))?;
        let entries: Vec<_> = self
            .msrs
            .iter()
            .map(|&(index, data)| kvm_bindings::kvm_msr_entry { index, data, ..Default::default() })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|e| Error::Restore(format!("MSR list: {e:?}")))?;
        let written = vcpu.set_msrs(&msrs).map_err(Error::kvm("KVM_SET_MSRS"))?;
        if written != entries.len() {
            return Err(Error::Restore(format!(
                "KVM_SET_MSRS took {written} of {} MSRs; MSR {:#x} was refused",
                entries.len(),
                entries.get(written).map_or(0, |e| e.index)
            )));
        }
        vcpu.set_regs(&self.regs).map_err(Error::kvm("KVM_SET_REGS"))?;
        // SAFETY: `kvm_xsave` is the fixed 4 KiB legacy layout KVM_SET_XSAVE reads; the VM's
        // XSAVE size was checked to fit it (`check_xsave_size`).
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(Error::kvm("KVM_SET_XSAVE"))?;
        vcpu.set_xcrs(&self.xcrs).map_err(Error::kvm("KVM_SET_XCRS"))?;
        vcpu.set_vcpu_events(&self.events).map_err(Error::kvm("KVM_SET_VCPU_EVENTS"))?;
        vcpu.set_debug_regs(&self.debugregs).map_err(Error::kvm("KVM_SET_DEBUGREGS"))?;
        vcpu.set_mp_state(self.mp_state).map_err(Error::kvm("KVM_SET_MP_STATE"))?;
        Ok(())
    }

    /// A digest of the state (for tests and reports; equal states give equal digests).
    pub fn digest(&self) -> u64 {
        ftvm_log::hash64(&postcard::to_stdvec(self).unwrap_or_default())
    }
}

/// The legacy XSAVE area is 4 KiB; guests whose XSAVE state is larger (AMX) need
/// KVM_GET_XSAVE2, which this version does not use.
pub fn check_xsave_size(xsave_size: u32) -> Result<()> {
    if xsave_size as usize > std::mem::size_of::<kvm_xsave>() {
        return Err(Error::XsaveTooLarge { size: xsave_size, max: std::mem::size_of::<kvm_xsave>() });
    }
    Ok(())
}
