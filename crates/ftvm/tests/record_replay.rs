//! `ftvm record`, `ftvm replay` and `ftvm log inspect` on real guests: exact replays, the
//! divergence report for a guest that breaks the contract, and every bad-log path.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::*;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn record(log: &Path, kernel: &Path, args: &[&str]) -> Output {
    let console = log.with_extension("console");
    ftvm()
        .args(["record", "--log"])
        .arg(log)
        .arg("--kernel")
        .arg(kernel)
        .arg("--console")
        .arg(format!("file:{}", console.display()))
        .args(args)
        .output()
        .unwrap()
}

fn replay(log: &Path, out_dir: Option<&Path>) -> Output {
    let mut cmd = ftvm();
    cmd.arg("replay").arg(log);
    if let Some(d) = out_dir {
        cmd.arg("--output-dir").arg(d);
    }
    cmd.output().unwrap()
}

#[test]
fn hello_replays_exactly_with_the_same_console() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("rr-hello");
    let log = dir.join("hello.log");
    let out = record(&log, &guest("hello"), &["--cmdline", "hello.wait_ms=300"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let recorded = std::fs::read_to_string(log.with_extension("console")).unwrap();
    assert!(recorded.contains("digest: "), "{recorded}");

    let out_dir = dir.join("replay");
    let out = replay(&log, Some(&out_dir));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("replayed exactly"), "{}", stderr(&out));
    let replayed = std::fs::read_to_string(out_dir.join("console.txt")).unwrap();
    assert_eq!(replayed, recorded, "the replay's console must be the recording's, byte for byte");

    let out = ftvm().args(["log", "inspect", "--json"]).arg(&log).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("inspect --json prints JSON");
    let text = json.to_string();
    assert!(text.contains("GuestPowerOff") || text.contains("power-off"), "{text}");
    let out = ftvm().args(["log", "inspect", "--events"]).arg(&log).output().unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(listing.contains("CLOCK") && listing.contains("OUTPUT") && listing.contains("END"), "{listing}");
}

/// A number in `text` right after `key` (e.g. "30 sync points" with key " sync points" reads
/// backwards: use `number_before`).
fn number_before(text: &str, key: &str) -> Option<f64> {
    let end = text.find(key)?;
    let start = text[..end].rfind(|c: char| !(c.is_ascii_digit() || c == '.')).map_or(0, |i| i + 1);
    text[start..end].parse().ok()
}

#[test]
fn a_guest_spinning_in_ring3_gets_its_ticks_through_sync_points_and_replays_exactly() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("rr-sync");
    let log = dir.join("spin.log");
    // 500 ms of ticks awaited in ring 3 without one exit: only sync points deliver them.
    // The budget is out of the way here (it has tests of its own, sync_budget.rs): this
    // debug build's sync points cost ~1 ms of CPU, which the default 5% spaces to ~20 ms.
    let out = record(&log, &guest("hello"), &["--cmdline", "hello.spin_ms=500", "--sync-budget", "50"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let recorded = std::fs::read_to_string(log.with_extension("console")).unwrap();
    assert!(recorded.contains("spin: 50 ticks in ring 3 without an exit"), "{recorded}");
    let syncs = number_before(&err, " sync points").expect("the summary counts sync points") as u64;
    assert!(syncs >= 45, "about one sync point per tick: {err}");
    // Each tick waited about the bound (10 ms); scheduling on a loaded host adds a little.
    let longest = number_before(&err, " ms at most").expect("the summary gives the longest wait");
    assert!(longest <= 25.0, "a tick waited {longest} ms (bound 10 ms): {err}");
    let inspect = ftvm().args(["log", "inspect", "--json"]).arg(&log).output().unwrap();
    let summary: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(summary["summary"]["by_kind"]["SYNC_POINT"]["count"].as_u64(), Some(syncs), "{summary}");
    let out_dir = dir.join("replay");
    let out = replay(&log, Some(&out_dir));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let replayed = std::fs::read_to_string(out_dir.join("console.txt")).unwrap();
    assert_eq!(replayed, recorded, "the replay applies the sync points and prints the same");

    // Without sync points the ticks wait for an exit that never comes.
    let console = dir.join("nosync.txt");
    let mut child = ftvm()
        .args(["record", "--sync-bound", "0", "--log"])
        .arg(dir.join("nosync.log"))
        .arg("--kernel")
        .arg(guest("hello"))
        .args(["--cmdline", "hello.spin_ms=500", "--console"])
        .arg(format!("file:{}", console.display()))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let still_running = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    assert!(still_running, "without sync points the spinning guest cannot finish");
    assert!(!std::fs::read_to_string(&console).unwrap_or_default().contains("spin:"));
}

#[test]
fn compute_replays_at_ring3_speed_to_the_same_digest() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("rr-compute");
    let log = dir.join("compute.log");
    let out = record(&log, &guest("compute"), &["--cmdline", "compute.rounds=40"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let recorded = std::fs::read_to_string(log.with_extension("console")).unwrap();
    let out_dir = dir.join("replay");
    let out = replay(&log, Some(&out_dir));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let replayed = std::fs::read_to_string(out_dir.join("console.txt")).unwrap();
    assert_eq!(digest_lines(&replayed), digest_lines(&recorded));
    assert_eq!(digest_lines(&replayed).len(), 1);
    // Its sync points carry the working set each time: ~200 MB of log, not worth keeping.
    let _ = std::fs::remove_dir_all(&dir);
}

/// A guest that breaks the contract: it prints the four low bytes of RDTSC.
fn rdtsc_guest() -> Vec<u8> {
    let mut code = vec![0x0f, 0x31]; // rdtsc
    code.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
    for _ in 0..4 {
        code.push(0xee); // out dx, al
        code.extend_from_slice(&[0xc1, 0xe8, 0x08]); // shr eax, 8
    }
    code.extend_from_slice(asm::POWER_OFF);
    pvh_elf(&code)
}

#[test]
fn a_guest_reading_rdtsc_diverges_and_the_report_says_where() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("rr-rdtsc");
    let kernel = dir.join("rdtsc.elf");
    std::fs::write(&kernel, rdtsc_guest()).unwrap();
    let log = dir.join("rdtsc.log");
    let out = record(&log, &kernel, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = replay(&log, None);
    assert_eq!(out.status.code(), Some(8), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("replay diverged at exit"), "{err}");
    // Caught at the first port write of a TSC byte (its exit signature carries the data), or,
    // when that byte happens to be the recording's too, by the checkpoint of the same exit
    // (RAX holds the rest of the TSC): either way at exit 0, where it happened.
    assert!(
        err.contains("expected (log): exit signature port write addr=0x3f8")
            || err.contains("diverged at exit 0\n  expected (log): checkpoint"),
        "{err}"
    );
    assert!(err.contains("last point of agreement"), "{err}");
}

#[test]
fn a_truncated_log_replays_to_its_end_and_says_so() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("rr-trunc");
    let log = dir.join("hello.log");
    let out = record(&log, &guest("hello"), &["--cmdline", "hello.wait_ms=100"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let bytes = std::fs::read(&log).unwrap();
    let cut = dir.join("cut.log");
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let out = replay(&cut, None);
    assert_eq!(out.status.code(), Some(9), "{}", stderr(&out));
    assert!(stderr(&out).contains("ends early"), "{}", stderr(&out));
    let out = ftvm().args(["log", "inspect"]).arg(&cut).output().unwrap();
    assert_eq!(out.status.code(), Some(9), "inspect says the log is incomplete");
}

#[test]
fn a_corrupted_frame_is_reported_with_its_offset() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("rr-corrupt");
    let log = dir.join("hello.log");
    let out = record(&log, &guest("hello"), &["--cmdline", "hello.wait_ms=100"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let mut bytes = std::fs::read(&log).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x55;
    std::fs::write(&log, &bytes).unwrap();
    let out = replay(&log, None);
    assert_eq!(out.status.code(), Some(10), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("byte offset") && err.contains("frame"), "{err}");
}

#[test]
fn bad_logs_and_altered_images_are_refused_clearly() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("rr-bad");
    let empty = dir.join("empty.log");
    std::fs::write(&empty, b"").unwrap();
    let out = replay(&empty, None);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("empty"), "{}", stderr(&out));

    let notlog = dir.join("not.log");
    std::fs::write(&notlog, b"hello, this is not a log at all").unwrap();
    let out = replay(&notlog, None);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not an ftvm log"), "{}", stderr(&out));

    // A log whose kernel changed since the recording.
    let kernel = dir.join("tiny.elf");
    let mut code = asm::out_bytes(0x3f8, b"hi");
    code.extend_from_slice(asm::POWER_OFF);
    std::fs::write(&kernel, pvh_elf(&code)).unwrap();
    let log = dir.join("tiny.log");
    let out = record(&log, &kernel, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let mut other = vec![0x90]; // a nop more
    other.extend_from_slice(&code);
    std::fs::write(&kernel, pvh_elf(&other)).unwrap();
    let out = replay(&log, None);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not the one recorded"), "{}", stderr(&out));
    std::fs::remove_file(&kernel).unwrap();
    let out = replay(&log, None);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("missing"), "{}", stderr(&out));

    // Another format version.
    let mut bytes = std::fs::read(&log).unwrap();
    bytes[8] = 99;
    std::fs::write(&log, &bytes).unwrap();
    let out = replay(&log, None);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("version"), "{}", stderr(&out));
}

#[test]
fn operator_stop_and_size_limit_end_the_log_cleanly() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("rr-stop");
    // SIGINT while compute runs: END(operator stop), and the replay reaches that point.
    let log = dir.join("stopped.log");
    let mut child = ftvm()
        .args(["record", "--log"])
        .arg(&log)
        .arg("--kernel")
        .arg(guest("compute"))
        .args(["--cmdline", "compute.rounds=100000", "--console"])
        .arg(format!("file:{}", dir.join("c.txt").display()))
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    // SAFETY: sending a signal to our own child process.
    unsafe { libc_kill(child.id() as i32, 2) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    let out = ftvm().args(["log", "inspect"]).arg(&log).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains("operator stop"));
    let out = replay(&log, None);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("reached the end of the recording"), "{}", stderr(&out));

    // A size limit: END(size limit), exit 7, and the log still replays exactly up to there.
    let log = dir.join("limited.log");
    let out = record(&log, &guest("hello"), &["--cmdline", "hello.wait_ms=500", "--max-size", "12K"]);
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    assert!(std::fs::metadata(&log).unwrap().len() <= 12 * 1024);
    let out = replay(&log, None);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

#[test]
fn a_divergence_that_stays_in_memory_is_caught_by_page_hashes() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("rr-memory");
    // rdtsc; mov [0x200000], eax; clear eax and edx; power off: the TSC reaches no exit, no
    // output and no register.
    let mut code = vec![0x0f, 0x31, 0xa3, 0x00, 0x00, 0x20, 0x00, 0x31, 0xc0, 0x31, 0xd2]; // then xor eax, edx
    code.extend_from_slice(asm::POWER_OFF);
    let kernel = dir.join("rdtsc-mem.elf");
    std::fs::write(&kernel, pvh_elf(&code)).unwrap();
    let log = dir.join("mem.log");
    let out = record(&log, &kernel, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = replay(&log, None);
    assert_eq!(out.status.code(), Some(8), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("expected (log): page 0x200000 hash"), "{err}");
}
