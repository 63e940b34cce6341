//! Validation against the host: the checks that look at the file system.
//! [`super::validate`] judges the values alone; this is what depends on the
//! machine the config is loaded on.

use super::Config;

/// Every file a check names that cannot be read here (a CA file, a client
/// certificate or key), each with its key.
pub fn problems(config: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    for (i, vip) in config.vips.iter().enumerate() {
        let at = format!("vips[{i}] ({}).check", vip.name);
        for (key, path) in vip.check.files() {
            if let Err(e) = std::fs::metadata(path) {
                problems.push(format!("{at}.{key}: {}: {e}", path.display()));
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::{super::tests::problems_of, *};

    const MISSING_CLIENT_CERT: &str = r#"
vips:
  - name: api
    address: 10.0.0.1
    port: 6443
    check: {client_cert: /nonexistent.pem, client_key: /nonexistent.key}
    backends: [{address: 10.0.0.2}]
"#;

    #[test]
    fn a_missing_check_file_is_reported_with_its_key_on_load_only() {
        let text = problems_of(MISSING_CLIENT_CERT).join("\n");
        for needle in [
            "vips[0] (api).check.client_cert: /nonexistent.pem: No such file",
            "vips[0] (api).check.client_key: /nonexistent.key: No such file",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        let config = Config::parse(MISSING_CLIENT_CERT, "test").expect("the values are valid");
        assert_eq!(problems(&config).len(), 2);
    }
}
