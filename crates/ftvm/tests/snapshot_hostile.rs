//! Snapshots against careless and hostile use (issue 18, items 4 and 5), with real processes
//! and KVM: what a snapshot writes is readable by its user alone (guest memory and disks are
//! the guest's secrets), and a crafted `snapshot.json` cannot make `ftvm run --restore DIR`
//! write anywhere but where a restore writes, nor pass absurd values: each is refused with a
//! clear error before anything changes.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
}

fn ctl(socket: &Path, args: &[&str]) -> Output {
    ftvm().arg("ctl").arg(socket).args(args).output().expect("spawn ftvm ctl")
}

/// A snapshot of a `hello` guest waiting on its ticks, with a writable disk: taken once,
/// shared by the tests (each edits a copy of it).
#[allow(dead_code)] // `disk`: the restore tests (next commit)
struct Taken {
    dir: PathBuf,
    snap: PathBuf,
    disk: PathBuf,
}

/// The disk's content: recognisable, so that a test sees whether it was put back.
fn disk_content() -> Vec<u8> {
    let mut d = vec![0u8; 1 << 20];
    d[..16].copy_from_slice(b"ftvm test disk 0");
    d[512 * 7..512 * 7 + 5].copy_from_slice(b"block");
    d
}

fn taken() -> &'static Taken {
    static TAKEN: OnceLock<Taken> = OnceLock::new();
    TAKEN.get_or_init(|| {
        let dir = scratch("snap-hostile");
        let disk = dir.join("disk.img");
        std::fs::write(&disk, disk_content()).unwrap();
        let socket = dir.join("vm.sock");
        let mut vm: Child = ftvm()
            .arg("run")
            .arg("--kernel")
            .arg(guest("hello"))
            .args(["--mem", "64M", "--cmdline", "hello.wait_ms=60000", "--disk"])
            .arg(&disk)
            .arg("--console")
            .arg(format!("file:{}", dir.join("console.txt").display()))
            .arg("--api-socket")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ftvm run");
        let start = Instant::now();
        while !ctl(&socket, &["status"]).status.success() {
            assert!(vm.try_wait().unwrap().is_none(), "the VM exited before its API answered");
            assert!(start.elapsed() < Duration::from_secs(30), "no API after 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        // Into a directory that does not exist yet, two levels down: every directory the
        // snapshot creates is private.
        let snap = dir.join("out").join("snap");
        let out = ctl(&socket, &["snapshot", snap.to_str().unwrap()]);
        let _ = vm.kill();
        let _ = vm.wait();
        assert_eq!(out.status.code(), Some(0), "ctl snapshot: {}", text(&out.stderr));
        assert!(snap.join("snapshot.json").exists());
        Taken { dir, snap, disk }
    })
}

#[test]
fn a_snapshot_is_readable_by_its_user_alone() {
    if !kvm_available() {
        return;
    }
    let t = taken();
    assert_eq!(mode(&t.snap), 0o700, "the snapshot directory");
    assert_eq!(mode(&t.dir.join("out")), 0o700, "a directory created on the way to it");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&t.snap).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        assert_eq!(mode(&entry.path()), 0o600, "{name}");
        names.push(name);
    }
    names.sort();
    assert_eq!(names, ["disk0.img", "memory.bin", "snapshot.json", "state.bin"]);
}
