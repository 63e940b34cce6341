//! Finds the compiled XDP object so `src/ebpf.rs` can embed it: one binary is
//! all an operator ships. The object is built by `cargo xtask build-ebpf`
//! (nightly, bpfel-unknown-none), which this build cannot do itself.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=HA_EBPF_OBJECT");
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
    for candidate in &candidates {
        println!("cargo:rerun-if-changed={}", candidate.display());
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

    match newest {
        Some(object) => println!("cargo:rustc-env=HA_EBPF_OBJECT_PATH={}", object.display()),
        None => {
            let looked_in: Vec<String> =
                candidates.iter().map(|p| p.display().to_string()).collect();
            panic!(
                "\n\nThe XDP object is not built yet (looked for {}).\n\
                 Run `cargo xtask build-ebpf --release` first (or `cargo xtask test`, which does it),\n\
                 or point HA_EBPF_OBJECT at a built object.\n\n",
                looked_in.join(" and ")
            );
        }
    }
}
