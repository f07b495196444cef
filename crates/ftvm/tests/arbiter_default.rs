//! The arbiter's defaults (issue 18 items 1 and 2, issue 16 item 2): a pair whose peer is
//! on another host does not start without an arbiter both hosts can see; a pair on one host
//! keeps a working default, named after the VM's `--id` so that two pairs never share a
//! lock; the default lock lives where only ftvm's user can open it, and a lock file others
//! can open is refused.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn port(offset: u16) -> u16 {
    33000 + (std::process::id() % 2000) as u16 * 8 + offset
}

fn side(role: &str, addr: &str, console: &Path, extra: &[&str]) -> Command {
    side_for(role, addr, console, extra, 1500)
}

/// A side of a hello pair that idles `wait_ms` milliseconds.
fn side_for(role: &str, addr: &str, console: &Path, extra: &[&str], wait_ms: u32) -> Command {
    let mut c = ftvm();
    c.arg(role);
    c.args(if role == "backup" { ["--listen", addr] } else { ["--backup", addr] });
    c.args(["--timeout", "1200", "--insecure"]).args(extra);
    c.arg("--kernel").arg(guest("hello")).args(["--cmdline", &format!("hello.wait_ms={wait_ms}")]);
    c.arg("--console").arg(format!("file:{}", console.display()));
    c.stderr(Stdio::piped()).stdout(Stdio::null());
    c
}

/// A side that must refuse to start at once: its status and what it said.
fn refused(mut c: Command) -> (Option<i32>, String) {
    let (out, in_time) = finish_within(c.spawn().unwrap(), Duration::from_secs(10));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(in_time, "it did not refuse at once (it started): {err}");
    (out.status.code(), err)
}

fn says_what_to_give(err: &str) {
    assert!(err.contains("not on this host"), "says why: {err}");
    assert!(err.contains("etcd://") && err.contains("--shared-lock"), "says what to give: {err}");
}

#[test]
fn a_primary_whose_backup_is_on_another_host_needs_an_arbiter_both_can_see() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("arb-remote-primary");
    // 192.0.2.1 (TEST-NET-1) is no address of this host.
    let (code, err) = refused(side("primary", "192.0.2.1:7000", &dir.join("p.txt"), &[]));
    assert_eq!(code, Some(2), "{err}");
    says_what_to_give(&err);
    // A lock file of this host is no better, unless the operator says it is shared.
    let lock = dir.join("arbiter.lock");
    let (code, err) =
        refused(side("primary", "192.0.2.1:7000", &dir.join("p.txt"), &["--arbiter", lock.to_str().unwrap()]));
    assert_eq!(code, Some(2), "{err}");
    says_what_to_give(&err);
    // With --shared-lock it starts (and waits for its backup).
    let mut c =
        side("primary", "192.0.2.1:7000", &dir.join("p.txt"), &["--arbiter", lock.to_str().unwrap(), "--shared-lock"]);
    let (out, in_time) = finish_within(c.spawn().unwrap(), Duration::from_secs(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!in_time, "a shared lock file is accepted: the primary waits for its backup: {err}");
    assert!(err.contains("waiting for the backup"), "{err}");
}

#[test]
fn a_backup_that_listens_for_other_hosts_needs_an_arbiter_both_can_see() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("arb-remote-backup");
    let addr = format!("0.0.0.0:{}", port(0));
    let (code, err) = refused(side("backup", &addr, &dir.join("b.txt"), &[]));
    assert_eq!(code, Some(2), "{err}");
    says_what_to_give(&err);
    let lock = dir.join("arbiter.lock");
    let (code, err) = refused(side("backup", &addr, &dir.join("b.txt"), &["--arbiter", lock.to_str().unwrap()]));
    assert_eq!(code, Some(2), "{err}");
    says_what_to_give(&err);
}

/// Where ftvm keeps its default lock files: /run/ftvm for root, $XDG_RUNTIME_DIR/ftvm else.
fn runtime_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        PathBuf::from("/run/ftvm")
    } else {
        PathBuf::from(std::env::var("XDG_RUNTIME_DIR").expect("XDG_RUNTIME_DIR")).join("ftvm")
    }
}

#[test]
fn two_pairs_on_one_host_keep_a_working_default_each_with_its_own_private_lock() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("arb-same-host");
    let ids = [format!("t{}-a", std::process::id()), format!("t{}-b", std::process::id())];
    let mut pairs = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let addr = format!("127.0.0.1:{}", port(1 + i as u16));
        let b = side("backup", &addr, &dir.join(format!("b{i}.txt")), &["--id", id]).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let p = side("primary", &addr, &dir.join(format!("p{i}.txt")), &["--id", id]).spawn().unwrap();
        pairs.push((p, b));
    }
    std::thread::sleep(Duration::from_millis(700));
    // While both run, each holds its own lock, which no other user can open.
    let run = runtime_dir();
    let mode = std::fs::metadata(&run).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "{}", run.display());
    for id in &ids {
        let lock = run.join(format!("{id}.lock"));
        let mode = std::fs::metadata(&lock).unwrap_or_else(|e| panic!("{}: {e}", lock.display())).permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", lock.display());
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            // nobody cannot open it, not even read-only (flock works through one).
            let out = Command::new("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups", "flock", "-n", "-s"])
                .arg(&lock)
                .arg("true")
                .output()
                .unwrap();
            assert!(!out.status.success(), "another user could open {}", lock.display());
            assert!(String::from_utf8_lossy(&out.stderr).contains("ermission denied"), "{out:?}");
        }
    }
    for (i, (p, b)) in pairs.into_iter().enumerate() {
        let (pout, _) = finish_within(p, Duration::from_secs(30));
        let (bout, _) = finish_within(b, Duration::from_secs(10));
        let (perr, berr) = (String::from_utf8_lossy(&pout.stderr), String::from_utf8_lossy(&bout.stderr));
        assert_eq!(pout.status.code(), Some(0), "pair {i}: primary: {perr}\nbackup: {berr}");
        assert_eq!(bout.status.code(), Some(0), "pair {i}: backup: {berr}");
        let console = std::fs::read_to_string(dir.join(format!("p{i}.txt"))).unwrap();
        assert!(console.contains("digest: "), "{console}");
        // Each side's lines name its VM, so that one journal of both pairs tells them apart.
        let mine = format!("ftvm[{}]: paired", ids[i]);
        assert!(perr.contains(&mine) && berr.contains(&mine), "{mine:?} missing: {perr}\n{berr}");
    }
    for id in &ids {
        let _ = std::fs::remove_file(run.join(format!("{id}.lock")));
    }
}

#[test]
fn a_lock_file_other_users_can_open_is_refused() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("arb-open-lock");
    let lock = dir.join("open.lock");
    std::fs::write(&lock, "").unwrap();
    std::fs::set_permissions(&lock, std::fs::Permissions::from_mode(0o644)).unwrap();
    let addr = format!("127.0.0.1:{}", port(4));
    let (code, err) = refused(side("primary", &addr, &dir.join("p.txt"), &["--arbiter", lock.to_str().unwrap()]));
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("other users can open it") && err.contains("chmod 600"), "{err}");
}

#[test]
fn an_id_must_be_a_plain_name() {
    for bad in ["", "../x", "a/b", ".hidden", "x y"] {
        let out = ftvm().args(["run", "--kernel", "/nonexistent", "--id", bad]).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "--id {bad:?}: {out:?}");
    }
}

#[test]
fn a_live_vm_whose_lock_is_of_this_host_takes_no_backup_on_another_host() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("arb-protect-remote");
    let addr = format!("127.0.0.1:{}", port(5));
    let lock = dir.join("arbiter.lock");
    let sock = dir.join("p.sock");
    let arbiter = ["--arbiter", lock.to_str().unwrap()];
    let mut b = side_for("backup", &addr, &dir.join("b.txt"), &arbiter, 8000).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut pc = side_for("primary", &addr, &dir.join("p.txt"), &arbiter, 8000);
    pc.arg("--api-socket").arg(&sock);
    let p = pc.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    let _ = b.kill();
    let _ = b.wait();
    // The primary notices (--timeout 1200) and runs on unprotected.
    std::thread::sleep(Duration::from_millis(2000));
    let out = ftvm().arg("ctl").arg(&sock).args(["protect", "192.0.2.1:7000"]).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let (pout, _) = finish_within(p, Duration::from_secs(1));
    assert_eq!(out.status.code(), Some(1), "{text}\nprimary: {}", String::from_utf8_lossy(&pout.stderr));
    assert!(text.contains("not on this host") && text.contains("--shared-lock"), "{text}");
}
