//! The cpio "newc" archive format (magic `070701`; `070702` with checksums is read the same),
//! the initramfs format of Linux, QEMU and Firecracker.
//!
//! Each member is a 110-byte ASCII header (the magic and 13 eight-digit hexadecimal fields),
//! the NUL-terminated name padded to a multiple of 4 bytes (counted from the header's start),
//! then the data padded to 4. The member named `TRAILER!!!` ends the archive.
//! Written here rather than taken from a crate: the `cpio` crate reads through `std::io`,
//! and a reader over a byte slice is these few lines.

use core::fmt;

/// File type bits of `mode` (`S_IFMT`) and the types the personality knows.
pub const S_IFMT: u32 = 0o170000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFLNK: u32 = 0o120000;

/// One archive member; `name` and `data` borrow the archive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    /// The name as stored (usually without a leading `/`, `.` for the root).
    pub name: &'a str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u32,
    pub ino: u32,
    pub nlink: u32,
    pub data: &'a [u8],
}

impl Entry<'_> {
    pub fn is_dir(&self) -> bool {
        self.mode & S_IFMT == S_IFDIR
    }
    pub fn is_file(&self) -> bool {
        self.mode & S_IFMT == S_IFREG
    }
    pub fn is_symlink(&self) -> bool {
        self.mode & S_IFMT == S_IFLNK
    }
}

/// Why an archive could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// The member at this offset does not start with `070701` or `070702`.
    BadMagic(usize),
    /// A header field at this offset is not 8 hexadecimal digits.
    BadField(usize),
    /// The member at this offset runs past the end of the archive.
    Truncated(usize),
    /// The name at this offset is not UTF-8 or lacks its NUL.
    BadName(usize),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::BadMagic(at) => write!(f, "not a cpio newc archive (bad magic at byte {at})"),
            Error::BadField(at) => write!(f, "bad cpio header field at byte {at}"),
            Error::Truncated(at) => write!(f, "cpio member at byte {at} runs past the end"),
            Error::BadName(at) => write!(f, "bad cpio member name at byte {at}"),
        }
    }
}

const HEADER: usize = 110;
const TRAILER: &str = "TRAILER!!!";

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn field(archive: &[u8], at: usize) -> Result<u32, Error> {
    let digits = archive.get(at..at + 8).ok_or(Error::Truncated(at))?;
    let mut value = 0u32;
    for &digit in digits {
        let d = (digit as char).to_digit(16).ok_or(Error::BadField(at))?;
        value = value << 4 | d;
    }
    Ok(value)
}

/// Iterates over the members of `archive` up to the trailer (which is not returned).
pub fn entries(archive: &[u8]) -> Entries<'_> {
    Entries { archive, pos: 0, done: false }
}

/// The iterator [`entries`] returns; stops after the first error.
pub struct Entries<'a> {
    archive: &'a [u8],
    pos: usize,
    done: bool,
}

impl<'a> Entries<'a> {
    fn read(&mut self) -> Result<Option<Entry<'a>>, Error> {
        let a = self.archive;
        let at = self.pos;
        // Some writers pad the end with zeros past the trailer; a missing trailer at the
        // very end is taken as the end too.
        if at >= a.len() || a[at..].iter().all(|&b| b == 0) {
            return Ok(None);
        }
        let magic = a.get(at..at + 6).ok_or(Error::Truncated(at))?;
        if magic != b"070701" && magic != b"070702" {
            return Err(Error::BadMagic(at));
        }
        let f = |i: usize| field(a, at + 6 + 8 * i);
        let (ino, mode, uid, gid, nlink, mtime) = (f(0)?, f(1)?, f(2)?, f(3)?, f(4)?, f(5)?);
        let filesize = f(6)? as usize;
        let namesize = f(11)? as usize;
        let name_start = at + HEADER;
        let name_end = name_start.checked_add(namesize).ok_or(Error::Truncated(at))?;
        let name_bytes = a.get(name_start..name_end).ok_or(Error::Truncated(at))?;
        let name_bytes = name_bytes.strip_suffix(&[0]).ok_or(Error::BadName(name_start))?;
        let name = core::str::from_utf8(name_bytes).map_err(|_| Error::BadName(name_start))?;
        let data_start = at + align4(HEADER + namesize);
        let data_end = data_start.checked_add(filesize).ok_or(Error::Truncated(at))?;
        let data = a.get(data_start..data_end).ok_or(Error::Truncated(at))?;
        self.pos = data_start + align4(filesize);
        if name == TRAILER {
            return Ok(None);
        }
        Ok(Some(Entry { name, mode, uid, gid, mtime, ino, nlink, data }))
    }
}

impl<'a> Iterator for Entries<'a> {
    type Item = Result<Entry<'a>, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.read() {
            Ok(Some(entry)) => Some(Ok(entry)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(error) => {
                self.done = true;
                Some(Err(error))
            }
        }
    }
}

/// Appends one newc member to `out` (for tests and tools; `ino` numbers the member).
pub fn write_entry(out: &mut alloc::vec::Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) {
    use core::fmt::Write;
    struct Hex<'a>(&'a mut alloc::vec::Vec<u8>);
    impl Write for Hex<'_> {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            self.0.extend_from_slice(s.as_bytes());
            Ok(())
        }
    }
    let start = out.len();
    let fields = [ino, mode, 0, 0, 1, 0, data.len() as u32, 0, 0, 0, 0, name.len() as u32 + 1, 0];
    out.extend_from_slice(b"070701");
    for value in fields {
        let _ = write!(Hex(out), "{value:08x}");
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while !(out.len() - start).is_multiple_of(4) {
        out.push(0);
    }
    out.extend_from_slice(data);
    while !(out.len() - start).is_multiple_of(4) {
        out.push(0);
    }
}

/// Appends the trailer member that ends an archive.
pub fn write_trailer(out: &mut alloc::vec::Vec<u8>) {
    write_entry(out, 0, TRAILER, 0, &[]);
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use alloc::vec::Vec;

    fn archive() -> Vec<u8> {
        let mut a = Vec::new();
        write_entry(&mut a, 1, ".", S_IFDIR | 0o755, &[]);
        write_entry(&mut a, 2, "etc", S_IFDIR | 0o755, &[]);
        write_entry(&mut a, 3, "etc/redis.conf", S_IFREG | 0o644, b"port 6379\n");
        write_entry(&mut a, 4, "bin/x", S_IFREG | 0o755, &[1, 2, 3, 4, 5]);
        write_trailer(&mut a);
        a
    }

    #[test]
    fn reads_what_was_written() {
        let a = archive();
        assert_eq!(a.len() % 4, 0);
        let all: Vec<Entry> = entries(&a).collect::<Result<_, _>>().unwrap();
        assert_eq!(all.len(), 4);
        assert_eq!(all[0].name, ".");
        assert!(all[1].is_dir());
        assert_eq!(all[2].name, "etc/redis.conf");
        assert_eq!(all[2].data, b"port 6379\n");
        assert!(all[2].is_file());
        assert_eq!(all[3].data, &[1, 2, 3, 4, 5]);
        assert_eq!(all[3].mode & 0o777, 0o755);
        assert_eq!(all[3].ino, 4);
    }

    #[test]
    fn header_layout_matches_the_format() {
        let mut a = Vec::new();
        write_entry(&mut a, 7, "ab", S_IFREG | 0o600, b"xyz");
        // 110-byte header + "ab\0" = 113, padded to 116; data 3 padded to 4.
        assert_eq!(a.len(), 120);
        assert_eq!(&a[..6], b"070701");
        assert_eq!(&a[6..14], b"00000007");
        assert_eq!(&a[54..62], b"00000003"); // filesize
        assert_eq!(&a[94..102], b"00000003"); // namesize incl. NUL
        assert_eq!(&a[116..119], b"xyz");
    }

    #[test]
    fn trailing_zero_padding_ends_the_archive() {
        let mut a = archive();
        a.extend_from_slice(&[0; 512]);
        assert_eq!(entries(&a).count(), 4);
        let mut b = Vec::new();
        write_entry(&mut b, 1, "f", S_IFREG, b"1");
        b.extend_from_slice(&[0; 64]);
        assert_eq!(entries(&b).count(), 1);
    }

    #[test]
    fn errors_are_reported() {
        assert_eq!(entries(b"ELF\x7fnot cpio").next(), Some(Err(Error::BadMagic(0))));
        let mut a = Vec::new();
        write_entry(&mut a, 1, "file", S_IFREG, &[9; 100]);
        a.truncate(150);
        assert_eq!(entries(&a).next(), Some(Err(Error::Truncated(0))));
        let mut c = archive();
        c[10] = b'z';
        assert_eq!(entries(&c).next(), Some(Err(Error::BadField(6))));
        let mut d = archive();
        let all: Vec<_> = entries(&d).collect();
        assert!(all.iter().all(|e| e.is_ok()));
        // The first member's name NUL replaced: a bad name.
        d[111] = b'x';
        assert!(matches!(entries(&d).next(), Some(Err(Error::BadName(_)))));
    }
}
