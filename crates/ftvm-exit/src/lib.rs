//! ftvm's process exit statuses, in one table: every status the `ftvm` binary can end with,
//! what it means, and what a supervisor (systemd, a script) should do about it. The CLI, the
//! VMM's outcomes and the replication layer's fence all take their numbers from here, and
//! docs/operations.md and docs/architecture.md show this table (a test checks they agree).
//!
//! A supervisor must tell apart outcomes that look alike from outside: a guest's reset
//! request (3) from a side that fenced itself off because another copy may be live (12), a
//! power-off (0) from a hand-over to the backup (11), and an operator's SIGTERM (143, which
//! the shipped systemd units count as success) from a failure.

/// How an `ftvm` process ended. `code()` is the process exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExitStatus {
    /// The guest powered off; `replay`: the whole log replayed exactly; `ctl`: done.
    Success,
    /// An ftvm error (bad configuration, unreadable kernel, KVM unavailable, the pair cannot
    /// form, ...); the message says what.
    Error,
    /// A usage error (bad arguments or flags).
    Usage,
    /// The guest asked for a reset (i8042); ftvm stops instead of rebooting.
    GuestReset,
    /// The guest triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault,
    /// The guest halted with nothing that could wake it.
    HaltedForever,
    /// KVM could not run the guest (emulation or entry failure).
    KvmFailure,
    /// `record`: the recording stopped early (size limit, or the log could not be written).
    RecordingStopped,
    /// `replay`: a divergence.
    Diverged,
    /// `replay` and `log inspect`: the log ends early.
    LogEndsEarly,
    /// `replay`: the log is damaged.
    LogDamaged,
    /// A primary handed the VM over to its backup (`ftvm ctl switchover`): the backup is live.
    Switchover,
    /// A side of a pair fenced itself off: it lost the arbiter, could not win it, or its
    /// state was wrong when its primary died. Another copy may be live: never restart it
    /// as it was.
    Fenced,
    /// Stopped by SIGINT (128 + 2).
    Interrupted,
    /// Stopped by SIGTERM (128 + 15), the supervisor's stop.
    Terminated,
}

impl ExitStatus {
    /// Every status, in the order of their codes.
    pub const ALL: [ExitStatus; 15] = [
        ExitStatus::Success,
        ExitStatus::Error,
        ExitStatus::Usage,
        ExitStatus::GuestReset,
        ExitStatus::TripleFault,
        ExitStatus::HaltedForever,
        ExitStatus::KvmFailure,
        ExitStatus::RecordingStopped,
        ExitStatus::Diverged,
        ExitStatus::LogEndsEarly,
        ExitStatus::LogDamaged,
        ExitStatus::Switchover,
        ExitStatus::Fenced,
        ExitStatus::Interrupted,
        ExitStatus::Terminated,
    ];

    /// The process exit status.
    pub const fn code(self) -> u8 {
        match self {
            ExitStatus::Success => 0,
            ExitStatus::Error => 1,
            ExitStatus::Usage => 2,
            ExitStatus::GuestReset => 3,
            ExitStatus::TripleFault => 4,
            ExitStatus::HaltedForever => 5,
            ExitStatus::KvmFailure => 6,
            ExitStatus::RecordingStopped => 7,
            ExitStatus::Diverged => 8,
            ExitStatus::LogEndsEarly => 9,
            ExitStatus::LogDamaged => 10,
            ExitStatus::Switchover => 11,
            ExitStatus::Fenced => 12,
            ExitStatus::Interrupted => 130,
            ExitStatus::Terminated => 143,
        }
    }

    /// What the status means, one line (the docs' table shows the same words).
    pub const fn meaning(self) -> &'static str {
        match self {
            ExitStatus::Success => {
                "the guest powered off (also after SIGTERM's shutdown request); `replay`: the whole log replayed exactly; `ctl`: done"
            }
            ExitStatus::Error => {
                "ftvm error (bad configuration, unreadable kernel, KVM unavailable, the pair cannot form, ...)"
            }
            ExitStatus::Usage => "usage error (bad arguments)",
            ExitStatus::GuestReset => "the guest requested a reset through the i8042 (ftvm stops rather than reboots)",
            ExitStatus::TripleFault => "triple fault (KVM_EXIT_SHUTDOWN); the registers are printed",
            ExitStatus::HaltedForever => "the guest halted with nothing that could wake it; the registers are printed",
            ExitStatus::KvmFailure => {
                "KVM could not run the guest (emulation or entry failure); the registers are printed"
            }
            ExitStatus::RecordingStopped => {
                "`record`: the recording stopped early (its size limit, or the log could not be written)"
            }
            ExitStatus::Diverged => "`replay`: a divergence (the report says where)",
            ExitStatus::LogEndsEarly => "`replay`, `log inspect`: the log ends early",
            ExitStatus::LogDamaged => "`replay`: the log is damaged (replayed exactly up to the damage)",
            ExitStatus::Switchover => {
                "`primary`: handed the VM over to its backup (`ctl switchover`); the backup is live"
            }
            ExitStatus::Fenced => {
                "HALT: a side of a pair fenced itself off (lost or could not win the arbiter, or a diverged backup \
                 whose primary died); another copy may be live"
            }
            ExitStatus::Interrupted => "stopped by SIGINT",
            ExitStatus::Terminated => {
                "stopped by SIGTERM: at once, or after --stop-timeout when the guest did not power off (a clean stop; the shipped systemd units count it as success)"
            }
        }
    }

    /// What a supervisor should do (the docs' table shows the same words).
    pub const fn supervisor(self) -> &'static str {
        match self {
            ExitStatus::Success | ExitStatus::Interrupted | ExitStatus::Terminated => "do not restart",
            ExitStatus::Error | ExitStatus::Usage => "fix the cause; restarting repeats it",
            ExitStatus::GuestReset => "restart if the guest should reboot",
            ExitStatus::TripleFault | ExitStatus::HaltedForever | ExitStatus::KvmFailure => {
                "the guest crashed: restart if wanted"
            }
            ExitStatus::RecordingStopped | ExitStatus::Diverged | ExitStatus::LogEndsEarly | ExitStatus::LogDamaged => {
                "not a service outcome"
            }
            ExitStatus::Switchover => "do not restart as primary: start a backup here to protect the new live side",
            ExitStatus::Fenced => "never restart as it was: find the live side first",
        }
    }

    /// The status of a stop by this signal; `None` for a signal ftvm does not stop on.
    pub const fn for_signal(signal: i32) -> Option<ExitStatus> {
        match signal {
            2 => Some(ExitStatus::Interrupted),
            15 => Some(ExitStatus::Terminated),
            _ => None,
        }
    }

    /// The status with this code, if ftvm uses it.
    pub fn from_code(code: i32) -> Option<ExitStatus> {
        ExitStatus::ALL.into_iter().find(|s| i32::from(s.code()) == code)
    }

    /// The table as Markdown rows (`| code | meaning | supervisor |`), as the docs show it.
    pub fn markdown_rows() -> String {
        ExitStatus::ALL.iter().map(|s| format!("| {} | {} | {} |\n", s.code(), s.meaning(), s.supervisor())).collect()
    }
}

impl From<ExitStatus> for std::process::ExitCode {
    fn from(s: ExitStatus) -> Self {
        std::process::ExitCode::from(s.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_ordered_and_round_trip() {
        let codes: Vec<u8> = ExitStatus::ALL.iter().map(|s| s.code()).collect();
        assert!(codes.windows(2).all(|w| w[0] < w[1]), "{codes:?}");
        for s in ExitStatus::ALL {
            assert_eq!(ExitStatus::from_code(i32::from(s.code())), Some(s));
        }
        assert_eq!(ExitStatus::from_code(77), None);
        assert_eq!(ExitStatus::for_signal(15), Some(ExitStatus::Terminated));
        assert_eq!(ExitStatus::for_signal(2).map(ExitStatus::code), Some(130));
        assert_eq!(ExitStatus::for_signal(9), None);
    }

    #[test]
    fn the_outcomes_a_supervisor_must_tell_apart_have_their_own_status() {
        assert_ne!(ExitStatus::GuestReset.code(), ExitStatus::Fenced.code());
        assert_ne!(ExitStatus::Success.code(), ExitStatus::Switchover.code());
        assert_ne!(ExitStatus::Interrupted.code(), ExitStatus::Terminated.code());
    }

    /// docs/operations.md and docs/architecture.md show exactly this table.
    #[test]
    fn the_docs_show_this_table() {
        let rows = ExitStatus::markdown_rows();
        for doc in ["operations.md", "architecture.md"] {
            let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/").to_string() + doc;
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            assert!(
                text.contains(&rows),
                "{doc} must show the exit statuses as `ExitStatus::markdown_rows()`:\n{rows}"
            );
        }
    }
}
