//! `cargo xtask`: repository tasks that are not part of ftvm itself.
//!
//! - `cargo xtask guests`: builds the guest kit's reference guests (the `guests/` workspace,
//!   freestanding PVH kernels) in release mode, copies them to `target/guests/<name>.elf`
//!   and checks each against the guest contract (see `check`).
//! - `cargo xtask check-guest PATH...`: only the check.

mod check;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

/// The guests `cargo xtask guests` builds: binaries of the `guests/` workspace.
const GUESTS: &[&str] = &["hello", "compute", "iobench", "kvstore"];
/// The guests are built for the host target (the only one installed) as bare-metal kernels.
const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";

#[derive(Parser)]
#[command(name = "cargo xtask", about = "ftvm repository tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the reference guests into target/guests/*.elf and check the guest contract.
    Guests,
    /// Check PVH ELF guests against the guest contract (no RDTSC, RDTSCP, RDPID, RDRAND,
    /// RDSEED; CPUID only in ring-0 code).
    CheckGuest {
        /// ELF files to check.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Guests => guests(),
        Task::CheckGuest { paths } => check_files(&paths),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The repository root: xtask lives one level below it.
fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

fn guests() -> Result<()> {
    let root = repo_root();
    let build_dir = root.join("target/guest-build");
    let out_dir = root.join("target/guests");
    let status = guest_cargo(&root, &build_dir).status().context("running cargo build for guests/")?;
    if !status.success() {
        bail!("building the guests failed ({status})");
    }

    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let mut failed = Vec::new();
    for name in GUESTS {
        let built = build_dir.join(GUEST_TARGET).join("release").join(name);
        let elf = out_dir.join(format!("{name}.elf"));
        std::fs::copy(&built, &elf).with_context(|| format!("copying {} to {}", built.display(), elf.display()))?;
        if !check_one(&elf)? {
            // A guest that breaks the contract must not be picked up by tests or benchmarks.
            std::fs::remove_file(&elf).with_context(|| format!("removing {}", elf.display()))?;
            failed.push(*name);
        }
    }
    if !failed.is_empty() {
        bail!("guest contract broken by: {}", failed.join(", "));
    }
    build_contract_breaker(&root, &build_dir, &out_dir)
}

/// `cargo build --release` of the guests workspace into `target_dir`. Run from guests/ so
/// that its .cargo/config.toml (target, rustflags) applies; flags inherited from the outer
/// build that would override or break those settings are dropped.
fn guest_cargo(root: &Path, target_dir: &Path) -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut c = Command::new(cargo);
    c.current_dir(root.join("guests"))
        .args(["build", "--release", "--target", GUEST_TARGET, "--target-dir"])
        .arg(target_dir)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET");
    c
}

/// `kvstore-rdtsc.elf`: the kvstore built with its `rdtsc` feature, which reads the TSC in
/// ring 3 and so breaks the guest contract on purpose (the pair's divergence and resync
/// tests run it). The checker must find exactly that: RDTSC, and nothing else.
fn build_contract_breaker(root: &Path, build_dir: &Path, out_dir: &Path) -> Result<()> {
    let status = guest_cargo(root, &build_dir.join("rdtsc"))
        .args(["-p", "kvstore", "--features", "rdtsc"])
        .status()
        .context("running cargo build for kvstore --features rdtsc")?;
    if !status.success() {
        bail!("building kvstore-rdtsc failed ({status})");
    }
    let built = build_dir.join("rdtsc").join(GUEST_TARGET).join("release").join("kvstore");
    let elf = out_dir.join("kvstore-rdtsc.elf");
    std::fs::copy(&built, &elf).with_context(|| format!("copying {} to {}", built.display(), elf.display()))?;
    let bytes = std::fs::read(&elf).with_context(|| format!("reading {}", elf.display()))?;
    let report = check::check_elf(&bytes).with_context(|| format!("checking {}", elf.display()))?;
    let rdtsc = report.violations.iter().filter(|v| v.instruction.starts_with("rdtsc")).count();
    if rdtsc == 0 || rdtsc != report.violations.len() {
        bail!("{}: expected RDTSC violations only, found: {:?}", elf.display(), report.violations);
    }
    println!(
        "{}: breaks the guest contract on purpose ({rdtsc} RDTSC in ring 3), for the divergence tests",
        elf.display()
    );
    Ok(())
}

fn check_files(paths: &[PathBuf]) -> Result<()> {
    let mut failed = Vec::new();
    for path in paths {
        if !check_one(path)? {
            failed.push(path.display().to_string());
        }
    }
    if !failed.is_empty() {
        bail!("guest contract broken by: {}", failed.join(", "));
    }
    Ok(())
}

/// Checks one ELF, prints its summary line and any violations; true if it passes.
fn check_one(path: &Path) -> Result<bool> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let report = check::check_elf(&bytes).with_context(|| format!("checking {}", path.display()))?;
    let name = path.display();
    for violation in &report.violations {
        println!("{name}: {violation}");
    }
    let sections: Vec<String> = report
        .sections
        .iter()
        .map(|s| {
            let mode = if s.bitness == 32 { ", 32-bit" } else { "" };
            format!("{} ({} B at {:#x}{mode})", s.name, s.size, s.address)
        })
        .collect();
    let invalid: usize = report.sections.iter().map(|s| s.invalid).sum();
    let invalid = if invalid > 0 { format!(", {invalid} undecodable") } else { String::new() };
    println!(
        "{name}: {} bytes, PVH entry {:#x}; scanned {}: {} instructions{invalid}; {}",
        bytes.len(),
        report.pvh_entry,
        sections.join(", "),
        report.instructions(),
        if report.violations.is_empty() {
            "OK".to_string()
        } else {
            format!("{} VIOLATION(S)", report.violations.len())
        }
    );
    Ok(report.violations.is_empty())
}
