//! `ftvm`: the command-line front end. Thin by design: it parses arguments, builds a
//! configuration, and hands it to the VMM core.

mod config;
mod doctor;
mod list;
mod logging;
mod notify;

/// One of ftvm's own lines on standard error: `ftvm: ...` as text, or a JSON line with
/// `--log-format json` ([`logging::say`]).
macro_rules! say {
    ($($arg:tt)*) => { logging::say(format_args!($($arg)*)) };
}

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use ftvm_replication::arbiter::Peer;
use ftvm_vmm::boot::BootSpec;
use ftvm_vmm::vm::{DiskConfig, NetConfig};
use ftvm_vmm::{ConsoleConfig, VmConfig};

/// ftvm: a virtual machine monitor that keeps a VM running when its host dies.
#[derive(Parser, Debug)]
#[command(name = "ftvm", about, long_about = None)]
struct Cli {
    /// Log level for ftvm's own messages (error, warn, info, debug, trace); FTVM_LOG overrides.
    #[arg(long, global = true, default_value = "warn")]
    log_level: String,
    /// How ftvm's messages on standard error are written: human text, or one JSON object a
    /// line (timestamp, level, target, fields) for log shippers.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: logging::LogFormat,
    /// Per-thread seccomp filters: each thread may make only the system calls it needs, and
    /// any other stops ftvm with a line naming the thread and the call. `off` is for
    /// debugging (docs/operations.md).
    #[arg(long, global = true, value_enum, default_value = "on")]
    seccomp: Seccomp,
    #[command(subcommand)]
    command: Command,
}

/// `--seccomp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Seccomp {
    On,
    Off,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a kernel and run it until the guest powers off.
    ///
    /// virtio devices are virtio-mmio, version 2 (virtio 1.x), announced to the guest by
    /// appending `virtio_mmio.device=4K@<addr>:<irq>` to its command line, in the order
    /// nets (in the order given), disks (in the order given), rng: the first device at
    /// 0xd0000000, the next 0x1000 higher, and so on, with ISA IRQs 5, 6, 7, 9, 10, 11 in turn
    /// (at most six devices).
    ///
    /// SIGTERM asks the guest to shut down (--stop-timeout): a guest that powers off on it
    /// exits 0; SIGINT, or a second SIGTERM, stops at once.
    ///
    /// Exit status: 0 guest powered off, 1 ftvm error, 2 usage error, 3 guest requested a
    /// reset, 4 guest triple fault, 5 guest halted for good, 6 KVM could not run the guest,
    /// 130 stopped by SIGINT, 143 stopped by SIGTERM (docs/operations.md has the table).
    Run(RunArgs),
    /// Run a VM live and record every host input to a log that replays it exactly.
    ///
    /// Takes the same VM options as `run`. The guest's disks are copied beside the log
    /// (LOG.disk0, ...) and the guest writes to the copies: the original images are never
    /// written. Interrupts are delivered at exits only (the deterministic mode).
    ///
    /// Exit status: as for `run`, plus 7 when the recording stopped early: the log reached
    /// its size limit (--max-size, by default half the free space; it then ends with
    /// END(size limit)) or could not be written (a full disk: it ends with at most one torn
    /// frame). Either way it replays exactly up to there.
    Record(RecordArgs),
    /// Re-execute a recorded VM from its log and check that it does exactly what it did.
    ///
    /// Needs no TAP, no client and no network: every input comes from the log, every output
    /// and exit is checked against it. The disks are replayed on copies of the base images
    /// (verified against the digests in the log) and compared with the recording's final
    /// disks beside the log.
    ///
    /// Exit status: 0 the whole log replayed exactly, 1 error (missing or altered images,
    /// unreadable log, a machine that differs), 8 divergence (the report says where), 9 the
    /// log ends early (replayed exactly up to its end), 10 the log is damaged (replayed
    /// exactly up to the damage, whose offset is reported).
    Replay(ReplayArgs),
    /// Run a VM protected by a backup on another host: the fault-tolerant pair's primary.
    ///
    /// Streams the event log to the backup, which replays it a few milliseconds behind.
    /// Every output (console byte, network frame) is held until the backup has acknowledged
    /// the log up to it, then performed. The primary takes the arbiter lock at start; if the
    /// backup is lost it continues unprotected and says so.
    ///
    /// Exit status: as for `run`, plus 11 after a switchover (the backup is live: do not
    /// restart this side as a primary) and 12 when it halted because another copy may be
    /// live (it lost the arbiter: never restart it as it was).
    Primary(PrimaryArgs),
    /// Stand by for a primary and take over when it dies: the pair's backup.
    ///
    /// Takes its own VM options (its own disk copy and TAP, identical images). The pair
    /// forms only if the VMs agree (images, memory, CPUID, ...); what differs is reported.
    /// When the primary's heartbeats stop for --timeout, the backup wins the arbiter, replays
    /// everything it received, performs the outputs OUTPUT_DONE did not cover, opens its TAP,
    /// sends a gratuitous ARP and goes on live. If it cannot win the arbiter it halts.
    ///
    /// Exit status: as for `run`, plus 12 when it halted (it could not win or lost the
    /// arbiter, or it was diverged when its primary died: never restart it as it was).
    Backup(BackupArgs),
    /// Work with event logs.
    #[command(subcommand)]
    Log(LogCommand),
    /// Talk to a running VM through its control API socket (`--api-socket PATH`).
    ///
    /// The API is HTTP/1.1 with JSON bodies on a Unix socket (docs/api.md); `ctl` is its
    /// command-line client.
    ///
    /// Exit status: 0 done, 1 error (no VM answers on PATH, or the VM refused the request:
    /// the message says why), 2 usage error.
    Ctl(CtlArgs),
    /// Check this host before starting a VM or one side of a pair: KVM, the images and disks,
    /// /dev/net/tun and the TAPs, the key file and its permissions, the arbiter, and the peer
    /// (the backup reachable, or the listen address free).
    ///
    /// Takes the options the VM will be started with (`--config FILE` too). Each line says what
    /// it checked, what it found and what to do.
    ///
    /// Exit status: 0 every check passed, 1 a check failed or warned, 2 usage error.
    #[command(subcommand)]
    Doctor(DoctorCommand),
    /// List the VMs running on this host: those whose API socket is in ftvm's runtime
    /// directory (where `--id NAME` puts it: /run/ftvm for root, else $XDG_RUNTIME_DIR/ftvm),
    /// and in each DIR given, with their role, state and protection.
    List {
        /// More directories to look for API sockets in.
        #[arg(value_name = "DIR")]
        dirs: Vec<PathBuf>,
        /// Print JSON (each VM's name, socket and status) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script, e.g. `ftvm completions bash > /etc/bash_completion.d/ftvm`.
    Completions {
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (ftvm.1, ftvm-run.1, ...) into DIR (`cargo xtask man` runs it).
    #[command(hide = true)]
    Manpages {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum DoctorCommand {
    /// Check what `ftvm run` with these options needs.
    Run(RunArgs),
    /// Check what `ftvm record` with these options needs.
    Record(RecordArgs),
    /// Check what `ftvm primary` with these options needs.
    Primary(PrimaryArgs),
    /// Check what `ftvm backup` with these options needs.
    Backup(BackupArgs),
}

#[derive(clap::Args, Debug)]
struct CtlArgs {
    /// The VM's API socket (what it was started with as --api-socket).
    #[arg(value_name = "PATH")]
    socket: PathBuf,
    #[command(subcommand)]
    action: CtlAction,
}

#[derive(Subcommand, Debug)]
enum CtlAction {
    /// Show the VM's state, role, uptime, exits and, for a pair, the replication figures.
    Status {
        /// Print the JSON the VM answers instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Pause the guest: the vCPU stops between exits (the guest clock keeps following the
    /// host's in a plain run; the guest sees a stall).
    Pause,
    /// Resume a paused guest (an error if it is not paused).
    Resume,
    /// Follow the pair's events (paired, protected, takeover, halt, ...): one JSON object a
    /// line on standard output, the recent ones first, until the VM ends (docs/api.md).
    Events,
    /// Hand over on purpose: a protected primary stops at an exit, lets the backup catch up
    /// and acknowledge every output, tells it, and exits; the backup goes live at once.
    Switchover,
    /// Ask the guest to shut down, as SIGTERM does: Ctrl+Alt+Del on its i8042 (logged), and a
    /// stop at once if it has not powered off within --stop-timeout; the second time, a stop at
    /// once.
    Shutdown,
    /// Snapshot the VM into DIR (new or empty) while it runs: memory and disks are copied
    /// live, and the guest pauses only for the last dirty pages and the vCPU and device
    /// state. Shows the progress; `ftvm run --restore DIR` continues from it.
    Snapshot {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
        /// Print the final progress report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Bring a live VM (a primary without a backup, or a backup that took over) back under
    /// protection: a new backup, started with `ftvm backup --listen ADDR` and the same VM
    /// options, gets the VM's state by a live transfer while the VM keeps serving (memory
    /// pre-copied with dirty logging, the disks through their dirty-block maps, a short pause
    /// for the last pages and the vCPU and device state), then the log from that point. Its
    /// disk image is overwritten with the primary's. Shows the progress until the backup has
    /// caught up.
    Protect {
        #[arg(value_name = "HOST:PORT", value_parser = parse_host_port)]
        backup: std::net::SocketAddr,
        /// Print the final progress report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args, Debug)]
#[command(next_help_heading = "Pair")]
struct PairArgs {
    /// The arbiter that makes sure only one side is live: a lock file both sides reach (one
    /// host or a shared filesystem; it detects process death), or an etcd lease,
    /// `etcd://HOST:PORT/KEY[?ttl=SECONDS]` (multi-host; a side performs outputs only while
    /// its lease is valid and halts when it loses it; a failover waits for the lease to expire;
    /// `etcds://` for TLS, `H1:P1,H2:P2` for several members, `&ca=&cert=&key=` PEM files,
    /// `&user=NAME&password-file=PATH`: docs/operations.md; without a KEY, `ftvm/ID` of --id).
    /// Default, for a pair on one host only: the lock file ID.lock (--id; `default.lock`
    /// without one) in /run/ftvm (root) or $XDG_RUNTIME_DIR/ftvm, which only ftvm's user can
    /// open. A peer on another host needs etcd, or a lock file with --shared-lock.
    #[arg(long, value_name = "PATH|etcd://HOST:PORT[/KEY]")]
    arbiter: Option<ftvm_replication::arbiter::ArbiterSpec>,
    /// The lock file of --arbiter is on storage both hosts share (NFS, a cluster filesystem):
    /// accept it for a peer on another host.
    #[arg(long, requires = "arbiter")]
    shared_lock: bool,
    /// The pre-shared key of the replication channel (a Noise handshake; every frame and
    /// heartbeat encrypted and authenticated with AES-256-GCM, with sequence numbers): a file
    /// of 32+ hex digits or 16+ raw bytes, the same on both sides
    /// (`openssl rand -hex 32 > key; chmod 600 key`). Needed unless --insecure.
    #[arg(long, value_name = "PATH")]
    key_file: Option<PathBuf>,
    /// Run the pair without a key: the link is still encrypted against a host that only
    /// watches it, but anyone who can reach it can speak for the primary or the backup.
    #[arg(long, conflicts_with = "key_file")]
    insecure: bool,
    /// Milliseconds the backup's replay may lag behind before the primary slows its vCPU
    /// down (as VMware FT does), which bounds the failover time; 0: no bound.
    #[arg(long, value_name = "MS", default_value_t = 500)]
    max_lag: u64,
    /// Milliseconds without a heartbeat after which the peer is taken for dead (heartbeats
    /// go every 50 ms). 300 lets a backup go live before a client's TCP retransmits a
    /// request lost with the primary for the second time (200 and 400 ms after it was sent).
    #[arg(long, value_name = "MS", default_value_t = ftvm_replication::DEFAULT_TIMEOUT.as_millis() as u64,
          value_parser = parse_timeout)]
    timeout: u64,
}

/// `HOST:PORT` with HOST an address or a name (resolved now; its first address is taken, an
/// IPv4 one if it has one, as the pair's sockets are of that family).
fn parse_host_port(s: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    if !s.contains(':') {
        return Err(format!("{s:?} has no port: give HOST:PORT, e.g. 10.0.0.2:7000 or backup-host:7000"));
    }
    let addrs: Vec<_> = s.to_socket_addrs().map_err(|e| format!("cannot resolve {s:?}: {e}"))?.collect();
    addrs.iter().find(|a| a.is_ipv4()).or(addrs.first()).copied().ok_or_else(|| format!("{s:?} resolves to no address"))
}

/// A peer timeout: at least three heartbeat intervals, or one late datagram breaks the pair.
fn parse_timeout(s: &str) -> Result<u64, String> {
    let ms: u64 = s.parse().map_err(|_| format!("{s:?} is not a number of milliseconds"))?;
    let floor = 3 * ftvm_replication::HEARTBEAT_INTERVAL.as_millis() as u64;
    if ms < floor {
        return Err(format!(
            "{ms} ms is too short: heartbeats go every {} ms, so the timeout must be at least {floor} ms",
            ftvm_replication::HEARTBEAT_INTERVAL.as_millis()
        ));
    }
    Ok(ms)
}

#[derive(clap::Args, Debug)]
struct PrimaryArgs {
    /// The backup's address (it listens with `ftvm backup --listen`). One that is neither a
    /// loopback address nor one of this host's needs an --arbiter both hosts see.
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_host_port, help_heading = "Pair")]
    backup: std::net::SocketAddr,
    #[command(flatten)]
    pair: PairArgs,
    #[command(flatten)]
    sync: SyncArgs,
    #[command(flatten)]
    vm: RunArgs,
}

#[derive(clap::Args, Debug)]
struct BackupArgs {
    /// Where to wait for the primary (TCP for the log, UDP for heartbeats, same port). Other
    /// than a loopback address, the primary may be on another host: give an --arbiter both
    /// hosts see.
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_host_port, help_heading = "Pair")]
    listen: std::net::SocketAddr,
    #[command(flatten)]
    pair: PairArgs,
    #[command(flatten)]
    sync: SyncArgs,
    #[command(flatten)]
    vm: RunArgs,
}

#[derive(Subcommand, Debug)]
enum LogCommand {
    /// Summarize a log: header, duration, exits and events by kind, outputs, end.
    ///
    /// Exit status: 0 a complete log, 9 a log that ends early, 1 an unreadable log.
    Inspect {
        /// The log file.
        path: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// List every event.
        #[arg(long)]
        events: bool,
    },
}

#[derive(clap::Args, Debug)]
struct RecordArgs {
    /// The log file to write.
    #[arg(long, value_name = "PATH")]
    log: PathBuf,
    /// Stop recording when the log reaches this size (e.g. 100M, 2G); it then ends cleanly
    /// with END(size limit). Default: half of the free space of the log's file system
    /// (less the disk copies made beside it), said at start.
    #[arg(long, value_name = "SIZE", value_parser = ftvm_api::parse_byte_size)]
    max_size: Option<u64>,
    #[command(flatten)]
    sync: SyncArgs,
    #[command(flatten)]
    vm: RunArgs,
}

#[derive(clap::Args, Debug)]
#[command(next_help_heading = "Recording")]
struct SyncArgs {
    /// Milliseconds an interrupt or received frame may wait for the guest to exit before the
    /// recorder kicks the vCPU and logs a sync point to deliver it (the state that replay
    /// applies instead of re-executing the exit-free stretch); 0 turns sync points off, and
    /// events then wait for the next exit.
    #[arg(long, value_name = "MS", default_value_t = 10)]
    sync_bound: u64,
    /// The share of the guest's time sync points may take, in percent: after a sync point
    /// that cost the guest X (the recorder's work, and the write faults on the pages it
    /// protected again), the next waits at least X (100 - P) / P, so interrupts arrive
    /// later rather than a guest that writes much memory stalling.
    #[arg(long, value_name = "PERCENT", default_value = "5", value_parser = parse_percent)]
    sync_budget: f64,
}

/// `10` or `10%` -> 0.10; the share must be in (0, 100].
fn parse_percent(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim_end_matches('%').parse().map_err(|_| format!("{s:?} is not a percentage (e.g. 10)"))?;
    if v > 0.0 && v <= 100.0 {
        Ok(v / 100.0)
    } else {
        Err(format!("{s} is outside (0, 100]"))
    }
}

impl PairArgs {
    /// The arbiter: --arbiter, or the VM's default lock file when the peer is on this host.
    fn arbiter(&self, vm: &RunArgs, peer: Peer) -> Result<ftvm_replication::arbiter::ArbiterSpec, String> {
        ftvm_replication::arbiter::choose(self.arbiter.as_ref(), self.shared_lock, vm.id.as_deref(), peer)
            .map_err(|e| e.to_string())
    }

    /// The channel's key; without --key-file only with --insecure, said loudly.
    fn key(&self) -> Result<ftvm_replication::secure::Key, String> {
        let key = ftvm_replication::secure::Key::for_pair(self.key_file.as_deref(), self.insecure)
            .map_err(|e| e.to_string())?;
        if self.insecure {
            say!(
                "WARNING: --insecure: the replication channel has no key; anyone who can reach it can \
                 impersonate either side"
            );
        }
        Ok(key)
    }

    fn max_lag(&self) -> Option<std::time::Duration> {
        (self.max_lag > 0).then(|| std::time::Duration::from_millis(self.max_lag))
    }
}

impl SyncArgs {
    fn policy(&self) -> Option<ftvm_vmm::syncpoint::SyncPolicy> {
        let bound = std::time::Duration::from_millis(self.sync_bound);
        // Both values were checked by their parsers; 0 ms turns sync points off.
        ftvm_vmm::syncpoint::SyncPolicy::new(bound, self.sync_budget).ok()
    }
}

#[derive(clap::Args, Debug)]
struct ReplayArgs {
    /// The log to replay.
    path: PathBuf,
    /// Write the replay's console output (console.txt), transmitted frames (net0.pcap, ...)
    /// and disks (disk0.img, ...) here.
    #[arg(long, value_name = "DIR")]
    output_dir: Option<PathBuf>,
    /// For a recording made with `record --restore`: the snapshot it started from, if it is
    /// no longer where the log says (it must be the same snapshot: its checksums are checked).
    #[arg(long, value_name = "DIR")]
    snapshot: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
#[command(next_help_heading = "VM")]
struct RunArgs {
    /// Kernel image: a PVH ELF kernel (such as the guest kit's) or a Linux bzImage.
    #[arg(long, value_name = "PATH", required_unless_present = "restore")]
    kernel: Option<PathBuf>,
    /// Continue a VM from a snapshot (`ftvm ctl PATH snapshot DIR`) instead of booting
    /// (run and record): the kernel, command line, memory and devices are the snapshot's; the
    /// disks are put back from the snapshot's copies, into the images the VM ran on or the
    /// --disk paths given (one per disk, in order); --net names other TAPs.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "initrd", "cmdline", "mem", "rtc_base", "rng"])]
    restore: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = "")]
    cmdline: String,
    /// Initial ramdisk (a PVH module, or the bzImage initrd).
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Guest memory: a number of MiB, or with a unit (512K, 256M, 1G).
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = ftvm_api::parse_mem_size)]
    mem: u64,
    /// Where the serial console goes: `stdio` (output to stdout, input from stdin) or
    /// `file:PATH` (output to PATH, no input).
    #[arg(long, value_name = "stdio|file:PATH", default_value = "stdio", value_parser = parse_console)]
    console: ConsoleConfig,
    /// The wall-clock time the guest's RTC shows at boot, in seconds since 1970 (default: now).
    #[arg(long, value_name = "SECONDS")]
    rtc_base: Option<u64>,
    /// A virtio-net device attached to the existing TAP interface NAME (ftvm does not
    /// create it). MAC default: 52:54:00:12:34:56, the last byte plus the device's index.
    /// Repeatable.
    #[arg(long = "net", value_name = "tap=NAME[,mac=MAC]", value_parser = parse_net)]
    nets: Vec<NetConfig>,
    /// A virtio-blk device backed by a raw disk image; `,readonly` attaches it read-only
    /// (needed for an image ftvm may not write). Repeatable.
    #[arg(long = "disk", value_name = "PATH[,readonly]", value_parser = parse_disk)]
    disks: Vec<DiskConfig>,
    /// A virtio-rng device (entropy from the host, through the event source).
    #[arg(long)]
    rng: bool,
    /// Read options from this TOML file (docs/operations.md): its keys are the long options'
    /// names, its top level is for every command and `[run]`, `[record]`, `[primary]` and
    /// `[backup]` for one; an option given on the command line overrides the file's.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Serve the control API (HTTP with JSON bodies) on this Unix socket; `ftvm ctl PATH`
    /// talks to it. A stale socket file is replaced; one a live VM answers on is refused.
    /// Default with --id: ID.sock (run, record), ID.primary.sock or ID.backup.sock in ftvm's
    /// runtime directory (/run/ftvm for root, $XDG_RUNTIME_DIR/ftvm else).
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Serve `GET /metrics` (the Prometheus text format; the API socket serves it too) on
    /// this TCP address as well, e.g. 127.0.0.1:9464. An address in use is an error.
    #[arg(long, value_name = "HOST:PORT")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// The VM's identity (1-64 letters, digits, '.', '_', '-'): names its default API socket
    /// and, for a pair, its default lock file, so that two VMs on one host never share them,
    /// and starts its lines (`ftvm[NAME]: ...`); `ftvm list` shows it.
    #[arg(long, value_name = "NAME", value_parser = parse_id)]
    id: Option<String>,
    /// A graceful stop's grace period (run, record, primary): SIGTERM or `ftvm ctl PATH
    /// shutdown` asks the guest to shut down (Ctrl+Alt+Del on its i8042, logged), and a guest
    /// that has not powered off after this many seconds is stopped at once, as before (status
    /// 143). 0: SIGTERM stops at once. A second SIGTERM, or SIGINT, stops at once. A backup
    /// always stops at once (its guest is the primary's).
    #[arg(long, value_name = "SECONDS", default_value_t = DEFAULT_STOP_TIMEOUT_S)]
    stop_timeout: u64,
}

/// `--stop-timeout`'s default: below the shipped units' TimeoutStopSec (45 s), so that ftvm,
/// not systemd's SIGKILL, ends a guest that ignores the request (tests/ops.rs checks it).
pub const DEFAULT_STOP_TIMEOUT_S: u64 = 30;

fn parse_id(s: &str) -> Result<String, String> {
    ftvm_replication::arbiter::check_id(s).map(|()| s.to_string())
}

/// The API socket: the one given, or with --id the one it derives (`ID.sock`, or
/// `ID.ROLE.sock` for a side of a pair, in ftvm's runtime directory).
fn api_socket_of(vm: &RunArgs, role: Option<&str>) -> Result<Option<PathBuf>, String> {
    match (&vm.api_socket, &vm.id) {
        (Some(path), _) => Ok(Some(path.clone())),
        (None, None) => Ok(None),
        (None, Some(id)) => {
            let dir = ftvm_replication::arbiter::runtime_dir().map_err(|e| e.to_string())?;
            Ok(Some(dir.join(match role {
                Some(role) => format!("{id}.{role}.sock"),
                None => format!("{id}.sock"),
            })))
        }
    }
}

fn parse_net(s: &str) -> Result<NetConfig, String> {
    s.parse().map_err(option_error)
}

fn parse_disk(s: &str) -> Result<DiskConfig, String> {
    s.parse().map_err(option_error)
}

/// clap already names the option and the value; keep only the reason.
fn option_error(e: ftvm_machine::Error) -> String {
    match e {
        ftvm_machine::Error::DeviceOption { why, .. } => why,
        other => other.to_string(),
    }
}

fn parse_console(s: &str) -> Result<ConsoleConfig, String> {
    match s {
        "stdio" => Ok(ConsoleConfig::Stdio),
        _ => match s.strip_prefix("file:") {
            Some("") => Err("file: needs a path, e.g. file:/tmp/console.log".into()),
            Some(path) => Ok(ConsoleConfig::File(path.into())),
            None => Err(format!("unknown console {s:?}; use stdio or file:PATH")),
        },
    }
}

fn version_text() -> String {
    format!("{} ({})", env!("CARGO_PKG_VERSION"), ftvm_vmm::kvm::describe())
}

fn main() -> ExitCode {
    let command = Cli::command().version(version_text());
    let args = match config::expand(std::env::args_os().collect(), &command) {
        Ok(args) => args,
        Err(e) => return usage_error(&e.to_string()),
    };
    let cli = match Cli::from_arg_matches(&command.get_matches_from(args)) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    if let Command::Run(vm)
    | Command::Record(RecordArgs { vm, .. })
    | Command::Primary(PrimaryArgs { vm, .. })
    | Command::Backup(BackupArgs { vm, .. }) = &cli.command
    {
        if let Some(id) = &vm.id {
            logging::set_id(id);
        }
    }
    if let Err(e) = logging::init(&cli.log_level, cli.log_format) {
        say!("error: {e}");
        return ftvm_exit::ExitStatus::Usage.into();
    }
    install_stop_handler();
    if let Err(e) = ftvm_seccomp::init(cli.seccomp == Seccomp::On) {
        say!("error: {e}");
        return ExitCode::from(1);
    }
    // The control API serves the VM of run, record, primary and backup until ftvm exits: on
    // its socket (given, or derived from --id), on the metrics address, and to systemd.
    let served = match &cli.command {
        Command::Run(vm) => Some((vm, None, ftvm_api::Role::Standalone)),
        Command::Record(RecordArgs { vm, .. }) => Some((vm, None, ftvm_api::Role::Recording)),
        Command::Primary(PrimaryArgs { vm, .. }) => Some((vm, Some("primary"), ftvm_api::Role::Primary)),
        Command::Backup(BackupArgs { vm, .. }) => Some((vm, Some("backup"), ftvm_api::Role::Backup)),
        _ => None,
    };
    let served = served.map(|(vm, side, role)| {
        let socket = api_socket_of(vm, side)?;
        start_api(vm, socket.as_deref(), role).map_err(|e| e.to_string())
    });
    let served = match served.transpose() {
        Ok(served) => served,
        Err(e) => {
            say!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let _served = served.flatten();
    if let Command::Primary(PrimaryArgs { vm, .. }) | Command::Backup(BackupArgs { vm, .. }) = &cli.command {
        if vm.restore.is_some() {
            say!("error: --restore is for run and record; the pair boots both sides from the same images");
            return ExitCode::from(2);
        }
    }
    // A graceful stop for the sessions that run their guest; a backup (and a replay) stops at once.
    if let Command::Run(vm) | Command::Record(RecordArgs { vm, .. }) | Command::Primary(PrimaryArgs { vm, .. }) =
        &cli.command
    {
        ftvm_vmm::kick::set_stop_timeout(Some(std::time::Duration::from_secs(vm.stop_timeout)));
    }
    match cli.command {
        Command::Ctl(args) => ctl(args),
        Command::Doctor(side) => doctor(side),
        Command::List { dirs, json } => match list::run(&dirs, json) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                say!("error: {e}");
                ExitCode::from(1)
            }
        },
        Command::Completions { shell } => {
            // Written whole: a reader that closes early (`| head`) is not an error to report.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "ftvm", &mut script);
            use std::io::Write;
            match std::io::stdout().write_all(&script) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
                Err(e) => {
                    say!("error: writing the completion script: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Manpages { dir } => match manpages(&dir) {
            Ok(n) => {
                println!("wrote {n} man pages to {}", dir.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                say!("error: writing the man pages to {}: {e}", dir.display());
                ExitCode::from(1)
            }
        },
        Command::Run(args) => run(args),
        Command::Record(args) => record(args),
        Command::Replay(args) => replay(args),
        Command::Log(LogCommand::Inspect { path, json, events }) => inspect(&path, json, events),
        Command::Primary(args) => {
            // The one given, or a safe default: a peer on another host needs an arbiter both see.
            let arbiter = match args.pair.arbiter(&args.vm, Peer::Backup(args.backup)) {
                Ok(a) => a,
                Err(e) => return usage_error(&e),
            };
            let key = match args.pair.key() {
                Ok(k) => k,
                Err(e) => return usage_error(&e),
            };
            let link = ftvm_replication::primary::PrimaryConfig {
                backup: args.backup,
                arbiter,
                timeout: std::time::Duration::from_millis(args.pair.timeout),
                connect_wait: std::time::Duration::from_secs(60),
                key,
                max_lag: args.pair.max_lag(),
            };
            finish(ftvm_vmm::recording::primary(vm_config(args.vm), link, args.sync.policy()))
        }
        Command::Backup(args) => {
            let arbiter = match args.pair.arbiter(&args.vm, Peer::Listen(args.listen)) {
                Ok(a) => a,
                Err(e) => return usage_error(&e),
            };
            let key = match args.pair.key() {
                Ok(k) => k,
                Err(e) => return usage_error(&e),
            };
            let link = ftvm_replication::backup::BackupConfig {
                listen: args.listen,
                arbiter,
                timeout: std::time::Duration::from_millis(args.pair.timeout),
                key,
            };
            let (max_lag, sync) = (args.pair.max_lag(), args.sync.policy());
            finish(ftvm_vmm::recording::backup(vm_config(args.vm), link, max_lag, sync))
        }
    }
}

/// ftvm.1 and one page a command (ftvm-run.1, ftvm-ctl-status.1, ...), from the clap definitions.
fn manpages(dir: &std::path::Path) -> std::io::Result<usize> {
    fn write(cmd: &clap::Command, name: &str, dir: &std::path::Path, count: &mut usize) -> std::io::Result<()> {
        let cmd = cmd.clone().name(name.to_string());
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd.clone()).render(&mut page)?;
        std::fs::write(dir.join(format!("{name}.1")), page)?;
        *count += 1;
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
            write(sub, &format!("{name}-{}", sub.get_name()), dir, count)?;
        }
        Ok(())
    }
    std::fs::create_dir_all(dir)?;
    let mut count = 0;
    let mut root = Cli::command().version(version_text());
    root.build();
    write(&root, "ftvm", dir, &mut count)?;
    Ok(count)
}

fn doctor(side: DoctorCommand) -> ExitCode {
    let (vm, pair) = match side {
        DoctorCommand::Run(vm) | DoctorCommand::Record(RecordArgs { vm, .. }) => (vm, None),
        DoctorCommand::Primary(args) => (args.vm, Some((Peer::Backup(args.backup), args.pair))),
        DoctorCommand::Backup(args) => (args.vm, Some((Peer::Listen(args.listen), args.pair))),
    };
    let paths = (vm.kernel.clone(), vm.initrd.clone(), vm.disks.clone(), vm.nets.clone());
    let pair = pair.map(|(peer, p)| {
        let arbiter = p.arbiter(&vm, peer);
        // The primary compares its VM with the backup's, as pairing would, once it reaches it.
        let probe: Option<doctor::Probe> = match (peer, &arbiter) {
            (Peer::Backup(backup), Ok(spec)) => {
                ftvm_replication::secure::Key::for_pair(p.key_file.as_deref(), p.insecure).ok().map(|key| {
                    let link = ftvm_replication::primary::PrimaryConfig {
                        backup,
                        arbiter: spec.clone(),
                        timeout: std::time::Duration::from_millis(p.timeout),
                        connect_wait: std::time::Duration::ZERO,
                        key,
                        max_lag: None,
                    };
                    let config = vm_config(vm);
                    Box::new(move || ftvm_vmm::recording::probe_backup(config, &link).map_err(|e| e.to_string()))
                        as doctor::Probe
                })
            }
            _ => None,
        };
        doctor::PairPlan { arbiter, peer, key_file: p.key_file, insecure: p.insecure, probe }
    });
    let (kernel, initrd, disks, nets) = paths;
    let plan = doctor::Plan { kernel, initrd, disks, nets, pair };
    if doctor::run(plan) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn usage_error(message: &str) -> ExitCode {
    say!("error: {message}");
    ExitCode::from(2)
}

/// What serves the VM's figures while it runs: the API socket, the metrics address and the
/// systemd notifier (each only where asked for). Dropped when ftvm exits.
struct Served {
    _api: Option<ftvm_api::ApiServer>,
    _metrics: Option<ftvm_api::MetricsServer>,
    _notifier: Option<notify::Notifier>,
}

/// Starts the API server on `--api-socket`, the metrics listener on `--metrics-addr` and the
/// systemd notifier (under a `Type=notify` unit), and connects them to the VM this process
/// will run; `None` when none of them is wanted.
fn start_api(
    vm: &RunArgs,
    socket: Option<&std::path::Path>,
    role: ftvm_api::Role,
) -> Result<Option<Served>, ftvm_api::ServerError> {
    let notify = notify::wanted();
    if socket.is_none() && vm.metrics_addr.is_none() && !notify {
        return Ok(None);
    }
    let control = ftvm_api::VmControl::new();
    control.set_role(role);
    control.set_shutdown_hook(Box::new(request_shutdown));
    let api = socket.map(|path| ftvm_api::ApiServer::start(path, control.clone())).transpose()?;
    let metrics = vm.metrics_addr.map(|addr| ftvm_api::MetricsServer::start(addr, control.clone())).transpose()?;
    if let Some(m) = &metrics {
        say!("serving GET /metrics on http://{}/metrics", m.addr());
    }
    let notifier = notify.then(|| notify::Notifier::start(control.clone()));
    ftvm_vmm::control::attach_control(control);
    Ok(Some(Served { _api: api, _metrics: metrics, _notifier: notifier }))
}

/// `ftvm ctl PATH ...`: one request to a running VM.
fn ctl(args: CtlArgs) -> ExitCode {
    use ftvm_api::client;
    let path = args.socket.as_path();
    let result = match args.action {
        // Pretty-printed in the server's field order; verbatim if this ctl does not know it.
        CtlAction::Status { json: true } => {
            client::status_body(path).map(|body| match serde_json::from_str::<ftvm_api::Status>(&body) {
                Ok(s) => println!("{}", serde_json::to_string_pretty(&s).unwrap_or(body)),
                Err(_) => println!("{body}"),
            })
        }
        CtlAction::Status { json: false } => client::status(path).map(|s| print!("{}", s.to_text())),
        CtlAction::Switchover => client::switchover(path).map(|state| println!("{state}")),
        CtlAction::Shutdown => client::shutdown(path).map(|state| println!("{state}")),
        CtlAction::Pause => client::pause(path).map(|state| match state.as_str() {
            "paused" => println!("paused"),
            other => println!("{other}: the vCPU has not reached a pause point yet; it parks at its next exit"),
        }),
        CtlAction::Resume => client::resume(path).map(|state| println!("{state}")),
        CtlAction::Events => client::follow_events(path, |line| {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            // A closed standard output (the reader went away) ends the following.
            writeln!(out, "{line}").and_then(|()| out.flush()).is_ok()
        }),
        CtlAction::Snapshot { dir, json } => return snapshot(path, &dir, json),
        CtlAction::Protect { backup, json } => return protect(path, backup, json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// `ftvm ctl PATH protect ADDR`: starts the re-protection, follows its progress, reports.
fn protect(path: &std::path::Path, backup: std::net::SocketAddr, json: bool) -> ExitCode {
    use ftvm_api::client;
    if let Err(e) = client::start_protect(path, backup) {
        say!("error: {e}");
        return ExitCode::from(1);
    }
    let mut shown = String::new();
    loop {
        let progress = match client::protect_progress(path) {
            Ok(p) => p,
            Err(e) => {
                say!("error: lost the VM during the re-protection: {e}");
                return ExitCode::from(1);
            }
        };
        if progress.phase.is_over() {
            if json {
                println!("{}", serde_json::to_string_pretty(&progress).unwrap_or_default());
            } else {
                println!("{progress}");
            }
            return if progress.phase == ftvm_api::ProtectPhase::Protected {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            };
        }
        let line = progress.to_string();
        if line != shown && !json {
            eprintln!("{line}");
            shown = line;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// `ftvm ctl PATH snapshot DIR`: starts the snapshot, follows its progress, reports.
fn snapshot(path: &std::path::Path, dir: &std::path::Path, json: bool) -> ExitCode {
    use ftvm_api::client;
    if let Err(e) = client::start_snapshot(path, dir) {
        say!("error: {e}");
        return ExitCode::from(1);
    }
    let mut shown = String::new();
    loop {
        let progress = match client::snapshot_progress(path) {
            Ok(p) => p,
            // The VM may have ended right after the snapshot: it waits for a running snapshot
            // to finish, and a complete one has its manifest.
            Err(_) if ftvm_vmm::snapshot::Snapshot::open(dir).is_ok() => {
                println!("snapshot written to {} (the VM has stopped since)", dir.display());
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                say!("error: lost the VM while it took the snapshot: {e}");
                return ExitCode::from(1);
            }
        };
        let line = progress.to_string();
        if progress.phase.is_over() {
            if json {
                println!("{}", serde_json::to_string_pretty(&progress).unwrap_or_default());
            } else {
                println!("{line}");
            }
            return if progress.phase == ftvm_api::SnapshotPhase::Done { ExitCode::SUCCESS } else { ExitCode::from(1) };
        }
        if line != shown {
            say!("{line}");
            shown = line;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The signal that asked ftvm to stop (0: none yet).
static STOP_SIGNAL: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// The exit status of an operator's stop: SIGTERM's (143, a supervisor's clean stop) or
/// SIGINT's (130).
fn stop_status() -> ftvm_exit::ExitStatus {
    ftvm_exit::ExitStatus::for_signal(STOP_SIGNAL.load(std::sync::atomic::Ordering::SeqCst))
        .unwrap_or(ftvm_exit::ExitStatus::Interrupted)
}

/// The exit status of an outcome: an operator's stop says which signal it was.
fn outcome_status(outcome: &ftvm_vmm::VmOutcome) -> ftvm_exit::ExitStatus {
    match outcome {
        ftvm_vmm::VmOutcome::OperatorStop => stop_status(),
        other => other.exit_status(),
    }
}

/// An operator's shutdown request (SIGTERM, `PUT /shutdown`): to the guest, with the grace
/// period, in a session that takes one; else, or the second time, the VM stops at once. A stop
/// at the end of the grace period is SIGTERM's (143). Async-signal-safe.
fn request_shutdown() -> bool {
    use std::sync::atomic::Ordering::SeqCst;
    let _ = STOP_SIGNAL.compare_exchange(0, libc::SIGTERM, SeqCst, SeqCst);
    ftvm_vmm::kick::request_shutdown()
}

/// SIGTERM asks the guest to shut down (docs/operations.md#stopping); SIGINT, and a second
/// SIGTERM, stop the VM at once, cleanly (a recording gets its END record).
fn install_stop_handler() {
    extern "C" fn on_stop(sig: libc::c_int) {
        if sig == libc::SIGTERM {
            request_shutdown();
            return;
        }
        // The first signal decides the status.
        let _ = STOP_SIGNAL.compare_exchange(
            0,
            sig,
            std::sync::atomic::Ordering::SeqCst,
            std::sync::atomic::Ordering::SeqCst,
        );
        ftvm_vmm::kick::request_stop();
    }
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only touches atomics, which is async-signal-safe.
        unsafe { libc::signal(sig, on_stop as *const () as libc::sighandler_t) };
    }
}

fn vm_config(args: RunArgs) -> VmConfig {
    VmConfig {
        boot: BootSpec { kernel: args.kernel.unwrap_or_default(), initrd: args.initrd, cmdline: args.cmdline },
        mem_size: args.mem,
        console: args.console,
        rtc_base_unix: args.rtc_base,
        nets: args.nets,
        disks: args.disks,
        rng: args.rng,
    }
}

fn summary(report: &ftvm_vmm::run::RunReport) -> String {
    let s = &report.stats;
    let sync = match s.sync.count {
        0 => String::new(),
        n => format!(
            "; {n} sync points, {} pages, wait {:.1} ms on average, {:.1} ms at most, {:.1} ms in them \
             (~{:.1} ms with the guest's write faults after them, {:.1}% of the run)",
            s.sync.pages,
            s.sync.mean_wait_us() as f64 / 1e3,
            s.sync.max_wait_us as f64 / 1e3,
            s.sync.work_us as f64 / 1e3,
            s.sync.cost_us as f64 / 1e3,
            s.sync.cost_us as f64 / 1e4 / report.elapsed.as_secs_f64().max(1e-6)
        ),
    };
    format!(
        "{} after {:.3} s ({} exits: {} port I/O, {} MMIO, {} HLT, {} MSR; {} interrupts, {} kicks{sync})",
        report.outcome,
        report.elapsed.as_secs_f64(),
        report.exits,
        s.io,
        s.mmio,
        s.hlt,
        s.msr,
        s.interrupts,
        s.kicks
    )
}

fn record(args: RecordArgs) -> ExitCode {
    let max_size = match args.max_size {
        Some(max) => max,
        None => {
            // The disk copies go beside the log too.
            let copies: u64 =
                args.vm.disks.iter().filter_map(|d| std::fs::metadata(&d.path).ok()).map(|m| m.len()).sum();
            match ftvm_vmm::recording::default_max_size(&args.log, copies) {
                Ok((limit, free, dir)) => {
                    say!(
                        "recording to {}: at most {} (half of the {} free on {}; --max-size to change)",
                        args.log.display(),
                        ftvm_api::format_bytes(limit),
                        ftvm_api::format_bytes(free),
                        dir.display()
                    );
                    limit
                }
                Err(e) => {
                    say!("error: cannot tell the free space for the log {}: {e}", args.log.display());
                    return ExitCode::from(1);
                }
            }
        }
    };
    let opts = ftvm_vmm::recording::RecordOptions {
        log: args.log.clone(),
        max_size: Some(max_size),
        sync_policy: args.sync.policy(),
    };
    let result = match args.vm.restore.clone() {
        Some(dir) => ftvm_vmm::recording::record_from_snapshot(&dir, restore_host(args.vm), &opts),
        None => ftvm_vmm::recording::record(vm_config(args.vm), &opts),
    };
    match result {
        Ok(report) => {
            let code = outcome_status(&report.run.outcome).code();
            let (log, bytes) = (args.log.display(), report.log_bytes);
            match &report.run.outcome {
                ftvm_vmm::VmOutcome::RecordingStopped(_) => {
                    say!("{}; {log} ({bytes} bytes) replays exactly up to there", summary(&report.run))
                }
                _ => say!("recorded {} to {log} ({bytes} bytes of log)", summary(&report.run)),
            }
            for copy in &report.disk_copies {
                say!("the guest's disk as recorded: {}", copy.display());
            }
            ExitCode::from(code)
        }
        Err(e) => {
            say!("error: {e}");
            ExitCode::from(1)
        }
    }
}

fn replay(args: ReplayArgs) -> ExitCode {
    let opts = ftvm_vmm::recording::ReplayOptions {
        log: args.path.clone(),
        output_dir: args.output_dir,
        snapshot: args.snapshot,
    };
    match ftvm_vmm::recording::replay(&opts) {
        Ok(report) => {
            let mut code = report.run.outcome.exit_code();
            for (i, (path, same)) in report.disks.iter().enumerate() {
                match same {
                    Some(true) => say!("disk {i}: the replayed disk equals the recording's"),
                    // A replay that stopped early (the log ends or is damaged) has done less
                    // to its disk than the recording: that is no divergence of its own.
                    Some(false) if code != 0 => say!(
                        "disk {i}: the replayed disk {} differs from the recording's final disk, as a replay that \
                         stopped early does",
                        path.display()
                    ),
                    Some(false) => {
                        say!("disk {i}: the replayed disk {} differs from the recording's", path.display());
                        code = 8;
                    }
                    None => say!("disk {i}: the recording's final disk is not beside the log; not compared"),
                }
            }
            if report.exact {
                say!("replayed exactly: {}", summary(&report.run));
                ExitCode::SUCCESS
            } else {
                say!("{}", summary(&report.run));
                ExitCode::from(if code == 0 { 8 } else { code as u8 })
            }
        }
        Err(e) => {
            say!("error: {e}");
            ExitCode::from(1)
        }
    }
}

fn inspect(path: &std::path::Path, json: bool, events: bool) -> ExitCode {
    match ftvm_log::inspect(path, events) {
        Ok(inspection) => {
            if json {
                println!("{}", inspection.to_json());
            } else {
                print!("{inspection}");
            }
            if inspection.is_complete() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(9)
            }
        }
        Err(e) => {
            say!("error: {}: {e}", path.display());
            ExitCode::from(1)
        }
    }
}

fn run(args: RunArgs) -> ExitCode {
    match args.restore.clone() {
        Some(dir) => finish(
            ftvm_vmm::snapshot::restore(&dir, &restore_host(args))
                .map_err(ftvm_vmm::Error::from)
                .and_then(|vm| ftvm_vmm::run::run_with(vm, ftvm_vmm::run::Journaling::Live)),
        ),
        None => finish(ftvm_vmm::run::run(vm_config(args))),
    }
}

/// The host-side choices of `--restore`: the console, TAPs and disk paths given.
fn restore_host(args: RunArgs) -> ftvm_vmm::snapshot::RestoreHost {
    ftvm_vmm::snapshot::RestoreHost { console: args.console, nets: args.nets, disks: args.disks }
}

fn finish(result: ftvm_vmm::Result<ftvm_vmm::run::RunReport>) -> ExitCode {
    match result {
        // This side fenced itself off: another copy may be live.
        // (An event: `GET /events` followers see it before the stream ends.)
        Err(e @ ftvm_vmm::Error::Fenced(_)) => {
            let status = ftvm_exit::ExitStatus::Fenced;
            tracing::error!(target: "ftvm::event", event = "halt", why = %e, status = status.code(), "HALT: {e}");
            status.into()
        }
        // A wait that SIGINT or SIGTERM ended before any VM ran (a backup waiting for its
        // primary): the operator's stop, not an error.
        Err(e) if ftvm_vmm::kick::stop_requested() => {
            say!("{e}");
            stop_status().into()
        }
        Ok(report) => {
            let status = outcome_status(&report.outcome);
            if status == ftvm_exit::ExitStatus::Success {
                tracing::info!("{}", summary(&report));
            } else {
                say!("{}", summary(&report));
            }
            status.into()
        }
        Err(e) => {
            say!("error: {e}");
            ExitCode::from(1)
        }
    }
}
