//! `--config FILE` and `ftvm doctor`: the example configuration of docs/operations.md runs a
//! pair as it is, flags override the file, bad files are refused with the key and the reason,
//! and the doctor says what is missing.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// The pair.toml example of docs/operations.md, verbatim.
fn documented_example() -> String {
    let doc = std::fs::read_to_string(repo_root().join("docs/operations.md")).unwrap();
    let (_, after) =
        doc.split_once("<!-- example: pair.toml -->").expect("docs/operations.md has the pair.toml example");
    let body = after.split_once("```toml\n").unwrap().1;
    body.split_once("```").unwrap().0.to_string()
}

/// A directory with the example, a key and a `target` link to the repository's, so that the
/// example's relative paths work unchanged from it.
fn example_dir(name: &str) -> Scratch {
    let dir = scratch(name);
    std::fs::write(dir.join("pair.toml"), documented_example()).unwrap();
    std::fs::write(dir.join("pair.key"), "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.join("pair.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink(repo_root().join("target"), dir.join("target")).unwrap();
    dir
}

fn ftvm_in(dir: &Path) -> Command {
    let mut c = ftvm();
    c.current_dir(dir).stdout(Stdio::piped()).stderr(Stdio::piped());
    c
}

#[test]
fn the_documented_example_runs_a_pair_as_it_is() {
    if !kvm_available() {
        return;
    }
    let dir = example_dir("config-pair");
    let backup = ftvm_in(&dir).args(["backup", "--config", "pair.toml"]).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let primary = ftvm_in(&dir).args(["primary", "--config", "pair.toml"]).spawn().unwrap();
    let (out, in_time) = finish_within(primary, Duration::from_secs(60));
    assert!(in_time, "the primary did not finish");
    assert_eq!(out.status.code(), Some(0), "primary: {}", String::from_utf8_lossy(&out.stderr));
    let (bout, in_time) = finish_within(backup, Duration::from_secs(20));
    assert!(in_time, "the backup did not finish");
    assert_eq!(bout.status.code(), Some(0), "backup: {}", String::from_utf8_lossy(&bout.stderr));
    let console = std::fs::read_to_string(dir.join("primary-console.txt")).unwrap();
    assert!(console.contains("digest: "), "the primary's console (from [primary]): {console}");
    // The backup performed nothing: every output was the primary's.
    assert_eq!(std::fs::read_to_string(dir.join("backup-console.txt")).unwrap_or_default(), "");
}

#[test]
fn a_flag_overrides_the_file() {
    if !kvm_available() {
        return;
    }
    let dir = example_dir("config-override");
    // The file's run takes the top level (hello, 300 ms) and no console: stdout. The flag
    // sends the console to a file instead.
    let out = ftvm_in(&dir).args(["run", "--config", "pair.toml", "--console", "file:flag.txt"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let console = std::fs::read_to_string(dir.join("flag.txt")).unwrap();
    assert!(console.contains("digest: "), "{console}");
    assert!(out.stdout.is_empty(), "the console went to the flag's file, not stdout");
}

#[test]
fn bad_configuration_files_are_refused_with_the_key_and_why() {
    let dir = scratch("config-bad");
    let cases: [(&str, &str, &[&str]); 5] = [
        ("memory = \"1G\"\n", "run", &["unknown key \"memory\"", "--memory"]),
        ("[primary]\nlisten = \"127.0.0.1:1\"\n", "primary", &["\"listen\" in [primary]"]),
        ("mem = \n", "run", &["not valid TOML", "line 1"]),
        ("rng = \"yes\"\n", "run", &["rng", "expected true or false"]),
        (
            "insecure = true\nkey-file = \"k\"\n[primary]\nbackup = \"127.0.0.1:1\"\n",
            "primary",
            &["cannot be used with"],
        ),
    ];
    for (i, (text, command, words)) in cases.iter().enumerate() {
        let path = dir.join(format!("bad{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let out = ftvm_in(&dir).arg(command).arg("--config").arg(&path).arg("--kernel").arg("k").output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text:?}: {err}");
        for w in *words {
            assert!(err.contains(w), "{text:?}: {w:?} missing from: {err}");
        }
        assert!(!err.contains("panicked"), "{err}");
    }
    let out = ftvm_in(&dir).args(["run", "--config", "missing.toml"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("cannot read the configuration file missing.toml"), "{err}");
}

#[test]
fn doctor_says_what_is_missing_and_passes_when_nothing_is() {
    if !kvm_available() {
        return;
    }
    let dir = example_dir("config-doctor");
    // No backup listens yet: the primary's check of its peer fails, the rest passes.
    let out = ftvm_in(&dir).args(["doctor", "primary", "--config", "pair.toml"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("ok    KVM (/dev/kvm): API 12"), "{text}");
    assert!(text.contains("ok    kernel target/guests/hello.elf"), "{text}");
    assert!(text.contains("ok    replication key pair.key: a valid key, mode 600"), "{text}");
    assert!(text.contains("FAIL  backup at 127.0.0.1:7400: cannot be reached"), "{text}");
    assert!(text.contains("-> start the backup"), "{text}");
    assert!(text.contains("1 of 5 checks did not pass"), "{text}");
    // The backup's side passes: its listen address is free.
    let out = ftvm_in(&dir).args(["doctor", "backup", "--config", "pair.toml"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("ok    listen address 127.0.0.1:7400: TCP and UDP can both be bound"), "{text}");
    assert!(text.contains("all 5 checks passed"), "{text}");
    // A key others can read, a missing disk, a missing TAP: each named, with what to do.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.join("pair.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = ftvm_in(&dir)
        .args(["doctor", "backup", "--config", "pair.toml", "--disk", "nodisk.img", "--net", "tap=ftvm-notap0"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("warn  replication key pair.key: a valid key, but its mode is 644"), "{text}");
    assert!(text.contains("`chmod 600 pair.key`"), "{text}");
    assert!(text.contains("FAIL  disk nodisk.img"), "{text}");
    assert!(text.contains("FAIL  TAP ftvm-notap0: no such interface"), "{text}");
    assert!(text.contains("ip tuntap add dev ftvm-notap0 mode tap"), "{text}");
}

#[test]
fn doctor_compares_the_vms_with_a_waiting_backup_which_then_pairs_as_usual() {
    if !kvm_available() {
        return;
    }
    let dir = example_dir("config-doctor-peer");
    // The example's port is fixed; this test has its own.
    let text = std::fs::read_to_string(dir.join("pair.toml")).unwrap().replace("7400", "7401");
    std::fs::write(dir.join("pair.toml"), text).unwrap();
    let backup = ftvm_in(&dir).args(["backup", "--config", "pair.toml"]).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let out = ftvm_in(&dir).args(["doctor", "primary", "--config", "pair.toml"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("ok    backup at 127.0.0.1:7401: accepts connections"), "{text}");
    assert!(text.contains("ok    the backup's VM at 127.0.0.1:7401: the key is accepted"), "{text}");
    // Another memory size: named.
    let out = ftvm_in(&dir).args(["doctor", "primary", "--config", "pair.toml", "--mem", "128M"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("FAIL  the backup's VM at 127.0.0.1:7401: differs from this VM"), "{text}");
    assert!(text.contains("mem"), "the difference is named: {text}");
    // Another key: refused by the channel.
    std::fs::write(dir.join("other.key"), "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100\n")
        .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.join("other.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let out =
        ftvm_in(&dir).args(["doctor", "primary", "--config", "pair.toml", "--key-file", "other.key"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("FAIL  the backup's VM at 127.0.0.1:7401"), "{text}");
    // The backup waited on through all three: the real primary pairs and ends normally.
    let primary = ftvm_in(&dir).args(["primary", "--config", "pair.toml"]).spawn().unwrap();
    let (out, in_time) = finish_within(primary, Duration::from_secs(60));
    assert!(in_time && out.status.code() == Some(0), "primary: {}", String::from_utf8_lossy(&out.stderr));
    let (bout, in_time) = finish_within(backup, Duration::from_secs(20));
    let berr = String::from_utf8_lossy(&bout.stderr);
    assert!(in_time && bout.status.code() == Some(0), "backup: {berr}");
    assert!(berr.contains("answered a preflight"), "{berr}");
}
