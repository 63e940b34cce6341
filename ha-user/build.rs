//! Finds the compiled XDP object so `src/ebpf_object.rs` can embed it: one
//! binary is all an operator ships. The object is built by `cargo xtask
//! build-ebpf` (nightly, bpfel-unknown-none), which this build cannot do itself.
//!
//! Without an object (a machine with only stable Rust, `cargo check`, the
//! unit tests) the build goes on with an empty stub in `OUT_DIR`, says so in
//! a warning, and sets `cfg(ha_ebpf_stub)`: such a binary refuses to load the
//! data path with an error that names the command to run, as aya's template
//! does.

use std::path::PathBuf;

fn main() {
    println!("cargo::rerun-if-env-changed=HA_EBPF_OBJECT");
    println!("cargo::rustc-check-cfg=cfg(ha_ebpf_stub)");
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let workspace = manifest_dir
        .parent()
        .expect("ha-user lives in the workspace root");

    let candidates: Vec<PathBuf> = match std::env::var_os("HA_EBPF_OBJECT") {
        Some(explicit) => vec![PathBuf::from(explicit)],
        None => ["release", "debug"]
            .iter()
            .map(|profile| {
                workspace
                    .join("target/ebpf/bpfel-unknown-none")
                    .join(profile)
                    .join("ha-ebpf")
            })
            .collect(),
    };
    // A missing path counts as changed, so a stub build looks again next time.
    for candidate in &candidates {
        println!("cargo::rerun-if-changed={}", candidate.display());
    }

    // With both profiles built, embed whichever was built last.
    let newest = candidates
        .iter()
        .filter_map(|path| {
            let modified = std::fs::metadata(path).ok()?.modified().ok()?;
            Some((modified, path))
        })
        .max_by_key(|(modified, _)| *modified)
        .map(|(_, path)| path.clone());

    let object = match newest {
        Some(object) => object,
        None => {
            let looked_in: Vec<String> =
                candidates.iter().map(|p| p.display().to_string()).collect();
            println!(
                "cargo::warning=no XDP object (looked for {}): building ha-user with an empty stub; \
                 this binary will not be able to load the data path. Run `cargo xtask build-ebpf \
                 --release` (or point HA_EBPF_OBJECT at a built object) and rebuild.",
                looked_in.join(" and ")
            );
            let stub =
                PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo")).join("ha-ebpf-stub");
            std::fs::write(&stub, []).expect("writing the stub object into OUT_DIR");
            println!("cargo::rustc-cfg=ha_ebpf_stub");
            stub
        }
    };
    println!("cargo::rustc-env=HA_EBPF_OBJECT_PATH={}", object.display());
}
