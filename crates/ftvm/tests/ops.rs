//! Running ftvm as a service: systemd's notifications on a real datagram socket, `GET
//! /metrics` scraped with curl (on the API socket and on `--metrics-addr`), `GET /events`
//! followed with curl through a failover, and `--log-format json`.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn port(offset: u16) -> u16 {
    40000 + (std::process::id() % 10000) as u16 + offset
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// One side of a pair of `hello` on loopback, without a key.
fn side(role: &str, addr: &str, dir: &Path, name: &str, cmdline: &str) -> Command {
    side_with_timeout(role, addr, dir, name, cmdline, 600)
}

fn side_with_timeout(role: &str, addr: &str, dir: &Path, name: &str, cmdline: &str, timeout_ms: u32) -> Command {
    let mut c = ftvm();
    c.arg(role);
    c.args(if role == "backup" { ["--listen", addr] } else { ["--backup", addr] });
    c.args(["--insecure", "--timeout", &timeout_ms.to_string()]).arg("--arbiter").arg(dir.join("arbiter.lock"));
    c.arg("--kernel").arg(guest("hello")).args(["--cmdline", cmdline]);
    c.arg("--console").arg(format!("file:{}", dir.join(format!("{name}.txt")).display()));
    c.arg("--api-socket").arg(dir.join(format!("{name}.sock")));
    c.stderr(Stdio::piped());
    c
}

/// Waits until `path` exists (an API socket), at most `limit`.
fn wait_for(path: &Path, limit: Duration) {
    let start = Instant::now();
    while !path.exists() {
        assert!(start.elapsed() < limit, "{} did not appear in {limit:?}", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `curl` on an API socket; the body.
fn curl_unix(sock: &Path, route: &str) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "5", "--unix-socket"])
        .arg(sock)
        .arg(format!("http://localhost{route}"))
        .output()
        .expect("curl is installed");
    assert!(out.status.success(), "curl {route}: {}", text(&out.stderr));
    text(&out.stdout)
}

/// A metric's value in an exposition (the first sample with exactly this series name).
fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn kill(child: &mut Child, signal: i32) {
    extern "C" {
        fn kill(pid: i32, sig: i32) -> i32;
    }
    // SAFETY: kill(2) on our child's pid.
    assert_eq!(unsafe { kill(child.id() as i32, signal) }, 0);
}

fn finish(child: Child, limit: Duration) -> Output {
    let (out, in_time) = finish_within(child, limit);
    assert!(in_time, "did not end within {limit:?}: {}", text(&out.stderr));
    out
}

/// The datagrams a service manager would get: READY, STATUS, WATCHDOG pings and STOPPING.
#[test]
fn systemd_gets_ready_status_watchdog_and_stopping_on_its_notify_socket() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("ops-notify");
    let sock_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let child = ftvm()
        .args(["run", "--kernel"])
        .arg(guest("hello"))
        .args(["--cmdline", "hello.wait_ms=1500", "--console"])
        .arg(format!("file:{}", dir.join("console.txt").display()))
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut got: Vec<String> = Vec::new();
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    while start.elapsed() < Duration::from_secs(20) && !got.iter().any(|m| m.contains("STOPPING=1")) {
        if let Ok(n) = sock.recv(&mut buf) {
            got.push(text(&buf[..n]));
        }
    }
    let out = finish(child, Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let ready = got.iter().position(|m| m.contains("READY=1")).unwrap_or_else(|| panic!("no READY: {got:?}"));
    assert!(got[ready].contains("STATUS=standalone"), "READY comes with the status line: {got:?}");
    let pings = got.iter().filter(|m| m.as_str() == "WATCHDOG=1\n").count();
    // 1.5 s of guest at a ping every 200 ms.
    assert!(pings >= 4, "{pings} watchdog pings: {got:?}");
    assert_eq!(got.last().map(String::as_str), Some("STOPPING=1\n"), "{got:?}");
}

/// A manager that does not read (its queue full) never holds ftvm up: the notifications
/// that find the queue full are dropped, and the VM ends on time. The socket is in the
/// abstract namespace (`NOTIFY_SOCKET=@name`), as a manager may give it.
#[test]
fn a_manager_that_does_not_read_does_not_hold_ftvm_up() {
    use std::os::linux::net::SocketAddrExt;
    if !kvm_available() {
        return;
    }
    let dir = scratch("ops-notify-full");
    let name = format!("ftvm-test-notify-{}", std::process::id());
    let sock = UnixDatagram::bind_addr(&std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
    let child = ftvm()
        .args(["run", "--kernel"])
        .arg(guest("hello"))
        .args(["--cmdline", "hello.wait_ms=2000", "--console"])
        .arg(format!("file:{}", dir.join("console.txt").display()))
        .env("NOTIFY_SOCKET", format!("@{name}"))
        .env("WATCHDOG_USEC", "100000")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = finish(child, Duration::from_secs(15));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // What the queue took: the first notifications, READY among them.
    sock.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 4096];
    let mut got = Vec::new();
    while let Ok(n) = sock.recv(&mut buf) {
        got.push(text(&buf[..n]));
    }
    assert!(got.iter().any(|m| m.starts_with("READY=1\n")), "{got:?}");
}

/// A backup is READY only once paired and replaying, and its STATUS says so; after its
/// primary dies the STATUS says it is live.
#[test]
fn a_backup_is_ready_once_paired_and_its_status_follows_the_failover() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("ops-notify-pair");
    let sock_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let addr = format!("127.0.0.1:{}", port(1));
    let backup = side("backup", &addr, &dir, "b", "hello.wait_ms=3000")
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "1000000")
        .spawn()
        .unwrap();
    let mut got: Vec<String> = Vec::new();
    let mut buf = [0u8; 4096];
    let mut drain = |got: &mut Vec<String>, for_: Duration| {
        let start = Instant::now();
        while start.elapsed() < for_ {
            if let Ok(n) = sock.recv(&mut buf) {
                got.push(text(&buf[..n]));
            }
        }
    };
    drain(&mut got, Duration::from_millis(800));
    assert!(!got.iter().any(|m| m.contains("READY=1")), "ready before it has a primary: {got:?}");
    let mut primary = side("primary", &addr, &dir, "p", "hello.wait_ms=3000").spawn().unwrap();
    drain(&mut got, Duration::from_millis(1200));
    let ready = got.iter().find(|m| m.contains("READY=1")).unwrap_or_else(|| panic!("no READY: {got:?}"));
    assert!(ready.contains("STATUS=backup, protected"), "{got:?}");
    primary.kill().unwrap();
    let _ = primary.wait();
    drain(&mut got, Duration::from_millis(1500));
    assert!(got.iter().any(|m| m.starts_with("STATUS=backup-live")), "{got:?}");
    assert!(got.iter().any(|m| m == "WATCHDOG=1\n"), "{got:?}");
    let out = finish(backup, Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

/// The watchdog pings stop while the replication stalls: the backup's threads are stopped
/// (SIGSTOP) while the primary still counts on it (a long peer timeout), so the log the
/// primary streams is acknowledged no further. They come back once the backup runs again.
#[test]
fn the_watchdog_pings_stop_while_the_replication_stalls_and_come_back() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("ops-watchdog");
    let sock_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let addr = format!("127.0.0.1:{}", port(6));
    let mut backup = side_with_timeout("backup", &addr, &dir, "b", "hello.wait_ms=8000", 6000).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let primary = side_with_timeout("primary", &addr, &dir, "p", "hello.wait_ms=8000", 6000)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000")
        .spawn()
        .unwrap();
    let mut buf = [0u8; 4096];
    // (seconds since `t0`, message)
    let mut listen = |for_: Duration, t0: Instant| -> Vec<(f64, String)> {
        let start = Instant::now();
        let mut got = Vec::new();
        while start.elapsed() < for_ {
            if let Ok(n) = sock.recv(&mut buf) {
                got.push((t0.elapsed().as_secs_f64(), text(&buf[..n])));
            }
        }
        got
    };
    let t0 = Instant::now();
    let before = listen(Duration::from_millis(1500), t0);
    assert!(before.iter().any(|(_, m)| m.contains("READY=1")), "{before:?}");
    let pings = |got: &[(f64, String)], from: f64, to: f64| {
        got.iter().filter(|(t, m)| *t >= from && *t < to && m.as_str() == "WATCHDOG=1\n").count()
    };
    assert!(pings(&before, 0.7, 1.5) >= 2, "pings while the pair runs: {before:?}");
    kill(&mut backup, 19); // SIGSTOP
    let stopped_at = t0.elapsed().as_secs_f64();
    let during = listen(Duration::from_millis(2000), t0);
    kill(&mut backup, 18); // SIGCONT
    let resumed_at = t0.elapsed().as_secs_f64();
    let after = listen(Duration::from_millis(2000), t0);
    // One ping may still come from the look before the stall showed.
    assert_eq!(pings(&during, stopped_at + 0.5, resumed_at), 0, "pings while the replication stalls: {during:?}");
    assert!(pings(&after, resumed_at, resumed_at + 2.0) >= 1, "no ping after the backup resumed: {after:?}");
    let p = finish(primary, Duration::from_secs(30));
    let b = finish(backup, Duration::from_secs(30));
    assert_eq!(p.status.code(), Some(0), "{}", text(&p.stderr));
    assert_eq!(b.status.code(), Some(0), "{}", text(&b.stderr));
    assert!(text(&p.stderr).contains("not pinging the systemd watchdog"), "it says why: {}", text(&p.stderr));
}

/// `GET /metrics` during a pair, with curl: the names and types, the counters moving, the
/// hold-time histogram; on `--metrics-addr` too; an address in use is a clear error.
#[test]
fn metrics_scraped_with_curl_during_a_pair_have_types_and_moving_counters() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("ops-metrics");
    let addr = format!("127.0.0.1:{}", port(2));
    let metrics_addr = format!("127.0.0.1:{}", port(3));
    let backup = side("backup", &addr, &dir, "b", "hello.wait_ms=2500").spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let primary = side("primary", &addr, &dir, "p", "hello.wait_ms=2500")
        .args(["--metrics-addr", &metrics_addr])
        .spawn()
        .unwrap();
    let psock = dir.join("p.sock");
    wait_for(&psock, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(600));
    let first = curl_unix(&psock, "/metrics");
    std::thread::sleep(Duration::from_millis(600));
    let second = curl_unix(&psock, "/metrics");
    for (name, kind) in [
        ("ftvm_role", "gauge"),
        ("ftvm_protected", "gauge"),
        ("ftvm_exits_total", "counter"),
        ("ftvm_log_bytes_total", "counter"),
        ("ftvm_log_records", "gauge"),
        ("ftvm_replay_lag_seconds", "gauge"),
        ("ftvm_outputs_held", "gauge"),
        ("ftvm_output_hold_seconds", "histogram"),
        ("ftvm_failovers_total", "counter"),
        ("ftvm_resyncs_total", "counter"),
        ("ftvm_state_transfers_total", "counter"),
    ] {
        assert!(second.contains(&format!("# TYPE {name} {kind}\n")), "{name} {kind}:\n{second}");
    }
    assert_eq!(sample(&second, "ftvm_role{role=\"primary\"}"), Some(1.0), "{second}");
    assert_eq!(sample(&second, "ftvm_protected"), Some(1.0), "{second}");
    // hello prints at its start and then waits on its timer: exits and log records go on.
    for counter in ["ftvm_exits_total{kind=\"io\"}", "ftvm_log_bytes_total", "ftvm_log_records"] {
        let (a, b) = (sample(&first, counter), sample(&second, counter));
        assert!(a.is_some() && b > a, "{counter} did not move: {a:?} then {b:?}");
    }
    // Its console bytes were held for the backup: the histogram counts them, cumulatively.
    let held = sample(&second, "ftvm_output_hold_seconds_count").unwrap_or(0.0);
    assert!(held > 0.0, "{second}");
    assert_eq!(sample(&second, "ftvm_output_hold_seconds_bucket{le=\"+Inf\"}"), Some(held), "{second}");
    let buckets: Vec<f64> = second
        .lines()
        .filter(|l| l.starts_with("ftvm_output_hold_seconds_bucket"))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    assert!(buckets.len() > 5 && buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
    // The TCP address serves the same, to a plain HTTP client; only that route.
    let tcp = Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "5"])
        .arg(format!("http://{metrics_addr}/metrics"))
        .output()
        .unwrap();
    assert!(tcp.status.success(), "{}", text(&tcp.stderr));
    assert!(text(&tcp.stdout).contains("# TYPE ftvm_protected gauge"), "{}", text(&tcp.stdout));
    let status = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5"])
        .arg(format!("http://{metrics_addr}/status"))
        .output()
        .unwrap();
    assert_eq!(text(&status.stdout), "404");
    let head = Command::new("curl")
        .args(["-sS", "-D", "-", "-o", "/dev/null", "--max-time", "5", "--unix-socket"])
        .arg(&psock)
        .arg("http://localhost/metrics")
        .output()
        .unwrap();
    assert!(text(&head.stdout).contains("Content-Type: text/plain; version=0.0.4"), "{}", text(&head.stdout));
    // The backup's metrics: its role, what it received.
    let b = curl_unix(&dir.join("b.sock"), "/metrics");
    assert_eq!(sample(&b, "ftvm_role{role=\"backup\"}"), Some(1.0), "{b}");
    assert!(sample(&b, "ftvm_log_records").is_some_and(|n| n > 0.0), "{b}");
    // A second VM on the same metrics address: refused at start, with the reason.
    let taken = ftvm()
        .args(["run", "--kernel"])
        .arg(guest("hello"))
        .args(["--metrics-addr", &metrics_addr, "--console", "file:/dev/null"])
        .output()
        .unwrap();
    let err = text(&taken.stderr);
    assert_eq!(taken.status.code(), Some(1), "{err}");
    assert!(err.contains(&metrics_addr) && err.contains("another program listens there"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let p = finish(primary, Duration::from_secs(20));
    let b = finish(backup, Duration::from_secs(20));
    assert_eq!(p.status.code(), Some(0), "{}", text(&p.stderr));
    assert_eq!(b.status.code(), Some(0), "{}", text(&b.stderr));
}

/// `GET /events` on the backup, followed with curl: the pair's events as JSON lines, the
/// TAKEOVER after SIGKILL of the primary, and a complete response when the backup ends.
#[test]
fn events_followed_with_curl_show_the_takeover_as_json() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("ops-events");
    let addr = format!("127.0.0.1:{}", port(4));
    let backup = side("backup", &addr, &dir, "b", "hello.wait_ms=3000").spawn().unwrap();
    let bsock = dir.join("b.sock");
    wait_for(&bsock, Duration::from_secs(10));
    let follower = Command::new("curl")
        .args(["-sS", "-N", "--max-time", "60", "--unix-socket"])
        .arg(&bsock)
        .arg("http://localhost/events")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // `ftvm ctl PATH events` follows the same stream.
    let ctl =
        ftvm().arg("ctl").arg(&bsock).arg("events").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let mut primary = side("primary", &addr, &dir, "p", "hello.wait_ms=3000").spawn().unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    kill(&mut primary, 9);
    let _ = primary.wait();
    let b = finish(backup, Duration::from_secs(20));
    assert_eq!(b.status.code(), Some(0), "{}", text(&b.stderr));
    let f = finish(follower, Duration::from_secs(10));
    // A complete chunked response: curl exits 0 (18 would be a stream cut short).
    assert_eq!(f.status.code(), Some(0), "curl: {}", text(&f.stderr));
    let events: Vec<serde_json::Value> = text(&f.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line {l:?}: {e}")))
        .collect();
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    let at = |k: &str| kinds.iter().position(|x| *x == k).unwrap_or_else(|| panic!("no {k} event in {kinds:?}"));
    assert!(at("listening") < at("paired") && at("paired") < at("takeover"), "{kinds:?}");
    let takeover = &events[at("takeover")];
    assert!(takeover["message"].as_str().is_some_and(|m| m.starts_with("TAKEOVER")), "{takeover}");
    assert!(takeover["silence_ms"].as_u64().is_some() && takeover["exit"].as_u64().is_some(), "{takeover}");
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let ctl = finish(ctl, Duration::from_secs(10));
    assert_eq!(ctl.status.code(), Some(0), "ctl events: {}", text(&ctl.stderr));
    let followed: Vec<serde_json::Value> =
        text(&ctl.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(followed, events, "ctl events and curl see the same events");
    // The text on standard error says the same, as it always did.
    assert!(text(&b.stderr).contains("ftvm: TAKEOVER: live at exit"), "{}", text(&b.stderr));
}

/// `--log-format json`: every line on standard error is a JSON object with a level; the
/// pair's events carry their fields. A bad format is a usage error.
#[test]
fn log_format_json_writes_json_lines_and_a_bad_format_is_a_usage_error() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("ops-json");
    let addr = format!("127.0.0.1:{}", port(5));
    let mut backup = side("backup", &addr, &dir, "b", "hello.wait_ms=200");
    let backup = backup.args(["--log-format", "json", "--log-level", "info"]).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let primary =
        side("primary", &addr, &dir, "p", "hello.wait_ms=200").args(["--log-format", "json"]).spawn().unwrap();
    let p = finish(primary, Duration::from_secs(20));
    let b = finish(backup, Duration::from_secs(20));
    assert_eq!(p.status.code(), Some(0), "{}", text(&p.stderr));
    assert_eq!(b.status.code(), Some(0), "{}", text(&b.stderr));
    let err = text(&b.stderr);
    // Every line is JSON, the command line's own too (the --insecure warning).
    let json: Vec<serde_json::Value> =
        err.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON {l:?}: {e}"))).collect();
    assert!(json.iter().all(|v| v["level"].is_string()), "{err}");
    let paired = json.iter().find(|v| v["event"] == "paired").unwrap_or_else(|| panic!("{err}"));
    assert!(paired["peer"].as_str().is_some_and(|p| p.starts_with("127.0.0.1:")), "{paired}");
    assert_eq!(paired["target"], "ftvm::event", "{paired}");
    let warning = json.iter().find(|v| v["target"] == "ftvm::cli").unwrap_or_else(|| panic!("{err}"));
    assert_eq!(warning["level"], "WARN", "{warning}");
    assert!(warning["message"].as_str().is_some_and(|m| m.starts_with("--insecure")), "{warning}");
    // A failure's last word too.
    let failed = ftvm().args(["--log-format", "json", "run", "--kernel", "/nonexistent/kernel"]).output().unwrap();
    assert_eq!(failed.status.code(), Some(1));
    let last: serde_json::Value = serde_json::from_str(text(&failed.stderr).trim()).unwrap();
    assert_eq!(last["level"], "ERROR", "{last}");
    assert!(last["message"].as_str().is_some_and(|m| m.contains("/nonexistent/kernel")), "{last}");
    let bad = ftvm().args(["--log-format", "xml", "run", "--kernel"]).arg(guest("hello")).output().unwrap();
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad.stderr));
    assert!(text(&bad.stderr).contains("xml") && text(&bad.stderr).contains("json"), "{}", text(&bad.stderr));
}

/// contrib/systemd's units: `systemd-analyze verify` finds nothing to say about them (with
/// ExecStart pointing at this build), and their exit-status lines use ftvm's table.
#[test]
fn the_shipped_systemd_units_verify_and_use_the_exit_statuses() {
    use ftvm_exit::ExitStatus;
    let units = repo_root().join("contrib").join("systemd");
    let dir = scratch("ops-units");
    let mut copies = Vec::new();
    for role in ["primary", "backup"] {
        let unit = std::fs::read_to_string(units.join(format!("ftvm-{role}@.service"))).unwrap();
        assert!(unit.contains("\nType=notify\n") && unit.contains("\nWatchdogSec="), "{role}: {unit}");
        let line = |key: &str| unit.lines().find_map(|l| l.strip_prefix(key)).unwrap_or_default().to_string();
        let codes = |key: &str| -> Vec<u8> { line(key).split(' ').filter_map(|c| c.parse().ok()).collect() };
        assert!(
            codes("SuccessExitStatus=").contains(&ExitStatus::Terminated.code()),
            "{role}: SIGTERM is a clean stop"
        );
        if role == "primary" {
            assert!(codes("SuccessExitStatus=").contains(&ExitStatus::Switchover.code()));
            // ftvm, not systemd's SIGKILL, ends a guest that ignores the shutdown request.
            let stop_sec: u64 = line("TimeoutStopSec=").trim_end_matches('s').parse().unwrap();
            let help = text(&ftvm().args(["primary", "--help"]).output().unwrap().stdout);
            let default: u64 = help
                .split("--stop-timeout <SECONDS>")
                .nth(1)
                .and_then(|h| h.split("[default: ").nth(1))
                .and_then(|d| d.split(']').next())
                .and_then(|d| d.parse().ok())
                .expect("--stop-timeout's default in primary --help");
            assert!(stop_sec > default + 10, "TimeoutStopSec={stop_sec}s vs --stop-timeout {default}");
            assert_eq!(line("Restart="), "no", "a primary is never restarted by itself");
        } else {
            assert_eq!(line("Restart="), "on-failure");
            assert!(
                codes("RestartPreventExitStatus=").contains(&ExitStatus::Fenced.code()),
                "a halted side stays down"
            );
        }
        let copy = dir.join(format!("ftvm-{role}@vm1.service"));
        std::fs::write(&copy, unit.replace("/usr/local/bin/ftvm", env!("CARGO_BIN_EXE_ftvm"))).unwrap();
        copies.push(copy);
    }
    let verify = match Command::new("systemd-analyze").args(["verify", "--man=no"]).args(&copies).output() {
        Ok(out) => out,
        Err(e) if std::env::var("FTVM_ALLOW_NO_KVM").as_deref() == Ok("1") => {
            eprintln!("SKIPPED: systemd-analyze cannot run ({e}) and FTVM_ALLOW_NO_KVM=1");
            return;
        }
        Err(e) => panic!("systemd-analyze: {e} (install systemd, or set FTVM_ALLOW_NO_KVM=1 to skip)"),
    };
    let said = text(&verify.stderr) + &text(&verify.stdout);
    assert!(verify.status.success() && said.trim().is_empty(), "systemd-analyze verify: {said}");
}

/// A log filter that does not parse (FTVM_LOG or --log-level) is a usage error that quotes
/// it, not a silent fallback; a metrics address that is not HOST:PORT is one too.
#[test]
fn a_bad_log_filter_or_metrics_address_is_a_usage_error() {
    let out = ftvm().env("FTVM_LOG", "warn,x=notalevel").args(["run", "--kernel", "/nonexistent"]).output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("invalid log filter \"warn,x=notalevel\" (from FTVM_LOG)"), "{err}");
    let out = ftvm().args(["--log-level", "info,=[", "run", "--kernel", "/nonexistent"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("(from --log-level)"), "{}", text(&out.stderr));
    let out = ftvm().args(["run", "--kernel", "/nonexistent", "--metrics-addr", "nowhere"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("--metrics-addr"), "{}", text(&out.stderr));
}
