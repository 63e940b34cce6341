//! `cargo xtask test` runs the benchmark harness once in quick mode: every
//! part must produce numbers (how fast they are is the benchmark's business).

use ha_bench::{self as bench, Effort};

#[test]
fn every_benchmark_part_produces_numbers() {
    let report = bench::run(Effort::QUICK, |_| {}).expect("the benchmark harness runs");
    assert_eq!(report.per_packet.len(), 5);
    for cost in report.per_packet.iter().chain(&report.scale) {
        assert!(cost.ns_per_packet > 0.0 && cost.calls > 0, "{cost:?}");
    }
    assert_eq!(report.table_builds.len(), 3);
    assert!(
        report
            .table_builds
            .iter()
            .all(|(_, _, time)| !time.is_zero())
    );
    assert_eq!(report.scale.len(), 5, "{:?}", report.scale);
    assert_eq!(report.e2e.len(), 4, "ha-lb, haproxy, nftables, direct");
    for result in &report.e2e {
        assert!(
            result.connections_per_second > 0.0
                && result.keepalive_requests_per_second > 0.0
                && result.p99_ms > 0.0,
            "{result:?}"
        );
    }
    assert_eq!(report.failover.len(), 5, "every failover scenario");
    for result in &report.failover {
        assert_eq!(result.trials.len(), 1, "{result:?}");
    }
    let chart = std::env::temp_dir().join(format!("ha-lb-bench-smoke-{}.png", std::process::id()));
    bench::chart::draw(&report.e2e, &chart).expect("drawing the chart");
    let png = std::fs::read(&chart).unwrap();
    let _ = std::fs::remove_file(&chart);
    assert!(
        png.len() > 10_000 && png.starts_with(b"\x89PNG"),
        "a PNG of {} bytes",
        png.len()
    );
    let markdown = bench::render(&report, Effort::QUICK, "test machine");
    assert!(
        markdown.contains("## 2. End to end") && markdown.contains("## 3. Failover"),
        "{markdown}"
    );
    assert!(
        markdown.contains("| trivial XDP_PASS program (floor) |")
            && markdown.contains("| direct, no balancer"),
        "{markdown}"
    );
}
