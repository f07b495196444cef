//! Device state for snapshots, live state transfer and resync (docs/snapshots.md).
//!
//! Every device implements [`Stateful`]: `save_state` returns a serde value holding everything
//! that decides what the guest sees from then on (registers, FIFOs, latches, the guest-time
//! bases of counters and the deadlines of timers), and `restore_state` puts such a value into a
//! device built with the same configuration. A restored device behaves exactly like the one
//! saved: the same register reads, the same interrupts at the same guest times, the same
//! [`crate::Timed::next_deadline`], the same number of clock reads.
//!
//! States come from files and from the network, so restoring validates first: a state that no
//! real device could be in, or one saved from a device configured differently (another MAC,
//! another disk size), is refused with a [`StateError`] that says what is wrong, and the device
//! is left as it was. Restoring never panics.
//!
//! Timer states hold absolute guest times (the PIT tick a count started at, the RTC's epoch,
//! the next deadlines), so the guest clock of the restored VM must go on from the guest time at
//! which the state was saved. A state is saved between exits, after the VMM has applied the
//! exit's interrupt line changes to the PIC (the lines' levels are PIC state).

use std::fmt::{Debug, Display};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The version of the device model's state format: bump when any state struct changes shape
/// (a field added, removed, renamed or retyped, an enum variant changed), so that a state saved
/// by another build is refused instead of misread.
pub const DEVICE_STATE_VERSION: u32 = 1;

/// A device whose complete state can be saved and restored.
pub trait Stateful {
    /// The saved state.
    type State: Clone + Debug + PartialEq + Serialize + DeserializeOwned;

    /// The device's complete state now. Saving changes nothing and reads no clock.
    fn save_state(&self) -> Self::State;

    /// Makes this device continue from `state`. On error the device is unchanged.
    fn restore_state(&mut self, state: &Self::State) -> Result<(), StateError>;
}

/// Why a saved state was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("device state version {found} cannot be read (this ftvm reads version {DEVICE_STATE_VERSION})")]
    Version { found: u32 },
    /// The state holds something no real device could hold.
    #[error("{device}: invalid saved state: {what}")]
    Invalid { device: String, what: String },
    /// The state is valid but was saved from a device configured differently.
    #[error("{device}: saved state does not fit this device: {what}")]
    Mismatch { device: String, what: String },
}

impl StateError {
    pub fn invalid(device: &str, what: impl Into<String>) -> Self {
        StateError::Invalid { device: device.into(), what: what.into() }
    }
}

/// Refuses a state saved by a device model of another [`DEVICE_STATE_VERSION`].
pub fn check_version(found: u32) -> Result<(), StateError> {
    if found == DEVICE_STATE_VERSION {
        Ok(())
    } else {
        Err(StateError::Version { found })
    }
}

/// Refuses a state whose `what` (a configuration value) differs from this device's.
pub fn ensure_same<T: PartialEq + Display>(device: &str, what: &str, saved: T, here: T) -> Result<(), StateError> {
    if saved == here {
        Ok(())
    } else {
        Err(StateError::Mismatch { device: device.into(), what: format!("{what}: saved {saved}, this device {here}") })
    }
}

/// `ensure_state!(cond, device, "format", args...)`: returns [`StateError::Invalid`] with the
/// formatted reason from the enclosing function unless `cond` holds.
#[macro_export]
macro_rules! ensure_state {
    ($cond:expr, $device:expr, $($what:tt)+) => {
        if !$cond {
            return Err($crate::StateError::invalid($device, format!($($what)+)));
        }
    };
}

/// For a device all of whose fields are state (it holds no configuration and no host
/// resource): declares `$state` as a snapshot of the whole device and implements [`Stateful`]
/// with it, checking the saved device with its `check_state` method before adopting it. Taking
/// the whole device means a field added to it later is in the state without anyone
/// remembering to add it (it still changes the state's shape: bump [`DEVICE_STATE_VERSION`]).
macro_rules! whole_device_state {
    ($(#[$doc:meta])* $state:ident for $device:ty) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
        #[serde(transparent)]
        pub struct $state($device);

        impl $crate::Stateful for $device {
            type State = $state;

            fn save_state(&self) -> $state {
                $state(self.clone())
            }

            fn restore_state(&mut self, state: &$state) -> Result<(), $crate::StateError> {
                state.0.check_state()?;
                *self = state.0.clone();
                Ok(())
            }
        }
    };
}
pub(crate) use whole_device_state;

/// Test support shared by the devices' state tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// The state through JSON and back, as a snapshot file or a transfer carries it.
    pub fn through_json<S: Serialize + DeserializeOwned>(state: &S) -> S {
        serde_json::from_str(&serde_json::to_string(state).expect("serialize")).expect("deserialize")
    }

    /// Saves `device`, carries the state through JSON and restores it into `fresh`.
    pub fn restored<D: Stateful>(device: &D, mut fresh: D) -> D {
        let state = through_json(&device.save_state());
        assert_eq!(state, device.save_state(), "JSON keeps the state exactly");
        fresh.restore_state(&state).expect("a saved state restores");
        assert_eq!(fresh.save_state(), state);
        fresh
    }

    /// The random words of the state tests (an LCG: the same sequence on every host).
    pub struct Lcg(pub u64);

    impl Lcg {
        pub fn next(&mut self) -> u32 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (self.0 >> 32) as u32
        }
    }

    /// The determinism check. Runs `split` random steps on `h`, then forks it (`fork` returns a
    /// fresh harness whose device is restored from `h`'s saved state and whose outside world, the
    /// clock, equals `h`'s) and runs `steps` more random steps on both, asserting that each step
    /// observes the same on both (`step` returns what the guest and the VMM saw: reads, line
    /// changes, deadlines, clock reads). Returns both for a final comparison.
    pub fn lockstep<H, O: PartialEq + Debug>(
        seed: u64,
        split: usize,
        steps: usize,
        mut h: H,
        fork: impl Fn(&H) -> H,
        mut step: impl FnMut(&mut H, u32) -> O,
    ) -> (H, H) {
        let mut rng = Lcg(seed);
        for _ in 0..split {
            step(&mut h, rng.next());
        }
        let mut twin = fork(&h);
        for i in 0..steps {
            let r = rng.next();
            let (a, b) = (step(&mut h, r), step(&mut twin, r));
            assert_eq!(a, b, "seed {seed}: step {i} after a restore at step {split} differs");
        }
        (h, twin)
    }

    /// Restoring `state` into `device` fails with a message containing `needle`, and leaves the
    /// device as it was.
    pub fn refused<D: Stateful>(device: &mut D, state: &D::State, needle: &str) {
        let before = device.save_state();
        let err = device.restore_state(state).expect_err(needle).to_string();
        assert!(err.contains(needle), "error {err:?} does not mention {needle:?}");
        assert_eq!(device.save_state(), before, "a refused state changes nothing");
    }

    #[test]
    fn errors_say_what_is_wrong() {
        assert!(check_version(DEVICE_STATE_VERSION).is_ok());
        assert_eq!(
            check_version(7).unwrap_err().to_string(),
            "device state version 7 cannot be read (this ftvm reads version 1)"
        );
        assert_eq!(
            ensure_same("virtio-blk0", "capacity (sectors)", 8u64, 16).unwrap_err().to_string(),
            "virtio-blk0: saved state does not fit this device: capacity (sectors): saved 8, this device 16"
        );
        let check = |n: u32| -> Result<(), StateError> {
            ensure_state!(n < 8, "pic", "priority {n} out of range");
            Ok(())
        };
        assert_eq!(check(9).unwrap_err().to_string(), "pic: invalid saved state: priority 9 out of range");
        assert!(check(3).is_ok());
    }
}
