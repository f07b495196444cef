//! The bzImage path, tested against a real kernel: Debian's linux-image-cloud-amd64, fetched by
//! scripts/fetch-test-kernel.sh (not committed). A Linux kernel is not a practical guest on
//! the PVM backend (its ring-0 code is emulated and the emulator lacks instructions it needs),
//! so these tests check the load and the boot_params layout exactly, then boot the kernel far
//! enough to see it print its version and the memory map ftvm gave it.

mod common;

use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use ftvm_vmm::boot::bzimage::{read_boot_params, HDRS_MAGIC, LOADER_TYPE_UNDEFINED};
use ftvm_vmm::boot::{BootSpec, EntryState, KernelFormat};
use ftvm_vmm::memory::{CMDLINE, HIGH_RAM_START, MIB};
use ftvm_vmm::{ConsoleConfig, VmConfig};
use vm_memory::{Bytes, GuestAddress};

fn test_kernel() -> PathBuf {
    let path = repo_root().join("target/test-assets/vmlinuz-cloud");
    assert!(path.exists(), "{} is missing: run scripts/fetch-test-kernel.sh (the CI set-up does)", path.display());
    path
}

#[test]
fn bzimage_loads_with_a_correct_boot_params_layout() {
    if !kvm_available() {
        return;
    }
    let kernel = test_kernel();
    let image = std::fs::read(&kernel).unwrap();
    let dir = scratch("bzimage-layout");
    let initrd = dir.join("initrd.img");
    let initrd_data: Vec<u8> = (0..300_000u32).map(|i| (i * 7) as u8).collect();
    std::fs::write(&initrd, &initrd_data).unwrap();
    let cmdline = "console=ttyS0 earlyprintk=ttyS0 panic=-1";
    let vm = ftvm_vmm::vm::Vm::build(VmConfig {
        boot: BootSpec { kernel: kernel.clone(), initrd: Some(initrd), cmdline: cmdline.into() },
        mem_size: 256 * MIB,
        console: ConsoleConfig::File(dir.join("console.txt")),
        rtc_base_unix: Some(0),
        nets: vec![],
        disks: vec![],
        rng: false,
    })
    .expect("build VM");
    let loaded = vm.loaded();
    assert_eq!(loaded.format, KernelFormat::BzImage);
    assert_eq!(loaded.kernel_start, HIGH_RAM_START);
    assert_eq!(loaded.entry, EntryState::Linux64 { entry: HIGH_RAM_START + 0x200, boot_params: 0x7000 });

    let mem = vm.memory();
    let params = read_boot_params(mem).unwrap();
    let hdr = params.hdr;
    assert_eq!({ hdr.header }, HDRS_MAGIC);
    assert_eq!({ hdr.boot_flag }, 0xaa55);
    assert!({ hdr.version } >= 0x020c, "64-bit boot protocol");
    assert_eq!(hdr.type_of_loader, LOADER_TYPE_UNDEFINED);
    assert_eq!({ hdr.cmd_line_ptr } as u64, CMDLINE);
    assert_eq!({ hdr.cmdline_size } as usize, cmdline.len());
    let mut text = vec![0u8; cmdline.len() + 1];
    mem.read_slice(&mut text, GuestAddress(CMDLINE)).unwrap();
    assert_eq!(&text[..cmdline.len()], cmdline.as_bytes());
    assert_eq!(text[cmdline.len()], 0, "NUL-terminated");

    // The protected-mode kernel is the file after the setup sectors, byte for byte.
    let setup_sects = if image[0x1f1] == 0 { 4 } else { image[0x1f1] as usize };
    let pm = &image[(setup_sects + 1) * 512..];
    let mut loaded_pm = vec![0u8; pm.len()];
    mem.read_slice(&mut loaded_pm, GuestAddress(HIGH_RAM_START)).unwrap();
    assert!(loaded_pm == pm, "protected-mode kernel loaded verbatim at 1 MiB");

    // The initrd is where the header says, below initrd_addr_max and above the kernel's init size.
    let (addr, size) = ({ hdr.ramdisk_image } as u64, { hdr.ramdisk_size } as u64);
    assert_eq!(size, initrd_data.len() as u64);
    assert_eq!(addr % 4096, 0);
    assert!(addr + size <= u64::from(hdr.initrd_addr_max) + 1);
    assert!(addr >= HIGH_RAM_START + u64::from(hdr.init_size));
    let mut back = vec![0u8; initrd_data.len()];
    mem.read_slice(&mut back, GuestAddress(addr)).unwrap();
    assert!(back == initrd_data);

    // e820: low RAM, the legacy hole, RAM from 1 MiB to the end.
    let n = params.e820_entries as usize;
    let table: Vec<(u64, u64, u32)> =
        params.e820_table[..n].iter().map(|e| ({ e.addr }, { e.size }, { e.r#type })).collect();
    assert_eq!(table, vec![(0, 0xa_0000, 1), (0xa_0000, 0x6_0000, 2), (MIB, 255 * MIB, 1)]);
}

#[test]
fn linux_boots_far_enough_to_print_its_version_and_memory_map() {
    if !kvm_available() {
        return;
    }
    let kernel = test_kernel();
    let dir = scratch("bzimage-boot");
    let console = dir.join("console.txt");
    let mut child = ftvm()
        .args(["run", "--mem", "256M", "--cmdline", "console=ttyS0 earlyprintk=ttyS0 nokaslr", "--kernel"])
        .arg(&kernel)
        .arg("--console")
        .arg(format!("file:{}", console.display()))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let wanted = "BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable";
    let mut text = String::new();
    while start.elapsed() < Duration::from_secs(240) {
        text = std::fs::read_to_string(&console).unwrap_or_default();
        if text.contains(wanted) || child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = child.kill();
    let _ = child.wait();
    let mut err = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
    assert!(
        text.contains("Linux version 6."),
        "no version banner after {:?}; console:\n{text}\nstderr:\n{err}",
        start.elapsed()
    );
    assert!(text.contains("Command line: console=ttyS0 earlyprintk=ttyS0 nokaslr"), "{text}");
    assert!(text.contains("BIOS-e820: [mem 0x0000000000000000-0x000000000009ffff] usable"), "{text}");
    assert!(text.contains("BIOS-e820: [mem 0x00000000000a0000-0x00000000000fffff] reserved"), "{text}");
    assert!(text.contains(wanted), "{text}");
    eprintln!("Linux printed its memory map after {:?}", start.elapsed());
}
