//! Snapshots taken live (docs/snapshots.md): a pre-copy of memory and disks while the guest
//! runs, then again what it dirtied meanwhile, until little is left; then the vCPU thread,
//! between two exits, copies the last dirty pages and blocks and saves the vCPU and device
//! state. Only that last step pauses the guest. The control API starts and follows it; a
//! state transfer (re-protection) takes the same path and ships the directory. The format,
//! its checks and restoring are the machine's ([`ftvm_machine::snapshot`], re-exported here).

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ftvm_api::{SnapshotPhase, SnapshotProgress, VmControl};
use ftvm_log::LogHeader;

pub use ftvm_machine::snapshot::*;

use crate::dirty::{DirtyTracker, PageSet};
use crate::disk::DiskTracker;
use crate::error::{Error, Result};
use crate::vcpu::VcpuTasks;
use crate::vm::DiskHandle;

/// A pre-copy round as the manifest keeps it (the progress shows the API's).
fn manifest_round(r: &ftvm_api::CopyRound) -> CopyRound {
    CopyRound { pages: r.pages, disk_bytes: r.disk_bytes, ms: r.ms }
}

/// Pre-copy stops when a round leaves at most this many dirty pages (1 MiB)...
const FINAL_PAGES: u64 = 256;
/// ...or after this many rounds...
const MAX_ROUNDS: usize = 8;
/// ...or when a round no longer shrinks the dirty set by a tenth (the guest dirties as fast
/// as we copy: pausing now costs no more than later).
const CONVERGENCE: f64 = 0.9;

/// What a snapshot of a running VM needs, shared by the API's starter and the job.
pub struct SnapshotSource {
    pub tracker: DirtyTracker,
    pub disks: Vec<DiskHandle>,
    /// The VM as built (its identity for the manifest).
    pub header: LogHeader,
    pub tasks: VcpuTasks,
    pub control: Arc<VmControl>,
}

impl SnapshotSource {
    /// The starter the control API calls for `PUT /snapshot`: checks the directory at once
    /// (a clear error if it cannot take a snapshot), then copies in a thread of its own.
    /// The starter owns the jobs it started: when it is dropped (the VM's run has ended),
    /// it waits for them, so that a job ends as it should, its manifest written or its files
    /// removed, instead of being cut off half-way by the process's exit.
    pub fn starter(self: Arc<Self>) -> ftvm_api::SnapshotStarter {
        let jobs = Jobs::default();
        Box::new(move |dir: PathBuf| {
            prepare_dir(&dir).map_err(|e| e.to_string())?;
            let src = self.clone();
            let started = Instant::now();
            let mut progress = SnapshotProgress::new(
                dir.display().to_string(),
                crate::memory::total_size(&src.tracker.memory()),
                src.disks.iter().filter(|d| !d.readonly).map(|d| d.tracker.size()).sum(),
            );
            // Published before the request is answered: a client that asks for the progress
            // right after starting finds this snapshot's, never none or the previous one's.
            src.control.set_snapshot_progress(progress.clone());
            let (control, mut failed) = (self.control.clone(), progress.clone());
            std::thread::Builder::new()
                .name("ftvm-snapshot".into())
                .spawn(move || {
                    let outcome = take(&src, &dir, &mut progress, started, None);
                    progress.elapsed_ms = ms(started.elapsed());
                    match outcome {
                        Ok(()) => {
                            progress.phase = SnapshotPhase::Done;
                            tracing::info!("{progress}");
                        }
                        Err(e) => {
                            progress.phase = SnapshotPhase::Failed;
                            progress.error = Some(e.to_string());
                            tracing::error!("{progress}");
                            discard(&dir);
                        }
                    }
                    src.control.set_snapshot_progress(progress);
                })
                .map(|job| jobs.add(job))
                .map_err(|e| {
                    let why = format!("cannot start the snapshot thread: {e}");
                    failed.phase = SnapshotPhase::Failed;
                    failed.error = Some(why.clone());
                    control.set_snapshot_progress(failed);
                    why
                })
        })
    }
}

/// Snapshot jobs, joined on drop. A job cannot wait forever: once the vCPU loop has ended,
/// the task of its paused round is dropped unrun and the job fails (removing its files).
#[derive(Default)]
struct Jobs(std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>);

impl Jobs {
    fn add(&self, job: std::thread::JoinHandle<()>) {
        let mut jobs = ftvm_sync::lock(&self.0);
        jobs.retain(|j| !j.is_finished());
        jobs.push(job);
    }
}

impl Drop for Jobs {
    fn drop(&mut self) {
        for job in ftvm_sync::unpoisoned(self.0.get_mut()).drain(..) {
            let _ = job.join();
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The directory must be new or empty, and writable. For a state transfer's staging
/// directory, the stale ones a killed ftvm left beside it are removed first.
pub(crate) fn prepare_dir(dir: &Path) -> Result<()> {
    if let (Some(parent), Some(_)) =
        (dir.parent(), dir.file_name().and_then(|n| n.to_str()).and_then(ftvm_replication::transfer::staging_owner))
    {
        ftvm_replication::transfer::remove_stale_staging(parent);
    }
    if dir.exists() {
        let mut entries =
            std::fs::read_dir(dir).map_err(snap_err(format!("{} is not a readable directory", dir.display())))?;
        if entries.next().is_some() {
            return Err(Error::Snapshot(format!(
                "{} is not empty; a snapshot goes into a new or empty directory",
                dir.display()
            )));
        }
    } else {
        // Every directory created here is private (a directory given that exists keeps the
        // mode its owner chose).
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(dir)
            .map_err(snap_err(format!("cannot create {}", dir.display())))?;
    }
    let probe = dir.join(".ftvm-write-test");
    create_private(&probe).map_err(snap_err(format!("{} is not writable", dir.display())))?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}

/// Removes what a failed snapshot wrote (only the files a snapshot writes).
fn discard(dir: &Path) {
    for name in [MANIFEST, SEAL, STATE, MEMORY] {
        let _ = std::fs::remove_file(dir.join(name));
    }
    for i in 0..16 {
        let _ = std::fs::remove_file(dir.join(disk_file(i)));
    }
}

/// A writable disk being copied.
struct DiskCopy {
    /// The disk's index in device order.
    index: usize,
    src: File,
    dst: File,
    tracker: DiskTracker,
    consumer: crate::disk::DiskConsumer,
}

impl DiskCopy {
    /// Another handle on the same copy (for the paused round, on the vCPU thread).
    fn try_clone(&self) -> std::io::Result<DiskCopy> {
        Ok(DiskCopy {
            index: self.index,
            src: self.src.try_clone()?,
            dst: self.dst.try_clone()?,
            tracker: self.tracker.clone(),
            consumer: self.consumer,
        })
    }

    /// Copies the blocks written since the last round. Returns the bytes copied.
    fn round(&self, buf: &mut [u8]) -> Result<u64> {
        let mut bytes = 0;
        for (offset, len) in self.tracker.take(self.consumer) {
            copy_range(&self.src, &self.dst, offset, len, false, buf).map_err(snap_err("copying a disk".into()))?;
            bytes += len;
        }
        Ok(bytes)
    }
}

/// Subscriptions that end with the job, however it ends.
struct Subscriptions<'a> {
    src: &'a SnapshotSource,
    memory: crate::dirty::Consumer,
    disks: Vec<DiskCopy>,
}

impl Drop for Subscriptions<'_> {
    fn drop(&mut self) {
        self.src.tracker.unsubscribe(self.memory);
        for d in &self.disks {
            d.tracker.unsubscribe(d.consumer);
        }
    }
}

/// Work done on the vCPU thread at the end of the paused round, right after the state was
/// saved, before the guest runs again (a state transfer starts its new recording there).
pub(crate) type CutHook = Box<dyn FnOnce(&mut crate::vcpu::VcpuLoop) -> Result<()> + Send>;

/// The whole job: pre-copy rounds, the paused round on the vCPU thread, the manifest.
pub(crate) fn take(
    src: &SnapshotSource,
    dir: &Path,
    progress: &mut SnapshotProgress,
    started: Instant,
    at_cut: Option<CutHook>,
) -> Result<()> {
    let mem = src.tracker.memory();
    let image = Arc::new(MemoryImage::create(&dir.join(MEMORY), &mem)?);
    let mut buf = vec![0u8; 1 << 20];
    let subs = first_round(src, dir, &image, progress, &mut buf)?;
    report(src, progress, started);
    precopy_rounds(src, &image, &subs, progress, started, &mut buf)?;
    // The paused round, on the vCPU thread between two exits.
    progress.phase = SnapshotPhase::Pausing;
    report(src, progress, started);
    let ((last, guest_time_ns), pause_ms) = paused_round(src, dir, &image, &subs, at_cut)?;
    progress.rounds.push(last);
    progress.pause_ms = Some(pause_ms);
    progress.phase = SnapshotPhase::Finishing;
    report(src, progress, started);
    write_manifest(src, dir, &image, subs, progress, guest_time_ns, pause_ms)
}

/// Round 0: every disk's data and every page the guest ever touched, while the guest runs
/// (pages it never touched are zeros: not even read). Returns the subscriptions the later
/// rounds take their dirty sets from.
fn first_round<'a>(
    src: &'a SnapshotSource,
    dir: &Path,
    image: &MemoryImage,
    progress: &mut SnapshotProgress,
    buf: &mut [u8],
) -> Result<Subscriptions<'a>> {
    let mem = src.tracker.memory();
    let mut subs = Subscriptions { src, memory: src.tracker.subscribe()?, disks: Vec::new() };
    let t = Instant::now();
    let mut disk_bytes = 0;
    for (i, d) in src.disks.iter().enumerate().filter(|(_, d)| !d.readonly) {
        let consumer = d.tracker.subscribe();
        let source = File::open(&d.path).map_err(snap_err(format!("cannot read disk {}", d.path.display())))?;
        let path = dir.join(disk_file(i));
        let dst = create_private(&path).map_err(snap_err(format!("cannot create {}", path.display())))?;
        dst.set_len(d.tracker.size()).map_err(snap_err(format!("cannot size {}", path.display())))?;
        let copy = DiskCopy { index: i, src: source, dst, tracker: d.tracker.clone(), consumer };
        for (offset, len) in data_extents(&copy.src, d.tracker.size()) {
            disk_bytes += copy_range(&copy.src, &copy.dst, offset, len, true, buf)
                .map_err(snap_err(format!("copying disk {}", d.path.display())))?;
        }
        subs.disks.push(copy);
    }
    let pages = image.write_pages(&mem, &PageSet::populated(&mem), true)?;
    progress.rounds.push(ftvm_api::CopyRound { pages, disk_bytes, ms: ms(t.elapsed()) });
    Ok(subs)
}

/// Rounds while the guest runs: what it dirtied meanwhile, until little is left, the rounds
/// stop shrinking or there were [`MAX_ROUNDS`].
fn precopy_rounds(
    src: &SnapshotSource,
    image: &MemoryImage,
    subs: &Subscriptions<'_>,
    progress: &mut SnapshotProgress,
    started: Instant,
    buf: &mut [u8],
) -> Result<()> {
    let mem = src.tracker.memory();
    let mut previous = u64::MAX;
    loop {
        let dirty = src.tracker.take(subs.memory)?;
        let n = dirty.len();
        let converging = (n as f64) < previous as f64 * CONVERGENCE;
        if n <= FINAL_PAGES || progress.rounds.len() >= MAX_ROUNDS || !converging {
            // The pages seen dirty now go into the paused round with the rest.
            src.tracker.mark(&dirty, None);
            return Ok(());
        }
        let t = Instant::now();
        let pages = image.write_pages(&mem, &dirty, false)?;
        let mut disk_bytes = 0;
        for d in &subs.disks {
            disk_bytes += d.round(buf)?;
        }
        progress.rounds.push(ftvm_api::CopyRound { pages, disk_bytes, ms: ms(t.elapsed()) });
        report(src, progress, started);
        previous = n;
    }
}

/// The paused round, a task for the vCPU thread between two exits: the last dirty pages and
/// blocks, the VM's state (and `at_cut`, a state transfer's cut). Returns the round, the
/// guest time at the cut and how long the guest was paused, in ms.
fn paused_round(
    src: &SnapshotSource,
    dir: &Path,
    image: &Arc<MemoryImage>,
    subs: &Subscriptions<'_>,
    mut at_cut: Option<CutHook>,
) -> Result<((ftvm_api::CopyRound, u64), f64)> {
    let (tx, rx) = mpsc::channel();
    let memory = subs.memory;
    let disks: Vec<DiskCopy> = subs
        .disks
        .iter()
        .map(DiskCopy::try_clone)
        .collect::<std::io::Result<_>>()
        .map_err(snap_err("disk files".into()))?;
    let (tracker, image_for_vcpu, state_path) = (src.tracker.clone(), image.clone(), dir.join(STATE));
    src.tasks.submit(Box::new(move |vloop| {
        let t = Instant::now();
        let result = (|| -> Result<(ftvm_api::CopyRound, u64)> {
            vloop.complete_pending_io()?;
            let dirty = tracker.take(memory)?;
            let pages = image_for_vcpu.write_pages(&tracker.memory(), &dirty, false)?;
            let mut buf = vec![0u8; 1 << 20];
            let mut disk_bytes = 0;
            for d in &disks {
                disk_bytes += d.round(&mut buf)?;
            }
            let state = vloop.save_state()?;
            let guest_time = state.clock.guest_now;
            let bytes = state.encode()?;
            create_private(&state_path)
                .and_then(|mut f| f.write_all(&bytes))
                .map_err(snap_err(format!("cannot write {}", state_path.display())))?;
            if let Some(hook) = at_cut.take() {
                hook(vloop)?;
            }
            Ok((ftvm_api::CopyRound { pages, disk_bytes, ms: ms(t.elapsed()) }, guest_time))
        })();
        // complete_pending_io clears `immediate_exit`, and with it a kick that came before
        // (the deadline timer's, always so when the VM was paused: its deadline passed
        // meanwhile and the timer fired once). Lost, the guest computing in ring 3 would get
        // no timer interrupt until its next exit of its own. Kick again: the next KVM_RUN
        // returns at once and the loop re-arms its timer (a spurious kick is harmless).
        vloop.kick();
        let _ = tx.send(result.map(|r| (r, ms(t.elapsed()))));
    }));
    rx.recv().map_err(|_| Error::Snapshot("the VM stopped before the snapshot was complete".into()))?
}

/// The files are complete: makes them durable, checksums them, seals and writes the
/// manifest (last: it completes the snapshot).
fn write_manifest(
    src: &SnapshotSource,
    dir: &Path,
    image: &MemoryImage,
    subs: Subscriptions<'_>,
    progress: &SnapshotProgress,
    guest_time_ns: u64,
    pause_ms: f64,
) -> Result<()> {
    image.sync().map_err(snap_err("syncing memory.bin".into()))?;
    let mut disks = Vec::new();
    for (i, d) in src.disks.iter().enumerate() {
        let copy = if d.readonly {
            None
        } else {
            if let Some(c) = subs.disks.iter().find(|c| c.index == i) {
                c.dst.sync_all().map_err(snap_err("syncing a disk copy".into()))?;
            }
            Some(entry_for(dir, &disk_file(i))?)
        };
        // The image's real path: the one a restore that is not told otherwise writes back to.
        let source = std::fs::canonicalize(&d.path).unwrap_or_else(|_| d.path.clone());
        disks.push(DiskEntry { source: source.display().to_string(), readonly: d.readonly, copy });
    }
    drop(subs);
    let manifest = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        ftvm_version: env!("CARGO_PKG_VERSION").into(),
        device_state_version: ftvm_devices::DEVICE_STATE_VERSION,
        vm: src.header.clone(),
        created_unix: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        guest_time_ns,
        state: state_entry(&dir.join(STATE))?,
        memory: FileEntry { file: MEMORY.into(), size: image.size(), xxh3: hex(checksum(&dir.join(MEMORY))?.0) },
        disks,
        rounds: progress.rounds.iter().map(manifest_round).collect(),
        pause_ms,
    };
    let json = serde_json::to_string_pretty(&manifest).map_err(|e| Error::Snapshot(format!("manifest: {e}")))?;
    // The seal before the manifest: the manifest, last, completes the snapshot.
    seal(dir, &json)?;
    let path = dir.join(MANIFEST);
    let mut f = create_private(&path).map_err(snap_err(format!("cannot create {}", path.display())))?;
    f.write_all(json.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(snap_err(format!("cannot write {}", path.display())))?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The seal first: the manifest, last, completes the snapshot. A state transfer's staging
/// is not sealed: the receiving side restores it onto its own disks, never onto the paths
/// the manifest names (and a pair needs no key in its user's home).
fn seal(dir: &Path, json: &str) -> Result<()> {
    let staging = dir.file_name().and_then(|n| n.to_str()).and_then(ftvm_replication::transfer::staging_owner);
    let key = match staging {
        Some(_) => Err("a state transfer's staging".to_string()),
        None => snapshot_key(true),
    };
    match key.map(|key| seal_tag(&key, json.as_bytes())) {
        Ok(tag) => {
            let path = dir.join(SEAL);
            create_private(&path)
                .and_then(|mut f| f.write_all(hex_bytes(&tag).as_bytes()))
                .map_err(snap_err(format!("cannot write {}", path.display())))?;
        }
        Err(e) if staging.is_some() => tracing::debug!("not sealed: {e}"),
        Err(e) => tracing::warn!(
            "the snapshot's manifest is not sealed ({e}): restoring it will need --disk for each writable disk"
        ),
    }
    Ok(())
}

fn report(src: &SnapshotSource, progress: &mut SnapshotProgress, started: Instant) {
    progress.elapsed_ms = ms(started.elapsed());
    src.control.set_snapshot_progress(progress.clone());
}

/// Sends the staged snapshot in `dir` over a live state transfer (the backup rebuilds the
/// directory with `ftvm_replication::transfer::receive_dir`): every file but the manifest,
/// only its non-zero blocks (read as a restore reads them), contiguous blocks in one record;
/// the manifest last. `sent` counts the data bytes.
pub(crate) fn ship(w: &mut dyn Write, dir: &Path, sent: &std::sync::atomic::AtomicU64) -> Result<()> {
    use ftvm_replication::transfer::{DirSender, MANIFEST as SENT_LAST};
    let pair = Error::Replication;
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(snap_err(format!("cannot read {}", dir.display())))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != SENT_LAST)
        .collect();
    names.sort();
    let mut sender = DirSender::new(w, sent);
    let mut run: Vec<u8> = Vec::with_capacity(ftvm_replication::protocol::XFER_CHUNK);
    for name in &names {
        let path = dir.join(name);
        let file = File::open(&path).map_err(snap_err(format!("cannot read {}", path.display())))?;
        let size = file.metadata().map_err(snap_err(format!("cannot read {}", path.display())))?.len();
        sender.file(name, size).map_err(pair)?;
        let mut run_at = 0;
        read_sparse::<Error>(&file, size, |at, block| {
            if !run.is_empty()
                && (at != run_at + run.len() as u64 || run.len() >= ftvm_replication::protocol::XFER_CHUNK)
            {
                sender.data(run_at, &run).map_err(pair)?;
                run.clear();
            }
            if run.is_empty() {
                run_at = at;
            }
            run.extend_from_slice(block);
            Ok(())
        })?;
        if !run.is_empty() {
            sender.data(run_at, &run).map_err(pair)?;
            run.clear();
        }
    }
    let manifest = std::fs::read(dir.join(SENT_LAST))
        .map_err(snap_err(format!("cannot read the manifest in {}", dir.display())))?;
    sender.manifest(&manifest).map_err(pair)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ftvm-snap-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_sparse_directory_arrives_whole() {
        use ftvm_replication::transfer::{receive_dir, MANIFEST as SENT_LAST};
        use std::sync::atomic::{AtomicU64, Ordering};
        let base = scratch("xfer");
        let (src, dst) = (base.join("src"), base.join("dst"));
        std::fs::create_dir_all(&src).unwrap();
        let f = File::create(src.join("memory.bin")).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&[7; 5000], 3 << 20).unwrap();
        f.write_all_at(&[9; 10], (64 << 20) - 10).unwrap();
        std::fs::write(src.join("state.bin"), b"state").unwrap();
        std::fs::write(src.join(SENT_LAST), b"{}").unwrap();
        let mut wire = Vec::new();
        let sent = AtomicU64::new(0);
        ship(&mut wire, &src, &sent).unwrap();
        assert!(wire.len() < 64 << 10, "holes and zero blocks are not sent ({} bytes)", wire.len());
        let got = AtomicU64::new(0);
        receive_dir(&mut wire.as_slice(), &dst, &got).unwrap();
        assert_eq!(sent.load(Ordering::Relaxed), got.load(Ordering::Relaxed));
        for name in ["memory.bin", "state.bin", SENT_LAST] {
            assert_eq!(std::fs::read(src.join(name)).unwrap(), std::fs::read(dst.join(name)).unwrap(), "{name}");
        }
        // A truncated stream or a hostile name is an error, not a panic.
        assert!(receive_dir(&mut &wire[..wire.len() / 2], &base.join("cut"), &got).is_err());
        let mut evil = vec![ftvm_replication::protocol::XFER_FILE];
        evil.extend_from_slice(&5u16.to_le_bytes());
        evil.extend_from_slice(b"../x1");
        evil.extend_from_slice(&0u64.to_le_bytes());
        assert!(receive_dir(&mut evil.as_slice(), &base.join("evil"), &got).is_err());
        let _ = std::fs::remove_dir_all(&base);
    }
}
