//! Snapshots with real processes: `ftvm ctl PATH snapshot DIR` of a running and of a paused
//! VM, `ftvm run --restore DIR` in fresh processes (twice from one snapshot), the kvstore
//! guest snapshotted with data and under redis-benchmark load on the namespaced test network,
//! `ftvm record --restore` and its replay (also from a moved snapshot), a snapshot cut short
//! by the guest's end (complete or absent, never half there), and every bad-input path:
//! damaged, edited, foreign or missing snapshots, refused snapshot directories, option
//! conflicts and changed images.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// The compute guest's work: about 3.5 s here, so that a snapshot (under a second for 64 MiB
/// with the debug binary) completes well before the guest ends.
const ROUNDS: &str = "compute.rounds=500";
/// Guest memory of the compute and hello VMs: small, so snapshots and restores are quick.
const MEM: &str = "64M";

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Nothing of ftvm ever panics, whatever the input.
fn no_panic(what: &str, stderr: &str) {
    assert!(!stderr.contains("panicked"), "{what}: ftvm panicked:\n{stderr}");
}

fn ctl(socket: &Path, args: &[&str]) -> Output {
    ftvm().arg("ctl").arg(socket).args(args).output().expect("spawn ftvm ctl")
}

fn status_json(socket: &Path) -> Value {
    let out = ctl(socket, &["status", "--json"]);
    assert_eq!(out.status.code(), Some(0), "ctl status --json: {}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("ctl status --json prints JSON")
}

/// `ftvm ctl SOCKET snapshot DIR [--json]`.
fn take_snapshot(socket: &Path, dir: &Path, json: bool) -> Output {
    let mut c = ftvm();
    c.arg("ctl").arg(socket).arg("snapshot").arg(dir);
    if json {
        c.arg("--json");
    }
    let out = c.output().expect("spawn ftvm ctl snapshot");
    no_panic("ctl snapshot", &text(&out.stderr));
    out
}

/// Waits until the VM answers on its API socket.
fn wait_for_api(socket: &Path, vm: &mut Child) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if let Some(status) = vm.try_wait().unwrap() {
            panic!("the VM exited ({status}) before its API answered");
        }
        if ctl(socket, &["status"]).status.success() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no API on {} after 30 s", socket.display());
}

/// Waits for the VM to end (killing it after `limit`); its exit code and stderr.
fn wait_exit(mut vm: Child, limit: Duration) -> (Option<i32>, String) {
    let start = Instant::now();
    while start.elapsed() < limit && vm.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = vm.kill();
    let out = vm.wait_with_output().unwrap();
    let err = text(&out.stderr);
    no_panic("the VM", &err);
    (out.status.code(), err)
}

/// `ftvm run` of a guest with an API socket (stderr kept for the end).
fn spawn_vm(kernel: &Path, cmdline: &str, socket: &Path, console: &Path) -> Child {
    ftvm()
        .arg("run")
        .arg("--kernel")
        .arg(kernel)
        .args(["--mem", MEM, "--cmdline", cmdline])
        .arg("--console")
        .arg(format!("file:{}", console.display()))
        .arg("--api-socket")
        .arg(socket)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ftvm run")
}

/// `ftvm run --restore DIR` with the console in a file: (output, console text).
fn restore(dir: &Path, extra: &[&str], console: &Path) -> (Output, String) {
    let out = ftvm()
        .arg("run")
        .arg("--restore")
        .arg(dir)
        .arg("--console")
        .arg(format!("file:{}", console.display()))
        .args(extra)
        .output()
        .expect("spawn ftvm run --restore");
    no_panic("run --restore", &text(&out.stderr));
    (out, std::fs::read_to_string(console).unwrap_or_default())
}

/// A restore that must fail with exit 1 and a message containing every one of `want`.
fn restore_fails(dir: &Path, extra: &[&str], want: &[&str]) -> String {
    let console = dir.with_extension("console.txt");
    let (out, console_text) = restore(dir, extra, &console);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "restore of {} {extra:?} must fail: {err}", dir.display());
    assert!(err.contains("ftvm: error: restore: "), "{err}");
    for w in want {
        assert!(err.contains(w), "the error should say {w:?}: {err}");
    }
    assert!(console_text.is_empty(), "a refused restore runs nothing: {console_text}");
    err
}

fn manifest(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("snapshot.json")).unwrap()).expect("snapshot.json is JSON")
}

/// How long the guest was paused, from `ctl snapshot`'s final line.
fn paused_ms(line: &str) -> f64 {
    let rest = line.split("guest paused ").nth(1).unwrap_or_else(|| panic!("no 'guest paused' in {line:?}"));
    rest.split(" ms").next().unwrap().parse().unwrap_or_else(|_| panic!("no pause time in {line:?}"))
}

/// A copy of a snapshot directory: `copied` files are copied, the others hard-linked (they
/// must then not be modified: they are the original's).
fn copy_snapshot(from: &Path, to: &Path, copied: &[&str]) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        let target = to.join(&name);
        if copied.contains(&name.as_str()) || name == "snapshot.json" {
            std::fs::copy(entry.path(), &target).unwrap();
        } else {
            std::fs::hard_link(entry.path(), &target).unwrap();
        }
    }
}

fn flip_byte(path: &Path, offset: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[offset] ^= 0x5a;
    std::fs::write(path, &bytes).unwrap();
}

/// The first non-zero byte of a file at or after `from` (a byte of real data).
fn data_byte(path: &Path, from: usize) -> usize {
    let bytes = std::fs::read(path).unwrap();
    from + bytes[from..].iter().position(|&b| b != 0).unwrap_or_else(|| panic!("{} has no data", path.display()))
}

/// The digest line of an uninterrupted compute run (computed once).
fn reference_digest() -> &'static str {
    static DIGEST: OnceLock<String> = OnceLock::new();
    DIGEST.get_or_init(|| {
        let dir = scratch("snap-reference");
        let (out, console) = run_guest(&guest("compute"), &["--mem", MEM, "--cmdline", ROUNDS], &dir);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let digests = digest_lines(&console);
        assert_eq!(digests.len(), 1, "{console}");
        digests[0].clone()
    })
}

/// A snapshot of the compute guest and what its run printed.
struct Taken {
    dir: PathBuf,

    /// The `digest:` line of the run the snapshot was taken of.
    digest: String,
}

/// A compute run snapshotted live, mid-run (taken once, shared by the tests that read it).
fn live_compute_snapshot() -> &'static Taken {
    static TAKEN: OnceLock<Taken> = OnceLock::new();
    TAKEN.get_or_init(|| {
        let dir = shared_scratch("snap-live");
        let (socket, console) = (dir.join("vm.sock"), dir.join("console.txt"));
        let mut vm = spawn_vm(&guest("compute"), ROUNDS, &socket, &console);
        wait_for_api(&socket, &mut vm);
        std::thread::sleep(Duration::from_millis(700));
        let snap = dir.join("snap");
        let out = take_snapshot(&socket, &snap, false);
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert_eq!(out.status.code(), Some(0), "ctl snapshot: {stderr}{stdout}");
        // Mid-run: the guest had started its work and not finished it.
        let before = std::fs::read_to_string(&console).unwrap();
        assert!(before.contains("compute: 500 rounds"), "{before}");
        assert!(digest_lines(&before).is_empty(), "the guest ended before the snapshot was complete: {before}");
        assert!(vm.try_wait().unwrap().is_none(), "the VM must still run after its snapshot");
        // Progress on stderr (as often as ctl looks: a fast snapshot may show none), the
        // outcome on stdout.
        let phases = ["ftvm: copying while the guest runs", "ftvm: pausing for", "ftvm: guest running again"];
        assert!(stderr.lines().all(|l| phases.iter().any(|p| l.starts_with(p))), "{stderr}");
        let line = stdout.trim();
        assert_eq!(stdout.lines().count(), 1, "{stdout}");
        assert!(line.starts_with(&format!("snapshot written to {}: ", snap.display())), "{line}");
        assert!(line.contains("64.0 MiB of memory"), "{line}");
        let pause = paused_ms(line);
        assert!(pause > 0.0 && pause < 2000.0, "a live snapshot pauses the guest briefly: {line}");
        let (code, err) = wait_exit(vm, Duration::from_secs(60));
        assert_eq!(code, Some(0), "{err}");
        let console = std::fs::read_to_string(&console).unwrap();
        let digests = digest_lines(&console);
        assert_eq!(digests.len(), 1, "{console}");
        Taken { dir: snap, digest: digests[0].clone() }
    })
}

/// A compute run paused, snapshotted and resumed (taken once): pause, status and resume
/// behave around the snapshot.
fn paused_compute_snapshot() -> &'static Taken {
    static TAKEN: OnceLock<Taken> = OnceLock::new();
    TAKEN.get_or_init(|| {
        let dir = shared_scratch("snap-paused");
        let (socket, console) = (dir.join("vm.sock"), dir.join("console.txt"));
        let mut vm = spawn_vm(&guest("compute"), ROUNDS, &socket, &console);
        wait_for_api(&socket, &mut vm);
        std::thread::sleep(Duration::from_millis(500));
        let out = ctl(&socket, &["pause"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout).trim(), "paused");
        let a = status_json(&socket);
        assert_eq!(a["state"], "paused", "{a}");

        let snap = dir.join("snap");
        let out = take_snapshot(&socket, &snap, true);
        assert_eq!(out.status.code(), Some(0), "ctl snapshot --json: {}", text(&out.stderr));
        let progress: Value = serde_json::from_slice(&out.stdout).expect("ctl snapshot --json prints JSON");
        assert_eq!(progress["phase"], "done", "{progress}");
        assert!(progress["error"].is_null(), "{progress}");
        assert_eq!(progress["dir"], snap.display().to_string(), "{progress}");
        assert_eq!(progress["memory_bytes"], 64u64 << 20, "{progress}");
        let rounds = progress["rounds"].as_array().unwrap();
        assert!(rounds.len() >= 2, "round 0 and the paused round at least: {progress}");
        assert!(rounds[0]["pages"].as_u64().unwrap() > 0, "the guest's data is copied: {progress}");
        let later: u64 = rounds[1..].iter().map(|r| r["pages"].as_u64().unwrap()).sum();
        assert!(later < 64, "a paused guest dirties (almost) nothing after round 0: {progress}");
        let pause = progress["pause_ms"].as_f64().unwrap();
        assert!(pause >= 0.0 && pause < progress["elapsed_ms"].as_f64().unwrap(), "{progress}");

        // A snapshot leaves a paused VM paused, and the guest did not run meanwhile.
        let b = status_json(&socket);
        assert_eq!(b["state"], "paused", "{b}");
        assert_eq!(a["exits"], b["exits"], "the guest ran while paused");
        assert_eq!(a["interrupts"], b["interrupts"], "the guest ran while paused");
        let out = ctl(&socket, &["resume"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout).trim(), "running");
        // After the resume the guest (computing in ring 3) gets its timer interrupts again.
        std::thread::sleep(Duration::from_millis(400));
        let c = status_json(&socket);
        assert_eq!(c["state"], "running", "{c}");
        assert!(
            c["interrupts"].as_u64().unwrap() > b["interrupts"].as_u64().unwrap(),
            "no timer interrupt since the resume: before {b}, after {c}"
        );
        // Resuming a running VM is an error.
        let out = ctl(&socket, &["resume"]);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
        assert!(text(&out.stderr).contains("not paused"), "{}", text(&out.stderr));
        no_panic("ctl resume", &text(&out.stderr));

        let (code, err) = wait_exit(vm, Duration::from_secs(60));
        assert_eq!(code, Some(0), "{err}");
        let console = std::fs::read_to_string(&console).unwrap();
        let digests = digest_lines(&console);
        assert_eq!(digests.len(), 1, "{console}");
        Taken { dir: snap, digest: digests[0].clone() }
    })
}

#[test]
fn compute_snapshotted_mid_run_restores_to_the_same_digest_twice() {
    if !kvm_available() {
        return;
    }
    let taken = live_compute_snapshot();
    assert_eq!(taken.digest, reference_digest(), "the snapshot must not disturb the run");

    // The files: manifest, state, a sparse memory image; no disks.
    let m = manifest(&taken.dir);
    assert_eq!((m["format"].as_str(), m["version"].as_u64()), (Some("ftvm-snapshot"), Some(1)), "{m}");
    assert_eq!(m["vm"]["cmdline"], ROUNDS);
    assert_eq!(m["vm"]["memory_size"], 64u64 << 20);
    assert_eq!(m["memory"]["size"], 64u64 << 20);
    assert_eq!(m["disks"].as_array().map(Vec::len), Some(0), "{m}");
    assert!(m["pause_ms"].as_f64().unwrap() > 0.0);
    let memory = std::fs::metadata(taken.dir.join("memory.bin")).unwrap();
    assert_eq!(memory.len(), 64 << 20);
    use std::os::unix::fs::MetadataExt;
    assert!(memory.blocks() * 512 < memory.len() / 2, "memory.bin leaves zero pages as holes");
    assert_eq!(std::fs::metadata(taken.dir.join("state.bin")).unwrap().len(), m["state"]["size"].as_u64().unwrap());
    let files = |dir: &Path| -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| (e.file_name().into_string().unwrap(), std::fs::read(e.path()).unwrap()))
            .collect();
        v.sort();
        v
    };
    let before = files(&taken.dir);
    let names: Vec<&str> = before.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["memory.bin", "snapshot.hmac", "snapshot.json", "state.bin"]);

    // Fresh processes continue the run to the same digest, twice: a snapshot is reusable.
    let dir = scratch("snap-compute-restore");
    for i in 0..2 {
        let console = dir.join(format!("restore{i}.txt"));
        let (out, console) = restore(&taken.dir, &[], &console);
        assert_eq!(out.status.code(), Some(0), "restore {i}: {}", text(&out.stderr));
        assert_eq!(digest_lines(&console), std::slice::from_ref(&taken.digest), "restore {i}: {console}");
        assert!(!console.contains("compute: "), "restore {i} continues, it does not boot again: {console}");
    }
    assert!(before == files(&taken.dir), "restoring leaves the snapshot as it was");
}

#[test]
fn a_paused_vm_snapshots_and_restores_to_the_same_digest() {
    if !kvm_available() {
        return;
    }
    let taken = paused_compute_snapshot();
    assert_eq!(taken.digest, reference_digest(), "pause, snapshot and resume must not disturb the run");
    let dir = scratch("snap-paused-restore");
    let (out, console) = restore(&taken.dir, &[], &dir.join("console.txt"));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(digest_lines(&console), std::slice::from_ref(&taken.digest), "{console}");
}

#[test]
fn record_from_a_snapshot_replays_exactly_also_from_a_moved_snapshot() {
    if !kvm_available() {
        return;
    }
    let taken = live_compute_snapshot();
    let dir = scratch("snap-rr");
    let snap = dir.join("snap");
    copy_snapshot(&taken.dir, &snap, &["memory.bin", "state.bin"]);
    let log = dir.join("run.log");
    let rec_console = dir.join("recorded.txt");
    // Without sync points (--sync-bound 0): they are record/replay's own matter
    // (record_replay.rs), and this compute guest would carry megabytes in each.
    let out = ftvm()
        .args(["record", "--sync-bound", "0", "--restore"])
        .arg(&snap)
        .arg("--log")
        .arg(&log)
        .arg("--console")
        .arg(format!("file:{}", rec_console.display()))
        .output()
        .unwrap();
    let err = text(&out.stderr);
    no_panic("record --restore", &err);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let recorded = std::fs::read_to_string(&rec_console).unwrap();
    assert_eq!(digest_lines(&recorded), std::slice::from_ref(&taken.digest), "{recorded}");

    let replay = |out_dir: &Path, snapshot: Option<&Path>| -> Output {
        let mut c = ftvm();
        c.arg("replay").arg(&log).arg("--output-dir").arg(out_dir);
        if let Some(s) = snapshot {
            c.arg("--snapshot").arg(s);
        }
        let out = c.output().unwrap();
        no_panic("replay", &text(&out.stderr));
        out
    };
    let out = replay(&dir.join("replay1"), None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("replayed exactly"), "{}", text(&out.stderr));
    let replayed = std::fs::read_to_string(dir.join("replay1/console.txt")).unwrap();
    assert_eq!(replayed, recorded, "the replay's console is the recording's, byte for byte");

    // The snapshot moves: the replay needs to be told where it is.
    let moved = dir.join("moved");
    std::fs::rename(&snap, &moved).unwrap();
    let out = replay(&dir.join("replay2"), None);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("snapshot") && err.contains(&snap.display().to_string()), "{err}");
    let out = replay(&dir.join("replay3"), Some(&moved));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let replayed = std::fs::read_to_string(dir.join("replay3/console.txt")).unwrap();
    assert_eq!(digest_lines(&replayed), std::slice::from_ref(&taken.digest), "{replayed}");
    assert_eq!(replayed, recorded);
    // Another snapshot of the same VM is not the one the recording started from.
    let other = &paused_compute_snapshot().dir;
    let out = replay(&dir.join("replay4"), Some(other));
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("not the snapshot the recording started from"), "{err}");
}

#[test]
fn a_recording_from_a_snapshot_taken_mid_spin_replays_its_sync_points_exactly() {
    if !kvm_available() {
        return;
    }
    // hello spinning in ring 3 (no exits): after the restore every tick needs a sync point.
    let dir = scratch("snap-rr-sync");
    let socket = dir.join("vm.sock");
    let mut vm = spawn_vm(&guest("hello"), "hello.wait_ms=10 hello.spin_ms=3000", &socket, &dir.join("run.txt"));
    wait_for_api(&socket, &mut vm);
    std::thread::sleep(Duration::from_millis(800));
    let snap = dir.join("snap");
    let out = take_snapshot(&socket, &snap, false);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (code, err) = wait_exit(vm, Duration::from_secs(30));
    assert_eq!(code, Some(0), "{err}");
    let log = dir.join("run.log");
    let console = dir.join("recorded.txt");
    let out = ftvm()
        .args(["record", "--restore"])
        .arg(&snap)
        .arg("--log")
        .arg(&log)
        .arg("--console")
        .arg(format!("file:{}", console.display()))
        .output()
        .unwrap();
    let err = text(&out.stderr);
    no_panic("record --restore", &err);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains(" sync points"), "the spin went on through sync points: {err}");
    let recorded = std::fs::read_to_string(&console).unwrap();
    assert!(recorded.contains("spin: 300 ticks"), "{recorded}");
    let out_dir = dir.join("replay");
    let out = ftvm().arg("replay").arg(&log).arg("--output-dir").arg(&out_dir).output().unwrap();
    let err = text(&out.stderr);
    no_panic("replay", &err);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(std::fs::read_to_string(out_dir.join("console.txt")).unwrap(), recorded);
}

#[test]
fn a_restored_guest_computing_in_ring3_gets_its_timer_interrupts() {
    if !kvm_available() {
        return;
    }
    let taken = live_compute_snapshot();
    let dir = scratch("snap-restore-timer");
    let socket = dir.join("vm.sock");
    let mut vm = ftvm()
        .arg("run")
        .arg("--restore")
        .arg(&taken.dir)
        .arg("--console")
        .arg(format!("file:{}", dir.join("console.txt").display()))
        .arg("--api-socket")
        .arg(&socket)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_api(&socket, &mut vm);
    let start = Instant::now();
    while status_json(&socket)["state"] != "running" && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(800));
    let s = status_json(&socket);
    let (code, err) = wait_exit(vm, Duration::from_secs(60));
    assert_eq!(code, Some(0), "{err}");
    // The PIT ticks at 100 Hz: 800 ms of a running guest take about 80 timer interrupts.
    assert!(s["interrupts"].as_u64().unwrap() > 10, "no timer interrupts in the restored guest: {s}");
}

/// Whatever the moment the guest ends at, a snapshot is either complete or not there at all:
/// never a directory with part of the files and no manifest.
#[test]
fn a_snapshot_cut_short_by_the_guests_end_leaves_no_half_snapshot() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("snap-cut");
    // Large memory: the guest ends during the pre-copy; small: the snapshot completes, or
    // the guest ends at some point of it.
    let attempts = [("512M", 300, 0), ("64M", 600, 0), ("64M", 600, 200), ("64M", 600, 350)];
    for (i, (mem, wait_ms, delay)) in attempts.into_iter().enumerate() {
        let (socket, console) = (dir.join(format!("vm{i}.sock")), dir.join(format!("console{i}.txt")));
        let mut vm = ftvm()
            .arg("run")
            .arg("--kernel")
            .arg(guest("hello"))
            .args(["--mem", mem, "--cmdline", &format!("hello.wait_ms={wait_ms}")])
            .arg("--console")
            .arg(format!("file:{}", console.display()))
            .arg("--api-socket")
            .arg(&socket)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for_api(&socket, &mut vm);
        std::thread::sleep(Duration::from_millis(delay));
        let snap = dir.join(format!("snap{i}"));
        let out = take_snapshot(&socket, &snap, false);
        let (code, err) = wait_exit(vm, Duration::from_secs(60));
        assert_eq!(code, Some(0), "{err}");
        let ctl_err = text(&out.stderr);
        assert!(matches!(out.status.code(), Some(0 | 1)), "{ctl_err}");
        eprintln!("attempt {i}: ctl exit {:?}: {}{}", out.status.code(), text(&out.stdout), ctl_err);
        let files: Vec<String> = std::fs::read_dir(&snap)
            .map(|d| d.map(|e| e.unwrap().file_name().into_string().unwrap()).collect())
            .unwrap_or_default();
        if out.status.code() == Some(0) || files.iter().any(|f| f == "snapshot.json") {
            // Complete: it restores to the end of the run.
            let (r, restored) = restore(&snap, &[], &dir.join(format!("restored{i}.txt")));
            assert_eq!(r.status.code(), Some(0), "{}", text(&r.stderr));
            let ran = std::fs::read_to_string(&console).unwrap();
            assert_eq!(digest_lines(&restored), digest_lines(&ran), "{restored}");
        } else {
            assert!(files.is_empty(), "a failed snapshot leaves none of its files: {files:?} ({ctl_err})");
            restore_fails(&snap, &[], &[]);
        }
    }
}

#[test]
fn damaged_edited_and_foreign_snapshots_are_refused_clearly() {
    if !kvm_available() {
        return;
    }
    let taken = live_compute_snapshot();
    let dir = scratch("snap-bad");
    let variant = |name: &str, copied: &[&str]| -> PathBuf {
        let d = dir.join(name);
        copy_snapshot(&taken.dir, &d, copied);
        d
    };
    let edit_manifest = |d: &Path, edit: &dyn Fn(&mut Value)| {
        let mut m = manifest(d);
        edit(&mut m);
        std::fs::write(d.join("snapshot.json"), serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    };

    // A truncated memory image.
    let d = variant("truncated", &["memory.bin"]);
    let f = std::fs::OpenOptions::new().write(true).open(d.join("memory.bin")).unwrap();
    f.set_len(32 << 20).unwrap();
    drop(f);
    restore_fails(&d, &[], &["memory.bin", "truncated"]);
    // One byte changed in the guest's data in the memory image.
    let d = variant("memory-byte", &["memory.bin"]);
    let at = data_byte(&d.join("memory.bin"), 2 << 20);
    flip_byte(&d.join("memory.bin"), at);
    restore_fails(&d, &[], &["memory.bin is corrupt", "checksum"]);
    // One byte changed in the vCPU and device state.
    let d = variant("state-byte", &["state.bin"]);
    let len = std::fs::metadata(d.join("state.bin")).unwrap().len() as usize;
    flip_byte(&d.join("state.bin"), len / 2);
    restore_fails(&d, &[], &["state.bin is damaged"]);
    // Missing files.
    let d = variant("no-memory", &[]);
    std::fs::remove_file(d.join("memory.bin")).unwrap();
    restore_fails(&d, &[], &["memory.bin"]);
    // Another format version.
    let d = variant("version", &[]);
    edit_manifest(&d, &|m| m["version"] = 2.into());
    restore_fails(&d, &[], &["format version 2", "reads version 1"]);
    // A manifest whose memory size was edited (larger and smaller).
    for (name, size) in [("mem-larger", 128u64 << 20), ("mem-smaller", 32 << 20)] {
        let d = variant(name, &[]);
        edit_manifest(&d, &|m| m["vm"]["memory_size"] = size.into());
        restore_fails(&d, &[], &["memory_size", &size.to_string()]);
    }
    // What is not a snapshot at all.
    let empty = dir.join("empty");
    std::fs::create_dir(&empty).unwrap();
    restore_fails(&empty, &[], &["is not a snapshot", "snapshot.json"]);
    let file = dir.join("notes.txt");
    std::fs::write(&file, "not a snapshot").unwrap();
    restore_fails(&file, &[], &["is not a directory"]);
    restore_fails(&dir.join("missing"), &[], &["is not a directory"]);
    let d = dir.join("garbage");
    std::fs::create_dir(&d).unwrap();
    std::fs::write(d.join("snapshot.json"), "{ this is not json").unwrap();
    restore_fails(&d, &[], &["not a valid manifest"]);
    std::fs::write(d.join("snapshot.json"), r#"{"format": "something-else", "version": 1}"#).unwrap();
    restore_fails(&d, &[], &["not an ftvm snapshot manifest"]);

    // Host choices that do not fit the snapshot's VM (it has no network device and no disk).
    restore_fails(&taken.dir, &["--net", "tap=tap0"], &["network device", "1 --net given"]);
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(1 << 20).unwrap();
    restore_fails(&taken.dir, &["--disk", disk.to_str().unwrap()], &["disk(s)", "1 --disk given"]);

    // The VM comes from the snapshot: booting options conflict with --restore (usage error).
    for extra in [&["--kernel", "x.elf"][..], &["--mem", "128M"], &["--cmdline", "a=b"], &["--rng"]] {
        let out = ftvm().args(["run", "--restore"]).arg(&taken.dir).args(extra).output().unwrap();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {err}");
        assert!(err.contains("--restore") && err.contains(extra[0]), "{extra:?}: {err}");
        no_panic("usage", &err);
    }
    // The snapshot was not touched by any of this.
    assert!(manifest(&taken.dir)["vm"]["memory_size"] == 64u64 << 20);
}

#[test]
fn refused_snapshot_directories_and_a_changed_kernel() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("snap-dirs");
    // The VM runs from a copy of the kernel, which changes after the snapshot.
    let kernel = dir.join("hello.elf");
    std::fs::copy(guest("hello"), &kernel).unwrap();
    let (socket, console) = (dir.join("vm.sock"), dir.join("console.txt"));
    let mut vm = spawn_vm(&kernel, "hello.wait_ms=3000", &socket, &console);
    wait_for_api(&socket, &mut vm);

    // A directory that is not empty: refused, and left as it was.
    let full = dir.join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("keep.txt"), "mine").unwrap();
    let out = take_snapshot(&socket, &full, false);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("not empty") && err.contains(&full.display().to_string()), "{err}");
    let left: Vec<_> = std::fs::read_dir(&full).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, ["keep.txt"]);
    assert_eq!(std::fs::read_to_string(full.join("keep.txt")).unwrap(), "mine");
    // A path that cannot be created (under a regular file).
    let file = dir.join("a-file");
    std::fs::write(&file, "x").unwrap();
    let under = file.join("snap");
    let out = take_snapshot(&socket, &under, true);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot create") && err.contains(&under.display().to_string()), "{err}");
    // The VM runs on, unharmed, and a snapshot into a good directory works.
    assert!(vm.try_wait().unwrap().is_none(), "the VM must keep running");
    assert_eq!(status_json(&socket)["state"], "running");
    let snap = dir.join("snap");
    let out = take_snapshot(&socket, &snap, false);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let (code, err) = wait_exit(vm, Duration::from_secs(30));
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(digest_lines(&std::fs::read_to_string(&console).unwrap()).len(), 1);

    // The kernel the snapshot was taken with changed, then went.
    let mut image = std::fs::read(&kernel).unwrap();
    let last = image.len() - 1;
    image[last] ^= 0xff;
    std::fs::write(&kernel, &image).unwrap();
    let k = kernel.display().to_string();
    restore_fails(&snap, &[], &["kernel", &k, "changed since the snapshot"]);
    std::fs::remove_file(&kernel).unwrap();
    restore_fails(&snap, &[], &["kernel", &k, "missing"]);
}

// ---- The kvstore guest on the namespaced test network ----

/// A blank 64 MiB disk image.
fn blank_disk(path: &Path) {
    std::fs::File::create(path).unwrap().set_len(64 << 20).unwrap();
}

/// ftvm in host 1's namespace (where tap0 is); stderr kept.
fn ftvm_in(net: &Topology) -> Command {
    let mut c = net.cmd("h1", env!("CARGO_BIN_EXE_ftvm"));
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

/// The kvstore guest booted on `disk`, with an API socket.
fn boot_kvstore(net: &Topology, disk: &Path, console: &Path, socket: Option<&Path>) -> Child {
    let mut c = ftvm_in(net);
    c.arg("run").arg("--kernel").arg(guest("kvstore"));
    c.args(["--mem", "128M", "--cmdline", "ip=10.0.0.2/24", "--net", "tap=tap0", "--rng", "--disk"]).arg(disk);
    c.arg("--console").arg(format!("file:{}", console.display()));
    if let Some(s) = socket {
        c.arg("--api-socket").arg(s);
    }
    c.spawn().unwrap()
}

/// A kvstore VM on a fresh blank disk in `dir`, with an API socket, answering PING:
/// (the VM, its disk, its socket); its console is `dir/console.txt`.
fn kvstore_serving(net: &Topology, dir: &Path) -> (Child, PathBuf, PathBuf) {
    let disk = dir.join("disk.img");
    blank_disk(&disk);
    let (socket, console) = (dir.join("vm.sock"), dir.join("console.txt"));
    let vm = boot_kvstore(net, &disk, &console, Some(&socket));
    wait_console(&console, "kvstore: listening");
    net.wait_ping("kvstore");
    (vm, disk, socket)
}

fn restore_kvstore(net: &Topology, snap: &Path, console: &Path, extra: &[&str]) -> Child {
    let mut c = ftvm_in(net);
    c.arg("run").arg("--restore").arg(snap).arg("--console").arg(format!("file:{}", console.display()));
    c.args(extra).spawn().unwrap()
}

fn wait_console(console: &Path, what: &str) -> String {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        let t = std::fs::read_to_string(console).unwrap_or_default();
        if t.contains(what) {
            return t;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{} never showed {what:?}", console.display());
}

/// Kills a VM (as a host crash would) and returns its stderr.
fn kill(vm: Child) -> String {
    wait_exit(vm, Duration::ZERO).1
}

/// DBSIZE once it holds still (requests that were in flight when a snapshot was taken are
/// served by the restored VM).
fn settled_dbsize(net: &Topology) -> u64 {
    let mut last = u64::MAX;
    for _ in 0..50 {
        let now: u64 = net.cli(&["DBSIZE"]).parse().expect("DBSIZE answers a number");
        if now == last {
            return now;
        }
        last = now;
        std::thread::sleep(Duration::from_millis(300));
    }
    panic!("DBSIZE never settled (last {last})");
}

#[test]
fn kvstore_restored_has_the_keys_from_before_the_snapshot_only() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("snap-kv");
    let net = Topology::up("sk", 1);
    let (vm, disk, socket) = kvstore_serving(&net, &dir);
    for i in 0..10 {
        assert_eq!(net.cli(&["SET", &format!("before:{i}"), &format!("value {i}")]), "OK");
    }
    for n in 1..=3 {
        assert_eq!(net.cli(&["INCR", "counter"]), n.to_string());
    }
    let snap = dir.join("snap");
    let out = take_snapshot(&socket, &snap, false);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let m = manifest(&snap);
    let disks = m["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 1, "{m}");
    assert_eq!(disks[0]["copy"]["file"], "disk0.img", "{m}");
    assert_eq!(std::fs::metadata(snap.join("disk0.img")).unwrap().len(), 64 << 20);
    assert_eq!(m["vm"]["net"].as_array().map(Vec::len), Some(1), "{m}");

    // Writes after the snapshot, then the VM dies.
    for i in 0..5 {
        assert_eq!(net.cli(&["SET", &format!("after:{i}"), "later"]), "OK");
    }
    assert_eq!(net.cli(&["INCR", "counter"]), "4");
    assert_eq!(net.cli(&["DEL", "before:0"]), "1");
    assert_eq!(net.cli(&["DBSIZE"]), "15");
    kill(vm);

    // Restored (the disk back into disk.img, the snapshot's TAP): the state of the snapshot.
    let console2 = dir.join("restored.txt");
    let vm = restore_kvstore(&net, &snap, &console2, &[]);
    net.wait_ping("the restored kvstore");
    for i in 0..10 {
        assert_eq!(net.cli(&["GET", &format!("before:{i}")]), format!("value {i}"), "before:{i}");
    }
    assert_eq!(net.cli(&["GET", "counter"]), "3");
    for i in 0..5 {
        assert_eq!(net.cli(&["EXISTS", &format!("after:{i}")]), "0", "after:{i} was written after the snapshot");
    }
    assert_eq!(net.cli(&["DBSIZE"]), "11");
    // It serves new writes.
    assert_eq!(net.cli(&["SET", "new", "after restore"]), "OK");
    assert_eq!(net.cli(&["GET", "new"]), "after restore");
    assert_eq!(net.cli(&["INCR", "counter"]), "4");
    let restored_console = std::fs::read_to_string(&console2).unwrap_or_default();
    assert!(!restored_console.contains("kvstore: listening"), "a restore does not boot: {restored_console}");
    let err = kill(vm);
    assert!(err.contains(&format!("restoring disk 0 from the snapshot into {}", disk.display())), "{err}");

    // The disk was put back too: a fresh boot on it finds the restored VM's data.
    let console3 = dir.join("rebooted.txt");
    let vm = boot_kvstore(&net, &disk, &console3, None);
    let booted = wait_console(&console3, "kvstore: listening");
    net.wait_ping("the rebooted kvstore");
    assert!(booted.contains("recovered 12 keys"), "{booted}");
    assert_eq!(net.cli(&["GET", "new"]), "after restore");
    assert_eq!(net.cli(&["GET", "counter"]), "4");
    assert_eq!(net.cli(&["EXISTS", "after:0"]), "0");
    kill(vm);

    // A damaged disk copy is refused, and the target image is left alone.
    let at = data_byte(&snap.join("disk0.img"), 0);
    flip_byte(&snap.join("disk0.img"), at);
    let target = dir.join("target.img");
    std::fs::write(&target, b"untouched").unwrap();
    let target_arg = target.display().to_string();
    let out = restore_kvstore(&net, &snap, &dir.join("bad.txt"), &["--disk", &target_arg]).wait_with_output().unwrap();
    let err = text(&out.stderr);
    no_panic("restore with a damaged disk copy", &err);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("disk0.img is corrupt"), "{err}");
    assert_eq!(std::fs::read(&target).unwrap(), b"untouched");
    assert!(!target.with_extension("restoring").exists(), "no half-restored disk is left behind");
}

#[test]
fn a_live_snapshot_under_redis_benchmark_load_is_consistent() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("snap-kv-load");
    let net = Topology::up("sl", 1);
    let (vm, disk, socket) = kvstore_serving(&net, &dir);

    // 20 clients SET random keys, throughout the snapshot.
    let mut bench = net
        .cmd("c", "redis-benchmark")
        .args(["-h", "10.0.0.2", "-t", "set", "-r", "100000", "-n", "100000000", "-c", "20", "-q"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    assert!(bench.try_wait().unwrap().is_none(), "redis-benchmark runs");
    let snap = dir.join("snap");
    let out = take_snapshot(&socket, &snap, true);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(bench.try_wait().unwrap().is_none(), "redis-benchmark ran during the whole snapshot");
    let progress: Value = serde_json::from_slice(&out.stdout).unwrap();
    let rounds = progress["rounds"].as_array().unwrap();
    let later = |key: &str| -> u64 { rounds[1..].iter().map(|r| r[key].as_u64().unwrap()).sum() };
    assert!(later("pages") > 0, "the loaded guest dirtied memory during the pre-copy: {progress}");
    assert!(later("disk_bytes") > 0, "the loaded guest wrote its disk during the pre-copy: {progress}");
    let _ = bench.kill();
    let _ = bench.wait();
    kill(vm);

    // The restore goes to another image; the VM's own disk is left as the VM left it.
    let disk_after = std::fs::read(&disk).unwrap();
    let restored = dir.join("restored.img");
    let console2 = dir.join("restored.txt");
    let vm = restore_kvstore(&net, &snap, &console2, &["--net", "tap=tap0", "--disk", restored.to_str().unwrap()]);
    net.wait_ping("the restored kvstore");
    let d1 = settled_dbsize(&net);
    assert!(d1 > 0, "the benchmark's keys are there");
    let err = kill(vm);
    assert!(err.contains(&format!("into {}", restored.display())), "{err}");
    assert!(std::fs::read(&disk).unwrap() == disk_after, "the original image was not written by the restore");

    // Memory and disk of the snapshot agree: a fresh boot on the restored image recovers the
    // same keys from the disk log alone.
    let console3 = dir.join("rebooted.txt");
    let vm = boot_kvstore(&net, &restored, &console3, None);
    let booted = wait_console(&console3, "kvstore: listening");
    net.wait_ping("the rebooted kvstore");
    assert!(booted.contains(&format!("recovered {d1} keys")), "DBSIZE {d1} after the restore; the reboot: {booted}");
    assert_eq!(net.cli(&["DBSIZE"]), d1.to_string());
    kill(vm);
}
