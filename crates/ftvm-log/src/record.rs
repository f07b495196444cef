//! The records of the log. This crate does not interpret them: it encodes, frames, checks and
//! decodes them. Every record is positioned at an exit index (docs/record-replay.md): events at N apply
//! after exit N's access completed, before re-entering the guest, in log order.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A log sequence number: the header frame is LSN 0, the first record LSN 1, and each frame's
/// LSN is its predecessor's plus one.
pub type Lsn = u64;

/// `Output::kind` for console bytes.
pub const OUTPUT_CONSOLE: u8 = 0;
/// `Output::kind` for a transmitted network frame.
pub const OUTPUT_NET: u8 = 1;

/// One log record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    /// Guest time in ns admitted at this exit (a time-dependent read or a due deadline).
    Clock { exit: u64, t: u64 },
    /// Bytes typed on the console.
    ConsoleInput { exit: u64, bytes: Vec<u8> },
    /// A frame received on network device `dev`.
    NetRx { exit: u64, dev: u8, frame: Vec<u8> },
    /// Bytes for the guest's entropy device.
    Entropy { exit: u64, bytes: Vec<u8> },
    /// The signature of the exit at which events are applied or an output happened.
    ExitSig { exit: u64, kind: u8, addr: u64, size: u8, data: u64, rip: u64 },
    /// Rolling hash of the exit signatures since the previous checkpoint, and a register digest.
    Checkpoint { exit: u64, exits_hash: u64, regs_hash: u64 },
    /// (gfn, hash) of the pages dirtied since the previous check.
    PageHashes { exit: u64, pages: Vec<(u64, u64)> },
    /// An output (console bytes or a network frame): its ordinal, length and digest, and, in
    /// forensic logs, the bytes themselves (then `len == data.len()`).
    Output { exit: u64, ordinal: u64, kind: u8, len: u32, digest: u64, data: Option<Vec<u8>> },
    /// A sync point: the `kick`-th kick after exit `exit`; `wait_us`: how long the oldest
    /// event it delivers had waited for it (the lateness sync points cause, for people and
    /// tools; the replay ignores it); `state` is opaque here.
    SyncPoint { exit: u64, kick: u32, wait_us: u64, state: Vec<u8> },
    /// The end of the recording and why.
    End { exit: u64, reason: EndReason },
    /// The operator asked the guest to shut down (SIGTERM, `PUT /shutdown`): the request was
    /// delivered to the guest here (docs/operations.md#stopping).
    ShutdownRequest { exit: u64 },
}

/// Why a recording ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EndReason {
    GuestPowerOff,
    GuestReset,
    TripleFault,
    OperatorStop,
    /// The writer's size limit was reached.
    SizeLimit,
    Error(String),
}

impl fmt::Display for EndReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndReason::GuestPowerOff => f.write_str("guest power-off"),
            EndReason::GuestReset => f.write_str("guest reset"),
            EndReason::TripleFault => f.write_str("triple fault"),
            EndReason::OperatorStop => f.write_str("operator stop"),
            EndReason::SizeLimit => f.write_str("log size limit reached"),
            EndReason::Error(e) => write!(f, "error: {e}"),
        }
    }
}

impl Record {
    /// The exit index at which the record is positioned.
    pub fn exit(&self) -> u64 {
        match self {
            Record::Clock { exit, .. }
            | Record::ConsoleInput { exit, .. }
            | Record::NetRx { exit, .. }
            | Record::Entropy { exit, .. }
            | Record::ExitSig { exit, .. }
            | Record::Checkpoint { exit, .. }
            | Record::PageHashes { exit, .. }
            | Record::Output { exit, .. }
            | Record::SyncPoint { exit, .. }
            | Record::End { exit, .. }
            | Record::ShutdownRequest { exit } => *exit,
        }
    }

    /// The record kind's name, as `inspect` prints it.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Record::Clock { .. } => "CLOCK",
            Record::ConsoleInput { .. } => "CONSOLE_IN",
            Record::NetRx { .. } => "NET_RX",
            Record::Entropy { .. } => "ENTROPY",
            Record::ExitSig { .. } => "EXIT_SIG",
            Record::Checkpoint { .. } => "CHECKPOINT",
            Record::PageHashes { .. } => "PAGE_HASHES",
            Record::Output { .. } => "OUTPUT",
            Record::SyncPoint { .. } => "SYNC_POINT",
            Record::End { .. } => "END",
            Record::ShutdownRequest { .. } => "SHUTDOWN_REQ",
        }
    }
}

/// At most this many bytes of console data are shown by `Display`.
const SHOW_BYTES: usize = 48;

fn show_bytes(f: &mut fmt::Formatter<'_>, b: &[u8]) -> fmt::Result {
    let shown = &b[..b.len().min(SHOW_BYTES)];
    write!(f, "\"{}\"", shown.escape_ascii())?;
    if b.len() > SHOW_BYTES {
        f.write_str("...")?;
    }
    Ok(())
}

/// One readable line per record, for `ftvm log inspect --events`.
impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:<11} exit={}", self.kind_name(), self.exit())?;
        match self {
            Record::Clock { t, .. } => write!(f, " t={}.{:09}s", t / 1_000_000_000, t % 1_000_000_000),
            Record::ConsoleInput { bytes, .. } => {
                write!(f, " len={} ", bytes.len())?;
                show_bytes(f, bytes)
            }
            Record::NetRx { dev, frame, .. } => {
                write!(f, " dev={dev} len={} hash={:#018x}", frame.len(), crate::hash64(frame))
            }
            Record::Entropy { bytes, .. } => write!(f, " len={}", bytes.len()),
            Record::ExitSig { kind, addr, size, data, rip, .. } => {
                write!(f, " kind={kind} addr={addr:#x} size={size} data={data:#x} rip={rip:#x}")
            }
            Record::Checkpoint { exits_hash, regs_hash, .. } => {
                write!(f, " exits_hash={exits_hash:#018x} regs_hash={regs_hash:#018x}")
            }
            Record::PageHashes { pages, .. } => {
                write!(f, " pages={}", pages.len())?;
                if let (Some(lo), Some(hi)) = (pages.iter().map(|p| p.0).min(), pages.iter().map(|p| p.0).max()) {
                    write!(f, " gfns={lo:#x}..={hi:#x}")?;
                }
                Ok(())
            }
            Record::Output { ordinal, kind, len, digest, data, .. } => {
                let k = match *kind {
                    OUTPUT_CONSOLE => "console".to_string(),
                    OUTPUT_NET => "net".to_string(),
                    k => format!("kind{k}"),
                };
                write!(f, " ordinal={ordinal} {k} len={len} digest={digest:#018x}")?;
                match data {
                    Some(d) if *kind == OUTPUT_CONSOLE => {
                        f.write_str(" ")?;
                        show_bytes(f, d)
                    }
                    Some(_) => f.write_str(" +data"),
                    None => Ok(()),
                }
            }
            Record::SyncPoint { kick, wait_us, state, .. } => {
                write!(f, " kick={kick} wait_us={wait_us} state_len={}", state.len())
            }
            Record::End { reason, .. } => write!(f, " reason={reason}"),
            Record::ShutdownRequest { .. } => Ok(()),
        }
    }
}
