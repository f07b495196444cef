//! ftvm's VMM: boot protocols, the vCPU loop and the sessions that compose the machine
//! (run, record, replay, primary, backup, protect, snapshots).
//!
//! The machine layer below it is the crate `ftvm-machine` (KVM, memory, CPUID/MSR policy,
//! kicks, dirty tracking, disks, vCPU state, the legacy devices' wiring); its modules are
//! re-exported here under their old paths.
//! - [`boot`]: loading PVH ELF kernels and Linux bzImages and the vCPU's first state.
//! - [`vcpu`]: the vCPU loop that dispatches every exit to the device buses.
//! - [`vm`]: putting it together: [`vm::VmConfig`] in, [`vm::VmOutcome`] out.

pub mod control;
pub mod error;
pub mod identity;
pub mod pair;
pub mod protect;
pub mod recording;
pub mod run;
pub mod snapshot;
pub mod vm;

pub use ftvm_machine::{boot, cpuid, dirty, disk, kick, kvm, legacy, memory, msr, state, syncpoint, vcpu, vcpu_state};

pub use error::{Error, Result};
pub use vm::{ConsoleConfig, VmConfig, VmOutcome};
