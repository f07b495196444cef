//! `ftvm replay` of a damaged log (issue 18, items 8 and 10): a real recording of a guest
//! spinning in ring 3 (its ticks arrive through sync points) is damaged at many offsets, a
//! flipped byte or a cut, and every replay must end within a bound, with the documented exit
//! status and a message that says what is wrong: 1 when the header itself is unreadable, 9
//! when the log ends early, 10 when it is damaged. Never a hang (the replay used to run the
//! spinning guest at 100% CPU for ever once the log could not supply the next sync point),
//! and never "divergence" (8) for damage the reader found.

mod common;

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// How long one replay of a damaged log may take. An exact replay of this log takes a
/// fraction of a second; the bound leaves room for a loaded host.
const BOUND: Duration = Duration::from_secs(30);

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Replays `log`, killing it at [`BOUND`]; `None` if it had to be killed.
fn bounded_replay(log: &Path) -> Option<Output> {
    let mut child =
        ftvm().arg("replay").arg(log).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn ftvm replay");
    let started = Instant::now();
    loop {
        if child.try_wait().expect("wait for ftvm replay").is_some() {
            return Some(child.wait_with_output().expect("collect ftvm replay's output"));
        }
        if started.elapsed() > BOUND {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[derive(Debug, Clone, Copy)]
enum Damage {
    Flip(usize),
    Cut(usize),
}

#[test]
fn every_damaged_log_ends_the_replay_promptly_with_its_status_and_a_message() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("damaged");
    let log = dir.join("spin.log");
    let out = ftvm()
        .args(["record", "--log"])
        .arg(&log)
        .arg("--kernel")
        .arg(guest("hello"))
        .args(["--cmdline", "hello.spin_ms=500", "--console"])
        .arg(format!("file:{}", dir.join("console.txt").display()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("sync points"), "the recording must take sync points: {}", stderr(&out));
    let bytes = std::fs::read(&log).unwrap();
    let len = bytes.len();
    assert!(len > 10_000, "a recording of {len} bytes is too small to damage usefully");
    // The undamaged log replays exactly (so whatever follows is the damage's doing).
    let out = bounded_replay(&log).expect("the undamaged log replays within the bound");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    // Offsets spread over the whole file (most of it is sync points of the spin), with an odd
    // stride so that they land on every part of a frame: length words, CRCs, bodies.
    let mut cases = Vec::new();
    for i in 0..48 {
        cases.push(Damage::Flip((i * len / 48 + i * 7) % len));
    }
    for i in 1..=16 {
        cases.push(Damage::Cut(i * len / 17 + i * 3));
    }
    let damaged = dir.join("damaged.log");
    let mut seen = std::collections::BTreeMap::<i32, usize>::new();
    for case in cases {
        let mut b = bytes.clone();
        match case {
            Damage::Flip(at) => b[at] ^= 0x55,
            Damage::Cut(at) => b.truncate(at),
        }
        std::fs::write(&damaged, &b).unwrap();
        let started = Instant::now();
        let Some(out) = bounded_replay(&damaged) else {
            panic!("{case:?} of {len} bytes: the replay was still running after {BOUND:?} (a hang)");
        };
        let err = stderr(&out);
        let code = out.status.code().unwrap_or_else(|| panic!("{case:?}: the replay died of a signal: {err}"));
        *seen.entry(code).or_default() += 1;
        let what = format!("{case:?} of {len} bytes, exit {code} after {:?}:\n{err}", started.elapsed());
        match code {
            // The header (or the preamble) is unreadable: the replay cannot start.
            1 => assert!(err.contains("ftvm: error: replay:") && err.contains(&*log_name(&damaged)), "{what}"),
            9 => assert!(err.contains("the log ends early") && err.contains("replayed exactly up to exit"), "{what}"),
            10 => {
                assert!(matches!(case, Damage::Flip(_)), "a cut is not damage: {what}");
                assert!(
                    err.contains("the log is damaged") && err.contains("byte offset") && err.contains("frame"),
                    "{what}"
                );
                assert!(err.contains("replayed exactly up to exit"), "{what}");
            }
            8 => panic!("damage the reader found is reported as a divergence: {what}"),
            _ => panic!("not a documented status for a damaged log: {what}"),
        }
    }
    eprintln!("exit statuses of the damaged replays: {seen:?}");
    // Most of the file is records after the header: the mutations reached them.
    assert!(seen.get(&10).copied().unwrap_or(0) >= 24, "{seen:?}");
    assert!(seen.get(&9).copied().unwrap_or(0) >= 12, "{seen:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn log_name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

/// A kvstore recording whose guest writes its disk throughout (SETs), damaged or cut: the
/// replay stops at the damage, so its disk is naturally behind the recording's final one.
/// That is not a divergence either: the status must stay 9 or 10.
#[test]
fn a_damaged_log_of_a_guest_writing_its_disk_is_not_a_divergence() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("damaged-kv");
    let net = Topology::up("dk", 1);
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(64 << 20).unwrap();
    let log = dir.join("kv.log");
    let console = dir.join("console.txt");
    let log_arg = log.display().to_string();
    let mut vm = net.kvstore_vm(&["record", "--log", &log_arg], &disk, &console).stderr(Stdio::null()).spawn().unwrap();
    net.wait_ping("kvstore");
    for i in 0..30 {
        assert_eq!(net.cli(&["SET", &format!("k{i}"), &format!("v{i}")]), "OK");
    }
    let _ = std::process::Command::new("kill").args(["-INT", &vm.id().to_string()]).status();
    let _ = vm.wait();
    drop(net);
    let bytes = std::fs::read(&log).unwrap();
    let len = bytes.len();
    let damaged = dir.join("damaged.log");
    // The recording's final disk beside the damaged log, as beside the original.
    std::fs::copy(dir.join("kv.log.disk0"), dir.join("damaged.log.disk0")).unwrap();
    for i in 1..=12usize {
        let mut b = bytes.clone();
        let case = if i % 3 == 0 {
            b.truncate(i * len / 13);
            Damage::Cut(i * len / 13)
        } else {
            b[i * len / 13] ^= 0x55;
            Damage::Flip(i * len / 13)
        };
        std::fs::write(&damaged, &b).unwrap();
        let out = bounded_replay(&damaged).unwrap_or_else(|| panic!("{case:?}: a hang"));
        let err = stderr(&out);
        assert!(matches!(out.status.code(), Some(1 | 9 | 10)), "{case:?} of {len} bytes: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
