//! `ftvm`: the command-line front end. Thin by design: it parses arguments, builds a
//! configuration, and hands it to the VMM core.

mod size;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use ftvm_vmm::boot::BootSpec;
use ftvm_vmm::vm::{DiskConfig, NetConfig};
use ftvm_vmm::{ConsoleConfig, VmConfig};

/// ftvm: a virtual machine monitor that keeps a VM running when its host dies.
#[derive(Parser, Debug)]
#[command(name = "ftvm", about, long_about = None)]
struct Cli {
    /// Log level for ftvm's own messages (error, warn, info, debug, trace); FTVM_LOG overrides.
    #[arg(long, global = true, default_value = "warn")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a kernel and run it until the guest powers off.
    ///
    /// virtio devices are virtio-mmio, version 2 (virtio 1.x), announced to the guest by
    /// appending `virtio_mmio.device=4K@<addr>:<irq>` to its command line, in the order
    /// nets (in the order given), disks (in the order given), rng: the first device at
    /// 0xd0000000, the next 0x1000 higher, and so on, with ISA IRQs 5, 6, 7, 9, 10, 11 in turn
    /// (at most six devices).
    ///
    /// Exit status: 0 guest powered off, 1 ftvm error, 2 usage error, 3 guest requested a
    /// reset, 4 guest triple fault, 5 guest halted for good, 6 KVM could not run the guest.
    Run(RunArgs),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Kernel image: a PVH ELF kernel (such as the guest kit's) or a Linux bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,
    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = "")]
    cmdline: String,
    /// Initial ramdisk (a PVH module, or the bzImage initrd).
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Guest memory: a number of MiB, or with a unit (512K, 256M, 1G).
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = size::parse_mem_size)]
    mem: u64,
    /// Where the serial console goes: `stdio` (output to stdout, input from stdin) or
    /// `file:PATH` (output to PATH, no input).
    #[arg(long, value_name = "stdio|file:PATH", default_value = "stdio", value_parser = parse_console)]
    console: ConsoleConfig,
    /// The wall-clock time the guest's RTC shows at boot, in seconds since 1970 (default: now).
    #[arg(long, value_name = "SECONDS")]
    rtc_base: Option<u64>,
    /// A virtio-net device attached to the existing TAP interface NAME (ftvm does not
    /// create it). MAC default: 52:54:00:12:34:56, the last byte plus the device's index.
    /// Repeatable.
    #[arg(long = "net", value_name = "tap=NAME[,mac=MAC]", value_parser = parse_net)]
    nets: Vec<NetConfig>,
    /// A virtio-blk device backed by a raw disk image; `,readonly` attaches it read-only
    /// (needed for an image ftvm may not write). Repeatable.
    #[arg(long = "disk", value_name = "PATH[,readonly]", value_parser = parse_disk)]
    disks: Vec<DiskConfig>,
    /// A virtio-rng device (entropy from the host, through the event source).
    #[arg(long)]
    rng: bool,
}

fn parse_net(s: &str) -> Result<NetConfig, String> {
    s.parse().map_err(option_error)
}

fn parse_disk(s: &str) -> Result<DiskConfig, String> {
    s.parse().map_err(option_error)
}

/// clap already names the option and the value; keep only the reason.
fn option_error(e: ftvm_vmm::Error) -> String {
    match e {
        ftvm_vmm::Error::DeviceOption { why, .. } => why,
        other => other.to_string(),
    }
}

fn parse_console(s: &str) -> Result<ConsoleConfig, String> {
    match s {
        "stdio" => Ok(ConsoleConfig::Stdio),
        _ => match s.strip_prefix("file:") {
            Some("") => Err("file: needs a path, e.g. file:/tmp/console.log".into()),
            Some(path) => Ok(ConsoleConfig::File(path.into())),
            None => Err(format!("unknown console {s:?}; use stdio or file:PATH")),
        },
    }
}

fn version_text() -> String {
    format!("{} ({})", env!("CARGO_PKG_VERSION"), ftvm_vmm::kvm::describe())
}

fn main() -> ExitCode {
    let command = Cli::command().version(version_text());
    let cli = match Cli::from_arg_matches(&command.get_matches()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    init_logging(&cli.log_level);
    match cli.command {
        Command::Run(args) => run(args),
    }
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FTVM_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
}

fn run(args: RunArgs) -> ExitCode {
    let config = VmConfig {
        boot: BootSpec { kernel: args.kernel, initrd: args.initrd, cmdline: args.cmdline },
        mem_size: args.mem,
        console: args.console,
        rtc_base_unix: args.rtc_base,
        nets: args.nets,
        disks: args.disks,
        rng: args.rng,
    };
    match ftvm_vmm::vm::run(config) {
        Ok(report) => {
            let code = report.outcome.exit_code();
            let s = &report.stats;
            let summary = format!(
                "{} after {:.3} s ({} exits: {} port I/O, {} MMIO, {} HLT, {} MSR; {} interrupts, {} kicks)",
                report.outcome,
                report.elapsed.as_secs_f64(),
                report.exits,
                s.io,
                s.mmio,
                s.hlt,
                s.msr,
                s.interrupts,
                s.kicks
            );
            if code == 0 {
                tracing::info!("{summary}");
            } else {
                eprintln!("ftvm: {summary}");
            }
            ExitCode::from(code as u8)
        }
        Err(e) => {
            eprintln!("ftvm: error: {e}");
            ExitCode::from(1)
        }
    }
}
