//! Links the personality as a freestanding, static, non-PIE PVH kernel with `link.ld`: the
//! kit's layout (image at 1 MiB) with the process window (4 MiB - 256 MiB, where a non-PIE
//! x86-64 executable is linked) left out of the kit's heap.

use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let script = manifest.join("link.ld");
    println!("cargo:rerun-if-changed={}", script.display());
    for arg in [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-no-pie",
        "-Wl,--build-id=none",
        "-Wl,-z,norelro",
        "-Wl,-z,noexecstack",
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rustc-link-arg-bins=-Wl,-T,{}", script.display());
}
