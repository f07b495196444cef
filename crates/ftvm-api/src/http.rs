//! The HTTP/1.1 subset the API speaks: one request per connection (`Connection: close`),
//! bodies only with `Content-Length` (no chunked transfer coding), bounded sizes. Enough for
//! `curl --unix-socket` and for `ftvm ctl`; nothing the client sends can make it panic.

use std::io::{self, Read, Write};

/// The most a request's line and headers may take.
pub const MAX_HEAD: usize = 8 * 1024;
/// The largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path, without a query string.
    pub path: String,
    pub body: Vec<u8>,
}

/// Why a request could not be read; each maps to an answer (or to none, for a client that
/// went away).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestError {
    /// 400, with the reason.
    Malformed(String),
    /// 411: a body without a length.
    LengthRequired,
    /// 413.
    TooLarge(String),
    /// 501: a transfer coding or protocol this server does not speak.
    Unsupported(String),
    /// The client closed the connection or timed out before sending a whole request.
    Gone,
}

impl RequestError {
    /// The status code and the message of the answer.
    pub fn answer(&self) -> Option<(u16, String)> {
        Some(match self {
            RequestError::Malformed(why) => (400, format!("malformed HTTP request: {why}")),
            RequestError::LengthRequired => (411, "a request body needs a Content-Length header".into()),
            RequestError::TooLarge(why) => (413, why.clone()),
            RequestError::Unsupported(why) => (501, why.clone()),
            RequestError::Gone => return None,
        })
    }
}

fn find_head_end(buf: &[u8]) -> Option<(usize, usize)> {
    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
        return Some((i, i + 4));
    }
    buf.windows(2).position(|w| w == b"\n\n").map(|i| (i, i + 2))
}

/// Reads one request from `r` (which should have a read timeout).
pub fn read_request(r: &mut impl Read) -> Result<Request, RequestError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    let (head_end, body_start) = loop {
        if let Some(found) = find_head_end(&buf) {
            break found;
        }
        if buf.len() > MAX_HEAD {
            return Err(RequestError::TooLarge(format!("the request head is over {MAX_HEAD} bytes")));
        }
        match r.read(&mut chunk) {
            Ok(0) if buf.iter().all(u8::is_ascii_whitespace) => return Err(RequestError::Gone),
            Ok(0) => return Err(RequestError::Malformed("the request ends before its blank line".into())),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) if buf.is_empty() => return Err(RequestError::Gone),
            Err(_) => return Err(RequestError::Malformed("the request head did not arrive in time".into())),
        }
    };
    if head_end > MAX_HEAD {
        return Err(RequestError::TooLarge(format!("the request head is over {MAX_HEAD} bytes")));
    }
    let head = std::str::from_utf8(&buf[..head_end])
        .map_err(|_| RequestError::Malformed("the request head is not UTF-8".into()))?;
    let mut lines = head.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (method, target, version) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v), None) if !m.is_empty() && !t.is_empty() => (m, t, v),
        _ => {
            return Err(RequestError::Malformed(format!(
                "expected a request line like \"GET /status HTTP/1.1\", got {:?}",
                truncate(request_line, 80)
            )))
        }
    };
    if !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(RequestError::Malformed(format!("bad method {:?}", truncate(method, 20))));
    }
    match version {
        "HTTP/1.1" | "HTTP/1.0" => {}
        v if v.starts_with("HTTP/") => {
            return Err(RequestError::Unsupported(format!("{} is not supported; use HTTP/1.1", truncate(v, 20))))
        }
        v => return Err(RequestError::Malformed(format!("bad protocol version {:?}", truncate(v, 20)))),
    }
    if !target.starts_with('/') {
        return Err(RequestError::Malformed(format!("the target must be a path, got {:?}", truncate(target, 80))));
    }
    let path = target.split(['?', '#']).next().unwrap_or(target).to_string();
    let mut content_length: Option<usize> = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(RequestError::Malformed(format!("bad header line {:?}", truncate(line, 80))));
        };
        let (name, value) = (name.trim(), value.trim());
        if name.is_empty() || name.contains(' ') {
            return Err(RequestError::Malformed(format!("bad header name {:?}", truncate(name, 40))));
        }
        if name.eq_ignore_ascii_case("content-length") {
            let n: usize = value
                .parse()
                .map_err(|_| RequestError::Malformed(format!("bad Content-Length {:?}", truncate(value, 20))))?;
            if content_length.is_some_and(|old| old != n) {
                return Err(RequestError::Malformed("conflicting Content-Length headers".into()));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(RequestError::Unsupported(
                "Transfer-Encoding is not supported; send the body with a Content-Length".into(),
            ));
        }
    }
    let length = content_length.unwrap_or(0);
    if length > MAX_BODY {
        return Err(RequestError::TooLarge(format!("the request body is over {MAX_BODY} bytes")));
    }
    let mut body = buf[body_start..].to_vec();
    if body.len() > length {
        if content_length.is_none() {
            return Err(RequestError::LengthRequired);
        }
        // Pipelined requests are not supported: only the first is answered.
        body.truncate(length);
    }
    while body.len() < length {
        let want = (length - body.len()).min(chunk.len());
        match r.read(&mut chunk[..want]) {
            Ok(0) => return Err(RequestError::Malformed("the body is shorter than its Content-Length".into())),
            Ok(n) => body.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Err(RequestError::Malformed("the body did not arrive in time".into())),
        }
    }
    Ok(Request { method: method.to_string(), path, body })
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// The reason phrase of the codes the API uses.
pub fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Writes a whole response with a JSON body and closes the exchange (`Connection: close`).
pub fn write_response(w: &mut impl Write, code: u16, extra_headers: &[(&str, &str)], body: &str) -> io::Result<()> {
    write_typed_response(w, code, "application/json", extra_headers, body)
}

/// [`write_response`] with another Content-Type (the metrics' text).
pub fn write_typed_response(
    w: &mut impl Write,
    code: u16,
    content_type: &str,
    extra_headers: &[(&str, &str)],
    body: &str,
) -> io::Result<()> {
    let mut out = format!("HTTP/1.1 {code} {}\r\n", reason(code));
    out.push_str(&format!("Server: ftvm\r\nContent-Type: {content_type}\r\nConnection: close\r\n"));
    for (k, v) in extra_headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    out.push_str(body);
    w.write_all(out.as_bytes())?;
    w.flush()
}

/// A response as the client reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// Parses a whole response (the server closes the connection after it).
pub fn parse_response(bytes: &[u8]) -> Result<Response, String> {
    let Some((head_end, body_start)) = find_head_end(bytes) else {
        return Err(format!("no complete HTTP response ({} bytes)", bytes.len()));
    };
    let head = String::from_utf8_lossy(&bytes[..head_end]);
    let status_line = head.lines().next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let status = match (parts.next(), parts.next()) {
        (Some(v), Some(code)) if v.starts_with("HTTP/1.") => {
            code.parse::<u16>().map_err(|_| format!("bad status line {status_line:?}"))?
        }
        _ => return Err(format!("not an HTTP response: {:?}", truncate(status_line, 80))),
    };
    let mut body = &bytes[body_start..];
    for line in head.lines().skip(1) {
        if let Some((k, v)) = line.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                let n: usize = v.trim().parse().map_err(|_| format!("bad Content-Length {v:?}"))?;
                if n > body.len() {
                    return Err(format!("the response body is cut short ({} of {n} bytes)", body.len()));
                }
                body = &body[..n];
            }
        }
    }
    Ok(Response { status, body: String::from_utf8_lossy(body).into_owned() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<Request, RequestError> {
        read_request(&mut &raw[..])
    }

    #[test]
    fn well_formed_requests() {
        let r = parse(b"GET /status HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
        assert_eq!((r.method.as_str(), r.path.as_str(), r.body.len()), ("GET", "/status", 0));
        let r = parse(b"PUT /snapshot?x=1 HTTP/1.1\r\nContent-Length: 11\r\n\r\n{\"dir\":\"d\"}").unwrap();
        assert_eq!((r.path.as_str(), r.body.as_slice()), ("/snapshot", &b"{\"dir\":\"d\"}"[..]));
        // Bare newlines, as `printf` users write them.
        assert_eq!(parse(b"GET /status HTTP/1.0\n\n").unwrap().path, "/status");
    }

    #[test]
    fn malformed_requests_get_reasons_not_panics() {
        let bad: &[&[u8]] = &[
            b"GARBAGE\r\n\r\n",
            b"GET\r\n\r\n",
            b"GET /status\r\n\r\n",
            b"GET status HTTP/1.1\r\n\r\n",
            b"get /status HTTP/1.1\r\n\r\n",
            b"GET /status FTP/1\r\n\r\n",
            b"GET /status HTTP/1.1\r\nno colon here\r\n\r\n",
            b"GET /status HTTP/1.1\r\nContent-Length: x\r\n\r\n",
            b"GET /status HTTP/1.1\r\nContent-Length: 5\r\n\r\nab",
            b"GET /status HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"\xff\xfe /status HTTP/1.1\r\n\r\n",
            b"GET /status HTTP/1.1\r\n",
        ];
        for raw in bad {
            let e = parse(raw).unwrap_err();
            let (code, msg) = e.answer().unwrap();
            assert_eq!(code, 400, "{:?}: {msg}", String::from_utf8_lossy(raw));
        }
        assert_eq!(parse(b"").unwrap_err(), RequestError::Gone);
        let e = parse(b"PUT /pause HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap_err();
        assert_eq!(e.answer().unwrap().0, 501);
        assert_eq!(parse(b"GET / HTTP/2.0\r\n\r\n").unwrap_err().answer().unwrap().0, 501);
        assert_eq!(parse(b"PUT /pause HTTP/1.1\r\n\r\nbody").unwrap_err(), RequestError::LengthRequired);
        let big = format!("PUT /pause HTTP/1.1\r\nContent-Length: {}\r\n\r\n", MAX_BODY + 1);
        assert_eq!(parse(big.as_bytes()).unwrap_err().answer().unwrap().0, 413);
        let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_HEAD * 2));
        assert_eq!(parse(long.as_bytes()).unwrap_err().answer().unwrap().0, 413);
    }

    #[test]
    fn responses_round_trip() {
        let mut out = Vec::new();
        write_response(&mut out, 404, &[], "{\"error\":\"no\"}").unwrap();
        let r = parse_response(&out).unwrap();
        assert_eq!(r, Response { status: 404, body: "{\"error\":\"no\"}".into() });
        assert!(parse_response(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc").is_err());
    }
}
