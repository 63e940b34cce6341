//! The compiled XDP program, embedded at build time (see `build.rs`).
//!
//! A build without the object (stable Rust only: `cargo check`, the unit
//! tests) embeds an empty stub instead and is compiled with
//! `cfg(ha_ebpf_stub)`; [`embedded`] then answers `None`, and loading the
//! data path fails with [`crate::dataplane::DataPlaneError::NoXdpObject`].

/// What `build.rs` embedded: the ELF object of `ha-ebpf`, aligned as the
/// loader requires, or the empty stub.
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("HA_EBPF_OBJECT_PATH"));

/// Whether this binary embeds the XDP object (false: built without one).
pub const IS_EMBEDDED: bool = !cfg!(ha_ebpf_stub);

/// The embedded XDP object, or `None` when this binary was built without it.
pub fn embedded() -> Option<&'static [u8]> {
    IS_EMBEDDED.then_some(OBJECT)
}

#[cfg(test)]
mod tests {
    #[cfg(not(ha_ebpf_stub))]
    #[test]
    fn embedded_object_is_bpf_elf_with_a_multi_buffer_xdp_section() {
        use object::{Object, ObjectSection};

        let embedded = super::embedded().expect("built with the object");
        let file = object::File::parse(embedded).expect("embedded object parses as ELF");
        assert_eq!(file.architecture(), object::Architecture::Bpf);
        let sections: Vec<&str> = file.sections().filter_map(|s| s.name().ok()).collect();
        // `xdp.frags`: the program is multi-buffer aware (jumbo frames in native mode).
        assert!(sections.contains(&"xdp.frags"), "sections: {sections:?}");
        assert!(sections.contains(&"license"), "sections: {sections:?}");
    }

    /// A build without the object (`cargo xtask test`'s unprivileged step)
    /// refuses to load with an error naming the remedy, before anything
    /// needs privileges: no panic, no ELF parse error of the empty stub.
    #[cfg(ha_ebpf_stub)]
    #[test]
    fn a_build_without_the_object_refuses_to_load_and_names_the_remedy() {
        use crate::dataplane::{DataPlane, DataPlaneError, LoadOptions};

        assert!(super::embedded().is_none());
        if std::env::var_os("HA_LB_XDP_OBJECT").is_some() {
            // The test hook overrides the embedded object; nothing to check here.
            return;
        }
        let options = LoadOptions {
            maglev_table_size: 251,
            max_vips: 1,
            max_flows: 1024,
            pin_dir: None,
            host_ports: None,
            accept_flow_loss: false,
        };
        let error = DataPlane::load(&options)
            .err()
            .expect("loading without an object fails");
        assert!(
            matches!(error, DataPlaneError::NoXdpObject),
            "unexpected error: {error}"
        );
        let message = error.to_string();
        assert!(
            message.contains("built without the XDP object")
                && message.contains("cargo xtask build-ebpf --release"),
            "{message}"
        );
    }
}
