//! What a user expects of a command-line tool: shell completions that complete, man pages,
//! grouped help, host names where addresses are asked for, and `ftvm list`.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;

#[test]
fn bash_completion_completes_commands_and_options() {
    let script = ftvm().args(["completions", "bash"]).output().unwrap();
    assert!(script.status.success());
    let dir = scratch("completions");
    let path = dir.join("ftvm.bash");
    std::fs::write(&path, &script.stdout).unwrap();
    let complete = |words: &str, cword: usize| {
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(format!(
                "source {}; COMP_WORDS=({words}); COMP_CWORD={cword}; COMP_LINE='{words}'; COMP_POINT=${{#COMP_LINE}}; \
                 _ftvm ftvm; echo \"${{COMPREPLY[@]}}\"",
                path.display()
            ))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let commands = complete("ftvm pri", 1);
    assert!(commands.split_whitespace().any(|w| w == "primary"), "{commands}");
    let options = complete("ftvm primary --key", 2);
    assert!(options.split_whitespace().any(|w| w == "--key-file"), "{options}");
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let out = ftvm().args(["completions", shell]).output().unwrap();
        assert!(out.status.success() && !out.stdout.is_empty(), "{shell}");
    }
    let out = ftvm().args(["completions", "tcsh"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn man_pages_are_written_for_every_command() {
    let dir = scratch("manpages");
    let out = ftvm().arg("manpages").arg(&dir).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for page in
        ["ftvm.1", "ftvm-run.1", "ftvm-primary.1", "ftvm-backup.1", "ftvm-ctl-status.1", "ftvm-doctor-primary.1"]
    {
        let text = std::fs::read_to_string(dir.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.starts_with(".ie") || text.contains(".TH"), "{page} is not a man page");
    }
    let primary = std::fs::read_to_string(dir.join("ftvm-primary.1")).unwrap();
    assert!(primary.contains("key\\-file") || primary.contains("key-file"), "the options are in the page");
}

#[test]
fn the_pair_options_are_grouped_in_the_help() {
    let out = ftvm().args(["primary", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    let headings: Vec<_> = help.lines().filter(|l| !l.starts_with(' ') && l.ends_with(':')).collect();
    assert_eq!(headings, ["Options:", "Pair:", "Recording:", "VM:"], "{help}");
    let pair = help.split("\nPair:\n").nth(1).unwrap().split("\nRecording:\n").next().unwrap();
    for flag in ["--backup", "--arbiter", "--key-file", "--timeout"] {
        assert!(pair.contains(flag), "{flag} is not under Pair: {pair}");
    }
}

#[test]
fn backup_and_listen_take_host_names() {
    // doctor resolves the name as the primary would, and says which address it tries.
    let out = ftvm()
        .args(["doctor", "primary", "--backup", "localhost:1", "--insecure", "--kernel", "/nonexistent"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("backup at 127.0.0.1:1") || text.contains("backup at [::1]:1"), "{text}");
    let out = ftvm()
        .args(["doctor", "backup", "--listen", "localhost:0", "--insecure", "--kernel", "/nonexistent"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("listen address 127.0.0.1:0"), "{text}");
    let out = ftvm()
        .args(["primary", "--backup", "no-such-host.invalid:7000", "--insecure", "--kernel", "k"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("cannot resolve \"no-such-host.invalid:7000\""), "{err}");
    let out = ftvm().args(["primary", "--backup", "localhost", "--insecure", "--kernel", "k"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("has no port"), "{err}");
}

#[test]
fn list_shows_running_vms_and_stale_sockets() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("list");
    let socket = dir.join("web1.sock");
    let mut vm = ftvm()
        .args(["run", "--kernel"])
        .arg(guest("hello"))
        .args(["--cmdline", "hello.wait_ms=5000", "--console"])
        .arg(format!("file:{}", dir.join("console.txt").display()))
        .arg("--api-socket")
        .arg(&socket)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // A socket nobody answers on, as a killed VM leaves behind.
    let stale = std::os::unix::net::UnixListener::bind(dir.join("old.sock")).unwrap();
    drop(stale);
    let start = std::time::Instant::now();
    while !socket.exists() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = ftvm().arg("list").arg(&dir).output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    let json = ftvm().arg("list").arg(&dir).arg("--json").output().unwrap();
    let _ = vm.kill();
    let _ = vm.wait();
    assert!(out.status.success(), "{table}");
    let line = table.lines().find(|l| l.starts_with("web1 ")).unwrap_or_else(|| panic!("no web1 in:\n{table}"));
    assert!(line.contains("standalone") && line.contains("running"), "{line}");
    assert!(line.contains(&vm.id().to_string()), "the pid: {line}");
    let old = table.lines().find(|l| l.starts_with("old ")).unwrap_or_else(|| panic!("no old in:\n{table}"));
    assert!(old.contains("stale"), "{old}");
    let list: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let names: Vec<_> = list.as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap().to_string()).collect();
    assert!(names.contains(&"web1".to_string()) && names.contains(&"old".to_string()), "{names:?}");
    let web1 = list.as_array().unwrap().iter().find(|e| e["name"] == "web1").unwrap();
    assert_eq!(web1["status"]["role"], "standalone");
    let out = ftvm().args(["list", "/nonexistent-dir"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent-dir is not a directory"));
}
