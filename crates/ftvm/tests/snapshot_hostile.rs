//! Snapshots against careless and hostile use (issue 18, items 4 and 5), with real processes
//! and KVM: what a snapshot writes is readable by its user alone (guest memory and disks are
//! the guest's secrets), and a crafted `snapshot.json` cannot make `ftvm run --restore DIR`
//! write anywhere but where a restore writes, nor pass absurd values: each is refused with a
//! clear error before anything changes.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
}

/// This test's snapshot key (a scratch directory: the tests do not touch the user's).
fn key_dir() -> PathBuf {
    repo_root().join("target").join("test-scratch").join(format!("snap-hostile-key-{}", std::process::id()))
}

/// `ftvm` with this test's snapshot key.
fn cmd() -> Command {
    let mut c = ftvm();
    c.env("FTVM_STATE_DIR", key_dir());
    c
}

fn ctl(socket: &Path, args: &[&str]) -> Output {
    ftvm().arg("ctl").arg(socket).args(args).output().expect("spawn ftvm ctl")
}

/// A snapshot of a `hello` guest waiting on its ticks, with a writable disk: taken once,
/// shared by the tests (each edits a copy of it).
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

/// Held by the tests that write the image the VM ran on (they run in parallel otherwise).
static DISK: Mutex<()> = Mutex::new(());

fn taken() -> &'static Taken {
    static TAKEN: OnceLock<Taken> = OnceLock::new();
    TAKEN.get_or_init(|| {
        let dir = shared_scratch("snap-hostile");
        let disk = dir.join("disk.img");
        std::fs::write(&disk, disk_content()).unwrap();
        let socket = dir.join("vm.sock");
        let _ = std::fs::remove_dir_all(key_dir());
        let mut vm: Child = cmd()
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
    assert_eq!(names, ["disk0.img", "memory.bin", "snapshot.hmac", "snapshot.json", "state.bin"]);
    // The snapshot key, made for it: this user's alone too.
    assert_eq!(mode(&key_dir()), 0o700);
    assert_eq!(mode(&key_dir().join("snapshot.key")), 0o600);
}

/// An exact copy of the snapshot (its seal included).
fn copied(name: &str) -> PathBuf {
    let t = taken();
    let copy = t.dir.join(name);
    let _ = std::fs::remove_dir_all(&copy);
    std::fs::create_dir(&copy).unwrap();
    for f in ["disk0.img", "memory.bin", "state.bin", "snapshot.hmac", "snapshot.json"] {
        if t.snap.join(f).exists() {
            std::fs::copy(t.snap.join(f), copy.join(f)).unwrap();
        }
    }
    copy
}

/// A copy of the snapshot whose manifest `edit` changed.
fn edited(name: &str, edit: impl FnOnce(&mut Value)) -> PathBuf {
    let t = taken();
    let copy = copied(name);
    let mut m: Value = serde_json::from_slice(&std::fs::read(t.snap.join("snapshot.json")).unwrap()).unwrap();
    edit(&mut m);
    std::fs::write(copy.join("snapshot.json"), serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    copy
}

/// `ftvm run --restore DIR` that must fail: exit 1, an error that says every one of `want`.
fn restore_refused(dir: &Path, extra: &[&str], want: &[&str]) -> String {
    let console = dir.with_extension("console.txt");
    let mut child = cmd()
        .arg("run")
        .arg("--restore")
        .arg(dir)
        .arg("--console")
        .arg(format!("file:{}", console.display()))
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("the restore of {} ran on: it must be refused", dir.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.code(), Some(1), "the restore of {} must be refused: {err}", dir.display());
    assert!(err.contains("ftvm: error: restore: "), "{err}");
    for w in want {
        assert!(err.contains(w), "the error should say {w:?}: {err}");
    }
    err
}

/// A file that must survive every refused restore.
fn victim(name: &str) -> (PathBuf, Vec<u8>) {
    let t = taken();
    let path = t.dir.join(name);
    // The same size as the disk: only the path gives it away.
    let content: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    std::fs::write(&path, &content).unwrap();
    (path, content)
}

#[test]
fn a_crafted_disk_source_cannot_overwrite_another_file() {
    if !kvm_available() {
        return;
    }
    let _disk = ftvm_sync::lock(&DISK);
    let t = taken();
    let (target, content) = victim("victim.img");
    let source = |v: String| move |m: &mut Value| m["disks"][0]["source"] = Value::String(v);

    // A path with `..` in it (that would reach the victim), a relative one, one through a
    // symbolic link, and a path into the snapshot itself.
    let dotdot = format!("{}/out/../victim.img", t.dir.display());
    let d = edited("src-dotdot", source(dotdot));
    restore_refused(&d, &[], &["disk 0", "..", "--disk"]);
    let d = edited("src-relative", source("victim.img".into()));
    restore_refused(&d, &[], &["disk 0", "not an absolute path", "--disk"]);
    let link = t.dir.join("link.img");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let d = edited("src-link", source(link.display().to_string()));
    restore_refused(&d, &[], &["disk 0", "symbolic link", "--disk"]);
    let d = edited("src-inside", |m| {
        m["disks"][0]["source"] = Value::String(t.dir.join("src-inside").join("memory.bin").display().to_string())
    });
    restore_refused(&d, &[], &["disk 0", "inside the snapshot", "--disk"]);
    let d = edited("src-missing", source(t.dir.join("nope.img").display().to_string()));
    restore_refused(&d, &[], &["disk 0", "nope.img", "--disk"]);
    let d = edited("src-dir", source(t.dir.display().to_string()));
    restore_refused(&d, &[], &["disk 0", "not a regular file", "--disk"]);
    let small = t.dir.join("small.img");
    std::fs::write(&small, b"not a disk image of that size").unwrap();
    let d = edited("src-size", source(small.display().to_string()));
    restore_refused(&d, &[], &["disk 0", "bytes", "--disk"]);
    // What the issue found: the path of another file of the disk's size, plainly. Only the
    // manifest's seal tells it from the image the VM ran on.
    let d = edited("src-victim", source(target.display().to_string()));
    restore_refused(&d, &[], &["disk 0", "not trusted", "snapshot.hmac", "--disk"]);
    // A seal copied from the real manifest does not cover an edited one; nor does another
    // user's key (or another host's) seal this one.
    let d = copied("other-key");
    let err = {
        let console = d.with_extension("console.txt");
        let out = ftvm()
            .env("FTVM_STATE_DIR", t.dir.join("another-key"))
            .arg("run")
            .arg("--restore")
            .arg(&d)
            .arg("--console")
            .arg(format!("file:{}", console.display()))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        text(&out.stderr)
    };
    assert!(err.contains("not trusted") && err.contains("--disk"), "{err}");
    assert_eq!(std::fs::read(&small).unwrap(), b"not a disk image of that size");
    assert_eq!(std::fs::read(&target).unwrap(), content, "the victim is untouched");

    // The snapshot's own files: only the names a snapshot writes, real files in DIR.
    let d = edited("file-escape", |m| m["disks"][0]["copy"]["file"] = Value::String("../victim.img".into()));
    restore_refused(&d, &[], &["disk0.img"]);
    let d =
        edited("state-escape", |m| m["state"]["file"] = Value::String(t.dir.join("victim.img").display().to_string()));
    restore_refused(&d, &[], &["state.bin"]);
    let d = edited("mem-link", |_| {});
    std::fs::remove_file(d.join("memory.bin")).unwrap();
    std::os::unix::fs::symlink(&target, d.join("memory.bin")).unwrap();
    restore_refused(&d, &[], &["memory.bin", "symbolic link"]);
    assert_eq!(std::fs::read(&target).unwrap(), content, "the victim is untouched");

    // An untouched manifest restores (the refusals above are the edits' doing), and its disk
    // goes back to the image the VM ran on.
    std::fs::write(&t.disk, b"overwritten after the snapshot").unwrap();
    std::fs::OpenOptions::new().write(true).open(&t.disk).unwrap().set_len(1 << 20).unwrap();
    let d = copied("untouched");
    let mut vm = cmd()
        .arg("run")
        .arg("--restore")
        .arg(&d)
        .arg("--console")
        .arg(format!("file:{}", t.dir.join("untouched.txt").display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while std::fs::read(&t.disk).unwrap() != disk_content() {
        assert!(vm.try_wait().unwrap().is_none(), "the restore of an untouched snapshot ended");
        assert!(start.elapsed() < Duration::from_secs(30), "the disk was not put back");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = vm.kill();
    let _ = vm.wait();
}

/// An edit of a manifest.
type Edit = Box<dyn FnOnce(&mut Value)>;

#[test]
fn absurd_values_in_the_manifest_are_refused() {
    if !kvm_available() {
        return;
    }
    let _disk = ftvm_sync::lock(&DISK);
    let (target, content) = victim("victim2.img");
    let fifo = taken().dir.join("kernel.fifo");
    let _ = std::fs::remove_file(&fifo);
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let cases: Vec<(&str, Edit, Vec<&str>)> = vec![
        ("time-max", Box::new(|m| m["guest_time_ns"] = Value::from(u64::MAX)), vec!["guest_time_ns"]),
        ("time-other", Box::new(|m| m["guest_time_ns"] = Value::from(12345u64)), vec!["guest_time_ns", "state.bin"]),
        (
            "mem-huge",
            Box::new(|m| {
                m["memory"]["size"] = Value::from(u64::MAX);
                m["vm"]["memory_size"] = Value::from(u64::MAX);
                m["vm"]["memory_layout"][0]["size"] = Value::from(u64::MAX);
            }),
            vec!["memory"],
        ),
        (
            "layout-overflow",
            Box::new(|m| {
                let r = m["vm"]["memory_layout"][0].clone();
                m["vm"]["memory_layout"] = Value::Array(vec![r.clone(), r]);
                m["vm"]["memory_layout"][1]["size"] = Value::from(u64::MAX);
            }),
            vec!["memory"],
        ),
        ("state-huge", Box::new(|m| m["state"]["size"] = Value::from(u64::MAX)), vec!["state.bin"]),
        ("disk-huge", Box::new(|m| m["disks"][0]["copy"]["size"] = Value::from(u64::MAX)), vec!["disk0.img"]),
        (
            "disks-many",
            Box::new(|m| {
                let d = m["disks"][0].clone();
                m["disks"] = Value::Array(vec![d; 1000]);
            }),
            vec!["disks"],
        ),
        ("pause-negative", Box::new(|m| m["pause_ms"] = Value::from(-1.0)), vec!["pause_ms"]),
        // A kernel that is no file: hashing it would read for ever (or block on the FIFO).
        (
            "kernel-zero",
            Box::new(|m| m["vm"]["kernel"]["path"] = Value::from("/dev/zero")),
            vec!["kernel", "/dev/zero", "character device"],
        ),
        (
            "kernel-fifo",
            Box::new(move |m| m["vm"]["kernel"]["path"] = Value::from(fifo.display().to_string())),
            vec!["kernel", "a FIFO"],
        ),
        (
            "source-victim",
            Box::new(move |m| {
                m["disks"][0]["source"] = Value::String("relative/../victim2.img".into());
                m["guest_time_ns"] = Value::from(u64::MAX);
            }),
            vec!["guest_time_ns"],
        ),
    ];
    for (name, edit, want) in cases {
        let d = edited(name, edit);
        restore_refused(&d, &[], &want);
    }
    assert_eq!(std::fs::read(&target).unwrap(), content);
    // Nothing was rolled back by a refused restore: the image the VM ran on is as it is now.
    let t = taken();
    let before = std::fs::read(&t.disk).unwrap();
    std::fs::write(&t.disk, vec![0xa5u8; 1 << 20]).unwrap();
    let d = edited("time-max-2", |m| m["guest_time_ns"] = Value::from(u64::MAX));
    restore_refused(&d, &[], &["guest_time_ns"]);
    assert_eq!(std::fs::read(&t.disk).unwrap(), vec![0xa5u8; 1 << 20], "a refused restore changes nothing");
    // Nor does one refused for a damaged memory image, found only after the disk's copy was
    // checked: the disk is not rolled back before everything was.
    let d = copied("memory-damaged");
    let mut memory = std::fs::read(d.join("memory.bin")).unwrap();
    let at = memory.iter().position(|&b| b != 0).expect("a guest's memory is not all zeros");
    memory[at] ^= 0x55;
    std::fs::write(d.join("memory.bin"), &memory).unwrap();
    restore_refused(&d, &[], &["memory.bin is corrupt"]);
    assert_eq!(std::fs::read(&t.disk).unwrap(), vec![0xa5u8; 1 << 20], "the disk was rolled back by a refused restore");
    std::fs::write(&t.disk, before).unwrap();
}
