//! ftvm's VMM core: KVM, guest memory, boot protocols and the vCPU loop.
//!
//! - [`kvm`]: opening /dev/kvm and telling hardware KVM from the PVM software backend.
//! - [`memory`]: the guest physical memory layout and its KVM memory slots.
//! - [`cpuid`], [`msr`]: the fixed CPUID and MSR policy (design brief §3).
//! - [`boot`]: loading PVH ELF kernels and Linux bzImages and the vCPU's first state.
//! - [`vcpu`]: the vCPU loop that dispatches every exit to the device buses.
//! - [`vm`]: putting it together: [`vm::VmConfig`] in, [`vm::VmOutcome`] out.

pub mod boot;
pub mod cpuid;
pub mod dirty;
pub mod disk;
pub mod error;
pub mod kick;
pub mod kvm;
pub mod legacy;
pub mod memory;
pub mod msr;
pub mod pair;
pub mod protect;
pub mod recording;
pub mod snapshot;
pub mod syncpoint;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;

pub use error::{Error, Result};
pub use vm::{ConsoleConfig, VmConfig, VmOutcome};
