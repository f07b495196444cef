//! ftvm's machine layer: the VM as a machine, below every session (run, record, replay, the
//! pair). It depends on the device model, the virtio devices and the log's hashing, never on
//! the event sessions above it (ftvm-vmm) nor on replication or the control API: the
//! compiler keeps it so.
//!
//! - [`boot`]: loading PVH ELF kernels and Linux bzImages, and the vCPU's first state.
//! - [`vcpu`]: the vCPU loop that dispatches every exit to the device buses, admits host
//!   inputs through the event source at counted exits, and takes sync points; what differs by
//!   session reaches it through narrow interfaces ([`vcpu::hooks`], the output gate).
//! - [`state`]: the VM's saved state (vCPU, devices, guest clock).
//! - [`snapshot`]: the snapshot format, its checks, and restoring a VM from one.
//! - [`vm`]: building the VM from its configuration ([`vm::VmConfig`] in, a [`vm::Vm`] out).
//! - [`identity`]: what a log header or a snapshot pins about the VM, and the one check of
//!   an image named by its digest.
//! - [`kvm`]: opening /dev/kvm and telling hardware KVM from the PVM software backend.
//! - [`memory`]: the guest physical memory layout and its KVM memory slots.
//! - [`cpuid`], [`msr`]: the fixed CPUID and MSR policy.
//! - [`kick`]: getting a vCPU out of KVM_RUN, and the deadline timer that does it.
//! - [`dirty`], [`disk`]: which guest pages and disk blocks changed, for every consumer.
//! - [`vcpu_state`]: the vCPU's saved state.
//! - [`legacy`]: the device buses and the legacy PC devices' wiring.

pub mod boot;
pub mod cpuid;
pub mod dirty;
pub mod disk;
pub mod error;
pub mod identity;
pub mod kick;
pub mod kvm;
pub mod legacy;
pub mod memory;
pub mod msr;
pub mod snapshot;
pub mod state;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;

pub use vcpu::syncpoint;

pub use error::{Error, Result};
