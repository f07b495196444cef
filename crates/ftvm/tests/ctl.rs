//! The control API (`--api-socket`) and its client `ftvm ctl`: status as text and JSON,
//! pause and resume, bad requests, sockets that are missing, stale or taken, and the pair's
//! figures.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn ctl(socket: &Path, args: &[&str]) -> Output {
    ftvm().arg("ctl").arg(socket).args(args).output().expect("spawn ftvm ctl")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn status_json(socket: &Path) -> Value {
    let out = ctl(socket, &["status", "--json"]);
    assert_eq!(out.status.code(), Some(0), "ctl status --json: {}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("ctl status --json prints JSON")
}

/// Waits until a VM answers on `socket`.
fn wait_for_api(socket: &Path, vm: &mut Child) {
    wait_for_api_state(socket, vm, true)
}

/// Waits until the API answers (and, with `running`, the VM is past being built: a backup
/// stays "starting" until its primary comes).
fn wait_for_api_state(socket: &Path, vm: &mut Child, running: bool) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        if let Some(status) = vm.try_wait().unwrap() {
            panic!("the VM exited ({status}) before its API answered");
        }
        // Answering, and past building the VM (a loaded machine takes a while).
        let out = ctl(socket, &["status"]);
        let starting = text(&out.stdout).lines().any(|l| l.starts_with("state:") && l.ends_with("starting"));
        if out.status.success() && !(running && starting) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no running VM behind {} after 20 s", socket.display());
}

/// Sends raw bytes to the socket and returns the whole answer.
fn raw(socket: &Path, request: &[u8]) -> String {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    answer
}

/// The status code and the JSON body of an answer.
fn parse_answer(answer: &str) -> (u16, Value) {
    let code = answer.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (code, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn spawn_vm(sub: &str, extra: &[&str], socket: &Path, console: &Path) -> Child {
    ftvm()
        .arg(sub)
        .arg("--kernel")
        .arg(guest("hello"))
        .arg("--console")
        .arg(format!("file:{}", console.display()))
        .arg("--api-socket")
        .arg(socket)
        .args(extra)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ftvm")
}

fn finish(mut vm: Child, limit: Duration) -> (Option<i32>, String) {
    let start = Instant::now();
    while start.elapsed() < limit && vm.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = vm.kill();
    let out = vm.wait_with_output().unwrap();
    (out.status.code(), text(&out.stderr))
}

#[test]
fn ctl_without_a_vm_says_so() {
    let dir = scratch("ctl-no-vm");
    let missing = dir.join("missing.sock");
    let out = ctl(&missing, &["status"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("no API socket at") && err.contains("--api-socket"), "{err}");
    // A socket file left by a VM that died: nothing answers.
    let stale = dir.join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let out = ctl(&stale, &["pause"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("the VM is gone"), "{}", text(&out.stderr));
    // A path that is not a socket.
    let file = dir.join("notes.txt");
    std::fs::write(&file, "x").unwrap();
    let out = ctl(&file, &["status", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("is not a socket"), "{}", text(&out.stderr));
    // Usage errors.
    assert_eq!(ftvm().args(["ctl"]).output().unwrap().status.code(), Some(2));
    assert_eq!(ctl(&missing, &["frobnicate"]).status.code(), Some(2));
}

#[test]
fn status_pause_resume_and_bad_requests() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("ctl-run");
    let socket: PathBuf = dir.join("vm.sock");
    // A stale socket from an earlier VM is replaced.
    drop(UnixListener::bind(&socket).unwrap());
    let console = dir.join("console.txt");
    let mut vm = spawn_vm("run", &["--cmdline", "hello.wait_ms=3000"], &socket, &console);
    wait_for_api(&socket, &mut vm);

    // Text for people.
    let out = ctl(&socket, &["status"]);
    let t = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let line = |key: &str| {
        t.lines().find(|l| l.starts_with(&format!("{key}:"))).unwrap_or_else(|| panic!("no {key}: line in\n{t}"))
    };
    assert!(line("state").ends_with(" running"), "{t}");
    assert!(line("role").ends_with(" standalone"), "{t}");
    assert!(line("exits").contains("(io "), "{t}");
    line("uptime");
    line("guest time");
    assert!(!t.contains("lag:"), "no pair figures for a standalone VM: {t}");

    // JSON for scripts.
    let s = status_json(&socket);
    assert_eq!(s["state"], "running");
    assert_eq!(s["role"], "standalone");
    assert_eq!(s["pause_requested"], false);
    assert!(s["uptime_s"].as_f64().unwrap() > 0.0, "{s}");
    assert!(s["guest_time_s"].as_f64().is_some(), "{s}");
    let total = s["exits"]["total"].as_u64().unwrap();
    let by_kind: u64 = ["io", "mmio", "hlt", "msr"].iter().map(|k| s["exits"][k].as_u64().unwrap()).sum();
    assert!(total > 0 && by_kind <= total, "{s}");
    assert!(s["interrupts"].as_u64().is_some(), "{s}");
    assert!(s["log"].is_null() && s["pair"].is_null(), "{s}");

    // A second VM on the same socket is refused while this one answers.
    let other = ftvm()
        .args(["run", "--kernel"])
        .arg(guest("hello"))
        .arg("--api-socket")
        .arg(&socket)
        .arg("--console")
        .arg(format!("file:{}", dir.join("other.txt").display()))
        .output()
        .unwrap();
    assert_eq!(other.status.code(), Some(1));
    assert!(text(&other.stderr).contains("another ftvm answers there"), "{}", text(&other.stderr));

    // Pause: exits stop advancing; pausing again is fine.
    let out = ctl(&socket, &["pause"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "paused");
    let a = status_json(&socket);
    assert_eq!(a["state"], "paused");
    std::thread::sleep(Duration::from_millis(400));
    let b = status_json(&socket);
    assert_eq!(a["exits"], b["exits"], "exits advanced while paused");
    assert_eq!(a["interrupts"], b["interrupts"]);
    assert!(ctl(&socket, &["pause"]).status.success());
    assert!(text(&ctl(&socket, &["status"]).stdout).contains("paused"));

    // Resume: exits advance again; resuming a running VM is an error.
    let out = ctl(&socket, &["resume"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "running");
    std::thread::sleep(Duration::from_millis(200));
    let c = status_json(&socket);
    assert_eq!(c["state"], "running");
    assert!(c["exits"]["total"].as_u64() > b["exits"]["total"].as_u64(), "{c}");
    let out = ctl(&socket, &["resume"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("not paused") && text(&out.stderr).contains("400"), "{}", text(&out.stderr));

    // A snapshot while running (live), and one into a directory that already has one: refused.
    let snap = dir.join("snap");
    let out = ctl(&socket, &["snapshot", snap.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("snapshot written to"), "{}", text(&out.stdout));
    assert!(snap.join("snapshot.json").exists());
    let out = ctl(&socket, &["snapshot", snap.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("not empty"), "{}", text(&out.stderr));

    // Bad requests get an HTTP error with a JSON body, never a crash.
    for (request, want) in [
        (&b"GARBAGE\r\n\r\n"[..], 400),
        (b"GET /status HTTP/1.1\r\nContent-Length: nope\r\n\r\n", 400),
        (b"\x00\x01\x02\xff\r\n\r\n", 400),
        (b"GET /nowhere HTTP/1.1\r\n\r\n", 404),
        (b"DELETE /status HTTP/1.1\r\n\r\n", 405),
        (b"PUT /snapshot HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", 400),
    ] {
        let answer = raw(&socket, request);
        let (code, body) = parse_answer(&answer);
        assert_eq!(code, want, "{:?} -> {answer}", String::from_utf8_lossy(request));
        assert!(body["error"].is_string(), "{answer}");
    }
    // A well-formed request by hand, as curl --unix-socket sends it.
    let (code, body) = parse_answer(&raw(&socket, b"GET /status HTTP/1.1\r\nHost: localhost\r\n\r\n"));
    assert_eq!((code, body["role"].as_str()), (200, Some("standalone")));

    // The VM still runs to its end; the socket goes with it.
    let (code, err) = finish(vm, Duration::from_secs(30));
    assert_eq!(code, Some(0), "{err}");
    assert!(std::fs::read_to_string(&console).unwrap().contains("digest: "));
    assert!(!socket.exists(), "the socket file is removed at exit");
    let out = ctl(&socket, &["status"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no API socket"), "{}", text(&out.stderr));
}

#[test]
fn a_recording_reports_its_log() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("ctl-record");
    let socket = dir.join("rec.sock");
    let log = dir.join("run.log");
    let mut vm = spawn_vm(
        "record",
        &["--cmdline", "hello.wait_ms=2000", "--log", log.to_str().unwrap()],
        &socket,
        &dir.join("console.txt"),
    );
    wait_for_api(&socket, &mut vm);
    std::thread::sleep(Duration::from_millis(500));
    let s = status_json(&socket);
    assert_eq!((s["role"].as_str(), s["state"].as_str()), (Some("recording"), Some("running")), "{s}");
    assert!(s["log"]["bytes"].as_u64().unwrap() > 0, "{s}");
    assert!(s["log"]["bandwidth_bytes_per_s"].as_f64().is_some(), "{s}");
    let t = text(&ctl(&socket, &["status"]).stdout);
    assert!(t.contains("role:") && t.contains("recording") && t.contains("log bandwidth:"), "{t}");
    // Pausing a recording keeps it exact: the pause is between exits.
    assert!(ctl(&socket, &["pause"]).status.success());
    std::thread::sleep(Duration::from_millis(200));
    assert!(ctl(&socket, &["resume"]).status.success());
    let (code, err) = finish(vm, Duration::from_secs(30));
    assert_eq!(code, Some(0), "{err}");
    let replay = ftvm().arg("replay").arg(&log).output().unwrap();
    assert_eq!(replay.status.code(), Some(0), "{}", text(&replay.stderr));
}

/// A free TCP port whose UDP twin is free too (the pair uses both).
fn free_port() -> u16 {
    loop {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

#[test]
fn the_pair_reports_replication_figures() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("ctl-pair");
    let addr = format!("127.0.0.1:{}", free_port());
    let arbiter = dir.join("arbiter.lock");
    let side = |role: &str, flag: &str, name: &str| -> (Child, PathBuf) {
        let socket = dir.join(format!("{name}.sock"));
        let mut c = Command::new(env!("CARGO_BIN_EXE_ftvm"));
        c.args([role, flag, &addr, "--insecure"]).arg("--arbiter").arg(&arbiter);
        c.arg("--kernel").arg(guest("hello")).args(["--cmdline", "hello.wait_ms=3000"]);
        c.arg("--console").arg(format!("file:{}", dir.join(format!("{name}.txt")).display()));
        c.arg("--api-socket").arg(&socket);
        (c.stderr(Stdio::piped()).spawn().unwrap(), socket)
    };
    let (mut backup, bsock) = side("backup", "--listen", "b");
    wait_for_api_state(&bsock, &mut backup, false);
    let (mut primary, psock) = side("primary", "--backup", "p");
    wait_for_api(&psock, &mut primary);
    std::thread::sleep(Duration::from_millis(1200));

    let p = status_json(&psock);
    assert_eq!(p["role"], "primary", "{p}");
    let pair = &p["pair"];
    assert_eq!(pair["protected"], true, "{p}");
    assert!(pair["acked_lsn"].as_u64().unwrap() > 0, "{p}");
    assert!(pair["lag_records"].is_u64() && pair["sent_bytes"].as_u64().unwrap() > 0, "{p}");
    assert!(pair["outputs_done"].as_u64().unwrap() > 0, "hello printed by now: {p}");
    assert!(pair["outputs_held"].is_u64() && pair["failovers"] == 0, "{p}");
    // Every output so far waited for an acknowledgement: the mean wait is measured.
    assert!(pair["output_hold_us"].as_u64().is_some_and(|us| us > 0), "{p}");
    assert!(p["log"]["bytes"].as_u64().unwrap() > 0, "{p}");
    let t = text(&ctl(&psock, &["status"]).stdout);
    assert!(t.contains("primary (protected)") && t.contains("lag:") && t.contains("outputs held:"), "{t}");
    assert!(t.contains("output hold:"), "{t}");

    let b = status_json(&bsock);
    assert_eq!((b["role"].as_str(), b["state"].as_str()), (Some("backup"), Some("running")), "{b}");
    assert_eq!(b["pair"]["protected"], true, "{b}");
    assert!(b["pair"]["received_lsn"].as_u64().unwrap() > 0, "{b}");
    assert_eq!(b["pair"]["failovers"], 0, "{b}");

    // The primary dies: the backup goes live and says so.
    primary.kill().unwrap();
    let _ = primary.wait();
    let start = Instant::now();
    let live = loop {
        let b = status_json(&bsock);
        if b["role"] == "backup-live" || start.elapsed() > Duration::from_secs(10) {
            break b;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(live["role"], "backup-live", "{live}");
    assert_eq!((live["pair"]["failovers"].as_u64(), live["pair"]["protected"].as_bool()), (Some(1), Some(false)));
    assert!(live["pair"]["primary_silence_ms"].as_u64().is_some(), "{live}");
    let (code, err) = finish(backup, Duration::from_secs(20));
    assert_eq!(code, Some(0), "{err}");
}
