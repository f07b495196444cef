//! `ftvm log inspect`: a summary of a whole log, for people (`Display`) and tools (JSON).

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::LogError;
use crate::header::LogHeader;
use crate::reader::LogReader;
use crate::record::{EndReason, Record};

/// Count and frame bytes (prefix included) of one record kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KindStats {
    pub count: u64,
    pub bytes: u64,
}

/// How the log ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum LogEnd {
    /// An END record closes the log.
    Complete { exit: u64, reason: EndReason },
    /// No END record: the stream stops at `offset`, the end of the last complete frame.
    /// `torn` when a partial frame follows it.
    EndsEarly { offset: u64, torn: bool },
    /// A damaged frame at `offset`; everything before it was read.
    Corrupt { offset: u64, error: String },
}

/// What `inspect` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogSummary {
    pub header: LogHeader,
    /// Bytes read up to the end of the last complete frame.
    pub valid_bytes: u64,
    /// Header frame size (magic and version included).
    pub header_bytes: u64,
    pub records: u64,
    pub first_exit: Option<u64>,
    pub last_exit: Option<u64>,
    pub first_clock_ns: Option<u64>,
    pub last_clock_ns: Option<u64>,
    /// Guest time between the first and the last CLOCK.
    pub guest_duration_ns: u64,
    /// By kind name (`CLOCK`, `NET_RX`, ...).
    pub by_kind: BTreeMap<String, KindStats>,
    pub outputs: u64,
    /// Sum of the outputs' lengths.
    pub output_bytes: u64,
    pub checkpoints: u64,
    /// The sync points' lateness: how long the events they delivered had waited.
    #[serde(default)]
    pub sync_points: SyncSummary,
    pub end: LogEnd,
}

/// How late sync points delivered (from their `wait_us`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncSummary {
    pub count: u64,
    pub mean_wait_us: u64,
    pub max_wait_us: u64,
    /// Their frames' bytes per second of guest time (0 without guest time).
    pub bytes_per_guest_s: u64,
}

/// One record, as `--events` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventLine {
    pub lsn: u64,
    /// Byte offset of the frame.
    pub offset: u64,
    /// Frame size in bytes.
    pub bytes: u64,
    pub kind: String,
    pub exit: u64,
    /// The record rendered for people (long data elided).
    pub text: String,
}

/// A summary plus, on request, one line per record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inspection {
    pub summary: LogSummary,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<EventLine>>,
}

impl Inspection {
    /// Pretty JSON, for `--json`.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("inspection serializes")
    }

    /// Whether the log is whole: an END record and no damage.
    pub fn is_complete(&self) -> bool {
        matches!(self.summary.end, LogEnd::Complete { .. })
    }
}

/// Reads the log at `path` and summarizes it; `events` also lists every record.
///
/// Opening errors (missing file, empty, not a log, another format version, torn header) are
/// errors; damage further on is reported in [`LogSummary::end`] with everything read before it.
pub fn inspect(path: &Path, events: bool) -> Result<Inspection, LogError> {
    inspect_reader(BufReader::with_capacity(1 << 20, File::open(path)?), events)
}

/// [`inspect`] over any reader.
pub fn inspect_reader<R: Read>(r: R, events: bool) -> Result<Inspection, LogError> {
    let (mut rd, header) = LogReader::open(r)?;
    let header_bytes = rd.valid_len();
    let mut s = LogSummary {
        header,
        valid_bytes: header_bytes,
        header_bytes,
        records: 0,
        first_exit: None,
        last_exit: None,
        first_clock_ns: None,
        last_clock_ns: None,
        guest_duration_ns: 0,
        by_kind: BTreeMap::new(),
        outputs: 0,
        output_bytes: 0,
        checkpoints: 0,
        sync_points: SyncSummary::default(),
        end: LogEnd::EndsEarly { offset: header_bytes, torn: false },
    };
    let mut lines = events.then(Vec::new);
    let mut end = None;
    let mut total_wait_us = 0u64;
    loop {
        let (lsn, rec) = match rd.next() {
            Ok(Some(x)) => x,
            Ok(None) => break,
            Err(e) => {
                end = Some(LogEnd::Corrupt { offset: e.offset().unwrap_or(rd.valid_len()), error: e.to_string() });
                break;
            }
        };
        let bytes = rd.last_frame_len();
        let exit = rec.exit();
        s.records += 1;
        s.first_exit.get_or_insert(exit);
        s.last_exit = Some(exit);
        let k = s.by_kind.entry(rec.kind_name().to_string()).or_default();
        k.count += 1;
        k.bytes += bytes;
        match &rec {
            Record::Clock { t, .. } => {
                s.first_clock_ns.get_or_insert(*t);
                s.last_clock_ns = Some(*t);
            }
            Record::Output { len, .. } => {
                s.outputs += 1;
                s.output_bytes += u64::from(*len);
            }
            Record::Checkpoint { .. } => s.checkpoints += 1,
            Record::SyncPoint { wait_us, .. } => {
                s.sync_points.count += 1;
                s.sync_points.max_wait_us = s.sync_points.max_wait_us.max(*wait_us);
                total_wait_us = total_wait_us.saturating_add(*wait_us);
            }
            Record::End { exit, reason } => end = Some(LogEnd::Complete { exit: *exit, reason: reason.clone() }),
            _ => {}
        }
        if let Some(l) = lines.as_mut() {
            let offset = rd.valid_len() - bytes;
            let text = rec.to_string();
            l.push(EventLine { lsn, offset, bytes, kind: rec.kind_name().into(), exit, text });
        }
    }
    s.valid_bytes = rd.valid_len();
    if let (Some(a), Some(b)) = (s.first_clock_ns, s.last_clock_ns) {
        s.guest_duration_ns = b.saturating_sub(a);
    }
    let sync = &mut s.sync_points;
    sync.mean_wait_us = total_wait_us.checked_div(sync.count).unwrap_or(0);
    if let (Some(k), true) = (s.by_kind.get("SYNC_POINT"), s.guest_duration_ns > 0) {
        sync.bytes_per_guest_s = (k.bytes as f64 * 1e9 / s.guest_duration_ns as f64) as u64;
    }
    s.end = match end {
        Some(e) => e,
        None => LogEnd::EndsEarly { offset: rd.valid_len(), torn: rd.truncated() },
    };
    Ok(Inspection { summary: s, events: lines })
}

fn secs(ns: u64) -> String {
    format!("{}.{:09}s", ns / 1_000_000_000, ns % 1_000_000_000)
}

impl fmt::Display for LogEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LogEnd::Complete { exit, reason } => write!(f, "END at exit {exit}: {reason}"),
            LogEnd::EndsEarly { offset, torn: true } => {
                write!(f, "log ends early at offset {offset} (a partial frame follows; no END record)")
            }
            LogEnd::EndsEarly { offset, torn: false } => write!(f, "log ends early at offset {offset} (no END record)"),
            LogEnd::Corrupt { error, .. } => write!(f, "CORRUPT: {error}"),
        }
    }
}

impl fmt::Display for LogSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = &self.header;
        writeln!(
            f,
            "ftvm log, format {}, written by ftvm {}, device model {}",
            h.format_version, h.ftvm_version, h.device_model_version
        )?;
        let img = |f: &mut fmt::Formatter<'_>, what: &str, i: &crate::ImageInfo| {
            writeln!(f, "  {what:<9} {} ({} bytes, sha256 {})", i.path, i.size, i.sha256)
        };
        img(f, "kernel", &h.kernel)?;
        if let Some(i) = &h.initrd {
            img(f, "initrd", i)?;
        }
        for d in &h.disks {
            img(f, "disk", d)?;
        }
        let regions: Vec<String> = h.memory_layout.iter().map(|r| format!("{:#x}+{:#x}", r.start, r.size)).collect();
        writeln!(f, "  {:<9} {} MiB: {}", "memory", h.memory_size >> 20, regions.join(", "))?;
        writeln!(f, "  {:<9} {:?}", "cmdline", h.cmdline)?;
        if h.effective_cmdline != h.cmdline {
            writeln!(f, "  {:<9} {:?}", "effective", h.effective_cmdline)?;
        }
        writeln!(f, "  {:<9} {} entries, xcr0 {:#x}, xsave {} bytes", "cpuid", h.cpuid.len(), h.xcr0, h.xsave_size)?;
        let net: Vec<String> = h.net.iter().map(|n| format!("{} on {}", n.mac, n.tap)).collect();
        writeln!(
            f,
            "  {:<9} console {}, rng {}, net [{}], exit delivery {}, rtc base {}",
            "devices",
            h.console,
            if h.rng { "on" } else { "off" },
            net.join(", "),
            h.exit_delivery,
            h.rtc_base_unix
        )?;
        writeln!(f, "  {:<9} unix {}", "recorded", secs(h.record_start_unix_ns))?;
        for (k, v) in &h.extra {
            writeln!(f, "  {k} = {v:?}")?;
        }
        let exits = match (self.first_exit, self.last_exit) {
            (Some(a), Some(b)) => format!("exits {a}..={b}"),
            _ => "no exits".into(),
        };
        writeln!(
            f,
            "{} bytes, {} records, {exits}, guest time {}",
            self.valid_bytes,
            self.records,
            secs(self.guest_duration_ns)
        )?;
        writeln!(f, "  {:<12} {:>10} {:>12} {:>9}", "kind", "count", "bytes", "bytes/rec")?;
        writeln!(f, "  {:<12} {:>10} {:>12}", "(header)", 1, self.header_bytes)?;
        for (k, v) in &self.by_kind {
            let per = v.bytes as f64 / v.count.max(1) as f64;
            writeln!(f, "  {k:<12} {:>10} {:>12} {per:>9.1}", v.count, v.bytes)?;
        }
        writeln!(f, "outputs {} ({} bytes), checkpoints {}", self.outputs, self.output_bytes, self.checkpoints)?;
        let y = &self.sync_points;
        if y.count > 0 {
            writeln!(
                f,
                "sync points {}: events waited {:.1} ms on average, {:.1} ms at most; {} bytes per second of guest time",
                y.count,
                y.mean_wait_us as f64 / 1e3,
                y.max_wait_us as f64 / 1e3,
                y.bytes_per_guest_s
            )?;
        }
        write!(f, "{}", self.end)
    }
}

impl fmt::Display for EventLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:>8} @{:<10} {}", self.lsn, self.offset, self.text)
    }
}

impl fmt::Display for Inspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.summary)?;
        if let Some(ev) = &self.events {
            writeln!(f, "{:>8} {:<11} record", "lsn", "@offset")?;
            for e in ev {
                writeln!(f, "{e}")?;
            }
        }
        Ok(())
    }
}
