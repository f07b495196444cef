//! `GET /metrics`: the VM's figures in the Prometheus text exposition format (version 0.0.4),
//! written by hand: a few dozen lines of `# HELP`, `# TYPE` and samples, from the same
//! figures `GET /status` answers, need no metrics registry.
//!
//! Every metric is named `ftvm_...`; docs/api.md lists them. Gauges that do not apply to this
//! VM (a replay lag without a pair) are left out rather than shown as 0.

use std::fmt::Write;

use crate::control::VmControl;
use crate::status::{Role, VmState};

/// The Content-Type of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

struct Out(String);

impl Out {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &str, value: impl std::fmt::Display) {
        match labels {
            "" => {
                let _ = writeln!(self.0, "{name} {value}");
            }
            l => {
                let _ = writeln!(self.0, "{name}{{{l}}} {value}");
            }
        }
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.head(name, kind, help);
        self.sample(name, "", value);
    }
}

const ROLES: [Role; 6] =
    [Role::Standalone, Role::Recording, Role::Replaying, Role::Primary, Role::Backup, Role::BackupLive];
const STATES: [VmState; 4] = [VmState::Starting, VmState::Running, VmState::Paused, VmState::Stopped];

/// The exposition of this VM's figures now.
pub fn render(control: &VmControl) -> String {
    let status = control.status();
    let mut o = Out(String::new());
    o.head("ftvm_info", "gauge", "The ftvm version and process (always 1).");
    o.sample("ftvm_info", &format!("version=\"{}\",pid=\"{}\"", status.ftvm_version, status.pid), 1);
    o.head("ftvm_role", "gauge", "What this process is to its VM: 1 for its role, 0 for the others.");
    for role in ROLES {
        o.sample("ftvm_role", &format!("role=\"{}\"", role.as_str()), u8::from(role == status.role));
    }
    o.head("ftvm_vm_state", "gauge", "Whether the guest runs: 1 for its state, 0 for the others.");
    for state in STATES {
        o.sample("ftvm_vm_state", &format!("state=\"{}\"", state.as_str()), u8::from(state == status.state));
    }
    o.one("ftvm_uptime_seconds", "gauge", "Seconds since the guest started.", status.uptime_s);
    o.one("ftvm_guest_time_seconds", "gauge", "The guest clock.", status.guest_time_s);
    o.head("ftvm_exits_total", "counter", "VM exits by kind (rate() gives the exit rate).");
    let e = &status.exits;
    for (kind, n) in [("io", e.io), ("mmio", e.mmio), ("hlt", e.hlt), ("msr", e.msr)] {
        o.sample("ftvm_exits_total", &format!("kind=\"{kind}\""), n);
    }
    let other = e.total.saturating_sub(e.io + e.mmio + e.hlt + e.msr);
    o.sample("ftvm_exits_total", "kind=\"other\"", other);
    o.one("ftvm_interrupts_total", "counter", "Interrupts injected into the guest.", status.interrupts);
    o.one("ftvm_kicks_total", "counter", "Times the vCPU was kicked out of the guest.", status.kicks);
    if let Some(log) = &status.log {
        o.one(
            "ftvm_log_bytes_total",
            "counter",
            "Event log bytes: written (recording, primary) or received (backup).",
            log.bytes,
        );
    }
    if let Some(sync) = &status.sync {
        o.one("ftvm_sync_points_total", "counter", "Sync points the recorder took.", sync.count);
    }
    if let Some(p) = &status.pair {
        o.one(
            "ftvm_protected",
            "gauge",
            "1 while a backup would take over if this VM's host died.",
            u8::from(p.protected),
        );
        let records = p.acked_lsn.or(p.received_lsn);
        if let Some(records) = records {
            o.one(
                "ftvm_log_records",
                "gauge",
                "The log's records the pair has: acknowledged by the backup (primary) or received (backup).",
                records,
            );
        }
        if let Some(sent) = p.sent_bytes {
            o.one("ftvm_replication_sent_bytes_total", "counter", "Log bytes sent to the backup.", sent);
        }
        if let Some(lag) = p.replay_lag_ms {
            o.one(
                "ftvm_replay_lag_seconds",
                "gauge",
                "How far the backup's replay is behind (the age of its oldest unreplayed record).",
                lag as f64 / 1e3,
            );
        }
        o.one("ftvm_outputs_held", "gauge", "Outputs waiting for the backup's acknowledgement.", p.outputs_held);
        o.one("ftvm_outputs_done_total", "counter", "Outputs performed (OUTPUT_DONE).", p.outputs_done);
        o.one("ftvm_failovers_total", "counter", "Takeovers this process made.", p.failovers);
        o.one("ftvm_resyncs_total", "counter", "Resyncs after a divergence (run or received).", p.resyncs);
        if let Some(t) = p.throttled_ms {
            o.one(
                "ftvm_throttled_seconds_total",
                "counter",
                "Time the vCPU was slowed down for the lag bound.",
                t as f64 / 1e3,
            );
        }
        o.one("ftvm_backup_lost", "gauge", "1 once the primary lost its backup.", u8::from(p.backup_lost));
        o.one("ftvm_halted", "gauge", "1 once this side halted (another copy may be live).", u8::from(p.halted));
    }
    let (sent, received) = control.state_transfers();
    o.head("ftvm_state_transfers_total", "counter", "State transfers (re-protections and resyncs) completed.");
    o.sample("ftvm_state_transfers_total", "direction=\"sent\"", sent);
    o.sample("ftvm_state_transfers_total", "direction=\"received\"", received);
    if let Some(h) = control.output_hold() {
        let name = "ftvm_output_hold_seconds";
        o.head(name, "histogram", "How long outputs were held for the backup's acknowledgement.");
        let mut cumulative = 0;
        for (bound, n) in h.bounds_us.iter().zip(h.counts) {
            cumulative += n;
            o.sample(&format!("{name}_bucket"), &format!("le=\"{}\"", *bound as f64 / 1e6), cumulative);
        }
        o.sample(&format!("{name}_bucket"), "le=\"+Inf\"", h.count);
        o.sample(&format!("{name}_sum"), "", h.sum_us as f64 / 1e6);
        o.sample(&format!("{name}_count"), "", h.count);
    }
    o.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{HoldHistogram, PairFigures};

    /// Every line is a comment or `name{labels} value` with a number value; every sample's
    /// metric was declared by a TYPE line before it.
    fn check_format(text: &str) {
        let mut declared = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split(' ');
                let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
                assert!(["gauge", "counter", "histogram"].contains(&kind), "{line}");
                declared.push(name.to_string());
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
            assert!(value.parse::<f64>().is_ok(), "{line}");
            let name = series.split('{').next().unwrap();
            let base = name.trim_end_matches("_bucket").trim_end_matches("_sum").trim_end_matches("_count");
            assert!(declared.iter().any(|d| d == name || d == base), "{line}: no TYPE before it");
        }
    }

    #[test]
    fn a_plain_vm_has_its_role_state_and_exits() {
        let control = VmControl::new();
        control.set_role(Role::Standalone);
        let text = render(&control);
        check_format(&text);
        assert!(text.contains("ftvm_role{role=\"standalone\"} 1\n"), "{text}");
        assert!(text.contains("ftvm_role{role=\"primary\"} 0\n"), "{text}");
        assert!(text.contains("# TYPE ftvm_exits_total counter\n"), "{text}");
        assert!(!text.contains("ftvm_protected"), "no pair, no protection gauge: {text}");
    }

    #[test]
    fn a_primary_has_the_pair_figures_and_a_cumulative_hold_histogram() {
        static BOUNDS: [u64; 3] = [100, 1000, 10_000];
        let control = VmControl::new();
        control.set_role(Role::Primary);
        control.set_pair_source(Some(Box::new(|| PairFigures {
            protected: true,
            acked_lsn: Some(42),
            sent_bytes: Some(4096),
            replay_lag_ms: Some(7),
            resyncs: 1,
            output_hold: Some(HoldHistogram {
                bounds_us: &BOUNDS,
                counts: [2, 3, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                sum_us: 30_000,
                count: 6,
            }),
            ..Default::default()
        })));
        control.note_state_transfer(true);
        let text = render(&control);
        check_format(&text);
        for want in [
            "ftvm_protected 1\n",
            "ftvm_log_records 42\n",
            "ftvm_replay_lag_seconds 0.007\n",
            "ftvm_resyncs_total 1\n",
            "ftvm_state_transfers_total{direction=\"sent\"} 1\n",
            "# TYPE ftvm_output_hold_seconds histogram\n",
            "ftvm_output_hold_seconds_bucket{le=\"0.0001\"} 2\n",
            "ftvm_output_hold_seconds_bucket{le=\"0.001\"} 5\n",
            "ftvm_output_hold_seconds_bucket{le=\"0.01\"} 5\n",
            "ftvm_output_hold_seconds_bucket{le=\"+Inf\"} 6\n",
            "ftvm_output_hold_seconds_sum 0.03\n",
            "ftvm_output_hold_seconds_count 6\n",
        ] {
            assert!(text.contains(want), "{want:?} missing from:\n{text}");
        }
    }
}
