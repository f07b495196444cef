//! The state model: everything of a VM that is not memory or disk, saved and restored
//! between two exits (a snapshot's `state.bin`, a sync point, a live state transfer).

use ftvm_events::ClockState;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::legacy::DevicesState;
use crate::vcpu_state::VcpuState;

/// The vCPU, every device and the guest clock.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    pub vcpu: VcpuState,
    pub devices: DevicesState,
    pub clock: ClockState,
}

impl VmState {
    pub fn encode(&self) -> Result<Vec<u8>> {
        postcard::to_stdvec(self).map_err(|e| Error::Capture(format!("cannot encode the VM state: {e}")))
    }

    pub fn decode(bytes: &[u8]) -> Result<Self> {
        postcard::from_bytes(bytes).map_err(|e| Error::Restore(format!("the VM state does not decode: {e}")))
    }
}
