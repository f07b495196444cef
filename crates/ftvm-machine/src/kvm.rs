//! Opening KVM and identifying the backend.
//!
//! Our development machines run KVM's PVM backend (software, shadow paging; ring-0 guest
//! code is emulated), users run hardware KVM. The same API serves both; ftvm reports which
//! one it is on because speed and a few behaviours differ (see docs/architecture.md).

use std::fmt;
use std::path::Path;

use kvm_ioctls::{Cap, Kvm};

use crate::error::{Error, Result};

pub const KVM_PATH: &str = "/dev/kvm";

/// Which KVM implementation backs /dev/kvm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Hardware virtualization (VMX or SVM).
    Hardware,
    /// The PVM software backend (kvm_pvm module).
    Pvm,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Hardware => "hardware (VMX/SVM)",
            Backend::Pvm => "PVM (software, kvm_pvm)",
        })
    }
}

/// The backend, judged by which module provides KVM.
pub fn detect_backend() -> Backend {
    if Path::new("/sys/module/kvm_pvm").exists() {
        Backend::Pvm
    } else {
        Backend::Hardware
    }
}

/// What `ftvm --version` and `ftvm doctor`-style checks say about KVM.
pub fn describe() -> String {
    match open() {
        Ok(kvm) => format!("KVM API {} on {}", kvm.get_api_version(), detect_backend()),
        Err(e) => format!("KVM unavailable: {e}"),
    }
}

/// Opens /dev/kvm and checks the API version and the capabilities ftvm relies on.
pub fn open() -> Result<Kvm> {
    let kvm = Kvm::new()
        .map_err(|e| Error::KvmOpen { path: KVM_PATH.into(), source: std::io::Error::from_raw_os_error(e.errno()) })?;
    let version = kvm.get_api_version();
    if version != 12 {
        return Err(Error::KvmApiVersion(version));
    }
    for (cap, name) in [
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
        (Cap::X86UserSpaceMsr, "KVM_CAP_X86_USER_SPACE_MSR"),
        (Cap::X86MsrFilter, "KVM_CAP_X86_MSR_FILTER"),
        (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(Error::KvmCapability(name));
        }
    }
    Ok(kvm)
}
