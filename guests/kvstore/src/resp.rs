//! RESP2, the Redis protocol: request parsing (multibulk and inline) and reply encoding.

use alloc::vec::Vec;

/// Largest bulk argument accepted (Redis allows 512 MiB; this guest has little memory).
pub const MAX_BULK: usize = 16 << 20;
/// Largest number of arguments in one command.
const MAX_ARGS: usize = 1 << 20;
/// Longest inline command line.
const MAX_INLINE: usize = 64 << 10;

/// The outcome of parsing the front of a connection's input.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A whole command: its arguments are in the caller's vector (ranges into the input);
    /// it took this many bytes.
    Command(usize),
    /// An empty inline line (ignored, as Redis does) of this many bytes.
    Empty(usize),
    /// More bytes are needed.
    Incomplete,
    /// A protocol error: reply with it and close the connection.
    Error(&'static str),
}

/// Reads a `\r\n`-terminated decimal after the type byte at `start`: (value, next index).
fn line_number(input: &[u8], start: usize) -> Result<Option<(i64, usize)>, ()> {
    let Some(newline) = input[start..].iter().position(|&b| b == b'\n') else {
        // A length line is short: a long one without a newline is garbage.
        return if input.len() - start > 32 { Err(()) } else { Ok(None) };
    };
    let line = &input[start..start + newline];
    let line = line.strip_suffix(b"\r").ok_or(())?;
    let text = core::str::from_utf8(line).map_err(|_| ())?;
    let value = text.parse::<i64>().map_err(|_| ())?;
    Ok(Some((value, start + newline + 1)))
}

/// Parses one command from the front of `input` into `args` (byte ranges of `input`).
pub fn parse(input: &[u8], args: &mut Vec<(usize, usize)>) -> Parsed {
    args.clear();
    if input.is_empty() {
        return Parsed::Incomplete;
    }
    if input[0] != b'*' {
        return parse_inline(input, args);
    }
    let (count, mut pos) = match line_number(input, 1) {
        Ok(Some(found)) => found,
        Ok(None) => return Parsed::Incomplete,
        Err(()) => return Parsed::Error("Protocol error: invalid multibulk length"),
    };
    if count <= 0 {
        // `*0` and `*-1` are empty commands.
        return Parsed::Empty(pos);
    }
    if count as usize > MAX_ARGS {
        return Parsed::Error("Protocol error: invalid multibulk length");
    }
    for _ in 0..count {
        if pos >= input.len() {
            return Parsed::Incomplete;
        }
        if input[pos] != b'$' {
            return Parsed::Error("Protocol error: expected '$'");
        }
        let (len, start) = match line_number(input, pos + 1) {
            Ok(Some(found)) => found,
            Ok(None) => return Parsed::Incomplete,
            Err(()) => return Parsed::Error("Protocol error: invalid bulk length"),
        };
        if len < 0 || len as usize > MAX_BULK {
            return Parsed::Error("Protocol error: invalid bulk length");
        }
        let end = start + len as usize;
        if input.len() < end + 2 {
            return Parsed::Incomplete;
        }
        if &input[end..end + 2] != b"\r\n" {
            return Parsed::Error("Protocol error: bulk not followed by CRLF");
        }
        args.push((start, end));
        pos = end + 2;
    }
    Parsed::Command(pos)
}

/// An inline command: one line, arguments separated by spaces or tabs (no quoting).
fn parse_inline(input: &[u8], args: &mut Vec<(usize, usize)>) -> Parsed {
    let Some(newline) = input.iter().position(|&b| b == b'\n') else {
        return if input.len() > MAX_INLINE {
            Parsed::Error("Protocol error: too big inline request")
        } else {
            Parsed::Incomplete
        };
    };
    let line_end = if newline > 0 && input[newline - 1] == b'\r' { newline - 1 } else { newline };
    let mut pos = 0;
    while pos < line_end {
        while pos < line_end && (input[pos] == b' ' || input[pos] == b'\t') {
            pos += 1;
        }
        let start = pos;
        while pos < line_end && input[pos] != b' ' && input[pos] != b'\t' {
            pos += 1;
        }
        if pos > start {
            args.push((start, pos));
        }
    }
    if args.is_empty() {
        Parsed::Empty(newline + 1)
    } else {
        Parsed::Command(newline + 1)
    }
}

/// Appends a decimal number.
fn push_decimal(out: &mut Vec<u8>, value: i64) {
    let mut digits = [0u8; 20];
    let mut n = value.unsigned_abs();
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if value < 0 {
        out.push(b'-');
    }
    out.extend_from_slice(&digits[i..]);
}

/// `+OK`-style simple string.
pub fn simple(out: &mut Vec<u8>, text: &str) {
    out.push(b'+');
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// `-ERR ...` error (the text includes its prefix, e.g. "ERR ").
pub fn error(out: &mut Vec<u8>, text: &str) {
    out.push(b'-');
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// `:n`.
pub fn integer(out: &mut Vec<u8>, value: i64) {
    out.push(b':');
    push_decimal(out, value);
    out.extend_from_slice(b"\r\n");
}

/// `$len\r\nbytes\r\n`.
pub fn bulk(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(b'$');
    push_decimal(out, bytes.len() as i64);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(bytes);
    out.extend_from_slice(b"\r\n");
}

/// `$-1`, the null bulk.
pub fn null(out: &mut Vec<u8>) {
    out.extend_from_slice(b"$-1\r\n");
}

/// `*n`, an array header (its elements follow).
pub fn array(out: &mut Vec<u8>, len: usize) {
    out.push(b'*');
    push_decimal(out, len as i64);
    out.extend_from_slice(b"\r\n");
}

/// Formats a signed decimal into `buf`, returning the digits.
pub fn format_i64(value: i64, buf: &mut Vec<u8>) {
    buf.clear();
    push_decimal(buf, value);
}
