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
