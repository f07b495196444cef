//! Boot protocols: loading a kernel image and the vCPU's first state.
//!
//! Two protocols, chosen by the image's format:
//! - [`pvh`]: ELF kernels with a PVH entry note (QEMU microvm, Firecracker and Cloud
//!   Hypervisor boot these; so do ftvm's guest-kit guests). Entry in 32-bit protected mode
//!   with `ebx` pointing at `hvm_start_info`.
//! - [`bzimage`]: Linux bzImages through the 64-bit boot protocol: entry in long mode at
//!   `startup_64` with `rsi` pointing at `boot_params`.

pub mod bzimage;
pub mod gdt;
pub mod pvh;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use kvm_bindings::kvm_fpu;
use kvm_ioctls::VcpuFd;
use linux_loader::cmdline::Cmdline;
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::error::{Error, Result};
use crate::memory::{self, GuestMemoryMmap, CMDLINE, CMDLINE_MAX, PAGE_SIZE};

/// The image formats ftvm can boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    PvhElf,
    BzImage,
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct BootSpec {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
}

/// Where the vCPU starts, and with what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryState {
    /// 32-bit protected mode, paging off, `ebx` = `hvm_start_info` address.
    Pvh { entry: u64, start_info: u64 },
    /// Long mode with identity page tables, `rsi` = `boot_params` address.
    Linux64 { entry: u64, boot_params: u64 },
}

/// The result of loading: where things are in guest memory.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub format: KernelFormat,
    pub entry: EntryState,
    pub kernel_start: u64,
    pub kernel_end: u64,
    /// Guest address and size of the initrd (or PVH module), if any.
    pub initrd: Option<(u64, u64)>,
}

/// The largest kernel or initrd ftvm reads: both must fit in the guest's RAM below 4 GiB.
pub const MAX_IMAGE_BYTES: u64 = 4 << 30;

/// What a file that is not a regular file is, for people ("a FIFO", "a character device").
pub fn file_kind(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_file() {
        "a regular file"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a plain file"
    }
}

/// Opens a kernel or initrd image for reading: a regular file of at most
/// [`MAX_IMAGE_BYTES`], nothing else. The open itself cannot block (a FIFO without a writer
/// would block it for ever) and what is opened is checked, not the name before it (no race
/// with a file replaced meanwhile): a FIFO, a device (`/dev/zero` reads without end), a
/// directory or a socket is refused with what it is.
pub fn open_image(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path)?;
    let meta = file.metadata()?;
    let t = meta.file_type();
    if !t.is_file() {
        let what = file_kind(&t);
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("it is {what}; only a regular file is accepted"),
        ));
    }
    if meta.len() > MAX_IMAGE_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("it is {} bytes; at most {MAX_IMAGE_BYTES} are accepted", meta.len()),
        ));
    }
    // Reads block as usual from here on (O_NONBLOCK means nothing for a regular file; off
    // all the same, for clarity).
    // SAFETY: F_GETFL/F_SETFL on a descriptor this function owns; no memory is passed.
    unsafe {
        let fd = std::os::unix::io::AsRawFd::as_raw_fd(&file);
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
    Ok(file)
}

/// Tells the kernel format from the first bytes of the image.
pub fn detect_format(path: &Path) -> Result<KernelFormat> {
    let mut head = [0u8; 0x210];
    let mut f = open_image(path).map_err(|source| Error::KernelRead { path: path.into(), source })?;
    let n = read_up_to(&mut f, &mut head).map_err(|source| Error::KernelRead { path: path.into(), source })?;
    let head = &head[..n];
    if head.starts_with(b"\x7fELF") {
        Ok(KernelFormat::PvhElf)
    } else if head.len() >= 0x206 && &head[0x202..0x206] == b"HdrS" {
        Ok(KernelFormat::BzImage)
    } else {
        let magic = head.iter().take(8).map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ");
        let magic = if magic.is_empty() { "the file is empty".to_string() } else { magic };
        Err(Error::UnknownKernelFormat { path: path.into(), magic })
    }
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Builds the kernel command line, refusing what the kernel could not parse.
pub fn build_cmdline(text: &str) -> Result<Cmdline> {
    if text.len() >= CMDLINE_MAX {
        return Err(Error::Cmdline(format!("{} bytes, longer than the {} bytes allowed", text.len(), CMDLINE_MAX - 1)));
    }
    if let Some(c) = text.chars().find(|c| !c.is_ascii() || c.is_ascii_control()) {
        return Err(Error::Cmdline(format!("contains the character {c:?}; only printable ASCII is allowed")));
    }
    let mut cmdline = Cmdline::new(CMDLINE_MAX).map_err(|e| Error::Cmdline(e.to_string()))?;
    let trimmed = text.trim();
    if !trimmed.is_empty() {
        cmdline.insert_str(trimmed).map_err(|e| Error::Cmdline(e.to_string()))?;
    }
    Ok(cmdline)
}

/// Loads the kernel, initrd and command line into guest memory and writes the boot
/// structures of the protocol the image calls for.
pub fn load(mem: &GuestMemoryMmap, spec: &BootSpec) -> Result<Loaded> {
    let cmdline = build_cmdline(&spec.cmdline)?;
    let loaded = match detect_format(&spec.kernel)? {
        KernelFormat::PvhElf => pvh::load(mem, spec, &cmdline)?,
        KernelFormat::BzImage => bzimage::load(mem, spec, &cmdline)?,
    };
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE), &cmdline)
        .map_err(|e| Error::Cmdline(format!("cannot write it to guest memory: {e}")))?;
    Ok(loaded)
}

/// Reads the initrd and places it page-aligned as high as possible below `limit`, above the
/// kernel. Returns (address, size).
pub(crate) fn load_initrd(mem: &GuestMemoryMmap, path: &Path, kernel_end: u64, limit: u64) -> Result<(u64, u64)> {
    let read = |source| Error::InitrdRead { path: path.into(), source };
    let file = open_image(path).map_err(read)?;
    let size = file.metadata().map_err(read)?.len();
    let top = memory::low_ram_end(mem).min(limit);
    let too_small = || Error::MemoryTooSmall {
        mem_mib: memory::total_size(mem) >> 20,
        what: format!("the kernel and the initrd {} ({} KiB)", path.display(), size >> 10),
        need_mib: ((kernel_end + size) >> 20) + 1,
    };
    // Known not to fit before a byte is read.
    if top.checked_sub(size).is_none_or(|a| a < kernel_end) {
        return Err(too_small());
    }
    // Read what the file holds now, and not more than it said (it may grow meanwhile).
    let mut data = Vec::with_capacity(size as usize);
    file.take(size).read_to_end(&mut data).map_err(read)?;
    let size = data.len() as u64;
    let addr = top.checked_sub(size).map(|a| a & !(PAGE_SIZE - 1)).filter(|&a| a >= kernel_end).ok_or_else(|| {
        Error::MemoryTooSmall {
            mem_mib: memory::total_size(mem) >> 20,
            what: format!("the kernel and the initrd {} ({} KiB)", path.display(), size >> 10),
            need_mib: ((kernel_end + size) >> 20) + 1,
        }
    })?;
    vm_memory::Bytes::write_slice(mem, &data, GuestAddress(addr))
        .map_err(|e| Error::GuestMemory { addr, detail: e.to_string() })?;
    Ok((addr, size))
}

/// Sets the vCPU's registers for the protocol's entry state.
pub fn setup_vcpu(vcpu: &VcpuFd, mem: &GuestMemoryMmap, entry: EntryState) -> Result<()> {
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(Error::kvm("KVM_SET_FPU"))?;
    let mut sregs = vcpu.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
    let mut regs = kvm_bindings::kvm_regs { rflags: 0x2, ..Default::default() };
    match entry {
        EntryState::Pvh { entry, start_info } => {
            gdt::setup_protected_mode(mem, &mut sregs)?;
            regs.rip = entry;
            regs.rbx = start_info;
        }
        EntryState::Linux64 { entry, boot_params } => {
            gdt::setup_long_mode(mem, &mut sregs)?;
            regs.rip = entry;
            regs.rsi = boot_params;
            regs.rsp = bzimage::BOOT_STACK;
            regs.rbp = bzimage::BOOT_STACK;
        }
    }
    vcpu.set_sregs(&sregs).map_err(Error::kvm("KVM_SET_SREGS"))?;
    vcpu.set_regs(&regs).map_err(Error::kvm("KVM_SET_REGS"))?;
    Ok(())
}

/// Checks that `[start, end)` lies in guest RAM, with a message in MiB if not.
pub(crate) fn check_fits(mem: &GuestMemoryMmap, what: &str, start: u64, end: u64) -> Result<()> {
    let fits = end > start
        && mem.find_region(GuestAddress(start)).is_some()
        && mem.find_region(GuestAddress(end - 1)).is_some()
        && end <= memory::low_ram_end(mem).max(start);
    if fits {
        Ok(())
    } else {
        Err(Error::MemoryTooSmall {
            mem_mib: memory::total_size(mem) >> 20,
            what: format!("{what} ({start:#x}..{end:#x})"),
            need_mib: end.div_ceil(1 << 20) + 1,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_rejects_what_a_kernel_cannot_parse() {
        assert!(build_cmdline("console=ttyS0 hello.wait_ms=10").is_ok());
        assert!(build_cmdline("").is_ok());
        assert!(matches!(build_cmdline("a\nb"), Err(Error::Cmdline(_))));
        assert!(matches!(build_cmdline("caf\u{e9}"), Err(Error::Cmdline(_))));
        assert!(matches!(build_cmdline(&"x".repeat(4096)), Err(Error::Cmdline(_))));
    }

    #[test]
    fn format_detection_names_the_problem() {
        let dir = std::env::temp_dir().join(format!("ftvm-boot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty");
        std::fs::write(&empty, b"").unwrap();
        let text = dir.join("text");
        std::fs::write(&text, b"#!/bin/sh\necho not a kernel\n").unwrap();
        let elf = dir.join("elf");
        std::fs::write(&elf, b"\x7fELF\x02\x01\x01").unwrap();
        assert!(
            matches!(detect_format(&empty), Err(Error::UnknownKernelFormat { ref magic, .. }) if magic.contains("empty"))
        );
        assert!(
            matches!(detect_format(&text), Err(Error::UnknownKernelFormat { ref magic, .. }) if magic.starts_with("23 21"))
        );
        assert_eq!(detect_format(&elf).unwrap(), KernelFormat::PvhElf);
        assert!(matches!(detect_format(&dir.join("missing")), Err(Error::KernelRead { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
