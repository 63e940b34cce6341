//! The imported config as the file `ha-user import` prints: the notes as a
//! comment block, then the config without ha-lb's own defaults.

use std::fmt::Write;

use super::Imported;
use crate::config::GarpConfig;

/// The imported config as YAML, with the notes as a comment block above it.
pub fn render(imported: &Imported, sources: &[&str]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# ha-lb config imported by `ha-user import` from {}.",
        sources.join(" and ")
    );
    let iface = imported.interface.as_deref().unwrap_or("<interface>");
    let _ = writeln!(
        out,
        "# Check it with `ha-user check-config --config FILE`; run it with\n# `ha-user attach --iface {iface} --config FILE`."
    );
    if imported.config.vrrp.is_none() {
        let _ = writeln!(
            out,
            "# No keepalived.conf: this host owns the VIPs statically (no vrrp section)."
        );
    }
    if imported.notes.is_empty() {
        let _ = writeln!(out, "#\n# Every directive was carried over.");
    } else {
        let _ = writeln!(
            out,
            "#\n# Not carried over, or carried over with a change ({}):",
            imported.notes.len()
        );
        for note in &imported.notes {
            let _ = writeln!(out, "#   {}  `{}`: {}", note.at(), note.directive, note.why);
        }
    }
    out.push('\n');
    let mut value = serde_yaml_ng::to_value(&imported.config).expect("a Config always serializes");
    if let Some(map) = value.as_mapping_mut() {
        // Defaults of ha-lb's own: left out so the file shows what was imported.
        map.remove("data_plane");
        map.remove("telemetry");
        if imported.config.garp == GarpConfig::default() {
            map.remove("garp");
        }
        // A TCP check has no path, status or certificate to show.
        let vips = map.get_mut("vips").and_then(|v| v.as_sequence_mut());
        for vip in vips.into_iter().flatten() {
            let Some(check) = vip.get_mut("check").and_then(|c| c.as_mapping_mut()) else {
                continue;
            };
            if check.get("type").and_then(|t| t.as_str()) == Some("tcp") {
                for key in ["path", "expect_status", "verify"] {
                    check.remove(key);
                }
            }
        }
    }
    out.push_str(&serde_yaml_ng::to_string(&value).expect("a Value always serializes"));
    out
}
