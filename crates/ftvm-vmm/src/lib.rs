//! ftvm's sessions: each composes the machine (`ftvm-machine`: KVM, memory, boot, the vCPU
//! loop, saved state) with what the session adds. The modules import in one direction:
//! - [`control`], [`pair`]: the control API's side of a VM (the loop's supervisor) and a
//!   backup's takeover and a primary's sinks;
//! - [`snapshot`]: snapshots taken live and restored;
//! - [`protect`]: re-protection and resync (a live state transfer to a new backup);
//! - [`run`]: running a VM to the end in a session mode ([`run::Journaling`]);
//! - [`recording`]: `ftvm record`, `ftvm replay`, `ftvm primary` and `ftvm backup`.
//!
//! The machine layer's modules are re-exported here under their old paths.

pub mod control;
pub mod error;
pub mod pair;
pub mod protect;
pub mod recording;
pub mod run;
pub mod snapshot;

pub use ftvm_machine::{
    boot, cpuid, dirty, disk, identity, kick, kvm, legacy, memory, msr, state, syncpoint, vcpu, vcpu_state, vm,
};

pub use error::{Error, Result};
pub use vm::{ConsoleConfig, VmConfig, VmOutcome};
