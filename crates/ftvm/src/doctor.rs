//! `ftvm doctor`: a preflight of everything a VM or one side of a pair needs on this host,
//! checked the way the VM will use it. Each line says what was checked, what was found and,
//! when it fails, what to do; the exit status is 0 only when every check passes.

use std::fmt;
use std::net::{TcpStream, UdpSocket};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ftvm_replication::arbiter::{ArbiterSpec, Peer};
use ftvm_virtio::block::BlockBackend;
use ftvm_vmm::vm::{DiskConfig, NetConfig};

/// What one side will use, from the same options it is started with.
pub struct Plan {
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub disks: Vec<DiskConfig>,
    pub nets: Vec<NetConfig>,
    pub pair: Option<PairPlan>,
}

pub struct PairPlan {
    pub peer: Peer,
    pub key_file: Option<PathBuf>,
    pub insecure: bool,
    /// The arbiter the side would use, or why it would refuse to start (a peer on another
    /// host and no arbiter both hosts see).
    pub arbiter: Result<ArbiterSpec, String>,
    /// The primary's preflight with its backup: how the backup's VM differs from this one.
    pub probe: Option<Probe>,
}

/// Sends this VM's header to the backup and returns the differences it answers.
pub type Probe = Box<dyn FnOnce() -> Result<Vec<String>, String>>;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Pass,
    Warn,
    Fail,
}

/// One line of the report.
struct Check {
    verdict: Verdict,
    what: String,
    found: String,
    fix: Option<String>,
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.verdict {
            Verdict::Pass => "ok  ",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
        };
        write!(f, "{tag}  {}: {}", self.what, self.found)?;
        if let Some(fix) = &self.fix {
            write!(f, "\n      -> {fix}")?;
        }
        Ok(())
    }
}

fn pass(what: impl Into<String>, found: impl Into<String>) -> Check {
    Check { verdict: Verdict::Pass, what: what.into(), found: found.into(), fix: None }
}

fn fail(what: impl Into<String>, found: impl Into<String>, fix: impl Into<String>) -> Check {
    Check { verdict: Verdict::Fail, what: what.into(), found: found.into(), fix: Some(fix.into()) }
}

fn warn(what: impl Into<String>, found: impl Into<String>, fix: impl Into<String>) -> Check {
    Check { verdict: Verdict::Warn, what: what.into(), found: found.into(), fix: Some(fix.into()) }
}

/// Runs every check, prints each line as it is done and the total; true when all passed
/// (a warning is not a pass: it names something to fix).
pub fn run(plan: Plan) -> bool {
    let mut all = Vec::new();
    let mut report = |c: Check| {
        println!("{c}");
        all.push(c.verdict);
    };
    report(kvm());
    for (what, path) in [("kernel", &plan.kernel), ("initrd", &plan.initrd)] {
        if let Some(path) = path {
            report(image(what, path));
        }
    }
    for disk in &plan.disks {
        report(self::disk(disk));
    }
    if !plan.nets.is_empty() {
        report(tun());
    }
    for net in &plan.nets {
        report(tap(&net.tap));
    }
    if let Some(mut pair) = plan.pair {
        report(key(&pair));
        report(arbiter(&pair.arbiter, &pair.peer));
        let reached = peer(&pair.peer);
        let reachable = reached.verdict == Verdict::Pass;
        report(reached);
        if let (Peer::Backup(addr), Some(probe), true) = (pair.peer, pair.probe.take(), reachable) {
            report(same_vm(addr, probe));
        }
    }
    let failed = all.iter().filter(|v| **v != Verdict::Pass).count();
    if failed == 0 {
        println!("all {} checks passed", all.len());
    } else {
        println!("{failed} of {} checks did not pass", all.len());
    }
    failed == 0
}

fn kvm() -> Check {
    let what = "KVM (/dev/kvm)";
    match ftvm_vmm::kvm::open() {
        Ok(kvm) => {
            let backend = ftvm_vmm::kvm::detect_backend();
            let note = match backend {
                ftvm_vmm::kvm::Backend::Pvm => {
                    "; ring-3 guest code runs natively, ring-0 code is emulated (slow for a full Linux kernel)"
                }
                ftvm_vmm::kvm::Backend::Hardware => "",
            };
            pass(what, format!("API {} on {backend}, with the capabilities ftvm needs{note}", kvm.get_api_version()))
        }
        Err(e) => fail(
            what,
            e.to_string(),
            "load the KVM module (kvm_intel, kvm_amd or kvm_pvm) and give this user read-write access to /dev/kvm \
             (the kvm group)",
        ),
    }
}

/// A boot image: a regular file this user can read, of a sane size.
fn image(what: &str, path: &Path) -> Check {
    let label = format!("{what} {}", path.display());
    match std::fs::metadata(path) {
        Err(e) => fail(label, format!("cannot be read: {e}"), format!("give the path of the {what} image")),
        Ok(m) if !m.is_file() => fail(label, "is not a regular file", format!("give the path of a {what} image file")),
        Ok(m) => match std::fs::File::open(path) {
            Ok(_) => pass(label, format!("{} readable", ftvm_api::format_bytes(m.len()))),
            Err(e) => fail(label, format!("cannot be opened: {e}"), "make it readable by this user"),
        },
    }
}

/// A disk: opened and locked exactly as the VM will (a second VM on it is refused).
fn disk(disk: &DiskConfig) -> Check {
    let label = format!("disk {}", disk.path.display());
    let how = if disk.readonly { "read-only" } else { "read-write" };
    match ftvm_virtio::block::RawFile::open(&disk.path, disk.readonly) {
        Ok(file) => {
            pass(label, format!("{} image opens {how} and its lock is free", ftvm_api::format_bytes(file.size())))
        }
        Err(e) => fail(
            label,
            e.to_string(),
            "give an existing raw image this user can open, used by no other VM (`truncate -s 1G data.img` makes one)",
        ),
    }
}

fn tun() -> Check {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun") {
        Ok(_) => pass("/dev/net/tun", "opens read-write"),
        Err(e) => fail(
            "/dev/net/tun",
            format!("cannot be opened: {e}"),
            "load the tun module (`modprobe tun`) and run as a user allowed to attach TAPs",
        ),
    }
}

/// A TAP: it exists, and this process can attach to it as the VM will.
fn tap(name: &str) -> Check {
    let label = format!("TAP {name}");
    let sys = Path::new("/sys/class/net").join(name);
    if !sys.exists() {
        return fail(
            label,
            "no such interface in this network namespace",
            format!("create it: `ip tuntap add dev {name} mode tap && ip link set {name} up`"),
        );
    }
    if !sys.join("tun_flags").exists() {
        return fail(label, "is not a TAP interface", "give the name of a TAP (`ip tuntap add ... mode tap`)");
    }
    let up = std::fs::read_to_string(sys.join("flags"))
        .ok()
        .and_then(|f| u32::from_str_radix(f.trim().trim_start_matches("0x"), 16).ok())
        .is_some_and(|flags| flags & libc::IFF_UP as u32 != 0);
    match ftvm_virtio::tap::Tap::open(name) {
        Ok(_) if up => pass(label, "exists, is up, and can be attached"),
        Ok(_) => warn(label, "exists and can be attached, but is down", format!("`ip link set {name} up`")),
        Err(e) => fail(label, e.to_string(), "stop the process using it, or give this VM a TAP of its own"),
    }
}

fn key(pair: &PairPlan) -> Check {
    let what = "replication key";
    let Some(path) = &pair.key_file else {
        return if pair.insecure {
            warn(
                what,
                "none (--insecure): anyone who reaches the link can speak for either side",
                "make one (`openssl rand -hex 32 > key; chmod 600 key`) and give it to both sides with --key-file",
            )
        } else {
            fail(what, "no --key-file", "give both sides the same --key-file (or --insecure, for tests only)")
        };
    };
    let label = format!("{what} {}", path.display());
    if let Err(e) = ftvm_replication::secure::Key::load(path) {
        return fail(label, e.to_string(), "make one: `openssl rand -hex 32 > key; chmod 600 key`");
    }
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => return fail(label, e.to_string(), "give a readable key file"),
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return warn(
            label,
            format!("a valid key, but its mode is {mode:03o}: other users may read it"),
            format!("`chmod 600 {}`", path.display()),
        );
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if meta.uid() != uid && meta.uid() != 0 {
        return warn(
            label,
            format!("a valid key, owned by uid {} (this is uid {uid})", meta.uid()),
            "let the key belong to the user ftvm runs as, or to root",
        );
    }
    pass(label, format!("a valid key, mode {mode:03o}"))
}

fn arbiter(spec: &Result<ArbiterSpec, String>, peer: &Peer) -> Check {
    let spec = match spec {
        Ok(spec) => spec,
        Err(why) => {
            return fail(
                "arbiter",
                why.clone(),
                "give both sides an arbiter they both see: --arbiter etcd://HOST:PORT/KEY, or \
                 --arbiter PATH --shared-lock for a lock file on shared storage",
            )
        }
    };
    let label = format!("arbiter {spec}");
    match spec {
        ArbiterSpec::File(path) | ArbiterSpec::SharedFile(path) => {
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
            if !dir.is_dir() {
                return fail(
                    label,
                    format!("its directory {} does not exist", dir.display()),
                    "create it, or give another --arbiter",
                );
            }
            match ftvm_replication::arbiter::FileArbiter::acquire(path, Duration::ZERO) {
                Ok(Some(_)) => pass(label, "the lock file can be taken (nobody holds it now)"),
                // The backup checks while its primary runs and holds it: that is the pair.
                Ok(None) if matches!(peer, Peer::Listen(_)) => {
                    pass(label, "held by another process (its primary, if it runs on this host or shares the file)")
                }
                Ok(None) => fail(
                    label,
                    "held by another process: a primary of this pair (or of another pair using the same file) is live",
                    "stop it, or give this pair its own --arbiter",
                ),
                Err(e) => fail(label, e.to_string(), "give a lock-file path this user can create and lock"),
            }
        }
        ArbiterSpec::Etcd(etcd) => match ftvm_replication::etcd::probe(etcd) {
            Ok(None) => pass(label, format!("etcd answers at {} (the key is free)", etcd.endpoint())),
            Ok(Some(holder)) => {
                pass(label, format!("etcd answers at {} (the key is held by {holder})", etcd.endpoint()))
            }
            Err(e) => fail(label, e.to_string(), "start etcd, or fix the endpoints, certificates or credentials"),
        },
    }
}

/// The backup's VM against this one: what pairing would compare (images, memory, CPUID,
/// devices), over the authenticated channel, so a wrong key shows here too.
fn same_vm(addr: std::net::SocketAddr, probe: Probe) -> Check {
    let label = format!("the backup's VM at {addr}");
    match probe() {
        Ok(differences) if differences.is_empty() => {
            pass(label, "the key is accepted and its images, memory, CPUID and devices agree with this VM's")
        }
        Ok(differences) => fail(
            label,
            format!("differs from this VM: {}", differences.join("; ")),
            "start both sides with the same images, memory size and devices on hosts of the same CPU model",
        ),
        Err(e) => {
            fail(label, e, "both sides need the same --key-file; a backup that is paired already answers no preflight")
        }
    }
}

fn peer(peer: &Peer) -> Check {
    match peer {
        Peer::Backup(addr) => {
            let label = format!("backup at {addr}");
            match TcpStream::connect_timeout(addr, Duration::from_secs(2)) {
                Ok(_) => pass(label, "accepts connections (a backup listens there)"),
                Err(e) => fail(
                    label,
                    format!("cannot be reached: {e}"),
                    "start the backup (`ftvm backup --listen ADDR ...`) and let TCP and UDP on its port through",
                ),
            }
        }
        Peer::Listen(addr) => {
            let label = format!("listen address {addr}");
            let tcp = std::net::TcpListener::bind(addr);
            let udp = UdpSocket::bind(addr);
            match (tcp, udp) {
                (Ok(_), Ok(_)) => pass(label, "TCP and UDP can both be bound"),
                (Err(e), _) | (_, Err(e)) => fail(
                    label,
                    format!("cannot be bound: {e}"),
                    "give an address of this host whose port is free for TCP and UDP (is a backup already running?)",
                ),
            }
        }
    }
}
