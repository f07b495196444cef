//! The replication link's floor: a TCP ping-pong between the two host namespaces of the
//! pair's topology, over the same veth (host 1 to host 2's replication address), with
//! messages of the pair's sizes (a log frame out, an acknowledgement back), on blocking
//! sockets with TCP_NODELAY as the pair's threads use them. `ftvm-bench pair` runs it
//! before and after its runs; the server and the client are this binary, run by `ip netns
//! exec` (hidden subcommands).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Bytes sent each way: a sealed log frame of one exit's outputs (the pair's log carries
/// ~150 B per request), and a sealed acknowledgement.
pub const PING_BYTES: usize = 256;
pub const PONG_BYTES: usize = 48;

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    pub listen: String,
}

#[derive(clap::Args, Debug)]
pub struct ClientArgs {
    pub addr: String,
    #[arg(long, default_value_t = 20_000)]
    pub count: usize,
}

/// Round trips, µs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rtt {
    pub count: usize,
    pub min_us: f64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// Echoes a pong for every ping of one connection, then exits.
pub fn serve(a: &ServeArgs) -> Result<()> {
    let l = TcpListener::bind(&a.listen).with_context(|| format!("binding {}", a.listen))?;
    println!("listening");
    std::io::stdout().flush()?;
    let (mut s, _) = l.accept()?;
    s.set_nodelay(true)?;
    let mut ping = [0u8; PING_BYTES];
    let pong = [7u8; PONG_BYTES];
    while s.read_exact(&mut ping).is_ok() {
        if s.write_all(&pong).is_err() {
            break;
        }
    }
    Ok(())
}

/// Times `count` round trips (after 500 to warm up) and prints them as JSON.
pub fn client(a: &ClientArgs) -> Result<()> {
    let mut s = TcpStream::connect(&a.addr).with_context(|| format!("connecting to {}", a.addr))?;
    s.set_nodelay(true)?;
    let ping = [1u8; PING_BYTES];
    let mut pong = [0u8; PONG_BYTES];
    let mut rtts = Vec::with_capacity(a.count);
    for i in 0..a.count + 500 {
        let t = Instant::now();
        s.write_all(&ping)?;
        s.read_exact(&mut pong)?;
        if i >= 500 {
            rtts.push(t.elapsed().as_nanos() as f64 / 1000.0);
        }
        // Not back to back: the pair's frames come between other work.
        if i % 4 == 0 {
            std::thread::sleep(Duration::from_micros(100));
        }
    }
    rtts.sort_by(|x, y| x.total_cmp(y));
    let pct = |q: f64| rtts[((rtts.len() as f64 * q) as usize).min(rtts.len() - 1)];
    let r = Rtt {
        count: rtts.len(),
        min_us: rtts[0],
        mean_us: rtts.iter().sum::<f64>() / rtts.len() as f64,
        p50_us: pct(0.5),
        p99_us: pct(0.99),
    };
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}

/// Runs the ping-pong from namespace `from` to `to_addr` (a port in namespace `to`).
pub fn measure(from: &str, to: &str, to_addr: &str) -> Result<Rtt> {
    let exe = std::env::current_exe()?;
    let mut server = Command::new("ip")
        .args(["netns", "exec", to])
        .arg(&exe)
        .args(["pingpong-serve", to_addr])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the ping-pong server")?;
    let mut line = [0u8; 10];
    let ok = server.stdout.as_mut().map(|o| o.read_exact(&mut line).is_ok()).unwrap_or(false);
    if !ok {
        let _ = server.kill();
        bail!("the ping-pong server did not start");
    }
    let out = Command::new("ip").args(["netns", "exec", from]).arg(&exe).args(["pingpong-client", to_addr]).output();
    let _ = server.kill();
    let _ = server.wait();
    let out = out?;
    if !out.status.success() {
        bail!("the ping-pong client failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    serde_json::from_slice(&out.stdout).context("the ping-pong client's output")
}
