//! `ftvm-bench`: side-by-side benchmarks of ftvm, each suite alternating the engines it
//! compares on the same guest images so that machine noise hits all alike, reporting medians
//! and ratios as a table, JSON and an SVG chart under target/bench/ (see docs/benchmarks.md).
//!
//! - `run-vs-qemu` (the default): `ftvm run` vs QEMU microvm (KVM): boot, compute, port I/O;
//! - `record-replay`: `ftvm run`/`record`/`replay` times and log sizes, QEMU TCG record/replay;
//! - `kvstore`: redis-benchmark against the kvstore guest under ftvm run, record and QEMU;
//! - `redis`: the real Redis 7 under the Linux personality (ftvm run, record, protected) vs the same
//!   binary natively, vs kvstore and vs QEMU microvm running the same image;
//! - `pair`: the kvstore guest protected (ftvm primary + backup) vs unprotected, failover outage;
//! - `snapshot`: live snapshot and restore of the kvstore guest vs QEMU's migration to a file;
//! - `reprotect`: re-protection of a live VM by a new backup (time, pause, clients) and resync;
//! - `soak`: many random failovers and re-protections under load, counting invariant violations;
//! - `chaos`: the hostile and careless uses of issue 18, each reported held or not.

mod chaos;
mod common;
mod kvstore;
mod pair;
mod pingpong;
mod plot;
mod redis;
mod redis_bench;
mod reprotect;
mod rr;
mod snapshot;
mod soak;
mod table;
mod vs_qemu;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "ftvm-bench", about = "Side-by-side benchmarks of ftvm (see docs/benchmarks.md)")]
struct Cli {
    #[command(flatten)]
    common: common::Common,
    /// Writes per iobench run for the port-I/O scenario (run-vs-qemu).
    #[arg(long, global = true, default_value_t = 50_000)]
    io_count: u64,
    #[command(subcommand)]
    suite: Option<Suite>,
}

#[derive(Subcommand, Debug)]
enum Suite {
    /// ftvm run vs QEMU microvm (KVM): boot, compute, port-I/O exit (the default suite).
    RunVsQemu,
    /// ftvm run/record/replay times and log sizes; QEMU TCG record/replay as the peer.
    RecordReplay(rr::Args),
    /// redis-benchmark against the kvstore guest: ftvm run, ftvm record, QEMU microvm (root).
    Kvstore(kvstore::Args),
    /// The real Redis 7 under the Linux personality (ftvm run, record, protected) vs natively, vs kvstore and vs QEMU (root).
    Redis(redis::Args),
    /// The kvstore guest protected by a pair vs unprotected; log bandwidth, failover outage (root).
    Pair(pair::Args),
    /// Live snapshot and restore of the kvstore guest, idle and under load, vs QEMU's migration to a file (root).
    Snapshot(snapshot::Args),
    /// Re-protection time and guest pause (256 MiB, 1 GiB; idle, under load) and resync cost (root).
    Reprotect(reprotect::Args),
    /// Many random failovers and re-protections under client load, checking the invariants (root; not for CI).
    Soak(soak::Args),
    /// The hostile and careless uses of issue 18 (split brain, locks, hostile peers, damaged
    /// logs and snapshots, bad inputs), each reported held or not (root; not for CI).
    Chaos(chaos::Args),
    /// Internal to `pair`: the link ping-pong's server (run in a host namespace).
    #[command(hide = true)]
    PingpongServe(pingpong::ServeArgs),
    /// Internal to `pair`: the link ping-pong's client.
    #[command(hide = true)]
    PingpongClient(pingpong::ClientArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    common::install_signal_handlers();
    match &cli.suite {
        None | Some(Suite::RunVsQemu) => vs_qemu::run(&cli.common, cli.io_count),
        Some(Suite::RecordReplay(a)) => rr::run(&cli.common, a),
        Some(Suite::Kvstore(a)) => kvstore::run(&cli.common, a),
        Some(Suite::Redis(a)) => redis::run(&cli.common, a),
        Some(Suite::Pair(a)) => pair::run(&cli.common, a),
        Some(Suite::Snapshot(a)) => snapshot::run(&cli.common, a),
        Some(Suite::Reprotect(a)) => reprotect::run(&cli.common, a),
        Some(Suite::Soak(a)) => soak::run(&cli.common, a),
        Some(Suite::Chaos(a)) => chaos::run(&cli.common, a),
        Some(Suite::PingpongServe(a)) => pingpong::serve(a),
        Some(Suite::PingpongClient(a)) => pingpong::client(a),
    }
}
