//! `ftvm record` and `ftvm replay`: building the VM, the log header that pins it, the disk
//! copies, and the checks around a replay (images, VM identity, final disk).

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use ftvm_log::{ImageInfo, LogHeader, LogReader, LogWriter};
use ftvm_virtio::net::{FrameSink, MacAddr};

use crate::boot::BootSpec;
use crate::error::{Error, Result};
use crate::identity::{check_image, header_for, image_info, sha256_file, NamedBy, DEVICE_MODEL_VERSION};

use crate::run::{run_with, Journaling, RunReport};
use crate::snapshot::{RestoreHost, Snapshot};
use crate::vm::{ConsoleConfig, DiskConfig, NetConfig, Vm, VmConfig, VmOutcome};

/// What `ftvm record` needs beyond the VM's configuration.
#[derive(Debug, Clone)]
pub struct RecordOptions {
    pub log: PathBuf,
    pub max_size: Option<u64>,
    /// How sync points deliver events to a guest that does not exit (`None`: off).
    pub sync_policy: Option<crate::syncpoint::SyncPolicy>,
}

/// The share of the free space of the log's file system a recording takes when not told.
pub const DEFAULT_LOG_SHARE: f64 = 0.5;

/// The size limit a recording gets when none is given: half of what the log's file system
/// has free, less `other_bytes` (the disk copies the recording makes beside the log), so
/// that a recording never fills a disk unasked. Returns (limit, free bytes, the directory).
pub fn default_max_size(log: &Path, other_bytes: u64) -> std::io::Result<(u64, u64, PathBuf)> {
    let dir = match log.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let free = free_bytes(&dir)?;
    let limit = (free.saturating_sub(other_bytes) as f64 * DEFAULT_LOG_SHARE) as u64;
    Ok((limit, free, dir))
}

/// Bytes an unprivileged writer may still put on the file system holding `dir`.
fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "a path with a NUL byte"))?;
    // SAFETY: statvfs only writes the struct it is given; the path is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; both pointers are valid for the call.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// What `ftvm replay` needs.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    pub log: PathBuf,
    /// Where the console text, the transmitted frames (pcap) and the disk copies go; a
    /// temporary directory (removed afterwards) if `None`.
    pub output_dir: Option<PathBuf>,
    /// For a recording that started from a snapshot: where the snapshot is, if not where the
    /// log says.
    pub snapshot: Option<PathBuf>,
}

#[derive(Debug)]
pub struct RecordReport {
    pub run: RunReport,
    pub log_bytes: u64,
    /// The guest's disks as the recording left them (beside the log).
    pub disk_copies: Vec<PathBuf>,
}

#[derive(Debug)]
pub struct ReplayReport {
    pub run: RunReport,
    /// Per disk: (replayed copy, whether it equals the recording's final disk; `None` if the
    /// recording's copy is not beside the log).
    pub disks: Vec<(PathBuf, Option<bool>)>,
    /// Whether the whole log replayed exactly and every disk matched.
    pub exact: bool,
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::RecordIo { what, source }
}

/// The disk copy a recording writes beside its log.
pub fn disk_copy_path(log: &Path, index: usize) -> PathBuf {
    let mut name = log.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".disk{index}"));
    log.with_file_name(name)
}

/// The primary of a fault-tolerant pair: `ftvm primary`.
pub fn primary(
    mut config: VmConfig,
    link: ftvm_replication::primary::PrimaryConfig,
    sync_policy: Option<crate::syncpoint::SyncPolicy>,
) -> Result<RunReport> {
    let rtc = config.rtc_base_unix.unwrap_or_else(crate::vm::unix_now);
    config.rtc_base_unix = Some(rtc);
    let (kernel, initrd, disks) = images(&config)?;
    let mut vm = Vm::build(config)?;
    vm.set_sync_policy(sync_policy);
    let header = header_for(&vm, kernel, initrd, disks, rtc);
    let settings = crate::protect::PairSettings { key: link.key.clone(), timeout: link.timeout, max_lag: link.max_lag };
    run_with(vm, Journaling::Primary { link, header: Box::new(header), settings })
}

/// A preflight of the pair from the primary's side (`ftvm doctor primary`): builds the VM as
/// the primary would (without its TAPs), sends its header to the backup and returns how the
/// backup's VM differs (empty: they agree). Takes no arbiter and forms no pair.
pub fn probe_backup(mut config: VmConfig, link: &ftvm_replication::primary::PrimaryConfig) -> Result<Vec<String>> {
    config.rtc_base_unix = Some(config.rtc_base_unix.unwrap_or_else(crate::vm::unix_now));
    let rtc = config.rtc_base_unix.unwrap_or_default();
    let (kernel, initrd, disks) = images(&config)?;
    let vm = Vm::build_with(config, false)?;
    let header = header_for(&vm, kernel, initrd, disks, rtc);
    drop(vm);
    Ok(ftvm_replication::primary::Primary::probe(link, &header)?)
}

/// The backup of a fault-tolerant pair: `ftvm backup`. It waits for a primary: one that
/// boots with it (the log from boot), or a live one that sends its state first
/// (re-protection). When its replay diverges it asks the primary for a resync and waits
/// for it on the same address; if the primary dies meanwhile, it halts.
pub fn backup(
    config: VmConfig,
    link: ftvm_replication::backup::BackupConfig,
    max_lag: Option<std::time::Duration>,
    sync_policy: Option<crate::syncpoint::SyncPolicy>,
) -> Result<RunReport> {
    use ftvm_replication::link::{Listener, Mode};
    let pair = Error::Replication;
    let settings = crate::protect::PairSettings { key: link.key.clone(), timeout: link.timeout, max_lag };
    let listener = Listener::bind(link.listen, &link.key).map_err(pair)?;
    tracing::info!(
        target: "ftvm::event",
        event = "listening",
        addr = %listener.addr,
        "backup listening on {}",
        listener.addr
    );
    let mut resyncs = 0u64;
    // The control API's block: each VM this backup runs (after a resync, the next) takes it.
    let control = crate::control::current_control();
    // After a divergence: the old link's heartbeats, to notice the primary dying before
    // it resyncs this backup.
    let mut diverged: Diverged = None;
    loop {
        let mut conn = wait_for_primary(&listener, &mut diverged, link.timeout)?;
        let (vm, ours) = match conn.mode {
            Mode::Probe => {
                // A preflight (`ftvm doctor primary`): compare with the VM a boot would
                // build, answer, wait on.
                let (_, ours) = boot_vm(&config)?;
                if let Err(e) = ftvm_replication::backup::Backup::answer_probe(conn, &ours) {
                    tracing::warn!(target: "ftvm::event", event = "bad_peer", error = %e, "{e}; waiting on for the primary");
                }
                continue;
            }
            Mode::Boot => boot_vm(&config)?,
            Mode::Transfer => match receive_state(&mut conn, &config)? {
                Some(restored) => {
                    if let Some(c) = &control {
                        c.note_state_transfer(false);
                    }
                    restored
                }
                // That peer failed before the pair formed (said): wait for the right one.
                None => continue,
            },
        };
        let transfer = conn.mode == Mode::Transfer;
        let (backup, theirs, source) = match ftvm_replication::backup::Backup::start(conn, &ours, &link, resyncs) {
            Ok(started) => started,
            Err(e @ ftvm_replication::Error::BadPeer { .. }) => {
                tracing::warn!(target: "ftvm::event", event = "bad_peer", error = %e, "{e}; waiting on for the primary");
                continue;
            }
            Err(e) => return Err(pair(e)),
        };
        // The old (diverged) link goes now that its successor is here.
        drop(diverged.take());
        let backup = std::sync::Arc::new(backup);
        let mut vm = vm;
        vm.set_sync_policy(sync_policy);
        let ran = run_with(
            vm,
            Journaling::Backup { backup: backup.clone(), theirs: Box::new(theirs), source, settings: settings.clone() },
        );
        let went_live = backup.state.won_arbiter.load(std::sync::atomic::Ordering::SeqCst);
        // A backup that halted (it could not win the arbiter) fenced itself off, whatever
        // its replay made of the source it stopped on purpose.
        if !went_live && backup.state.halted.load(std::sync::atomic::Ordering::SeqCst) {
            let why = ftvm_sync::lock(&backup.state.halt_reason).clone().unwrap_or_default();
            return Err(Error::Fenced(format!("{why}: halted (no second live copy)")));
        }
        let report = ran?;
        let Some(why) = divergence(&report, &backup, went_live) else { return Ok(report) };
        resyncs += 1;
        let why = why.replace('\n', "; ");
        tracing::warn!(
            target: "ftvm::event",
            event = "diverged",
            why = %why,
            resync = resyncs,
            after_transfer = transfer,
            "DIVERGED ({}): {why}; asking the primary for resync #{resyncs}",
            if transfer { "after a state transfer" } else { "from boot" }
        );
        backup.request_resync(&why);
        diverged = Some((backup, std::time::Instant::now()));
        if let Some(c) = &control {
            crate::control::attach_control(c.clone());
        }
    }
}

/// How long a state transfer's stream may stay silent (the primary copies its state live
/// between its header and its data) before its peer is refused.
const TRANSFER_STALL: std::time::Duration = std::time::Duration::from_secs(120);

/// An old link that diverged, and when its primary was last heard: a backup waiting for its
/// resync halts if that primary dies first.
type Diverged = Option<(std::sync::Arc<ftvm_replication::backup::Backup>, std::time::Instant)>;

/// Waits for the next primary's connection. Fails when the operator stops the backup, and
/// fences it off when the primary of a diverged link went silent meanwhile (its state is
/// wrong: it must not go live).
fn wait_for_primary(
    listener: &ftvm_replication::link::Listener,
    diverged: &mut Diverged,
    timeout: std::time::Duration,
) -> Result<ftvm_replication::link::Connection> {
    let mut give_up = || {
        // SIGTERM or SIGINT while waiting for a primary ends the backup.
        if crate::kick::stop_requested() {
            return true;
        }
        let Some((old, last_seen)) = diverged.as_mut() else { return false };
        let hb = &old.heartbeats;
        // A few datagrams at a time: a busy primary sends them without pause.
        for _ in 0..16 {
            match hb.recv() {
                Some(h) if h.role == ftvm_replication::protocol::Role::Primary => {
                    *last_seen = std::time::Instant::now();
                }
                Some(_) => {}
                None => break,
            }
        }
        last_seen.elapsed() > timeout
    };
    match listener.accept(&mut give_up).map_err(Error::Replication)? {
        Some(conn) => Ok(conn),
        None if crate::kick::stop_requested() => {
            Err(Error::Pair("stopped by the operator while waiting for a primary".into()))
        }
        None => Err(Error::Fenced(format!(
            "the primary went silent ({} ms) while this backup waited for its resync after a divergence; \
             halting: this backup's state is wrong and it does not go live",
            timeout.as_millis()
        ))),
    }
}

/// Why a backup's run diverged from its primary (to ask for a resync), if it did: its replay
/// disagreed before it went live, or the link rejected the stream.
fn divergence(report: &RunReport, backup: &ftvm_replication::backup::Backup, went_live: bool) -> Option<String> {
    match &report.outcome {
        VmOutcome::ReplayStopped(ftvm_events::ReplayStop::Diverged(d)) if !went_live => Some(d.to_string()),
        _ if backup.state.diverged.load(std::sync::atomic::Ordering::SeqCst) => {
            Some("the replication stream was rejected".into())
        }
        _ => None,
    }
}

/// A backup receives a live VM's state: checks the primary's VM against its own (refusing
/// with the differences), receives the staged snapshot into a directory of its own,
/// restores it into its disks and memory. Returns the restored VM and its header; `None`
/// when the peer failed before the pair formed (it closed, stalled, or sent what is not a
/// state transfer; said here): the backup refuses it and waits on.
fn receive_state(conn: &mut ftvm_replication::link::Connection, config: &VmConfig) -> Result<Option<(Vm, LogHeader)>> {
    let peer = conn.peer;
    let refuse = |why: String| {
        tracing::warn!(
            target: "ftvm::event",
            event = "bad_peer",
            peer = %peer,
            error = %why,
            "refused the peer {peer}: {why}; waiting on for the primary"
        );
        Ok(None)
    };
    let stall = ftvm_replication::link::PAIRING_STALL.as_secs();
    let theirs = match ftvm_replication::link::read_blob(&mut *conn.reader, 1 << 24) {
        Ok(b) => b,
        Err(e) if ftvm_replication::backup::is_timeout(&e) => {
            return refuse(format!("no transfer header within {stall} s"))
        }
        Err(e) => return refuse(format!("the transfer header: {e}")),
    };
    let theirs: LogHeader = match serde_json::from_slice(&theirs) {
        Ok(h) => h,
        Err(e) => return refuse(format!("the transfer header does not decode: {e}")),
    };
    // The disks' contents come with the state: only their sizes matter (hashing a large
    // image would keep the live side waiting for nothing).
    let kernel = image_info(&config.boot.kernel)?;
    let initrd = config.boot.initrd.as_deref().map(image_info).transpose()?;
    let disks = config
        .disks
        .iter()
        .map(|d| {
            let size = std::fs::metadata(&d.path)
                .map(|m| m.len())
                .map_err(io_err(format!("cannot read {}", d.path.display())))?;
            Ok(ImageInfo { path: d.path.display().to_string(), sha256: String::new(), size })
        })
        .collect::<Result<Vec<_>>>()?;
    let built = Vm::build_with(config.clone(), false)?;
    let ours = header_for(&built, kernel.clone(), initrd.clone(), disks.clone(), 0);
    drop(built);
    let differences = transfer_differences(&theirs, &ours);
    if !differences.is_empty() {
        let _ = ftvm_replication::link::answer(&mut conn.writer, Some(&differences.join("\n")));
        return refuse(format!(
            "its VM cannot continue here; it differs from this one in:\n  {}",
            differences.join("\n  ")
        ));
    }
    if let Err(e) = ftvm_replication::link::answer(&mut conn.writer, None) {
        return refuse(format!("answering it: {e}"));
    }
    // The primary copies its state live before it ships it: a longer silence than before.
    conn.set_read_timeout(Some(TRANSFER_STALL))?;
    let started = std::time::Instant::now();
    tracing::info!(
        target: "ftvm::event",
        event = "receiving_state",
        peer = %conn.peer,
        "receiving the state of the live VM from {}",
        conn.peer
    );
    let dir = std::env::temp_dir().join(format!("ftvm-incoming-{}-{}", std::process::id(), unique()));
    let _ = std::fs::remove_dir_all(&dir);
    let received = std::sync::atomic::AtomicU64::new(0);
    let got = ftvm_replication::transfer::receive_dir(&mut *conn.reader, &dir, &received);
    let restored = got.map_err(Error::Replication).and_then(|()| {
        let host =
            RestoreHost { console: config.console.clone(), nets: config.nets.clone(), disks: config.disks.clone() };
        Ok(crate::snapshot::restore_snapshot(Snapshot::open(&dir)?, &host, false)?)
    });
    let _ = std::fs::remove_dir_all(&dir);
    let vm = match restored {
        Ok(vm) => vm,
        Err(e) => return refuse(format!("its state transfer failed: {e}")),
    };
    let (bytes, ms) = (received.load(std::sync::atomic::Ordering::Relaxed), started.elapsed().as_millis() as u64);
    tracing::info!(
        target: "ftvm::event",
        event = "state_received",
        bytes,
        ms,
        "restored the primary's state ({} received) in {ms} ms; replaying its log since the cut",
        ftvm_api::format_bytes(bytes)
    );
    let ours = header_for(&vm, kernel, initrd, disks, theirs.rtc_base_unix);
    Ok(Some((vm, ours)))
}

fn unique() -> u64 {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// What keeps a live VM from continuing on this backup: a different machine (memory,
/// CPUID, kernel, ...), other network devices, or disks of another number or size (their
/// contents come with the state).
fn transfer_differences(theirs: &LogHeader, ours: &LogHeader) -> Vec<String> {
    let mut out = ftvm_replication::backup::vm_differences(theirs, ours, false);
    if theirs.disks.len() != ours.disks.len() {
        out.push(format!("the primary's VM has {} disk(s), this one {}", theirs.disks.len(), ours.disks.len()));
    } else {
        for (i, (t, o)) in theirs.disks.iter().zip(&ours.disks).enumerate() {
            if t.size != o.size {
                out.push(format!(
                    "disk {i}: the primary's is {} bytes, this backup's ({}) {} bytes",
                    t.size, o.path, o.size
                ));
            }
        }
    }
    out
}

type Images = (ImageInfo, Option<ImageInfo>, Vec<ImageInfo>);

/// The backup's VM for a pair formed at boot, and its header. The backup opens its TAPs only
/// when it goes live.
fn boot_vm(config: &VmConfig) -> Result<(Vm, LogHeader)> {
    let (kernel, initrd, disks) = images(config)?;
    let vm = Vm::build_with(config.clone(), false)?;
    let header = header_for(&vm, kernel, initrd, disks, 0);
    Ok((vm, header))
}

fn images(config: &VmConfig) -> Result<Images> {
    let kernel = image_info(&config.boot.kernel).map_err(|_| {
        Error::Machine(ftvm_machine::Error::KernelRead {
            path: config.boot.kernel.clone(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "cannot read it"),
        })
    })?;
    let initrd = config.boot.initrd.as_deref().map(image_info).transpose()?;
    let disks = config.disks.iter().map(|d| image_info(&d.path)).collect::<ftvm_machine::Result<Vec<_>>>()?;
    Ok((kernel, initrd, disks))
}

/// Runs a VM live and records it: `ftvm record`.
pub fn record(mut config: VmConfig, opts: &RecordOptions) -> Result<RecordReport> {
    let rtc = config.rtc_base_unix.unwrap_or_else(crate::vm::unix_now);
    config.rtc_base_unix = Some(rtc);
    let (kernel, initrd, bases) = images(&config)?;
    // The guest writes to copies beside the log; the base images stay untouched.
    let mut copies = Vec::new();
    for (i, disk) in config.disks.iter_mut().enumerate() {
        let copy = disk_copy_path(&opts.log, i);
        std::fs::copy(&disk.path, &copy).map_err(io_err(format!(
            "cannot copy disk {} to {} (the recording writes to a copy beside the log)",
            disk.path.display(),
            copy.display()
        )))?;
        disk.path = copy.clone();
        copies.push(copy);
    }
    let vm = Vm::build(config)?;
    let header = header_for(&vm, kernel, initrd, bases, rtc);
    record_vm(vm, header, opts, copies)
}

/// Header extras of a recording that starts from a snapshot: where the snapshot was and the
/// checksums that identify it (a replay restores the same snapshot first).
const SNAPSHOT_DIR: &str = "snapshot.dir";
const SNAPSHOT_STATE: &str = "snapshot.state_xxh3";
const SNAPSHOT_MEMORY: &str = "snapshot.memory_xxh3";

/// `ftvm record --restore DIR`: continues a VM from a snapshot and records it from there.
/// The disks are restored from the snapshot into the copies beside the log; the log's header
/// names the snapshot, whose disk copies are the recording's base images.
pub fn record_from_snapshot(dir: &Path, mut host: RestoreHost, opts: &RecordOptions) -> Result<RecordReport> {
    let snap = Snapshot::open(dir)?;
    let copies: Vec<PathBuf> = (0..snap.manifest.disks.len()).map(|i| disk_copy_path(&opts.log, i)).collect();
    host.disks = snap
        .manifest
        .disks
        .iter()
        .zip(&copies)
        .map(|(d, copy)| DiskConfig {
            path: if d.readonly { PathBuf::from(&d.source) } else { copy.clone() },
            readonly: d.readonly,
        })
        .collect();
    let bases = snapshot_bases(&snap)?;
    let manifest = snap.manifest.clone();
    let vm = crate::snapshot::restore_snapshot(snap, &host, true)?;
    let mut header =
        header_for(&vm, manifest.vm.kernel.clone(), manifest.vm.initrd.clone(), bases, manifest.vm.rtc_base_unix);
    header
        .extra
        .insert(SNAPSHOT_DIR.into(), std::fs::canonicalize(dir).unwrap_or_else(|_| dir.into()).display().to_string());
    header.extra.insert(SNAPSHOT_STATE.into(), manifest.state.xxh3.clone());
    header.extra.insert(SNAPSHOT_MEMORY.into(), manifest.memory.xxh3.clone());
    record_vm(vm, header, opts, copies)
}

/// The base images of a recording from a snapshot: the snapshot's disk copies (or, for a
/// read-only disk, the image itself), with their digests.
fn snapshot_bases(snap: &Snapshot) -> Result<Vec<ImageInfo>> {
    snap.manifest
        .disks
        .iter()
        .map(|d| match &d.copy {
            Some(c) => image_info(&snap.dir.join(&c.file)),
            None => image_info(Path::new(&d.source)),
        })
        .collect::<ftvm_machine::Result<_>>()
        .map_err(Error::from)
}

fn record_vm(mut vm: Vm, header: LogHeader, opts: &RecordOptions, copies: Vec<PathBuf>) -> Result<RecordReport> {
    vm.set_sync_policy(opts.sync_policy);
    let file = File::create(&opts.log).map_err(io_err(format!("cannot create the log {}", opts.log.display())))?;
    let sink: Box<dyn Write + Send> = Box::new(BackgroundFile::new(file)?);
    let mut writer = LogWriter::new(sink, &header).map_err(Error::RecordLog)?;
    if let Some(max) = opts.max_size {
        writer = writer.with_max_size(max);
    }
    let run = run_with(vm, Journaling::Record(writer))?;
    let log_bytes = std::fs::metadata(&opts.log).map(|m| m.len()).unwrap_or(0);
    Ok(RecordReport { run, log_bytes, disk_copies: copies })
}

/// A log file written by a thread of its own: the vCPU thread only hands over buffers, so a
/// large record (a sync point's pages) costs it a copy, not a trip through the page cache.
/// At most [`BackgroundFile::IN_FLIGHT`] buffers wait; beyond that a write waits for the
/// disk. A write error is kept and returned by the next write or flush; dropping the writer
/// waits until everything is on file.
struct BackgroundFile {
    buf: Vec<u8>,
    tx: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    failed: std::sync::Arc<std::sync::Mutex<Option<std::io::Error>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BackgroundFile {
    const CHUNK: usize = 1 << 20;
    const IN_FLIGHT: usize = 64;

    fn new(file: File) -> Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(Self::IN_FLIGHT);
        let failed = std::sync::Arc::new(std::sync::Mutex::new(None));
        let f = failed.clone();
        let thread = std::thread::Builder::new()
            .name("ftvm-log-write".into())
            .spawn(move || {
                ftvm_seccomp::enter(ftvm_seccomp::Thread::LogWrite);
                let mut file = file;
                let fail = |e| {
                    ftvm_sync::lock(&f).get_or_insert(e);
                };
                for chunk in rx.iter() {
                    if let Err(e) = file.write_all(&chunk) {
                        // Nothing more goes to the file after a failed write (a full disk):
                        // the log ends with at most one torn frame, which a reader tolerates,
                        // never with a gap a later write would leave behind it.
                        fail(e);
                        rx.iter().for_each(drop);
                        return;
                    }
                }
                if let Err(e) = file.sync_data() {
                    fail(e);
                }
            })
            .map_err(|source| Error::Spawn { thread: "log writer", source })?;
        Ok(BackgroundFile { buf: Vec::with_capacity(Self::CHUNK), tx: Some(tx), failed, thread: Some(thread) })
    }

    fn check(&self) -> std::io::Result<()> {
        match ftvm_sync::lock(&self.failed).as_ref() {
            Some(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
            None => Ok(()),
        }
    }

    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(Self::CHUNK));
        match &self.tx {
            Some(tx) => tx.send(chunk).map_err(|_| std::io::Error::other("the log writer thread is gone")),
            None => Ok(()),
        }
    }
}

impl Write for BackgroundFile {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.check()?;
        self.buf.extend_from_slice(b);
        if self.buf.len() >= Self::CHUNK {
            self.send()?;
        }
        Ok(b.len())
    }

    /// Hands what is buffered to the writer thread (the data reaches the file shortly).
    fn flush(&mut self) -> std::io::Result<()> {
        self.check()?;
        self.send()
    }
}

impl Drop for BackgroundFile {
    fn drop(&mut self) {
        let _ = self.send();
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Err(e) = self.check() {
            tracing::error!("writing the log failed: {e}");
        }
    }
}

/// Transmitted frames of a replay, written as a pcap file (classic format, Ethernet).
pub struct PcapSink {
    out: BufWriter<File>,
    count: u32,
}

impl PcapSink {
    pub fn create(path: &Path) -> Result<Self> {
        let file = File::create(path).map_err(io_err(format!("cannot create {}", path.display())))?;
        let mut out = BufWriter::new(file);
        let mut hdr = Vec::with_capacity(24);
        hdr.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
        hdr.extend_from_slice(&2u16.to_le_bytes());
        hdr.extend_from_slice(&4u16.to_le_bytes());
        hdr.extend_from_slice(&0i32.to_le_bytes());
        hdr.extend_from_slice(&0u32.to_le_bytes());
        hdr.extend_from_slice(&65535u32.to_le_bytes());
        hdr.extend_from_slice(&1u32.to_le_bytes()); // LINKTYPE_ETHERNET
        out.write_all(&hdr).map_err(io_err(format!("cannot write {}", path.display())))?;
        Ok(PcapSink { out, count: 0 })
    }
}

impl FrameSink for PcapSink {
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        // Replay has no wall clock worth recording: packets are numbered in the seconds field.
        self.count += 1;
        let len = frame.len() as u32;
        let mut rec = Vec::with_capacity(16 + frame.len());
        rec.extend_from_slice(&self.count.to_le_bytes());
        rec.extend_from_slice(&0u32.to_le_bytes());
        rec.extend_from_slice(&len.to_le_bytes());
        rec.extend_from_slice(&len.to_le_bytes());
        rec.extend_from_slice(frame);
        self.out.write_all(&rec)?;
        self.out.flush()
    }
}

/// Re-executes a recording from its log and checks it: `ftvm replay`.
pub fn replay(opts: &ReplayOptions) -> Result<ReplayReport> {
    let file = File::open(&opts.log).map_err(io_err(format!("cannot open the log {}", opts.log.display())))?;
    let reader: Box<dyn Read + Send> = Box::new(BufReader::with_capacity(1 << 16, file));
    let (log, header) =
        LogReader::open(reader).map_err(|source| Error::ReplayLog { path: opts.log.clone(), source })?;

    let (out_dir, temporary) = match &opts.output_dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(io_err(format!("cannot create {}", d.display())))?;
            (d.clone(), false)
        }
        None => {
            let d = std::env::temp_dir().join(format!("ftvm-replay-{}", std::process::id()));
            std::fs::create_dir_all(&d).map_err(io_err(format!("cannot create {}", d.display())))?;
            (d, true)
        }
    };
    let result = replay_in(opts, log, &header, &out_dir);
    if temporary {
        let _ = std::fs::remove_dir_all(&out_dir);
    }
    result
}

fn replay_in(
    opts: &ReplayOptions,
    log: LogReader<Box<dyn Read + Send>>,
    header: &LogHeader,
    out_dir: &Path,
) -> Result<ReplayReport> {
    if header.device_model_version != DEVICE_MODEL_VERSION {
        return Err(Error::Replay(format!(
            "the log was recorded with device model {}, this ftvm has device model {DEVICE_MODEL_VERSION}",
            header.device_model_version
        )));
    }
    if let Some(dir) = header.extra.get(SNAPSHOT_DIR) {
        let dir = opts.snapshot.clone().unwrap_or_else(|| PathBuf::from(dir));
        return replay_from_snapshot(opts, log, header, out_dir, &dir);
    }
    let kernel = check_image("kernel", &header.kernel, NamedBy::Log)?;
    let initrd = header.initrd.as_ref().map(|i| check_image("initrd", i, NamedBy::Log)).transpose()?;
    let mut disks = Vec::new();
    for (i, base) in header.disks.iter().enumerate() {
        let path = check_image(&format!("disk {i} base image"), base, NamedBy::Log)?;
        let copy = out_dir.join(format!("disk{i}.img"));
        std::fs::copy(&path, &copy).map_err(io_err(format!("cannot copy {} to {}", path.display(), copy.display())))?;
        disks.push(DiskConfig { path: copy, readonly: false });
    }
    let console = replay_console(opts, out_dir);
    let config = VmConfig {
        boot: BootSpec { kernel: kernel.clone(), initrd, cmdline: header.cmdline.clone() },
        mem_size: header.memory_size,
        console,
        rtc_base_unix: Some(header.rtc_base_unix),
        nets: header.net.iter().map(|n| NetConfig { tap: n.tap.clone(), mac: Some(MacAddr(n.mac.0)) }).collect(),
        disks: disks.clone(),
        rng: header.rng,
    };
    let vm = Vm::build_with(config, false)?;
    replay_vm(opts, vm, log, header, out_dir, disks)
}

/// Replays a recording that started from a snapshot: the snapshot is restored first (its
/// checksums must be the ones the log names), with its disks into the replay's copies.
fn replay_from_snapshot(
    opts: &ReplayOptions,
    log: LogReader<Box<dyn Read + Send>>,
    header: &LogHeader,
    out_dir: &Path,
    dir: &Path,
) -> Result<ReplayReport> {
    let snap = Snapshot::open(dir).map_err(|e| {
        Error::Replay(format!(
            "the recording starts from the snapshot {}: {e} (if it moved, say where with --snapshot DIR)",
            dir.display()
        ))
    })?;
    let named = |key: &str| header.extra.get(key).map(String::as_str).unwrap_or_default();
    if snap.manifest.state.xxh3 != named(SNAPSHOT_STATE) || snap.manifest.memory.xxh3 != named(SNAPSHOT_MEMORY) {
        return Err(Error::Replay(format!(
            "{} is not the snapshot the recording started from (its checksums differ from the log's)",
            dir.display()
        )));
    }
    let disks: Vec<DiskConfig> = snap
        .manifest
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| DiskConfig {
            path: if d.readonly { PathBuf::from(&d.source) } else { out_dir.join(format!("disk{i}.img")) },
            readonly: d.readonly,
        })
        .collect();
    let host = RestoreHost {
        console: replay_console(opts, out_dir),
        nets: header.net.iter().map(|n| NetConfig { tap: n.tap.clone(), mac: Some(MacAddr(n.mac.0)) }).collect(),
        disks: disks.clone(),
    };
    let vm = crate::snapshot::restore_snapshot(snap, &host, false)?;
    replay_vm(opts, vm, log, header, out_dir, disks)
}

fn replay_console(opts: &ReplayOptions, out_dir: &Path) -> ConsoleConfig {
    match &opts.output_dir {
        Some(_) => ConsoleConfig::File(out_dir.join("console.txt")),
        None => ConsoleConfig::Discard,
    }
}

/// Replays the log on a VM built for it, and compares the disks with the recording's.
fn replay_vm(
    opts: &ReplayOptions,
    vm: Vm,
    log: LogReader<Box<dyn Read + Send>>,
    header: &LogHeader,
    out_dir: &Path,
    disks: Vec<DiskConfig>,
) -> Result<ReplayReport> {
    // The machine must be the one recorded: same CPUID table, XSAVE, memory, command line.
    let mut ours =
        header_for(&vm, header.kernel.clone(), header.initrd.clone(), header.disks.clone(), header.rtc_base_unix);
    ours.extra = header.extra.clone();
    let differences: Vec<String> =
        header.compare(&ours).into_iter().filter(|m| m.significant).map(|m| m.to_string()).collect();
    // The console mode differs by design (the replay writes to a file or nowhere).
    let differences: Vec<String> = differences.into_iter().filter(|d| !d.starts_with("console")).collect();
    if !differences.is_empty() {
        return Err(Error::Replay(format!(
            "this machine cannot replay the log exactly; it differs in:\n  {}",
            differences.join("\n  ")
        )));
    }
    let mut net_sinks: Vec<Box<dyn FrameSink + Send>> = Vec::new();
    for i in 0..header.net.len() {
        if opts.output_dir.is_some() {
            net_sinks.push(Box::new(PcapSink::create(&out_dir.join(format!("net{i}.pcap")))?));
        } else {
            net_sinks.push(Box::new(crate::run::NullSink));
        }
    }
    let run = run_with(vm, Journaling::Replay { log, net_sinks })?;
    let mut disk_results = Vec::new();
    for (i, d) in disks.iter().enumerate() {
        let recorded = disk_copy_path(&opts.log, i);
        let same = if recorded.exists() { Some(sha256_file(&recorded)? == sha256_file(&d.path)?) } else { None };
        disk_results.push((d.path.clone(), same));
    }
    let replay_ok = matches!(
        run.outcome,
        VmOutcome::PowerOff
            | VmOutcome::Reset
            | VmOutcome::TripleFault(_)
            | VmOutcome::HaltedForever(_)
            | VmOutcome::ReplayReachedEnd(_)
    );
    let exact = replay_ok && disk_results.iter().all(|(_, s)| *s != Some(false));
    Ok(ReplayReport { run, disks: disk_results, exact })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ftvm-recording-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn disk_copies_sit_beside_the_log() {
        assert_eq!(disk_copy_path(Path::new("/tmp/x/run.log"), 0), PathBuf::from("/tmp/x/run.log.disk0"));
        assert_eq!(disk_copy_path(Path::new("run.log"), 2), PathBuf::from("run.log.disk2"));
    }

    #[test]
    fn the_default_size_limit_is_a_share_of_the_free_space_less_the_disk_copies() {
        let dir = scratch("limit");
        let (limit, free, at) = default_max_size(&dir.join("a.log"), 0).unwrap();
        assert_eq!(at, dir);
        assert!(free > 0 && limit <= free, "{limit} of {free}");
        assert_eq!(limit, (free as f64 * DEFAULT_LOG_SHARE) as u64);
        let (smaller, _, _) = default_max_size(&dir.join("a.log"), free / 2).unwrap();
        assert!(smaller < limit);
        // A bare file name is in the current directory; more than is free leaves nothing.
        assert_eq!(default_max_size(Path::new("a.log"), 0).unwrap().2, PathBuf::from("."));
        assert_eq!(default_max_size(&dir.join("a.log"), u64::MAX).unwrap().0, 0);
        assert!(default_max_size(Path::new("/nonexistent-ftvm/a.log"), 0).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_pcap_file_has_its_header_and_one_numbered_record_per_frame() {
        let dir = scratch("pcap");
        let path = dir.join("net0.pcap");
        let mut sink = PcapSink::create(&path).unwrap();
        sink.send(&[1, 2, 3]).unwrap();
        sink.send(&[0xaa; 60]).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 24 + (16 + 3) + (16 + 60));
        assert_eq!(&bytes[..4], &0xa1b2_c3d4u32.to_le_bytes());
        assert_eq!(&bytes[20..24], &1u32.to_le_bytes(), "LINKTYPE_ETHERNET");
        let rec = |at: usize, i: usize| u32::from_le_bytes(bytes[at + 4 * i..at + 4 * i + 4].try_into().unwrap());
        assert_eq!((rec(24, 0), rec(24, 2), rec(24, 3)), (1, 3, 3), "numbered from 1, lengths");
        assert_eq!(&bytes[40..43], &[1, 2, 3]);
        assert_eq!((rec(43, 0), rec(43, 2)), (2, 60));
        assert!(PcapSink::create(&dir.join("missing/net0.pcap")).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_state_transfer_names_every_disk_that_differs() {
        let disk = |size| ImageInfo { path: "d.img".into(), sha256: String::new(), size };
        let ours = LogHeader { disks: vec![disk(1 << 20)], ..LogHeader::default() };
        assert!(transfer_differences(&ours.clone(), &ours).is_empty());
        let bigger = LogHeader { disks: vec![disk(2 << 20)], ..LogHeader::default() };
        let d = transfer_differences(&bigger, &ours);
        assert_eq!(d, vec!["disk 0: the primary's is 2097152 bytes, this backup's (d.img) 1048576 bytes".to_string()]);
        let two = LogHeader { disks: vec![disk(1 << 20), disk(1)], ..LogHeader::default() };
        assert_eq!(transfer_differences(&two, &ours), vec!["the primary's VM has 2 disk(s), this one 1".to_string()]);
    }
}
