//! Careless use that must be refused with a clear word (issue 18): one disk image written by
//! two VMs, a peer timeout shorter than the heartbeats.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_disk_image_has_one_writer() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("misuse-disk");
    let img = dir.join("a.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    // The same image twice in one VM.
    let out = ftvm()
        .args(["run", "--kernel"])
        .arg(guest("hello"))
        .arg("--disk")
        .arg(&img)
        .arg("--disk")
        .arg(&img)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("is in use by another VM (or given twice)"), "{}", stderr(&out));

    // A second VM on an image a running VM writes.
    let console = dir.join("first.txt");
    let mut first = ftvm()
        .args(["run", "--kernel"])
        .arg(guest("hello"))
        .args(["--cmdline", "hello.wait_ms=3000", "--console"])
        .arg(format!("file:{}", console.display()))
        .arg("--disk")
        .arg(&img)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while !std::fs::read_to_string(&console).unwrap_or_default().contains("kit:") {
        assert!(started.elapsed() < Duration::from_secs(20), "the first VM did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    for disk in [img.display().to_string(), format!("{},readonly", img.display())] {
        let out = ftvm().args(["run", "--kernel"]).arg(guest("hello")).args(["--disk", &disk]).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{disk}: {}", stderr(&out));
        assert!(stderr(&out).contains("in use by another VM"), "{}", stderr(&out));
    }
    let _ = first.kill();
    let _ = first.wait();
    // Readers share: two read-only VMs on one image run.
    let ro = format!("{},readonly", img.display());
    let mut a = ftvm()
        .args(["run", "--kernel"])
        .arg(guest("hello"))
        .args(["--cmdline", "hello.wait_ms=500", "--disk", &ro])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let out = ftvm().args(["run", "--kernel"]).arg(guest("hello")).args(["--disk", &ro]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(a.wait().unwrap().code(), Some(0));
}

#[test]
fn a_peer_timeout_shorter_than_three_heartbeats_is_a_usage_error() {
    for role in [["primary", "--backup"], ["backup", "--listen"]] {
        let out = ftvm()
            .args([role[0], role[1], "127.0.0.1:7000", "--timeout", "0", "--kernel"])
            .arg(guest("hello"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(stderr(&out).contains("too short: heartbeats go every 50 ms"), "{}", stderr(&out));
    }
}

#[test]
fn a_pair_without_a_key_needs_insecure_and_says_so() {
    for role in [["primary", "--backup"], ["backup", "--listen"]] {
        let out = ftvm().args([role[0], role[1], "127.0.0.1:7000", "--kernel"]).arg(guest("hello")).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("needs a key: --key-file FILE") && stderr(&out).contains("--insecure"),
            "{}",
            stderr(&out)
        );
        let out = ftvm()
            .args([role[0], role[1], "127.0.0.1:7000", "--insecure", "--key-file", "k", "--kernel"])
            .arg(guest("hello"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    }
}

#[test]
fn sigterm_ends_a_backup_that_waits_for_its_primary() {
    if !kvm_available() {
        return;
    }
    let backup = ftvm()
        .args(["backup", "--listen", "127.0.0.1:0", "--insecure", "--kernel"])
        .arg(guest("hello"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: kill(2) on the child's pid.
    assert_eq!(unsafe { libc_kill(backup.id() as i32, 15) }, 0);
    let (out, in_time) = finish_within(backup, Duration::from_secs(10));
    let err = stderr(&out);
    assert!(in_time, "the backup ignored SIGTERM for 10 s: {err}");
    // SIGTERM has its own status (143), which the shipped systemd units count as success.
    assert_eq!(out.status.code(), Some(143), "{err}");
    assert!(err.contains("stopped by the operator while waiting for a primary"), "{err}");
    assert!(err.contains("WARNING: --insecure"), "a pair without a key says so loudly: {err}");
    // Port 0 became one real port, and the backup says which.
    assert!(err.contains("backup listening on 127.0.0.1:") && !err.contains("127.0.0.1:0\n"), "{err}");
}

#[test]
fn a_recording_refuses_an_initrd_that_reads_for_ever() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("misuse-record-initrd");
    // Hashed for the log header before the VM is built: /dev/zero read without end there.
    let child = ftvm()
        .args(["record", "--log"])
        .arg(dir.join("x.log"))
        .arg("--kernel")
        .arg(guest("hello"))
        .args(["--initrd", "/dev/zero"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (out, in_time) = finish_within(child, Duration::from_secs(20));
    assert!(in_time, "ftvm record --initrd /dev/zero was still running after 20 s");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("/dev/zero") && stderr(&out).contains("it is a character device"),
        "{}",
        stderr(&out)
    );
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}
