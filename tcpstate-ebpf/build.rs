//! Rebuild the program when bpf-linker changes: cargo does not track the
//! linker as an input, so a linker upgrade would otherwise reuse a stale object.
use which::which;

fn main() {
    if let Ok(linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
