//! The compiled XDP program, embedded at build time (see `build.rs`).

/// The ELF object of `ha-ebpf`, aligned as the loader requires.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("HA_EBPF_OBJECT_PATH"));

#[cfg(test)]
mod tests {
    use object::{Object, ObjectSection};

    #[test]
    fn embedded_object_is_bpf_elf_with_a_multi_buffer_xdp_section() {
        let file = object::File::parse(super::EBPF_OBJECT).expect("embedded object parses as ELF");
        assert_eq!(file.architecture(), object::Architecture::Bpf);
        let sections: Vec<&str> = file.sections().filter_map(|s| s.name().ok()).collect();
        // `xdp.frags`: the program is multi-buffer aware (jumbo frames in native mode).
        assert!(sections.contains(&"xdp.frags"), "sections: {sections:?}");
        assert!(sections.contains(&"license"), "sections: {sections:?}");
    }
}
