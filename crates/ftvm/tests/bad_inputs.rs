//! Kernels and initrds that are not regular files (issue 18, item 9): `--initrd /dev/zero`
//! grew memory at about 2 GB/s until killed, a `--kernel` that is a FIFO blocked ftvm for
//! ever in open(2). Only regular files are accepted, with a size bound checked before a byte
//! is read; each refusal is exit 1 with a message that says what the file is, within seconds.

mod common;

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// How long a refusal may take (it takes milliseconds; the bound is for a loaded host).
const BOUND: Duration = Duration::from_secs(20);

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `ftvm run ARGS`, killed at [`BOUND`]: `None` if it had to be.
fn bounded_run(args: &[&str], dir: &Path) -> Option<Output> {
    let mut child = ftvm()
        .arg("run")
        .args(args)
        .arg("--console")
        .arg(format!("file:{}", dir.join("console.txt").display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ftvm run");
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > BOUND {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(child.wait_with_output().unwrap())
}

fn refused(args: &[&str], dir: &Path, want: &[&str]) {
    let out = bounded_run(args, dir).unwrap_or_else(|| panic!("ftvm run {args:?} was still running after {BOUND:?}"));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "ftvm run {args:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    for w in want {
        assert!(err.contains(w), "ftvm run {args:?} should say {w:?}: {err}");
    }
}

fn mkfifo(path: &Path) {
    let _ = std::fs::remove_file(path);
    let status = std::process::Command::new("mkfifo").arg(path).status().expect("run mkfifo");
    assert!(status.success(), "mkfifo {}", path.display());
}

#[test]
fn a_kernel_that_is_not_a_regular_file_is_refused_at_once() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("bad-kernel");
    let fifo = dir.join("kernel.fifo");
    mkfifo(&fifo);
    let fifo = fifo.to_str().unwrap();
    refused(&["--kernel", fifo], &dir, &["cannot read kernel image", fifo, "a FIFO", "only a regular file"]);
    refused(&["--kernel", "/dev/zero"], &dir, &["/dev/zero", "a character device", "only a regular file"]);
    let d = dir.to_str().unwrap();
    refused(&["--kernel", d], &dir, &["a directory", "only a regular file"]);
    // A link to a regular file is that file: it boots.
    let link = dir.join("hello-link.elf");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(guest("hello"), &link).unwrap();
    let out = bounded_run(&["--kernel", link.to_str().unwrap(), "--cmdline", "hello.wait_ms=10"], &dir)
        .expect("the guest powers off at once");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn an_initrd_that_is_not_a_regular_file_or_does_not_fit_is_refused_before_it_is_read() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("bad-initrd");
    let hello = guest("hello");
    let kernel = hello.to_str().unwrap();
    refused(
        &["--kernel", kernel, "--initrd", "/dev/zero"],
        &dir,
        &["cannot read initrd /dev/zero", "character device"],
    );
    let fifo = dir.join("initrd.fifo");
    mkfifo(&fifo);
    refused(&["--kernel", kernel, "--initrd", fifo.to_str().unwrap()], &dir, &["initrd", "a FIFO"]);
    // 3 GiB that cannot fit a 64 MiB guest: refused from its size, not after reading it
    // (it is sparse: reading it would take seconds and 3 GiB of memory).
    let big = dir.join("big.img");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(3 << 30).unwrap();
    drop(f);
    let started = Instant::now();
    refused(&["--kernel", kernel, "--mem", "64M", "--initrd", big.to_str().unwrap()], &dir, &["too small", "big.img"]);
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}: the initrd was read", started.elapsed());
    // Beyond the bound of any initrd: refused from its size too, whatever the memory.
    let huge = dir.join("huge.img");
    let f = std::fs::File::create(&huge).unwrap();
    f.set_len(5 << 30).unwrap();
    drop(f);
    refused(&["--kernel", kernel, "--initrd", huge.to_str().unwrap()], &dir, &["huge.img", "at most"]);
    let _ = std::fs::remove_dir_all(&dir);
}
