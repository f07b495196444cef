//! The client side: the requests `ftvm ctl` makes, with errors that say what is wrong.

use std::io::{self, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::http::{self, Response};
use crate::status::Status;

/// How long the client waits for an answer (a pause waits up to a second for the vCPU).
const TIMEOUT: Duration = Duration::from_secs(10);
/// The most of an answer the client reads.
const MAX_RESPONSE: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no API socket at {path} (is a VM running with --api-socket {path}?)")]
    NoSocket { path: PathBuf },
    #[error("{path} is not a socket (give the path a VM's --api-socket named)")]
    NotASocket { path: PathBuf },
    #[error("no VM answers on {path}: the VM is gone (a stale socket left by an ftvm that was killed)")]
    Dead { path: PathBuf },
    #[error("{path}: {what}: {source}")]
    Io { path: PathBuf, what: &'static str, source: io::Error },
    #[error("{path}: the answer is not what ftvm sends: {why}")]
    BadResponse { path: PathBuf, why: String },
    /// The VM answered with an error (4xx, 5xx): its message.
    #[error("{message} (HTTP {status})")]
    Api { status: u16, message: String },
}

/// Connects to a VM's API socket.
pub fn connect(path: &Path) -> Result<UnixStream, ClientError> {
    let p = || path.to_path_buf();
    match std::fs::metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(ClientError::NoSocket { path: p() }),
        Ok(m) if !m.file_type().is_socket() => return Err(ClientError::NotASocket { path: p() }),
        _ => {}
    }
    let stream = UnixStream::connect(path).map_err(|e| match e.kind() {
        io::ErrorKind::ConnectionRefused => ClientError::Dead { path: p() },
        io::ErrorKind::NotFound => ClientError::NoSocket { path: p() },
        _ => ClientError::Io { path: p(), what: "cannot connect", source: e },
    })?;
    let _ = stream.set_read_timeout(Some(TIMEOUT));
    let _ = stream.set_write_timeout(Some(TIMEOUT));
    Ok(stream)
}

/// Sends raw bytes and reads the answer (tests use it to send malformed requests).
pub fn raw(path: &Path, request: &[u8]) -> Result<Response, ClientError> {
    let mut stream = connect(path)?;
    let io_err = |what| move |source| ClientError::Io { path: path.to_path_buf(), what, source };
    stream.write_all(request).map_err(io_err("cannot send the request"))?;
    let mut answer = Vec::new();
    stream.take(MAX_RESPONSE).read_to_end(&mut answer).map_err(io_err("no answer"))?;
    if answer.is_empty() {
        return Err(ClientError::BadResponse {
            path: path.to_path_buf(),
            why: "the connection closed without an answer".into(),
        });
    }
    http::parse_response(&answer).map_err(|why| ClientError::BadResponse { path: path.to_path_buf(), why })
}

/// Sends one request and returns the answer, whatever its status.
pub fn request(path: &Path, method: &str, target: &str, body: Option<&str>) -> Result<Response, ClientError> {
    let body = body.unwrap_or("");
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n");
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str(&format!("Content-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()));
    raw(path, req.as_bytes())
}

/// Sends a request and turns an error answer (4xx, 5xx) into [`ClientError::Api`].
pub fn call(path: &Path, method: &str, target: &str, body: Option<&str>) -> Result<Response, ClientError> {
    let r = request(path, method, target, body)?;
    if r.status >= 400 {
        let message = serde_json::from_str::<serde_json::Value>(&r.body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or_else(|| r.body.trim().to_string());
        return Err(ClientError::Api { status: r.status, message });
    }
    Ok(r)
}

/// `GET /status`: the JSON text as the VM sent it.
pub fn status_body(path: &Path) -> Result<String, ClientError> {
    Ok(call(path, "GET", "/status", None)?.body)
}

/// `GET /status`, decoded.
pub fn status(path: &Path) -> Result<Status, ClientError> {
    let r = call(path, "GET", "/status", None)?;
    serde_json::from_str(&r.body).map_err(|e| ClientError::BadResponse { path: path.into(), why: e.to_string() })
}

/// `PUT /pause`: the state the VM reports (`paused`, or `pausing` if the vCPU has not
/// reached a pause point within a second).
pub fn pause(path: &Path) -> Result<String, ClientError> {
    state_of(path, call(path, "PUT", "/pause", None)?)
}

/// `PUT /switchover`: a protected primary hands over to its backup.
pub fn switchover(path: &Path) -> Result<String, ClientError> {
    state_of(path, call(path, "PUT", "/switchover", None)?)
}

/// `PUT /shutdown`: asks the guest to shut down (as SIGTERM); the state the VM reports.
pub fn shutdown(path: &Path) -> Result<String, ClientError> {
    state_of(path, call(path, "PUT", "/shutdown", None)?)
}

/// `PUT /resume`.
pub fn resume(path: &Path) -> Result<String, ClientError> {
    state_of(path, call(path, "PUT", "/resume", None)?)
}

/// `PUT /snapshot`: starts a live snapshot into `dir` (relative paths are the VM's, so the
/// client makes them absolute first).
pub fn start_snapshot(path: &Path, dir: &Path) -> Result<(), ClientError> {
    let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    let body = serde_json::json!({ "dir": dir.display().to_string() }).to_string();
    call(path, "PUT", "/snapshot", Some(&body)).map(|_| ())
}

/// `GET /snapshot`: the latest snapshot's progress.
pub fn snapshot_progress(path: &Path) -> Result<crate::SnapshotProgress, ClientError> {
    let r = call(path, "GET", "/snapshot", None)?;
    serde_json::from_str(&r.body).map_err(|e| ClientError::BadResponse { path: path.into(), why: e.to_string() })
}

/// `PUT /protect`: a live VM starts a state transfer to the backup listening at `backup`.
pub fn start_protect(path: &Path, backup: std::net::SocketAddr) -> Result<(), ClientError> {
    let body = serde_json::json!({ "backup": backup.to_string() }).to_string();
    call(path, "PUT", "/protect", Some(&body)).map(|_| ())
}

/// `GET /protect`: the latest re-protection's progress.
pub fn protect_progress(path: &Path) -> Result<crate::ProtectProgress, ClientError> {
    let r = call(path, "GET", "/protect", None)?;
    serde_json::from_str(&r.body).map_err(|e| ClientError::BadResponse { path: path.into(), why: e.to_string() })
}

fn state_of(path: &Path, r: Response) -> Result<String, ClientError> {
    let v: serde_json::Value = serde_json::from_str(&r.body)
        .map_err(|e| ClientError::BadResponse { path: path.into(), why: e.to_string() })?;
    Ok(v.get("state").and_then(|s| s.as_str()).unwrap_or("unknown").to_string())
}

/// The most one event line may take (a chunk of `GET /events`).
const MAX_EVENT: usize = 1 << 20;

/// `GET /events`: calls `each` with every event line (a JSON object, without its newline) as
/// it arrives, until the VM ends the stream (`Ok`) or `each` returns `false` (`Ok` too). The
/// stream may stay quiet for long: there is no read timeout.
pub fn follow_events(path: &Path, mut each: impl FnMut(&str) -> bool) -> Result<(), ClientError> {
    use std::io::BufRead;
    let stream = connect(path)?;
    let _ = stream.set_read_timeout(None);
    let p = || path.to_path_buf();
    let io_err = |what| move |source| ClientError::Io { path: path.to_path_buf(), what, source };
    let bad = |why: String| ClientError::BadResponse { path: p(), why };
    (&stream)
        .write_all(b"GET /events HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .map_err(io_err("cannot send the request"))?;
    let mut r = io::BufReader::new(&stream);
    let mut line = String::new();
    let mut head = String::new();
    loop {
        line.clear();
        if r.by_ref().take(8192).read_line(&mut line).map_err(io_err("no answer"))? == 0 {
            return Err(bad(format!("the connection closed in the answer's head: {head:?}")));
        }
        if line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    if !head.starts_with("HTTP/1.1 200") {
        return Err(bad(format!("GET /events answered {:?}", head.lines().next().unwrap_or_default())));
    }
    if !head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        return Err(bad("GET /events is not a chunked stream (an ftvm without /events?)".into()));
    }
    loop {
        line.clear();
        r.by_ref().take(64).read_line(&mut line).map_err(io_err("the event stream broke"))?;
        let size = usize::from_str_radix(line.trim_end(), 16).map_err(|_| bad(format!("bad chunk size {line:?}")))?;
        if size == 0 {
            return Ok(());
        }
        if size > MAX_EVENT {
            return Err(bad(format!("an event of {size} bytes")));
        }
        let mut chunk = vec![0; size + 2];
        r.read_exact(&mut chunk).map_err(io_err("the event stream broke"))?;
        let text = String::from_utf8_lossy(&chunk[..size]);
        for event in text.lines().filter(|l| !l.is_empty()) {
            if !each(event) {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_dead_sockets_are_named() {
        let dir = std::env::temp_dir().join(format!("ftvm-api-client-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("vm.sock");
        assert!(matches!(status(&sock), Err(ClientError::NoSocket { .. })));
        drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        let err = status(&sock).unwrap_err();
        assert!(matches!(err, ClientError::Dead { .. }), "{err}");
        assert!(err.to_string().contains("the VM is gone"), "{err}");
        let file = dir.join("file");
        std::fs::write(&file, "x").unwrap();
        assert!(matches!(status(&file), Err(ClientError::NotASocket { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
