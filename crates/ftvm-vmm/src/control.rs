//! The control API's side of a VM (ftvm-api, `--api-socket`): the control block the next
//! VM takes, the role it shows, the pair's figures it reads from the replication link, and the
//! loop's [`Supervisor`] (the vCPU loop publishes its figures there and parks for pauses).

use std::sync::Arc;

use ftvm_machine::vcpu::{LoopFigures, Supervisor};

/// The control block of the VM this process runs next, if its API server is up.
static CONTROL: std::sync::Mutex<Option<Arc<ftvm_api::VmControl>>> = std::sync::Mutex::new(None);

/// Connects the control API to the next VM this process runs (one VM per process, as with
/// the stop request): its vCPU publishes its figures there and honours pause requests, and
/// the pair's figures are read from its replication link.
pub fn attach_control(control: Arc<ftvm_api::VmControl>) {
    *ftvm_sync::lock(&CONTROL) = Some(control);
}

/// The control block the next VM will take, without taking it.
pub(crate) fn current_control() -> Option<Arc<ftvm_api::VmControl>> {
    ftvm_sync::lock(&CONTROL).clone()
}

pub(crate) fn take_control() -> Option<Arc<ftvm_api::VmControl>> {
    ftvm_sync::lock(&CONTROL).take()
}

pub(crate) type PairSource = Box<dyn Fn() -> ftvm_api::PairFigures + Send + Sync>;

/// A backup's figures, from its link's state.
pub(crate) fn backup_figures(state: Arc<ftvm_replication::backup::BackupState>) -> PairSource {
    use std::sync::atomic::Ordering::Relaxed;
    Box::new(move || {
        let (won, halted) = (state.won_arbiter.load(Relaxed), state.halted.load(Relaxed));
        ftvm_api::PairFigures {
            protected: !(won || halted || state.primary_ended.load(Relaxed)),
            received_lsn: Some(state.received_lsn.load(Relaxed)),
            received_bytes: Some(state.received_bytes.load(Relaxed)),
            outputs_done: state.outputs_done.load(Relaxed),
            halted,
            primary_silence_ms: (won || halted).then(|| state.silence_ms.load(Relaxed)),
            resyncs: state.resyncs.load(Relaxed),
            ..Default::default()
        }
    })
}

/// The vCPU loop's supervisor: the control block, publishing the loop's figures as the API
/// shows them.
pub(crate) fn supervisor(control: Arc<ftvm_api::VmControl>) -> Arc<dyn Supervisor> {
    Arc::new(ApiSupervisor(control))
}

struct ApiSupervisor(Arc<ftvm_api::VmControl>);

impl Supervisor for ApiSupervisor {
    fn publish(&self, f: &LoopFigures) {
        let (s, y) = (&f.stats, &f.sync);
        self.0.publish(&ftvm_api::VcpuFigures {
            exits: f.exits,
            io: s.io,
            mmio: s.mmio,
            hlt: s.hlt,
            msr: s.msr,
            interrupts: s.interrupts,
            kicks: s.kicks,
            window_exits: s.window_exits,
            guest_time_ns: f.guest_time_ns,
            log_bytes: f.log_bytes,
            outputs: f.outputs,
            last_output_lsn: f.last_output_lsn,
            went_live: f.went_live,
            sync: ftvm_api::SyncFigures {
                count: y.count,
                pages: y.pages,
                total_wait_us: y.total_wait_us,
                max_wait_us: y.max_wait_us,
                work_us: y.work_us,
                cost_us: y.cost_us,
            },
        });
    }

    fn switchover_requested(&self) -> bool {
        self.0.switchover_requested()
    }

    fn pause_requested(&self) -> bool {
        self.0.pause_requested()
    }

    fn park_if_paused(&self, interrupted: &dyn Fn() -> bool) -> bool {
        self.0.park_if_paused(interrupted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ftvm_machine::syncpoint::SyncStats;
    use ftvm_machine::vcpu::ExitStats;

    #[test]
    fn the_supervisor_publishes_the_loops_figures_as_the_api_shows_them() {
        let control = ftvm_api::VmControl::new();
        let sup = supervisor(control.clone());
        let f = LoopFigures {
            exits: 10,
            stats: ExitStats {
                io: 1,
                mmio: 2,
                hlt: 3,
                msr: 4,
                interrupts: 5,
                kicks: 6,
                window_exits: 7,
                ..Default::default()
            },
            guest_time_ns: 8,
            log_bytes: 9,
            outputs: 11,
            last_output_lsn: Some(12),
            went_live: true,
            sync: SyncStats {
                count: 13,
                pages: 14,
                total_wait_us: 15,
                max_wait_us: 16,
                work_us: 17,
                cost_us: 18,
                ..Default::default()
            },
        };
        sup.publish(&f);
        let got = control.figures();
        assert_eq!((got.exits, got.io, got.mmio, got.hlt, got.msr), (10, 1, 2, 3, 4));
        assert_eq!((got.interrupts, got.kicks, got.window_exits), (5, 6, 7));
        assert_eq!((got.guest_time_ns, got.log_bytes, got.outputs, got.last_output_lsn), (8, 9, 11, Some(12)));
        assert!(got.went_live);
        let y = got.sync;
        assert_eq!((y.count, y.pages, y.total_wait_us, y.max_wait_us, y.work_us, y.cost_us), (13, 14, 15, 16, 17, 18));
        assert!(!sup.pause_requested() && !sup.switchover_requested());
        assert!(!sup.park_if_paused(&|| true), "no pause asked: no parking");
    }
}
