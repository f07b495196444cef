//! Bad input gets a clear error, a documented exit status, and no panic.

mod common;

use common::*;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn missing_kernel_is_reported() {
    let dir = scratch("missing-kernel");
    let (out, _) = run_guest(&dir.join("nope.elf"), &[], &dir);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("nope.elf") && err.contains("No such file"), "{err}");
}

#[test]
fn a_file_that_is_no_kernel_is_reported() {
    let dir = scratch("not-a-kernel");
    let path = dir.join("notes.txt");
    std::fs::write(&path, "just some text\n").unwrap();
    let (out, _) = run_guest(&path, &[], &dir);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("neither an ELF kernel nor a Linux bzImage"), "{}", stderr(&out));
    let empty = dir.join("empty");
    std::fs::write(&empty, "").unwrap();
    let (out, _) = run_guest(&empty, &[], &dir);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("empty"), "{}", stderr(&out));
}

#[test]
fn usage_errors_exit_2_with_a_hint() {
    for args in [
        vec!["run", "--kernel", "x", "--console", "serial"],
        vec!["run", "--kernel", "x", "--console", "file:"],
        vec!["run", "--kernel", "x", "--mem", "lots"],
        vec!["run"],
    ] {
        let out = ftvm().args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
    }
}

#[test]
fn version_names_the_kvm_backend() {
    let out = ftvm().arg("--version").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("ftvm "), "{text}");
    assert!(text.contains("KVM"), "{text}");
}

#[test]
fn malformed_command_line_is_refused() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("bad-cmdline");
    let kernel = dir.join("k.elf");
    std::fs::write(&kernel, pvh_elf(asm::POWER_OFF)).unwrap();
    let (out, _) = run_guest(&kernel, &["--cmdline", "a\tb"], &dir);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("command line"), "{}", stderr(&out));
}

#[test]
fn memory_too_small_for_the_image_is_reported() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("small-mem");
    // 3 MiB of code at 1 MiB does not fit a 2 MiB guest.
    let mut code = asm::POWER_OFF.to_vec();
    code.resize(3 << 20, 0x90);
    let kernel = dir.join("big.elf");
    std::fs::write(&kernel, pvh_elf(&code)).unwrap();
    let (out, _) = run_guest(&kernel, &["--mem", "2M"], &dir);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("too small"), "{}", stderr(&out));
}

#[test]
fn tiny_guest_prints_and_powers_off() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("tiny-poweroff");
    let mut code = asm::out_bytes(0x3f8, b"ok\n");
    code.extend_from_slice(asm::POWER_OFF);
    let kernel = dir.join("k.elf");
    std::fs::write(&kernel, pvh_elf(&code)).unwrap();
    let (out, console) = run_guest(&kernel, &[], &dir);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(console, "ok\n");
}

#[test]
fn unknown_ports_are_logged_once_and_ignored() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("unknown-port");
    let mut code = asm::out_bytes(0xe9, b"abc");
    code.extend_from_slice(asm::POWER_OFF);
    let kernel = dir.join("k.elf");
    std::fs::write(&kernel, pvh_elf(&code)).unwrap();
    let (out, _) = run_guest(&kernel, &[], &dir);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stderr(&out).matches("0xe9").count(), 1, "{}", stderr(&out));
}

#[test]
fn triple_fault_is_reported_with_registers() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("triple-fault");
    let kernel = dir.join("k.elf");
    std::fs::write(&kernel, pvh_elf(asm::UD2)).unwrap();
    let (out, _) = run_guest(&kernel, &[], &dir);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("triple fault") && err.contains("rip=0x0000000000100000"), "{err}");
}

#[test]
fn i8042_reset_stops_the_vm() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("i8042-reset");
    let kernel = dir.join("k.elf");
    std::fs::write(&kernel, pvh_elf(asm::I8042_RESET)).unwrap();
    let (out, _) = run_guest(&kernel, &[], &dir);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("reset"), "{}", stderr(&out));
}

#[test]
fn halting_with_interrupts_off_is_reported() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("cli-hlt");
    let kernel = dir.join("k.elf");
    std::fs::write(&kernel, pvh_elf(asm::CLI_HLT)).unwrap();
    let (out, _) = run_guest(&kernel, &[], &dir);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("halted"), "{}", stderr(&out));
}
