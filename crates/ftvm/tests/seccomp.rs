//! The per-thread seccomp filters (crates/ftvm-seccomp): a thread that makes a system call its
//! filter forbids stops the process with one line naming the thread and the call, and
//! `--seccomp=off` turns the filters off. The debug build's `FTVM_TEST_FORBIDDEN_SYSCALL=KIND`
//! makes the thread of that kind call getppid(2) (number 110, in no filter) right after its
//! filter is installed.

mod common;

use std::os::unix::process::ExitStatusExt;

use common::*;

fn run_with_forbidden_call(kind: &str, extra: &[&str]) -> (std::process::Output, String) {
    let dir = scratch(&format!("seccomp-{kind}"));
    let console = dir.join("console.txt");
    let out = ftvm()
        .arg("run")
        .arg("--kernel")
        .arg(guest("hello"))
        .args(["--cmdline", "hello.wait_ms=300", "--mem", "64M"])
        .arg("--console")
        .arg(format!("file:{}", console.display()))
        .args(extra.iter().map(|a| a.replace("DIR", &dir.display().to_string())))
        .env("FTVM_TEST_FORBIDDEN_SYSCALL", kind)
        .output()
        .expect("spawn ftvm");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stderr)
}

fn assert_killed_naming(kind: &str, extra: &[&str]) {
    let (out, stderr) = run_with_forbidden_call(kind, extra);
    assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{kind}: {:?}\n{stderr}", out.status);
    let line = format!("ftvm: seccomp: the {kind} thread made system call 110, which its filter forbids");
    assert_eq!(stderr.matches(&line).count(), 1, "{kind}: no single clear line in:\n{stderr}");
}

#[test]
fn a_forbidden_call_on_the_vcpu_thread_stops_ftvm_with_a_line_naming_it() {
    if !kvm_available() {
        return;
    }
    assert_killed_naming("vcpu", &[]);
}

#[test]
fn a_forbidden_call_on_other_threads_stops_ftvm_with_a_line_naming_them() {
    if !kvm_available() {
        return;
    }
    assert_killed_naming("main", &[]);
    assert_killed_naming("timer", &[]);
    assert_killed_naming("stop", &[]);
    assert_killed_naming("api", &["--api-socket", "DIR/api.sock"]);
}

#[test]
fn seccomp_off_installs_no_filter() {
    if !kvm_available() {
        return;
    }
    let (out, stderr) = run_with_forbidden_call("vcpu", &["--seccomp=off"]);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("seccomp"), "{stderr}");
}
