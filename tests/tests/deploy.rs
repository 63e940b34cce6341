//! deploy/: the manifests validate against the Kubernetes OpenAPI schemas,
//! the Containerfile passes hadolint, the systemd unit passes
//! `systemd-analyze verify`, the example configs and the imported classic
//! configs pass `check-config`, and the capability set of the manifests is
//! enough for the agent to serve a VIP in the lab. The linters come from
//! `cargo xtask setup`.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use common::{start_apiservers, telemetry, vip_config, whoami, write_config};
use ha_lab::{HOST_IFACE, Lab, bin_path, config};
use ha_user::config::VrrpConfig;
use serde::Deserialize;
use serde_yaml_ng::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn deploy(name: &str) -> PathBuf {
    repo().join("deploy").join(name)
}

fn lint_tool(name: &str) -> PathBuf {
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    let path = PathBuf::from(home)
        .join(".cache/ha-lb/lint-venv/bin")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask setup`",
        path.display()
    );
    path
}

fn output(command: &mut Command) -> (bool, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = command.output().unwrap();
    (
        status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        ),
    )
}

/// A scratch directory, removed when the test ends (also on panic).
struct Scratch(PathBuf);

impl Scratch {
    fn new(label: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("ha-lb-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The YAML documents of a manifest file.
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap())
        .collect()
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"))
}

fn validate(path: &Path, version: &str) -> (bool, String) {
    output(
        Command::new(lint_tool("kubernetes-validate"))
            .args(["--strict", "--kubernetes-version", version])
            .arg(path),
    )
}

#[test]
fn manifests_validate_against_the_kubernetes_schemas() {
    // The oldest release still in common use on LB hosts, and the newest.
    for version in ["1.29.0", "1.37.0"] {
        for (file, resources) in [
            (
                "daemonset.yaml",
                &[
                    "serviceaccount/ha-lb",
                    "configmap/ha-lb-config",
                    "daemonset/ha-lb",
                ][..],
            ),
            ("static-pod.yaml", &["pod/ha-lb"][..]),
        ] {
            let (ok, report) = validate(&deploy(file), version);
            assert!(ok, "{file} against {version}:\n{report}");
            for resource in resources {
                assert!(
                    report.contains(&format!("passed for resource {resource}")),
                    "{file}: {resource} not validated:\n{report}"
                );
            }
        }
    }
    // The validator does reject: a misspelled field in a copy fails.
    let dir = Scratch::new("manifest");
    let broken = dir.join("static-pod.yaml");
    let text = std::fs::read_to_string(deploy("static-pod.yaml")).unwrap();
    std::fs::write(&broken, text.replace("readinessProbe:", "readynessProbe:")).unwrap();
    let (ok, report) = validate(&broken, "1.37.0");
    assert!(!ok && report.contains("readynessProbe"), "{report}");
}

#[test]
fn the_manifests_run_the_agent_as_the_docs_say() {
    let docs = documents(&deploy("daemonset.yaml"));
    let daemonset = kind(&docs, "DaemonSet");
    let pod = &daemonset["spec"]["template"]["spec"];
    let static_pod = &documents(&deploy("static-pod.yaml"))[0]["spec"];
    for spec in [pod, static_pod] {
        assert_eq!(spec["hostNetwork"], true);
        assert_eq!(spec["priorityClassName"], "system-node-critical");
        let container = &spec["containers"][0];
        let args: Vec<&str> = container["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(container["command"][0], "/ha-user");
        assert_eq!(args[0], "attach");
        assert!(args.iter().any(|a| a.starts_with("--iface=")));
        assert!(args.contains(&"--config=/etc/ha-lb/config.yaml"));
        // A rollout or manifest change keeps the data path (docs/deployment.md).
        assert!(args.contains(&"--on-stop=keep"), "{args:?}");
        // The probes reach the agent's telemetry default.
        for (probe, path) in [("livenessProbe", "/livez"), ("readinessProbe", "/readyz")] {
            let get = &container[probe]["httpGet"];
            assert_eq!(
                (&get["host"], &get["port"]),
                (&"127.0.0.1".into(), &9641.into())
            );
            assert_eq!(get["path"], path);
        }
        let mounts = container["volumeMounts"].as_sequence().unwrap();
        assert!(mounts.iter().any(|m| m["mountPath"] == "/sys/fs/bpf"));
        assert!(
            spec["volumes"]
                .as_sequence()
                .unwrap()
                .iter()
                .any(|v| v["hostPath"]["path"] == "/sys/fs/bpf")
        );
        // The host's cgroup2 root for the socket-level balancer, read-only.
        assert!(
            mounts
                .iter()
                .any(|m| m["mountPath"] == "/host/sys/fs/cgroup"
                    && m["readOnly"] == true
                    && m["mountPropagation"] == "HostToContainer")
        );
        assert!(
            spec["volumes"]
                .as_sequence()
                .unwrap()
                .iter()
                .any(|v| v["hostPath"]["path"] == "/sys/fs/cgroup")
        );
        assert!(spec["terminationGracePeriodSeconds"].as_u64().unwrap() >= 5);
    }
    let tolerations = serde_yaml_ng::to_string(&pod["tolerations"]).unwrap();
    assert!(tolerations.contains("node-role.kubernetes.io/control-plane"));
    assert_eq!(
        pod["nodeSelector"]["ha-lb.io/lb-host"], "true",
        "LB hosts are chosen by label"
    );
}

fn capabilities(path: &Path, document: usize, pointer: &[&str]) -> Vec<String> {
    let docs = documents(path);
    let mut value = &docs[document];
    for key in pointer {
        value = &value[*key];
    }
    let container = &value["containers"][0]["securityContext"];
    assert_eq!(container["capabilities"]["drop"][0], "ALL");
    container["capabilities"]["add"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_lowercase())
        .collect()
}

#[test]
fn the_daemonset_and_the_static_pod_ask_for_the_same_capabilities() {
    let daemonset = capabilities(&deploy("daemonset.yaml"), 2, &["spec", "template", "spec"]);
    let static_pod = capabilities(&deploy("static-pod.yaml"), 0, &["spec"]);
    assert_eq!(daemonset, static_pod);
    assert!(!daemonset.iter().any(|c| c == "sys_admin"));
}

#[test]
fn the_containerfile_passes_hadolint() {
    let hadolint = lint_tool("hadolint");
    let (ok, report) = output(Command::new(&hadolint).arg(deploy("Containerfile")));
    assert!(ok, "{report}");
    // hadolint does reject: an unpinned base image fails.
    let dir = Scratch::new("containerfile");
    let broken = dir.join("Containerfile");
    std::fs::write(&broken, "FROM debian:latest\nRUN apt-get install curl\n").unwrap();
    let (ok, report) = output(Command::new(&hadolint).arg(&broken));
    assert!(!ok && report.contains("DL3007"), "{report}");
}

/// `systemd-analyze verify` on the unit, with the binary where the unit
/// expects it taken from the build (verify checks that ExecStart exists).
fn verify_unit(text: &str) -> (bool, String) {
    let dir = Scratch::new("unit");
    let unit = dir.join("ha-lb.service");
    let ha_user = bin_path("ha-user");
    std::fs::write(
        &unit,
        text.replace("/usr/local/bin/ha-user", ha_user.to_str().unwrap()),
    )
    .unwrap();
    output(Command::new("systemd-analyze").arg("verify").arg(&unit))
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let text = std::fs::read_to_string(deploy("ha-lb.service")).unwrap();
    let (ok, report) = verify_unit(&text);
    // verify exits 0 on unknown keys and only warns: any word about the unit is a failure.
    assert!(ok && !report.contains("ha-lb.service"), "{report}");
    let (_, report) = verify_unit(&text.replace("KillMode=mixed", "KillMod=mixed"));
    assert!(report.contains("Unknown key 'KillMod'"), "{report}");
    // `systemctl restart` keeps the data path; an exit after `ha-user stop`
    // is not undone by a restart.
    let exec_start = text.lines().find(|l| l.starts_with("ExecStart=")).unwrap();
    assert!(exec_start.ends_with("--on-stop keep"), "{exec_start}");
    assert!(text.contains("\nRestart=on-failure\n"), "{text}");
}

/// Real PEM files where the configs expect kubeadm's and haproxy's.
fn certificates(dir: &Path) {
    for (name, combined) in [
        ("kubernetes/pki/ca", false),
        ("kubernetes/pki/etcd/ca", false),
        ("kubernetes/pki/apiserver-etcd-client", false),
        ("haproxy/certs/etcd-client", true),
    ] {
        let certified = rcgen::generate_simple_self_signed(vec!["ha-lb-test".into()]).unwrap();
        let cert = certified.cert.pem();
        let key = certified.key_pair.serialize_pem();
        let base = dir.join(name);
        std::fs::create_dir_all(base.parent().unwrap()).unwrap();
        if combined {
            std::fs::write(base.with_extension("pem"), format!("{cert}{key}")).unwrap();
        } else {
            std::fs::write(base.with_extension("crt"), &cert).unwrap();
            std::fs::write(base.with_extension("key"), &key).unwrap();
        }
    }
}

/// `ha-user check-config` on `yaml` with /etc/ paths moved under `root`:
/// the normalized config, or the refusal.
fn check_config(yaml: &str, root: &Path, name: &str) -> Result<Value, String> {
    let path = root.join(name);
    std::fs::write(
        &path,
        yaml.replace("/etc/", &format!("{}/", root.display())),
    )
    .unwrap();
    let (ok, report) = output(
        Command::new(bin_path("ha-user"))
            .args(["check-config", "--config"])
            .arg(&path),
    );
    if ok {
        Ok(serde_yaml_ng::from_str(&report).unwrap())
    } else {
        Err(report)
    }
}

#[test]
fn the_example_configs_and_the_configmap_pass_check_config() {
    let root = Scratch::new("examples");
    certificates(&root);
    for example in ["on-masters.yaml", "dedicated-lb.yaml"] {
        let text = std::fs::read_to_string(deploy("examples").join(example)).unwrap();
        let config =
            check_config(&text, &root, example).unwrap_or_else(|e| panic!("{example}: {e}"));
        assert!(config["vrrp"]["vrid"].as_u64().is_some(), "{example}");
    }
    let etcd = &check_config(
        &std::fs::read_to_string(deploy("examples/dedicated-lb.yaml")).unwrap(),
        &root,
        "again.yaml",
    )
    .unwrap()["vips"][1];
    assert_eq!(
        (
            &etcd["port"],
            &etcd["check"]["path"],
            &etcd["check"]["expect_body"]
        ),
        (
            &2379.into(),
            &"/health".into(),
            &r#""health":"true""#.into()
        )
    );
    let docs = documents(&deploy("daemonset.yaml"));
    let embedded = kind(&docs, "ConfigMap")["data"]["config.yaml"]
        .as_str()
        .unwrap();
    let config = check_config(embedded, &root, "configmap.yaml").unwrap();
    assert_eq!(config["telemetry"]["listen"], "127.0.0.1:9641");
    // And check-config does refuse: a broken copy fails, naming the key.
    let refusal = check_config(
        &embedded.replace("port: 6443", "port: 0"),
        &root,
        "bad.yaml",
    )
    .unwrap_err();
    assert!(refusal.contains("port: must be 1-65535"), "{refusal}");
}

fn fixture(layout: &str, file: &str) -> PathBuf {
    repo()
        .join("ha-user/tests/fixtures/import")
        .join(layout)
        .join(file)
}

#[test]
fn imported_classic_configs_pass_check_config_with_the_same_vips() {
    let root = Scratch::new("import");
    certificates(&root);
    for (layout, vips) in [
        ("kubeadm-static-pods", vec![("apiserver", 8443, 3)]),
        (
            "dedicated-lb",
            vec![("apiserver", 6443, 3), ("etcd", 2379, 3)],
        ),
    ] {
        let imported = Command::new(bin_path("ha-user"))
            .arg("import")
            .arg("--haproxy")
            .arg(fixture(layout, "haproxy.cfg"))
            .arg("--keepalived")
            .arg(fixture(layout, "keepalived.conf"))
            .output()
            .unwrap();
        let yaml = String::from_utf8(imported.stdout).unwrap();
        let summary = String::from_utf8_lossy(&imported.stderr);
        assert!(imported.status.success(), "{layout}: {summary}");
        assert!(yaml.contains("Not carried over"), "{yaml}");
        assert!(summary.contains("directives not carried over"), "{summary}");
        let config = check_config(&yaml, &root, &format!("{layout}.yaml"))
            .unwrap_or_else(|e| panic!("{layout}: {e}\n{yaml}"));
        let found: Vec<(String, u64, usize)> = config["vips"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|v| {
                (
                    v["name"].as_str().unwrap().to_string(),
                    v["port"].as_u64().unwrap(),
                    v["backends"].as_sequence().unwrap().len(),
                )
            })
            .collect();
        let wanted: Vec<(String, u64, usize)> = vips
            .iter()
            .map(|(n, p, b)| (n.to_string(), *p, *b))
            .collect();
        assert_eq!(found, wanted, "{layout}");
        assert!(config["vrrp"]["vrid"].as_u64().is_some(), "{layout}");
    }
}

/// The agent with exactly the manifests' capabilities (root's uid, as in
/// the container, with the bounding set cut down): `setpriv` drops the rest.
fn start_with_capabilities(lab: &Lab, caps: &[String], config: &Path) -> ha_lab::LabProcess {
    let bounding = format!(
        "-all,{}",
        caps.iter()
            .map(|c| format!("+{c}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let bpffs = lab.bpffs().unwrap().join("caps");
    std::fs::create_dir_all(&bpffs).unwrap();
    let ha_user = bin_path("ha-user");
    lab.spawn(
        "lb",
        &[
            "setpriv",
            "--bounding-set",
            &bounding,
            "--inh-caps=-all",
            "--",
            ha_user.to_str().unwrap(),
            "attach",
            "--iface",
            HOST_IFACE,
            "--config",
            config.to_str().unwrap(),
            // The DaemonSet's hostPath /sys/fs/bpf: a bpffs already mounted.
            "--pin-dir",
            bpffs.to_str().unwrap(),
            // As the manifests run it.
            "--on-stop",
            "keep",
        ],
    )
    .unwrap()
}

#[test]
fn the_manifests_capabilities_are_needed_and_enough_to_serve_a_vip() {
    let caps = capabilities(&deploy("daemonset.yaml"), 2, &["spec", "template", "spec"]);
    let lab = Lab::new(&["client", "lb", "api1", "api2"]).unwrap();
    let _apis = start_apiservers(&lab, &["api1", "api2"]);
    // With VRRP, so that the raw sockets are part of the start.
    let mut conf = vip_config(&lab, &["api1", "api2"]);
    conf.vrrp = Some(VrrpConfig {
        advert_interval: Duration::from_millis(100),
        ..config::vrrp(77)
    });
    let config = write_config(&lab, "config.yaml", &conf);

    // Each capability is needed: without any one of them the agent stops
    // at start (BPF: maps; PERFMON: the verifier refuses packet pointer
    // arithmetic; NET_ADMIN: attaching; NET_RAW: the VRRP socket).
    for missing in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let mut refused = start_with_capabilities(&lab, &fewer, &config);
        let status = refused.wait_timeout(Duration::from_secs(15)).unwrap();
        assert!(
            status.is_some_and(|s| !s.success()),
            "the agent ran without CAP_{}:\n{}",
            missing.to_uppercase(),
            refused.log()
        );
    }

    let mut agent = start_with_capabilities(&lab, &caps, &config);
    agent
        .wait_for_log("serving;", Duration::from_secs(15))
        .unwrap();
    lab.wait_until(Duration::from_secs(10), "/readyz ok", || {
        telemetry(&lab, "lb", "/readyz").0 == 200
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
    let served: Vec<String> = lab
        .in_host("client", || {
            lab.wait_until(Duration::from_secs(5), "the VIP answers", || {
                whoami(lab.vip(0), 6443).is_ok()
            })
            .unwrap();
            (0..10)
                .map(|_| whoami(lab.vip(0), 6443).unwrap().0)
                .collect()
        })
        .unwrap();
    assert_eq!(served.len(), 10);
    assert!(
        !agent.log().contains("cannot pin"),
        "pinning needs no more capabilities:\n{}",
        agent.log()
    );
    // A rollout: stopped with the keep intent, the next agent with the same
    // capabilities adopts the pinned link (no CAP_SYS_ADMIN to look the
    // program up by id) and replaces its program in place.
    assert!(agent.stop(Duration::from_secs(10)).unwrap().success());
    let mut next = start_with_capabilities(&lab, &caps, &config);
    next.wait_for_log("serving;", Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("{e}\n{}", next.log()));
    assert!(next.log().contains("start=\"adopted\""), "{}", next.log());
}
