//! The lab itself: hosts reach each other, links go down and up, and
//! everything a lab made is gone after it drops or after a crashed run.

use std::{process::Command, time::Duration};

use ha_lab::{Lab, sweep_stale_labs};

fn ping(lab: &Lab, from: &str, to: &str) -> bool {
    let target = lab.host(to).addr.to_string();
    lab.exec(from, &["ping", "-c", "1", "-W", "1", &target])
        .is_ok()
}

fn netns_names() -> String {
    String::from_utf8(
        Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
}

#[test]
fn hosts_reach_each_other_and_links_can_be_cut_and_restored() {
    let lab = Lab::new(&["a", "b", "c"]).expect("building the lab");
    assert!(ping(&lab, "a", "b"), "a reaches b");
    assert!(ping(&lab, "c", "a"), "c reaches a");

    lab.set_link("b", false).unwrap();
    assert!(!ping(&lab, "a", "b"), "b's link is down");
    lab.set_link("b", true).unwrap();
    lab.wait_until(Duration::from_secs(5), "b reachable again", || {
        ping(&lab, "a", "b")
    })
    .unwrap();

    lab.set_switch_port("c", false).unwrap();
    assert!(!ping(&lab, "a", "c"), "c is unplugged at the switch");
    assert!(ping(&lab, "a", "b"), "the others still talk");
    lab.set_switch_port("c", true).unwrap();
    lab.wait_until(Duration::from_secs(5), "c reachable again", || {
        ping(&lab, "a", "c")
    })
    .unwrap();
}

#[test]
fn hosts_have_distinct_addresses_and_macs_in_the_lab_subnet() {
    let lab = Lab::new(&["x", "y"]).unwrap();
    let (x, y) = (lab.host("x"), lab.host("y"));
    assert_ne!(x.addr, y.addr);
    assert_ne!(x.mac, y.mac);
    let shown = lab
        .exec("x", &["ip", "-4", "-o", "addr", "show", "dev", "eth0"])
        .unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains(&format!("{}/24", x.addr)), "{shown}");
    let link = lab
        .exec("x", &["ip", "-o", "link", "show", "dev", "eth0"])
        .unwrap();
    assert!(String::from_utf8_lossy(&link.stdout).contains(&x.mac_string()));
    // VIP addresses are on the lab's subnet but used by no host.
    let vip = lab.vip(0);
    assert_eq!(vip.octets()[..3], x.addr.octets()[..3]);
    assert!(lab.hosts().iter().all(|h| h.addr != vip));
}

#[test]
fn two_labs_at_once_get_their_own_names_and_subnets() {
    let first = Lab::new(&["h"]).unwrap();
    let second = Lab::new(&["h"]).unwrap();
    assert_ne!(first.slot(), second.slot());
    assert_ne!(first.host("h").netns, second.host("h").netns);
    assert_ne!(first.host("h").addr, second.host("h").addr);
    // The two LANs are separate: no route from one to the other.
    let other = second.host("h").addr.to_string();
    assert!(
        first
            .exec("h", &["ping", "-c", "1", "-W", "1", &other])
            .is_err()
    );
}

#[test]
fn dropping_a_lab_removes_its_namespaces_and_processes() {
    let (names, pid) = {
        let lab = Lab::new(&["p", "q"]).unwrap();
        let sleeper = lab.spawn("p", &["sleep", "600"]).unwrap();
        let pid = sleeper.pid();
        // Leak the handle: the lab must still kill what runs inside it.
        std::mem::forget(sleeper);
        let names: Vec<String> = lab.hosts().iter().map(|h| h.netns.clone()).collect();
        let listed = netns_names();
        assert!(names.iter().all(|n| listed.contains(n.as_str())));
        (names, pid)
    };
    let listed = netns_names();
    for name in &names {
        assert!(
            !listed.contains(name.as_str()),
            "{name} still exists:\n{listed}"
        );
    }
    // SIGKILL was sent; on a loaded machine the process takes a moment to end
    // (it stays a zombie: the leaked handle never reaps it).
    let gone = || {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        state.is_empty() || state.contains(") Z")
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !gone() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(gone(), "process {pid} survived the lab: {state}");
}

#[test]
fn dropping_a_lab_during_a_panic_still_cleans_up() {
    let names = std::sync::Mutex::new(Vec::new());
    let result = std::panic::catch_unwind(|| {
        let lab = Lab::new(&["r"]).unwrap();
        *names.lock().unwrap() = vec![lab.host("r").netns.clone()];
        panic!("a failing test");
    });
    assert!(result.is_err());
    let listed = netns_names();
    for name in names.lock().unwrap().iter() {
        assert!(!listed.contains(name.as_str()), "{name} survived a panic");
    }
}

#[test]
fn stale_namespaces_of_an_unlocked_slot_are_swept() {
    // Slot 251 is outside the range labs claim, so no live lab owns it: this
    // is what a run killed with SIGKILL leaves behind.
    let stale = "hl251-crashed";
    let _ = Command::new("ip").args(["netns", "del", stale]).status();
    assert!(
        Command::new("ip")
            .args(["netns", "add", stale])
            .status()
            .unwrap()
            .success()
    );
    assert!(netns_names().contains(stale));
    sweep_stale_labs().unwrap();
    assert!(
        !netns_names().contains(stale),
        "stale namespace survived the sweep"
    );
}
