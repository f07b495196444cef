//! What `GET /status` answers, and how `ftvm ctl status` shows it to people.

use std::fmt::{self, Write as _};

use serde::{Deserialize, Serialize};

/// Whether the guest runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    /// Being built, or (a primary) waiting for its backup before the guest starts.
    Starting,
    Running,
    /// The vCPU is parked between exits (`PUT /pause`).
    Paused,
    /// The guest has stopped; the process is about to exit.
    Stopped,
}

impl VmState {
    pub(crate) fn from_u8(v: u8) -> Self {
        match v {
            1 => VmState::Running,
            2 => VmState::Paused,
            3 => VmState::Stopped,
            _ => VmState::Starting,
        }
    }

    pub(crate) fn as_u8(self) -> u8 {
        match self {
            VmState::Starting => 0,
            VmState::Running => 1,
            VmState::Paused => 2,
            VmState::Stopped => 3,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopped => "stopped",
        }
    }
}

/// What this ftvm process is to its VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// `ftvm run`.
    Standalone,
    /// `ftvm record`.
    Recording,
    /// `ftvm replay`.
    Replaying,
    /// `ftvm primary`.
    Primary,
    /// `ftvm backup`, replaying its primary's log.
    Backup,
    /// `ftvm backup` after its primary died: it took over and runs the VM.
    BackupLive,
}

impl Role {
    pub(crate) fn from_u8(v: u8) -> Self {
        match v {
            1 => Role::Recording,
            2 => Role::Replaying,
            3 => Role::Primary,
            4 => Role::Backup,
            5 => Role::BackupLive,
            _ => Role::Standalone,
        }
    }

    pub(crate) fn as_u8(self) -> u8 {
        match self {
            Role::Standalone => 0,
            Role::Recording => 1,
            Role::Replaying => 2,
            Role::Primary => 3,
            Role::Backup => 4,
            Role::BackupLive => 5,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Standalone => "standalone",
            Role::Recording => "recording",
            Role::Replaying => "replaying",
            Role::Primary => "primary",
            Role::Backup => "backup",
            Role::BackupLive => "backup-live",
        }
    }
}

/// Counted exits (docs/record-replay.md), in all and by kind. SHUTDOWN exits count in `total` only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitCounts {
    pub total: u64,
    pub io: u64,
    pub mmio: u64,
    pub hlt: u64,
    pub msr: u64,
}

/// The event log, for a VM that writes one (recording, primary) or receives one (backup).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LogStatus {
    /// Bytes written so far (recording, primary: header included) or received (backup).
    pub bytes: u64,
    /// `bytes` per second over the last second; `null` until there are two samples.
    pub bandwidth_bytes_per_s: Option<f64>,
}

/// The fault-tolerant pair, seen from this side. Fields that belong to the other side's
/// view are `null`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PairStatus {
    /// Primary: the backup is there (not lost). Backup: it replays a live primary's log (it
    /// has not gone live, halted, or seen the pair end).
    pub protected: bool,
    /// Primary: the last LSN the backup acknowledged (received and checksum-verified).
    pub acked_lsn: Option<u64>,
    /// Primary: the LSN of the most recent OUTPUT record logged.
    pub last_output_lsn: Option<u64>,
    /// Primary: records the backup has yet to acknowledge up to the most recent output
    /// (`last_output_lsn - acked_lsn`, 0 when acknowledged).
    pub lag_records: Option<u64>,
    /// Primary: log bytes sent to the backup.
    pub sent_bytes: Option<u64>,
    /// Primary: log bytes written but not yet sent (buffered or queued for the socket).
    pub unsent_bytes: Option<u64>,
    /// Backup: the last LSN received and verified.
    pub received_lsn: Option<u64>,
    /// Outputs waiting. Primary: held until acknowledged. Backup: replayed and not yet
    /// covered by OUTPUT_DONE.
    pub outputs_held: u64,
    /// OUTPUT_DONE: outputs the primary performed (on the backup: as its heartbeats said).
    pub outputs_done: u64,
    /// 1 for a backup that went live, else 0.
    pub failovers: u64,
    /// Backup that decided a failover: how long the primary had been silent, in ms.
    pub primary_silence_ms: Option<u64>,
    /// Primary: the backup was lost and the primary runs unprotected.
    pub backup_lost: bool,
    /// Backup: it could not win the arbiter (the primary still lives) and halted.
    pub halted: bool,
    /// Resyncs after a divergence (primary: run; backup: received).
    #[serde(default)]
    pub resyncs: u64,
    /// Primary: how far the backup's replay is behind, in ms (the failover would take about
    /// this long beyond the timeout).
    #[serde(default)]
    pub replay_lag_ms: Option<u64>,
    /// Primary: time the vCPU was slowed down to keep the lag within its bound, in ms.
    #[serde(default)]
    pub throttled_ms: Option<u64>,
    /// Primary: the mean time an output was held until the backup acknowledged the log up to
    /// it, in microseconds (the latency protection adds to every reply).
    #[serde(default)]
    pub output_hold_us: Option<u64>,
    /// Primary: a new backup catches up after a state transfer (not protected yet).
    #[serde(default)]
    pub catching_up: bool,
    /// Primary: where the hold goes, stage by stage along the output's path (the backup's
    /// stages measured on its own clock).
    #[serde(default)]
    pub output_stages: Option<OutputStages>,
}

/// The outputs held so far, their hold split into stages (held, sealed, sent, received by
/// the backup, verified, acknowledgement written, acknowledgement received, performed): the
/// whole `hold` and each stage, whose times add up to it. Each keeps its histogram, so that a
/// reader can take the figures of a window (`since`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OutputStages {
    pub hold: StageFigure,
    pub stages: Vec<StageFigure>,
    /// The `release` stage looked at more closely (not stages: they do not add up to the
    /// hold): `release_write`, the output's own write; `release_vcpu` and `release_thread`,
    /// the stage of the outputs the vCPU thread performed and of those another thread did.
    #[serde(default)]
    pub parts: Vec<StageFigure>,
}

/// One stage's times: their mean, median and 99th percentile in µs, over `count` outputs,
/// with the histogram they come from (`[largest ns in the bucket, count]`, ascending; a
/// percentile is its bucket's bound, within 1/16).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StageFigure {
    pub name: String,
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub sum_ns: u64,
    pub buckets: Vec<[u64; 2]>,
}

impl StageFigure {
    pub fn new(name: &str, sum_ns: u64, buckets: Vec<[u64; 2]>) -> StageFigure {
        let count: u64 = buckets.iter().map(|b| b[1]).sum();
        let pct = |q: f64| {
            let rank = ((count as f64) * q).ceil().max(1.0) as u64;
            let mut seen = 0;
            for b in &buckets {
                seen += b[1];
                if seen >= rank {
                    return b[0] as f64 / 1000.0;
                }
            }
            0.0
        };
        StageFigure {
            name: name.to_string(),
            count,
            mean_us: if count > 0 { sum_ns as f64 / count as f64 / 1000.0 } else { 0.0 },
            p50_us: pct(0.5),
            p99_us: pct(0.99),
            sum_ns,
            buckets,
        }
    }

    /// The figures of what was added since `earlier` (the same stage read before).
    pub fn since(&self, earlier: &StageFigure) -> StageFigure {
        let buckets = self
            .buckets
            .iter()
            .map(|b| {
                let before = earlier.buckets.iter().find(|e| e[0] == b[0]).map_or(0, |e| e[1]);
                [b[0], b[1].saturating_sub(before)]
            })
            .filter(|b| b[1] > 0)
            .collect();
        StageFigure::new(&self.name, self.sum_ns.saturating_sub(earlier.sum_ns), buckets)
    }
}

impl OutputStages {
    /// The figures of the outputs performed since `earlier`.
    pub fn since(&self, earlier: &OutputStages) -> OutputStages {
        let since = |now: &[StageFigure], before: &[StageFigure]| {
            now.iter()
                .map(|s| match before.iter().find(|e| e.name == s.name) {
                    Some(e) => s.since(e),
                    None => s.clone(),
                })
                .collect()
        };
        OutputStages {
            hold: self.hold.since(&earlier.hold),
            stages: since(&self.stages, &earlier.stages),
            parts: since(&self.parts, &earlier.parts),
        }
    }

    /// One line: each stage's mean in µs.
    pub fn summary(&self) -> String {
        let parts: Vec<String> = self.stages.iter().map(|s| format!("{} {:.0}", s.name, s.mean_us)).collect();
        format!("{} µs mean (of {:.0}; p50/p99 in --json)", parts.join(", "), self.hold.mean_us)
    }
}

/// A recording's sync points (a guest computing without exits gets its interrupts through
/// them): how many, how late they delivered, what they cost.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncStatus {
    pub count: u64,
    /// Pages they carried.
    pub pages: u64,
    /// How long an interrupt or frame waited for its sync point, on average and at most.
    pub mean_wait_us: u64,
    pub max_wait_us: u64,
    /// The recorder's own time in them.
    pub work_ms: u64,
    /// What they cost the guest: `work_ms` plus the estimated write faults on the pages they
    /// write-protected again (the budget spaces them by this).
    pub cost_ms: u64,
}

/// The answer to `GET /status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub ftvm_version: String,
    pub pid: u32,
    pub state: VmState,
    /// A pause was requested and not yet resumed (the vCPU parks at its next exit).
    pub pause_requested: bool,
    pub role: Role,
    /// Seconds since the guest started running.
    pub uptime_s: f64,
    /// The guest clock, seconds since the guest started (advances only as the event source
    /// admits time).
    pub guest_time_s: f64,
    pub exits: ExitCounts,
    /// Interrupts injected.
    pub interrupts: u64,
    /// Kicks of the vCPU out of KVM_RUN (not counted exits).
    pub kicks: u64,
    /// Interrupt-window exits (not counted exits).
    pub interrupt_window_exits: u64,
    pub log: Option<LogStatus>,
    pub pair: Option<PairStatus>,
    /// Recording and primary, once they took a sync point.
    #[serde(default)]
    pub sync: Option<SyncStatus>,
}

/// `1536` -> `1.5 KiB`.
pub fn format_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// Bytes per second for people: `1.2 MiB/s`.
pub fn format_rate(bytes_per_s: f64) -> String {
    format!("{}/s", format_bytes(bytes_per_s.max(0.0).round() as u64))
}

impl Status {
    /// The `key: value` lines `ftvm ctl status` prints.
    pub fn to_text(&self) -> String {
        let mut lines: Vec<(&str, String)> = Vec::new();
        let mut state = self.state.as_str().to_string();
        if self.pause_requested && self.state == VmState::Running {
            state.push_str(" (pause requested)");
        }
        lines.push(("state", state));
        lines.push(("role", self.role_text()));
        lines.push(("uptime", format!("{:.2} s", self.uptime_s)));
        lines.push(("guest time", format!("{:.2} s", self.guest_time_s)));
        let e = &self.exits;
        lines.push(("exits", format!("{} (io {}, mmio {}, hlt {}, msr {})", e.total, e.io, e.mmio, e.hlt, e.msr)));
        lines.push((
            "interrupts",
            format!(
                "{} ({} kicks, {} interrupt-window exits)",
                self.interrupts, self.kicks, self.interrupt_window_exits
            ),
        ));
        if let Some(log) = &self.log {
            let verb = if matches!(self.role, Role::Backup | Role::BackupLive) { "received" } else { "written" };
            lines.push(("log", format!("{} {verb}", format_bytes(log.bytes))));
            lines.push((
                "log bandwidth",
                log.bandwidth_bytes_per_s.map_or_else(|| "(measuring)".to_string(), format_rate),
            ));
        }
        if let Some(s) = &self.sync {
            lines.push((
                "sync points",
                format!(
                    "{} ({} pages; interrupts {:.1} ms late on average, {:.1} ms at most; {} ms in them, ~{} ms with the faults after them)",
                    s.count,
                    s.pages,
                    s.mean_wait_us as f64 / 1e3,
                    s.max_wait_us as f64 / 1e3,
                    s.work_ms,
                    s.cost_ms
                ),
            ));
        }
        if let Some(p) = &self.pair {
            if let (Some(lag), Some(acked)) = (p.lag_records, p.acked_lsn) {
                let mut text = format!("{lag} records behind (acked LSN {acked}");
                if let Some(out) = p.last_output_lsn {
                    let _ = write!(text, ", last output LSN {out}");
                }
                text.push(')');
                if let Some(unsent) = p.unsent_bytes {
                    let _ = write!(text, "; {} not yet sent", format_bytes(unsent));
                }
                lines.push(("lag", text));
            }
            if let Some(lsn) = p.received_lsn {
                lines.push(("received", format!("up to LSN {lsn}")));
            }
            lines.push(("outputs held", p.outputs_held.to_string()));
            lines.push(("outputs done", p.outputs_done.to_string()));
            if let Some(us) = p.output_hold_us {
                lines.push(("output hold", format!("{us} µs on average (until acknowledged)")));
            }
            if let Some(st) = p.output_stages.as_ref().filter(|st| st.hold.count > 0) {
                lines.push(("hold by stage", st.summary()));
            }
            lines.push(("failovers", p.failovers.to_string()));
            lines.push(("resyncs", p.resyncs.to_string()));
            if let Some(lag) = p.replay_lag_ms {
                let throttled = p.throttled_ms.map_or(String::new(), |t| format!(", vCPU slowed {t} ms in all"));
                lines.push(("replay lag", format!("{lag} ms{throttled}")));
            }
            if let Some(ms) = p.primary_silence_ms {
                lines.push(("primary silent", format!("{ms} ms before the failover")));
            }
        }
        let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
        let mut out = String::new();
        for (k, v) in lines {
            let _ = writeln!(out, "{:<width$} {v}", format!("{k}:"), width = width);
        }
        out
    }

    fn role_text(&self) -> String {
        let role = self.role.as_str();
        let Some(p) = &self.pair else { return role.to_string() };
        let detail = match self.role {
            Role::Primary if p.protected => "protected",
            Role::Primary if p.catching_up => "not protected yet: a new backup catches up",
            Role::Primary => "UNPROTECTED: no backup",
            Role::Backup if p.halted => "halted: could not win the arbiter",
            Role::Backup if p.protected => "protecting: replaying the primary's log",
            Role::Backup => "the primary is gone",
            Role::BackupLive => "took over: live and unprotected",
            _ => return role.to_string(),
        };
        format!("{role} ({detail})")
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_text())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Status {
        Status {
            ftvm_version: "0.1.0".into(),
            pid: 7,
            state: VmState::Running,
            pause_requested: false,
            role: Role::Primary,
            uptime_s: 2.5,
            guest_time_s: 2.49,
            exits: ExitCounts { total: 10, io: 6, mmio: 1, hlt: 2, msr: 1 },
            interrupts: 3,
            kicks: 0,
            interrupt_window_exits: 0,
            log: Some(LogStatus { bytes: 3500, bandwidth_bytes_per_s: Some(1.25 * 1024.0 * 1024.0) }),
            pair: Some(PairStatus {
                protected: true,
                acked_lsn: Some(100),
                last_output_lsn: Some(112),
                lag_records: Some(12),
                sent_bytes: Some(3000),
                unsent_bytes: Some(500),
                outputs_held: 3,
                outputs_done: 17,
                ..PairStatus::default()
            }),
            sync: Some(SyncStatus {
                count: 4,
                pages: 6700,
                mean_wait_us: 345_400,
                max_wait_us: 670_900,
                work_ms: 76,
                cost_ms: 211,
            }),
        }
    }

    #[test]
    fn bytes_and_rates_read_well() {
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(1023), "1023 B");
        assert_eq!(format_bytes(3482), "3.4 KiB");
        assert_eq!(format_bytes(5 << 20), "5.0 MiB");
        assert_eq!(format_rate(1.25 * 1024.0 * 1024.0), "1.2 MiB/s");
    }

    #[test]
    fn text_is_aligned_key_value_lines() {
        let text = sample().to_text();
        assert!(text.contains("role:          primary (protected)\n"), "{text}");
        assert!(
            text.contains("lag:           12 records behind (acked LSN 100, last output LSN 112); 500 B not yet sent")
        );
        assert!(text.contains("log bandwidth: 1.2 MiB/s\n"), "{text}");
        assert!(text.contains("outputs held:  3\n"), "{text}");
        assert!(
            text.contains(
                "sync points:   4 (6700 pages; interrupts 345.4 ms late on average, 670.9 ms at most; \
                 76 ms in them, ~211 ms with the faults after them)\n"
            ),
            "{text}"
        );
        // Every value starts in the same column.
        let columns: Vec<usize> = text
            .lines()
            .map(|l| {
                let colon = l.find(':').unwrap();
                colon + 1 + l[colon + 1..].len() - l[colon + 1..].trim_start().len()
            })
            .collect();
        assert!(columns.len() > 8 && columns.iter().all(|&c| c == columns[0]), "{text}");
    }

    #[test]
    fn json_round_trips_with_stable_names() {
        let s = sample();
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["state"], "running");
        assert_eq!(json["role"], "primary");
        assert_eq!(json["pair"]["lag_records"], 12);
        assert!(json["pair"]["received_lsn"].is_null());
        let back: Status = serde_json::from_value(json).unwrap();
        assert_eq!(back, s);
        let live: Role = serde_json::from_str("\"backup-live\"").unwrap();
        assert_eq!(live, Role::BackupLive);
    }
}
