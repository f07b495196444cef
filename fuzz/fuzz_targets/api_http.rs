//! The API's HTTP request reader (crates/ftvm-api/src/http.rs, as server.rs calls it on each
//! connection) and the client's response parser must never panic, whatever a client sends,
//! and must never read or keep more than their bounds.
//!
//! The first byte picks how the bytes arrive, the way a socket delivers them:
//! - bits 0-3: the most bytes one `read` returns (0: all at once), so that the head search and
//!   the body loop see every split;
//! - bit 4: an `Interrupted` error before every other read (it must be retried);
//! - bit 5: the stream ends in a timeout (`WouldBlock`, as a socket with a read timeout) rather
//!   than an end of file.
//!
//! Properties: a request read is well formed (an upper-case method, a path that starts with
//! `/`, a body within [`MAX_BODY`]); an error answers with 400, 411, 413 or 501, or none at all
//! for a client that went away; the reader never takes more than its head and body bounds (plus
//! one read's chunk) from the stream; the response parser's body is a part of its input.
#![no_main]

use std::io::{self, Read};

use ftvm_api::http::{parse_response, read_request, RequestError, MAX_BODY, MAX_HEAD};
use libfuzzer_sys::fuzz_target;

/// The reader's own buffer: at most this much beyond its bounds may be taken from the stream.
const CHUNK: usize = 2048;

struct Socket<'a> {
    data: &'a [u8],
    max_read: usize,
    interrupt: bool,
    timeout: bool,
    reads: u64,
    taken: usize,
}

impl Read for Socket<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reads += 1;
        if self.interrupt && self.reads % 2 == 1 {
            return Err(io::Error::from(io::ErrorKind::Interrupted));
        }
        if self.data.is_empty() && self.timeout {
            return Err(io::Error::from(io::ErrorKind::WouldBlock));
        }
        let n = buf.len().min(self.data.len()).min(self.max_read);
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        self.taken += n;
        Ok(n)
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&how, rest)) = data.split_first() else { return };
    let mut socket = Socket {
        data: rest,
        max_read: match usize::from(how & 0x0f) {
            0 => usize::MAX,
            n => n * n,
        },
        interrupt: how & 0x10 != 0,
        timeout: how & 0x20 != 0,
        reads: 0,
        taken: 0,
    };
    match read_request(&mut socket) {
        Ok(req) => {
            assert!(!req.method.is_empty() && req.method.bytes().all(|b| b.is_ascii_uppercase()), "{req:?}");
            assert!(req.path.starts_with('/') && !req.path.contains(['?', '#']), "{req:?}");
            assert!(req.body.len() <= MAX_BODY);
        }
        Err(RequestError::Gone) => assert!(RequestError::Gone.answer().is_none()),
        Err(e) => {
            let (code, message) = e.answer().expect("an answer for a client that is still there");
            assert!([400, 411, 413, 501].contains(&code), "{code} {message}");
            assert!(!message.is_empty());
        }
    }
    assert!(socket.taken <= MAX_HEAD + CHUNK + MAX_BODY + CHUNK, "took {} bytes", socket.taken);

    if let Ok(r) = parse_response(rest) {
        assert!(r.body.len() <= rest.len() * 3, "a body of {} bytes from {}", r.body.len(), rest.len());
    }
});
