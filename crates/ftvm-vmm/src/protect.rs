//! Keeping a VM protected (docs/replication.md, "Re-protection"; docs/snapshots.md): a live VM, the original
//! primary or a backup that went live, takes a new backup at any time, and a primary resyncs
//! a backup that diverged. Both are one live state transfer:
//!
//! 1. connect to the backup (authenticated) and let it check that it can take this VM;
//! 2. a live snapshot into a staging directory: pre-copy rounds while the guest runs, then
//!    the paused round on the vCPU thread, where the *cut* happens: the old link's outputs
//!    go out, a new recording starts (numbered from the snapshot, as a recording from a
//!    snapshot is) into the new link, whose gate takes the outputs from then on;
//! 3. the staged files go to the backup, which restores them (with every check a restore
//!    makes) and replays the log queued since the cut;
//! 4. the new link catches up: outputs are performed at once until the backup's first
//!    acknowledgement, held from then on, and the VM is protected once the backup has the
//!    log past every output performed unheld (and, with a lag bound, is within it).

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use ftvm_api::{ProtectPhase, ProtectProgress, Refused, SnapshotProgress, VmControl};
use ftvm_replication::arbiter::Arbiter;
use ftvm_replication::backup::ArbiterSlot;
use ftvm_replication::link::{self, Connection, Mode};
use ftvm_replication::primary::{log_channel, LinkOptions, Primary, SharedSinks};
use ftvm_replication::secure::Key;
use ftvm_sync::lock;

use crate::error::{Error, Result};
use crate::snapshot::SnapshotSource;

/// How a live VM's links are made (from its `ftvm primary` or `ftvm backup` options).
#[derive(Debug, Clone)]
pub struct PairSettings {
    pub key: Key,
    pub timeout: Duration,
    pub max_lag: Option<Duration>,
}

/// How long a new backup has to catch up before the re-protection is reported as failed.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(120);
/// How long to wait for the backup to be listening.
const CONNECT_WAIT: Duration = Duration::from_secs(5);

/// One VM's protection: its output sinks and arbiter once it is live, its current link,
/// and the state transfers that replace it.
pub struct Protection {
    settings: PairSettings,
    /// The VM's sync-point bound, for the recording a transfer starts.
    sync_policy: Option<crate::syncpoint::SyncPolicy>,
    /// The live copy of the state; its header is the VM's identity as a new backup checks
    /// it, and the header of each new log.
    snapshot: SnapshotSource,
    control: Option<Arc<VmControl>>,
    sinks: Mutex<Option<SharedSinks>>,
    arbiter: Mutex<Option<Arc<Arbiter>>>,
    /// A backup's arbiter, once it won it (it went live).
    backup_arbiter: Mutex<Option<ArbiterSlot>>,
    link: Mutex<Option<Primary>>,
    busy: AtomicBool,
    transfers: AtomicU64,
    resyncs: AtomicU64,
    jobs: Mutex<Vec<std::thread::JoinHandle<()>>>,
    me: Weak<Protection>,
}

/// Why a transfer is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Protect,
    Resync,
}

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Reason::Protect => "protect",
            Reason::Resync => "resync",
        }
    }
}

impl Protection {
    pub(crate) fn new(
        settings: PairSettings,
        sync_policy: Option<crate::syncpoint::SyncPolicy>,
        snapshot: SnapshotSource,
        control: Option<Arc<VmControl>>,
    ) -> Arc<Protection> {
        Arc::new_cyclic(|me| Protection {
            settings,
            sync_policy,
            snapshot,
            control,
            sinks: Mutex::new(None),
            arbiter: Mutex::new(None),
            backup_arbiter: Mutex::new(None),
            link: Mutex::new(None),
            busy: AtomicBool::new(false),
            transfers: AtomicU64::new(0),
            resyncs: AtomicU64::new(0),
            jobs: Mutex::new(Vec::new()),
            me: me.clone(),
        })
    }

    /// The original primary: its link formed at boot, with its sinks and arbiter.
    pub(crate) fn set_boot_link(&self, primary: Primary, backup: SocketAddr) {
        *lock(&self.sinks) = Some(primary.sinks());
        *lock(&self.arbiter) = Some(primary.arbiter());
        self.install(primary, backup);
    }

    /// A backup: the slot where its arbiter appears once it wins it.
    pub(crate) fn set_backup_arbiter(&self, slot: ArbiterSlot) {
        *lock(&self.backup_arbiter) = Some(slot);
    }

    fn arbiter(&self) -> Option<Arc<Arbiter>> {
        if let Some(a) = lock(&self.arbiter).clone() {
            return Some(a);
        }
        let slot = lock(&self.backup_arbiter).clone()?;
        let won = lock(&slot).clone();
        lock(&self.arbiter).clone_from(&won);
        won
    }

    /// Makes `primary` the current link: its figures in the status, its resync requests
    /// answered by a resync to `backup`.
    fn install(&self, primary: Primary, backup: SocketAddr) {
        let me = self.me.clone();
        primary.on_resync(Box::new(move |_why| {
            if std::env::var_os("FTVM_TEST_IGNORE_RESYNC").is_some() {
                tracing::warn!(target: "ftvm::event", event = "test_ignore_resync", "FTVM_TEST_IGNORE_RESYNC: not resyncing the backup");
                return;
            }
            if let Some(p) = me.upgrade() {
                if let Err(r) = p.start(backup, Reason::Resync) {
                    let why = r.answer().1;
                    tracing::error!(
                        target: "ftvm::event",
                        event = "resync_failed",
                        backup = %backup,
                        why = %why,
                        "cannot resync the backup at {backup}: {why}"
                    );
                }
            }
        }));
        if let Some(c) = &self.control {
            c.set_pair_source(Some(primary_figures(primary.stats(), self.me.clone())));
        }
        *lock(&self.link) = Some(primary);
    }

    pub(crate) fn resyncs(&self) -> u64 {
        self.resyncs.load(Ordering::Relaxed)
    }

    /// Takeovers this process made: a backup that won its arbiter went live.
    pub(crate) fn failovers(&self) -> u64 {
        let slot = lock(&self.backup_arbiter).clone();
        u64::from(slot.is_some_and(|s| lock(&s).is_some()))
    }

    /// Starts a state transfer to the backup listening at `backup` (`PUT /protect`, or a
    /// resync). Refused while one runs, while a backup protects this VM, and on a backup
    /// that has not gone live.
    pub fn start(&self, backup: SocketAddr, reason: Reason) -> std::result::Result<(), Refused> {
        let Some(arbiter) = self.arbiter() else {
            return Err(Refused::BadState(
                "this backup has not gone live: only a live VM (a primary, or a backup that took over) takes a backup"
                    .into(),
            ));
        };
        // A lock file of this host cannot keep a backup on another host from going live too.
        if let ftvm_replication::arbiter::ArbiterSpec::File(path) = arbiter.spec() {
            let peer = ftvm_replication::arbiter::Peer::Backup(backup);
            if !peer.on_this_host() {
                let why = ftvm_replication::arbiter::ChooseError::NotShared { peer, lock: Some(path.clone()) };
                return Err(Refused::BadState(format!(
                    "{why}; this VM runs with a lock file of this host: it takes backups on this host only"
                )));
            }
        }
        let under_way =
            || Refused::Busy("a state transfer to a backup is under way; wait for it (GET /protect)".into());
        if self.busy.load(Ordering::SeqCst) {
            return Err(under_way());
        }
        if let Some(l) = lock(&self.link).as_ref() {
            let s = l.stats();
            if reason == Reason::Protect && !s.backup_lost.load(Ordering::SeqCst) {
                return Err(Refused::Busy("this VM has a backup already; a second one is refused".into()));
            }
        }
        if self.busy.swap(true, Ordering::SeqCst) {
            return Err(under_way());
        }
        let Some(me) = self.me.upgrade() else { return Err(Refused::Stopped) };
        let job = std::thread::Builder::new().name("ftvm-protect".into()).spawn(move || {
            me.transfer(backup, reason, arbiter);
            me.busy.store(false, Ordering::SeqCst);
        });
        match job {
            Ok(j) => {
                let mut jobs = lock(&self.jobs);
                jobs.retain(|j| !j.is_finished());
                jobs.push(j);
                Ok(())
            }
            Err(e) => {
                self.busy.store(false, Ordering::SeqCst);
                Err(Refused::BadState(format!("cannot start the transfer thread: {e}")))
            }
        }
    }

    fn report(&self, progress: &mut ProtectProgress, started: Instant) {
        progress.elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
        if let Some(c) = &self.control {
            c.set_protect_progress(progress.clone());
        }
    }

    /// The whole transfer; its outcome is in the progress report.
    fn transfer(&self, backup: SocketAddr, reason: Reason, arbiter: Arc<Arbiter>) {
        let started = Instant::now();
        let mut progress = ProtectProgress::new(backup.to_string(), reason.as_str());
        self.report(&mut progress, started);
        if reason == Reason::Resync {
            self.resyncs.fetch_add(1, Ordering::SeqCst);
        }
        let outcome = self.run_transfer(backup, arbiter, &mut progress, started);
        match outcome {
            Ok(()) => {
                progress.phase = ProtectPhase::Protected;
                progress.protected_after_ms = Some(started.elapsed().as_secs_f64() * 1e3);
                if let Some(c) = &self.control {
                    c.note_state_transfer(true);
                }
                tracing::info!(
                    target: "ftvm::event",
                    event = "protected",
                    reason = reason.as_str(),
                    backup = %backup,
                    sent_bytes = progress.shipped_bytes,
                    pause_ms = progress.pause_ms(),
                    after_ms = progress.protected_after_ms,
                    "{progress}"
                );
            }
            Err(e) => {
                progress.phase = ProtectPhase::Failed;
                progress.error = Some(e.to_string());
                tracing::warn!(
                    target: "ftvm::event",
                    event = "protect_failed",
                    reason = reason.as_str(),
                    backup = %backup,
                    error = %e,
                    "{progress}"
                );
            }
        }
        self.report(&mut progress, started);
    }

    fn run_transfer(
        &self,
        backup: SocketAddr,
        arbiter: Arc<Arbiter>,
        progress: &mut ProtectProgress,
        started: Instant,
    ) -> Result<()> {
        let pair = Error::Replication;
        let mut conn = Connection::connect(backup, &self.settings.key, CONNECT_WAIT, Mode::Transfer).map_err(pair)?;
        let header =
            serde_json::to_vec(&self.snapshot.header).map_err(|e| Error::Pair(format!("transfer header: {e}")))?;
        link::write_blob(&mut conn.writer, &header)
            .and_then(|_| conn.writer.flush())
            .map_err(|source| Error::PairIo { what: "sending to the backup".into(), source })?;
        if let Err(why) = link::read_answer(&mut *conn.reader).map_err(pair)? {
            return Err(Error::Pair(format!("the backup at {backup} refused this VM:\n{why}")));
        }
        progress.phase = ProtectPhase::Copying;
        self.report(progress, started);
        let n = self.transfers.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("ftvm-transfer-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        crate::snapshot::prepare_dir(&dir)?;
        let staged = Staged(dir.clone());
        // The cut: on the vCPU thread, right after the state was saved.
        let made: Arc<Mutex<Option<NewLink>>> = Arc::new(Mutex::new(None));
        let hook = {
            let made = made.clone();
            let heartbeats = conn.heartbeats.clone();
            let settings = self.settings.clone();
            let sync_policy = self.sync_policy;
            // The new log is made here, not in the pause: nothing in it depends on the cut.
            let (writer, queue) = log_channel(&self.snapshot.header)?;
            let me = self.me.clone();
            Box::new(move |vloop: &mut crate::vcpu::VcpuLoop| -> Result<()> {
                let me = me.upgrade().ok_or_else(|| Error::Pair("the VM is ending".into()))?;
                // The old link's outputs go out first (it is unprotected: at once).
                vloop.drain_gate();
                let sinks = me.sinks_for(vloop);
                let opts =
                    LinkOptions { timeout: settings.timeout, max_lag: settings.max_lag, protected_from_start: false };
                let primary = Primary::new(heartbeats, sinks, arbiter, opts);
                vloop.start_recording(writer, sync_policy)?;
                vloop.set_gate(primary.gate());
                if let Some(c) = &me.control {
                    c.set_role(ftvm_api::Role::Primary);
                }
                *lock(&made) = Some((primary, queue));
                Ok(())
            }) as crate::snapshot::CutHook
        };
        let mut snap = SnapshotProgress::new(
            dir.display().to_string(),
            crate::memory::total_size(&self.snapshot.tracker.memory()),
            self.snapshot.disks.iter().filter(|d| !d.readonly).map(|d| d.tracker.size()).sum(),
        );
        let taken = crate::snapshot::take(&self.snapshot, &dir, &mut snap, started, Some(hook));
        progress.snapshot = Some(snap);
        // Once the cut happened, the new link is the VM's, whatever happens next.
        let Some((primary, log)) = lock(&made).take() else {
            taken?;
            return Err(Error::Pair("the state transfer's cut did not happen".into()));
        };
        let stats = primary.stats();
        self.install(primary, backup);
        taken?;
        progress.phase = ProtectPhase::Shipping;
        self.report(progress, started);
        let sent = AtomicU64::new(0);
        let shipped = crate::snapshot::ship(&mut conn.writer, &staged.0, &sent);
        progress.shipped_bytes = sent.load(Ordering::Relaxed);
        drop(staged);
        if let Err(e) = shipped {
            conn.shutdown();
            stats.backup_lost.store(true, Ordering::SeqCst);
            return Err(e);
        }
        if let Some(l) = lock(&self.link).as_mut() {
            l.start(conn, log).map_err(pair)?;
        }
        progress.phase = ProtectPhase::CatchingUp;
        self.report(progress, started);
        let deadline = Instant::now() + CATCH_UP_LIMIT;
        loop {
            // Protected, and the backup knows it (it would go live if this side died now).
            if stats.protected.load(Ordering::SeqCst) && stats.confirmed.load(Ordering::SeqCst) {
                return Ok(());
            }
            if stats.backup_lost.load(Ordering::SeqCst) {
                return Err(Error::Pair("the backup was lost while it caught up".into()));
            }
            if Instant::now() > deadline {
                return Err(Error::Pair(format!("the backup did not catch up within {} s", CATCH_UP_LIMIT.as_secs())));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The sinks that perform the VM's outputs: the primary's, or (a backup that went live)
    /// its console and TAPs, taken over from the vCPU loop.
    fn sinks_for(&self, vloop: &mut crate::vcpu::VcpuLoop) -> SharedSinks {
        let mut sinks = lock(&self.sinks);
        if let Some(s) = sinks.as_ref() {
            return s.clone();
        }
        let (console, taps) = vloop.take_output_sinks();
        let made: SharedSinks = Arc::new(Mutex::new(Box::new(crate::pair::HostSinks { console, taps })));
        *sinks = Some(made.clone());
        made
    }

    /// The VM is ending: the current link goes with it; running transfers end.
    pub(crate) fn finish(&self) -> Option<Primary> {
        let jobs: Vec<_> = lock(&self.jobs).drain(..).collect();
        let link = lock(&self.link).take();
        // A transfer stuck waiting for a backup that catches up ends with its link lost.
        if let Some(l) = &link {
            l.stats().backup_lost.store(true, Ordering::SeqCst);
        }
        // A transfer ends soon once the VM has stopped (its cut cannot happen, or its link is
        // lost); one stuck on an unresponsive backup is left behind rather than waited for.
        let deadline = Instant::now() + Duration::from_secs(5);
        for j in jobs {
            while !j.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if j.is_finished() {
                let _ = j.join();
            }
        }
        link
    }
}

/// A link made at the cut, and the log queued for it since.
type NewLink = (Primary, ftvm_replication::primary::LogQueue);

/// The staging directory, removed when the transfer is done with it.
/// A primary's figures, from its link's counters (and its protection's).
fn primary_figures(
    stats: Arc<ftvm_replication::primary::PairStats>,
    protection: std::sync::Weak<Protection>,
) -> crate::control::PairSource {
    use std::sync::atomic::Ordering::Relaxed;
    Box::new(move || {
        let lost = stats.backup_lost.load(Relaxed);
        let p = protection.upgrade();
        ftvm_api::PairFigures {
            protected: !lost && stats.protected.load(Relaxed),
            acked_lsn: Some(stats.acked_lsn.load(Relaxed)),
            sent_bytes: Some(stats.sent_bytes.load(Relaxed)),
            outputs_done: stats.outputs_done.load(Relaxed),
            backup_lost: lost,
            resyncs: p.as_ref().map_or(0, |p| p.resyncs()),
            failovers: p.as_ref().map_or(0, |p| p.failovers()),
            replay_lag_ms: (!lost).then(|| stats.lag_ms.load(Relaxed)),
            throttled_ms: Some(stats.throttled_us.load(Relaxed) / 1000),
            output_hold_us: {
                let n = stats.held_outputs.load(Relaxed);
                (n > 0).then(|| stats.hold_us.load(Relaxed) / n)
            },
            catching_up: !lost && !stats.protected.load(Relaxed),
            output_hold: Some({
                use ftvm_replication::primary::HOLD_BUCKETS_US;
                let mut counts = [0; 16];
                for (count, bucket) in counts.iter_mut().zip(&stats.hold_buckets) {
                    *count = bucket.load(Relaxed);
                }
                ftvm_api::HoldHistogram {
                    bounds_us: &HOLD_BUCKETS_US,
                    counts,
                    sum_us: stats.hold_us.load(Relaxed),
                    count: stats.held_outputs.load(Relaxed),
                }
            }),
            output_stages: {
                let f = ftvm_sync::lock(&stats.stages).figures.clone();
                let figure = |name: &str, h: &ftvm_replication::stages::Histogram| {
                    ftvm_api::StageFigure::new(name, h.sum_ns, h.buckets().into_iter().map(|(b, c)| [b, c]).collect())
                };
                Some(ftvm_api::OutputStages {
                    hold: figure("hold", &f.hold),
                    stages: ftvm_replication::stages::STAGES
                        .iter()
                        .zip(&f.stages)
                        .map(|(name, h)| figure(name, h))
                        .collect(),
                    parts: ftvm_replication::stages::PARTS
                        .iter()
                        .zip(&f.parts)
                        .map(|(name, h)| figure(name, h))
                        .collect(),
                })
            },
            ..Default::default()
        }
    })
}

struct Staged(PathBuf);

impl Drop for Staged {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_have_the_names_the_events_use() {
        assert_eq!(Reason::Protect.as_str(), "protect");
        assert_eq!(Reason::Resync.as_str(), "resync");
    }

    #[test]
    fn a_staged_transfer_directory_goes_with_its_guard() {
        let dir = std::env::temp_dir().join(format!("ftvm-protect-staged-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("inner")).unwrap();
        std::fs::write(dir.join("inner/memory.bin"), b"x").unwrap();
        drop(Staged(dir.clone()));
        assert!(!dir.exists());
        drop(Staged(dir.clone())); // already gone: nothing to do
    }
}
