//! The API server: a Unix socket, an accept thread, one short-lived thread per connection.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::control::{Refused, VmControl, PAUSE_ACK_WAIT};
use crate::http::{self, Request};
use crate::status::VmState;
use crate::{events, metrics, ROUTES};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("API socket {path}: another ftvm answers there; give this VM another --api-socket path")]
    InUse { path: PathBuf },
    #[error("API socket {path}: the path exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("API socket {path}: {what}: {source}")]
    Io { path: PathBuf, what: &'static str, source: io::Error },
    #[error("metrics address {addr}: another program listens there; give --metrics-addr another port")]
    MetricsAddrInUse { addr: std::net::SocketAddr, source: io::Error },
    #[error("metrics address {addr}: {what}: {source}")]
    MetricsIo { addr: std::net::SocketAddr, what: &'static str, source: io::Error },
}

/// How often the accept loop looks for a stop and takes a bandwidth sample.
const POLL: Duration = Duration::from_millis(20);
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// How long a client may take to send its request.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the accept loop waits for the request of a client it turns away.
const BUSY_READ_TIMEOUT: Duration = Duration::from_millis(50);
/// Connections served at once; more are answered 503.
const MAX_CLIENTS: usize = 16;

/// The running API server. Dropping it stops the accept thread and removes the socket file.
pub struct ApiServer {
    path: PathBuf,
    /// (device, inode) of the socket this server created: only that file is removed.
    id: (u64, u64),
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Binds `path` (replacing a stale socket no one answers on; refusing a live one or a
    /// file that is not a socket), makes it owner-only (0600), and serves `control` on a
    /// thread of its own.
    pub fn start(path: &Path, control: Arc<VmControl>) -> Result<ApiServer, ServerError> {
        let io_err = |what| move |source| ServerError::Io { path: path.to_path_buf(), what, source };
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
                Ok(_) => return Err(ServerError::InUse { path: path.to_path_buf() }),
                Err(_) => {
                    tracing::info!("removing the stale API socket {}", path.display());
                    std::fs::remove_file(path).map_err(io_err("cannot remove the stale socket"))?;
                }
            },
            Ok(_) => return Err(ServerError::NotASocket { path: path.to_path_buf() }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("cannot look at the path")(e)),
        }
        let listener = UnixListener::bind(path).map_err(io_err("cannot create the socket"))?;
        let meta = std::fs::metadata(path).map_err(io_err("cannot look at the socket"))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(io_err("cannot make the socket owner-only"))?;
        listener.set_nonblocking(true).map_err(io_err("cannot configure the socket"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("ftvm-api".into())
            .spawn(move || {
                ftvm_seccomp::enter(ftvm_seccomp::Thread::Api);
                serve(listener, control, s)
            })
            .map_err(io_err("cannot start the API thread"))?;
        Ok(ApiServer { path: path.to_path_buf(), id: (meta.dev(), meta.ino()), stop, thread: Some(thread) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// `GET /metrics` on a TCP address (`--metrics-addr`), for a Prometheus that cannot reach the
/// Unix socket: that route only. Dropping it stops its thread.
pub struct MetricsServer {
    addr: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Binds `addr` (an address in use is [`ServerError::MetricsAddrInUse`]) and serves the
    /// metrics of `control` on a thread of its own.
    pub fn start(addr: std::net::SocketAddr, control: Arc<VmControl>) -> Result<MetricsServer, ServerError> {
        let listener = std::net::TcpListener::bind(addr).map_err(|source| match source.kind() {
            io::ErrorKind::AddrInUse => ServerError::MetricsAddrInUse { addr, source },
            _ => ServerError::MetricsIo { addr, what: "cannot listen", source },
        })?;
        let io_err = |what| move |source| ServerError::MetricsIo { addr, what, source };
        let addr = listener.local_addr().map_err(io_err("cannot read the bound address"))?;
        listener.set_nonblocking(true).map_err(io_err("cannot configure the socket"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("ftvm-metrics".into())
            .spawn(move || {
                ftvm_seccomp::enter(ftvm_seccomp::Thread::Api);
                serve_metrics(listener, control, s)
            })
            .map_err(io_err("cannot start the metrics thread"))?;
        Ok(MetricsServer { addr, stop, thread: Some(thread) })
    }

    /// The address it listens on (the port chosen for port 0).
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_metrics(listener: std::net::TcpListener, control: Arc<VmControl>, stop: Arc<AtomicBool>) {
    let clients = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(CLIENT_TIMEOUT));
                let _ = stream.set_write_timeout(Some(CLIENT_TIMEOUT));
                let c = control.clone();
                let refuse = |stream: &mut std::net::TcpStream| {
                    let _ = stream.set_read_timeout(Some(BUSY_READ_TIMEOUT));
                    let _ = http::read_request(stream);
                    let _ = reply_error(stream, 503, "too many metrics clients at once; try again");
                };
                serve_client(stream, &clients, "ftvm-metrics-conn", refuse, move |s| handle_metrics_only(s, &c));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(POLL),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!("metrics address: accept failed: {e}");
                std::thread::sleep(POLL);
            }
        }
    }
}

/// The TCP listener's one route.
fn handle_metrics_only(stream: &mut std::net::TcpStream, control: &VmControl) {
    let Some(request) = read_or_refuse(stream) else { return };
    match (request.method.as_str(), request.path.as_str()) {
        ("GET", "/metrics") => {
            let _ =
                http::write_typed_response(stream, 200, crate::metrics::CONTENT_TYPE, &[], &metrics::render(control));
        }
        (_, "/metrics") => {
            let _ = http::write_response(
                stream,
                405,
                &[("Allow", "GET")],
                &json!({ "error": format!("/metrics takes GET, not {}", request.method) }).to_string(),
            );
        }
        (_, other) => {
            let _ = reply_error(
                stream,
                404,
                &format!("no such route {}; this address serves GET /metrics", truncate(other)),
            );
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn serve(listener: UnixListener, control: Arc<VmControl>, stop: Arc<AtomicBool>) {
    let clients = Arc::new(AtomicUsize::new(0));
    let mut next_sample = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        if Instant::now() >= next_sample {
            control.sample();
            next_sample = Instant::now() + SAMPLE_EVERY;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(CLIENT_TIMEOUT));
                let _ = stream.set_write_timeout(Some(CLIENT_TIMEOUT));
                let (c, st) = (control.clone(), stop.clone());
                serve_client(stream, &clients, "ftvm-api-conn", refuse_busy, move |s| handle(s, &c, &st));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(POLL),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!("API socket: accept failed: {e}");
                std::thread::sleep(POLL);
            }
        }
    }
    // The VM has ended: `/events` followers end their streams (after the last events);
    // give them a moment to, so that a follower sees a complete response.
    let deadline = Instant::now() + FOLLOWERS_END_WAIT;
    while clients.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Serves one accepted client on a thread of its own (`handle`), unless [`MAX_CLIENTS`] are
/// served already (`refuse`: a 503). `clients` counts those being served.
fn serve_client<S: Send + 'static>(
    mut stream: S,
    clients: &Arc<AtomicUsize>,
    name: &str,
    refuse: impl FnOnce(&mut S),
    handle: impl FnOnce(&mut S) + Send + 'static,
) {
    if clients.load(Ordering::SeqCst) >= MAX_CLIENTS {
        refuse(&mut stream);
        return;
    }
    clients.fetch_add(1, Ordering::SeqCst);
    let served = clients.clone();
    let spawned = std::thread::Builder::new().name(name.into()).spawn(move || {
        handle(&mut stream);
        served.fetch_sub(1, Ordering::SeqCst);
    });
    if spawned.is_err() {
        clients.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Answers 503 to a client beyond the limit. Its request is read first (briefly): a socket
/// closed with unread bytes makes the client's read fail with ECONNRESET instead of showing
/// it the answer.
fn refuse_busy(stream: &mut UnixStream) {
    let _ = stream.set_read_timeout(Some(BUSY_READ_TIMEOUT));
    let _ = http::read_request(stream);
    let _ = reply_error(stream, 503, "too many API clients at once; try again");
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

fn reply_error(stream: &mut impl std::io::Write, code: u16, message: &str) -> io::Result<()> {
    http::write_response(stream, code, &[], &json!({ "error": message }).to_string())
}

/// The client's request, or None after answering why it is refused (if the client is still
/// there to hear it).
fn read_or_refuse(stream: &mut (impl io::Read + io::Write)) -> Option<http::Request> {
    match http::read_request(stream) {
        Ok(r) => Some(r),
        Err(e) => {
            if let Some((code, message)) = e.answer() {
                let _ = reply_error(stream, code, &message);
            }
            None
        }
    }
}

/// Serves one connection: one request, one answer (or, for `GET /events`, a stream until
/// the server stops).
fn handle(stream: &mut UnixStream, control: &VmControl, stop: &AtomicBool) {
    let Some(request) = read_or_refuse(stream) else { return };
    match (request.method.as_str(), request.path.as_str()) {
        ("GET", "/events") => {
            let _ = stream.set_write_timeout(Some(EVENTS_WRITE_TIMEOUT));
            let _ = follow_events(stream, stop);
        }
        ("GET", "/metrics") => {
            let _ = http::write_typed_response(stream, 200, metrics::CONTENT_TYPE, &[], &metrics::render(control));
        }
        _ => {
            let (code, headers, body) = route(&request, control);
            let _ = http::write_response(stream, code, &headers, &body);
        }
    }
}

/// How long a follower of `/events` may leave a write waiting before it is dropped.
const EVENTS_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a follower with nothing to send looks at the server's stop.
const EVENTS_POLL: Duration = Duration::from_millis(100);
/// How long a stopping server waits for its connections (the followers) to end.
const FOLLOWERS_END_WAIT: Duration = Duration::from_millis(500);

/// `GET /events`: a chunked response, one event (a JSON object and a newline) a chunk: the
/// recent events, then each new one, until the server stops (the VM ended; the stream then
/// ends properly, with the last chunk) or the client goes away.
fn follow_events(stream: &mut UnixStream, stop: &AtomicBool) -> io::Result<()> {
    use std::io::Write;
    let (recent, rx) = events::follow();
    stream.write_all(
        b"HTTP/1.1 200 OK\r\nServer: ftvm\r\nContent-Type: application/x-ndjson\r\nCache-Control: no-store\r\n\
          Connection: close\r\nTransfer-Encoding: chunked\r\n\r\n",
    )?;
    let chunk = |stream: &mut UnixStream, line: &str| -> io::Result<()> {
        write!(stream, "{:x}\r\n{line}\n\r\n", line.len() + 1)?;
        stream.flush()
    };
    for line in &recent {
        chunk(stream, line)?;
    }
    loop {
        match rx.recv_timeout(EVENTS_POLL) {
            Ok(line) => chunk(stream, &line)?,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) if !stop.load(Ordering::SeqCst) => {}
            // Stopping: the events published until now, then the end.
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                while let Ok(line) = rx.try_recv() {
                    chunk(stream, &line)?;
                }
                break;
            }
            // Dropped for not reading.
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    stream.write_all(b"0\r\n\r\n")?;
    stream.flush()
}

/// The answer to a request: status code, extra headers, JSON body.
pub(crate) fn route(req: &Request, control: &VmControl) -> (u16, Vec<(&'static str, &'static str)>, String) {
    let error = |code: u16, message: String| (code, Vec::new(), json!({ "error": message }).to_string());
    let refused = |r: Refused| {
        let (code, message) = r.answer();
        error(code, message)
    };
    let allowed = match req.path.as_str() {
        "/status" | "/metrics" | "/events" => "GET",
        "/snapshot" | "/protect" if req.method == "GET" => "GET",
        "/pause" | "/resume" | "/snapshot" | "/switchover" | "/protect" | "/shutdown" => "PUT",
        other => return error(404, format!("no such route {}; the routes are {ROUTES}", truncate(other))),
    };
    if req.method != allowed {
        let mut answer = error(405, format!("{} takes {allowed}, not {}", req.path, req.method));
        answer.1.push(("Allow", allowed));
        return answer;
    }
    match req.path.as_str() {
        "/status" => match serde_json::to_string(&control.status()) {
            Ok(body) => (200, Vec::new(), body),
            Err(e) => error(500, format!("cannot encode the status: {e}")),
        },
        "/pause" => match control.request_pause(PAUSE_ACK_WAIT) {
            Ok(VmState::Paused) => (200, Vec::new(), json!({ "state": "paused" }).to_string()),
            Ok(VmState::Stopped) => refused(Refused::Stopped),
            Ok(_) => (
                202,
                Vec::new(),
                json!({
                    "state": "pausing",
                    "message": "the vCPU has not reached a pause point yet; it parks at its next exit"
                })
                .to_string(),
            ),
            Err(r) => refused(r),
        },
        "/resume" => match control.request_resume() {
            Ok(state) => (200, Vec::new(), json!({ "state": state }).to_string()),
            Err(r) => refused(r),
        },
        "/shutdown" => match control.request_shutdown() {
            Ok(state) => (202, Vec::new(), json!({ "state": state }).to_string()),
            Err(r) => refused(r),
        },
        "/switchover" => match control.request_switchover() {
            Ok(()) => (202, Vec::new(), json!({ "state": "handing over" }).to_string()),
            Err(m) => error(400, m),
        },
        "/snapshot" if req.method == "GET" => match control.snapshot_progress() {
            Some(p) => match serde_json::to_string(&p) {
                Ok(body) => (200, Vec::new(), body),
                Err(e) => error(500, format!("cannot encode the progress: {e}")),
            },
            None => error(404, "no snapshot has been taken".into()),
        },
        "/snapshot" => {
            let dir = serde_json::from_slice::<serde_json::Value>(&req.body)
                .ok()
                .and_then(|v| v.get("dir").and_then(|d| d.as_str()).map(str::to_string));
            match dir {
                Some(dir) if !dir.is_empty() => match control.request_snapshot(dir.into()) {
                    Ok(()) => (202, Vec::new(), json!({ "state": "snapshotting" }).to_string()),
                    Err(r) => refused(r),
                },
                _ => error(400, "PUT /snapshot needs a JSON body {\"dir\": \"PATH\"}".into()),
            }
        }
        "/protect" if req.method == "GET" => match control.protect_progress() {
            Some(p) => match serde_json::to_string(&p) {
                Ok(body) => (200, Vec::new(), body),
                Err(e) => error(500, format!("cannot encode the progress: {e}")),
            },
            None => error(404, "no re-protection has been started".into()),
        },
        "/protect" => {
            let backup = serde_json::from_slice::<serde_json::Value>(&req.body)
                .ok()
                .and_then(|v| v.get("backup").and_then(|d| d.as_str()).map(str::to_string));
            match backup.as_deref().map(str::parse::<std::net::SocketAddr>) {
                Some(Ok(addr)) => match control.request_protect(addr) {
                    Ok(()) => (202, Vec::new(), json!({ "state": "protecting" }).to_string()),
                    Err(r) => refused(r),
                },
                Some(Err(e)) => error(400, format!("\"backup\" must be HOST:PORT (an IP address and port): {e}")),
                None => error(400, "PUT /protect needs a JSON body {\"backup\": \"HOST:PORT\"}".into()),
            }
        }
        // Served by `handle` (their own content types): here only for the method check.
        "/metrics" => (200, Vec::new(), metrics::render(control)),
        other => error(404, format!("no such route {}", truncate(other))),
    }
}

fn truncate(s: &str) -> String {
    if s.chars().count() > 80 {
        format!("{}...", s.chars().take(80).collect::<String>())
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::client;
    use crate::status::Role;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ftvm-api-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn req(method: &str, path: &str) -> Request {
        Request { method: method.into(), path: path.into(), body: Vec::new() }
    }

    #[test]
    fn routes_answer_json() {
        let c = VmControl::new();
        c.mark_running();
        let (code, _, body) = route(&req("GET", "/status"), &c);
        assert_eq!(code, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!((v["state"].as_str(), v["role"].as_str()), (Some("running"), Some("standalone")));
        let (code, _, body) = route(&req("GET", "/nope"), &c);
        assert_eq!(code, 404, "{body}");
        assert!(body.contains("GET /status"), "{body}");
        let (code, headers, _) = route(&req("POST", "/pause"), &c);
        assert_eq!((code, headers), (405, vec![("Allow", "PUT")]));
        let (code, _, body) = route(&req("PUT", "/resume"), &c);
        assert_eq!(code, 400);
        assert!(body.contains("not paused"), "{body}");
        let (code, _, body) = route(&req("PUT", "/snapshot"), &c);
        assert_eq!(code, 400);
        assert!(body.contains("needs a JSON body"), "{body}");
        let put = |dir: &str| Request { method: "PUT".into(), path: "/snapshot".into(), body: dir.as_bytes().to_vec() };
        let (code, _, body) = route(&put(r#"{"dir":"/tmp/s"}"#), &c);
        assert_eq!(code, 400, "no starter yet: {body}");
        assert!(body.contains("cannot be snapshotted"), "{body}");
        assert_eq!(route(&req("GET", "/snapshot"), &c).0, 404);
        let started = Arc::new(Mutex::new(Vec::new()));
        let s = started.clone();
        c.set_snapshot_starter(Some(Box::new(move |dir| {
            s.lock().unwrap().push(dir.clone());
            if dir.starts_with("/nope") {
                return Err("cannot create /nope".into());
            }
            Ok(())
        })));
        let (code, _, body) = route(&put(r#"{"dir":"/nope/x"}"#), &c);
        assert_eq!((code, body.contains("cannot create /nope")), (400, true), "{body}");
        assert_eq!(route(&put(r#"{"dir":"/tmp/s"}"#), &c).0, 202);
        c.set_snapshot_progress(crate::SnapshotProgress::new("/tmp/s".into(), 1 << 20, 0));
        let (code, _, body) = route(&put(r#"{"dir":"/tmp/t"}"#), &c);
        assert_eq!((code, body.contains("under way")), (409, true), "{body}");
        let (code, _, body) = route(&req("GET", "/snapshot"), &c);
        assert_eq!(code, 200);
        let p: crate::SnapshotProgress = serde_json::from_str(&body).unwrap();
        assert_eq!((p.dir.as_str(), p.phase), ("/tmp/s", crate::SnapshotPhase::Copying));
        assert_eq!(started.lock().unwrap().len(), 2);
        c.mark_stopped();
        assert_eq!(route(&put(r#"{"dir":"/tmp/u"}"#), &c).0, 409);
        assert_eq!(route(&req("PUT", "/pause"), &c).0, 409);
    }

    #[test]
    fn a_hundred_clients_at_once_each_get_an_answer() {
        let dir = scratch("busy");
        let path = dir.join("api.sock");
        let c = VmControl::new();
        c.mark_running();
        let _server = ApiServer::start(&path, c).unwrap();
        // Clients that stay connected hold the server at its limit for a moment.
        let holders: Vec<UnixStream> = (0..MAX_CLIENTS).map(|_| UnixStream::connect(&path).unwrap()).collect();
        std::thread::sleep(Duration::from_millis(100));
        let answers: Vec<_> = (0..100)
            .map(|_| {
                let p = path.clone();
                std::thread::spawn(move || client::raw(&p, b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n"))
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        drop(holders);
        let mut busy = 0;
        for a in answers {
            let r = a.unwrap_or_else(|e| panic!("a client got no answer (reset?): {e}"));
            assert!(r.status == 200 || r.status == 503, "{} {}", r.status, r.body);
            if r.status == 503 {
                busy += 1;
                assert!(r.body.contains("too many API clients"), "{}", r.body);
            }
        }
        assert!(busy > 0, "the limit was reached: some answers are 503");
    }

    #[test]
    fn the_metrics_address_serves_metrics_only_and_one_in_use_is_a_typed_error() {
        use std::io::{Read, Write};
        let c = VmControl::new();
        let server = MetricsServer::start("127.0.0.1:0".parse().unwrap(), c.clone()).unwrap();
        let addr = server.addr();
        let get = |request: &[u8]| {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.write_all(request).unwrap();
            let mut answer = String::new();
            s.read_to_string(&mut answer).unwrap();
            answer
        };
        let m = get(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(m.starts_with("HTTP/1.1 200") && m.contains("text/plain; version=0.0.4"), "{m}");
        assert!(get(b"GET /status HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        assert!(get(b"PUT /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").starts_with("HTTP/1.1 405"));
        let err = MetricsServer::start(addr, c).err().unwrap();
        assert!(matches!(err, ServerError::MetricsAddrInUse { .. }), "{err}");
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
        assert!(std::error::Error::source(&err).is_some(), "the error keeps its source");
    }

    #[test]
    fn metrics_and_events_take_get_only() {
        let c = VmControl::new();
        for path in ["/metrics", "/events"] {
            let (code, headers, _) = route(&req("PUT", path), &c);
            assert_eq!((code, headers), (405, vec![("Allow", "GET")]), "{path}");
        }
    }

    #[test]
    fn events_stream_as_chunks_until_the_server_stops_and_metrics_are_text() {
        use std::io::{BufRead, BufReader, Write};
        let dir = scratch("events");
        let path = dir.join("api.sock");
        let c = VmControl::new();
        let server = ApiServer::start(&path, c.clone()).unwrap();
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut r = BufReader::new(s);
        let mut head = String::new();
        while !head.ends_with("\r\n\r\n") {
            assert!(r.read_line(&mut head).unwrap() > 0, "{head}");
        }
        assert!(head.starts_with("HTTP/1.1 200") && head.contains("Transfer-Encoding: chunked"), "{head}");
        assert!(head.contains("Content-Type: application/x-ndjson"), "{head}");
        // A follower gets the events published from now on (and the recent ones first).
        let mut event = serde_json::Map::new();
        event.insert("event".into(), "server-test".into());
        let line = events::publish(event);
        let got = loop {
            let mut size = String::new();
            r.read_line(&mut size).unwrap();
            let n = usize::from_str_radix(size.trim_end(), 16).unwrap();
            assert!(n > 0, "the stream ended before the event");
            let mut chunk = vec![0; n + 2];
            std::io::Read::read_exact(&mut r, &mut chunk).unwrap();
            let text = String::from_utf8(chunk[..n].to_vec()).unwrap();
            if text.contains("server-test") {
                break text;
            }
        };
        assert_eq!(got, format!("{line}\n"));
        // GET /metrics meanwhile: the exposition, as text.
        let m = client::raw(&path, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!(m.status, 200);
        assert!(m.body.contains("# TYPE ftvm_role gauge"), "{}", m.body);
        // The server stops: the stream ends with the last chunk.
        drop(server);
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut r, &mut rest);
        assert!(rest.ends_with("0\r\n\r\n"), "{rest:?}");
    }

    #[test]
    fn serves_on_a_socket_replaces_stale_ones_and_refuses_live_ones() {
        let dir = scratch("serve");
        let path = dir.join("api.sock");
        // A stale socket: bound, then its listener gone.
        drop(UnixListener::bind(&path).unwrap());
        let c = VmControl::new();
        c.set_role(Role::Recording);
        c.mark_running();
        let server = ApiServer::start(&path, c.clone()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let s = client::status(&path).unwrap();
        assert_eq!((s.state, s.role), (VmState::Running, Role::Recording));
        assert!(s.log.is_some());
        // A second server on the same path is refused while the first answers.
        let err = ApiServer::start(&path, VmControl::new()).err().unwrap();
        assert!(matches!(err, ServerError::InUse { .. }), "{err}");
        // Raw garbage gets a 400 with a JSON body.
        let r = client::raw(&path, b"HELLO\r\n\r\n").unwrap();
        assert_eq!(r.status, 400);
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert!(v["error"].as_str().unwrap().contains("malformed"), "{}", r.body);
        // A client that connects and says nothing does not hold up others.
        let _silent = UnixStream::connect(&path).unwrap();
        assert_eq!(client::status(&path).unwrap().state, VmState::Running);
        drop(server);
        assert!(!path.exists(), "the socket file is removed at exit");
        let err = client::status(&path).unwrap_err();
        assert!(err.to_string().contains("no API socket"), "{err}");
        // A file that is not a socket is never replaced.
        std::fs::write(&path, "precious").unwrap();
        let err = ApiServer::start(&path, VmControl::new()).err().unwrap();
        assert!(matches!(err, ServerError::NotASocket { .. }), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
