//! `securemesh bench --quick` end to end: it starts two servers, the
//! coordinator and nginx, measures every route, and writes the report, the
//! picture and the JSON. This checks that the benchmark works, never how
//! fast anything is (that is the benchmark's own business). `.ci/run`
//! installs nginx.

mod common;

use serde_json::Value;

#[test]
fn the_quick_benchmark_measures_every_route_and_writes_its_report() {
    let work = tempfile::tempdir().unwrap();
    let output = common::securemesh(
        &[
            "bench",
            "--quick",
            "--out",
            "BENCHMARKS.md",
            "--json",
            "results.json",
            // Relative: nginx must still find the lab's files.
            "--keep",
            "lab",
        ],
        work.path(),
    );
    let printed = common::text(&output);
    assert!(output.status.success(), "{printed}");
    for target in [
        "coordinator / direct throughput, concurrency 32: ",
        "for comparison, the same with the coordinator's own CPU left out",
        "for comparison, coordinator / direct throughput, concurrency 32 over one caller connection: ",
        "coordinator / nginx p99, concurrency 32: ",
        "coordinator failed calls through a SIGKILL (all runs): ",
        "coordinator added p50 at concurrency 1: ",
        "coordinator RSS idle: ",
        "Fernet decrypt, ours / Python cryptography (slowest size): ",
    ] {
        assert!(printed.contains(target), "{target} missing:\n{printed}");
    }
    assert!(!printed.contains("(target 0) not measured"), "{printed}");
    assert!(
        !printed.contains("over one caller connection: -"),
        "{printed}"
    );
    // Our Fernet decrypt ran under criterion, which reports each size.
    for size in ["64", "1024", "16384"] {
        let benchmark = format!("fernet_decrypt/{size}");
        assert!(
            printed.contains(&benchmark),
            "{benchmark} missing:\n{printed}"
        );
    }

    assert!(work.path().join("lab/nginx/nginx.conf").is_file());
    assert!(work.path().join("lab/certs/ca_cert.pem").is_file());

    let results: Value =
        serde_json::from_slice(&std::fs::read(work.path().join("results.json")).unwrap()).unwrap();
    let closed = results["closed"].as_array().unwrap();
    for route in ["Direct", "Coordinator", "Nginx"] {
        let runs: Vec<&Value> = closed.iter().filter(|run| run["route"] == route).collect();
        let loops: Vec<(u64, u64)> = runs
            .iter()
            .map(|run| {
                let number = |field: &str| run[field].as_u64().unwrap();
                (number("concurrency"), number("connections"))
            })
            .collect();
        assert_eq!(
            loops,
            [(1, 1), (32, 4), (32, 1)],
            "{route}: concurrency 1, 32 over four connections, 32 over one"
        );
        for run in runs {
            let summary = &run["rounds"][0];
            assert!(summary["ok"].as_u64().unwrap() > 0, "{route}: {summary}");
            assert_eq!(summary["failed"], 0, "{route}: {summary}");
            // Every process's CPU per call is measured (the servers and
            // the load generator on every route, the proxy behind one).
            for process in ["servers", "load_generator"] {
                let spent = &run[format!("{process}_cpu_us_per_call")][0];
                assert!(spent.as_f64().unwrap() > 0.0, "{route}: {process} {run}");
            }
            assert_eq!(
                run["cpu_us_per_call"].as_array().unwrap().is_empty(),
                route == "Direct",
                "{route}: {run}"
            );
        }
    }
    assert_eq!(results["open"].as_array().unwrap().len(), 3);
    let memory = results["memory"].as_array().unwrap();
    assert_eq!(memory.len(), 2);
    for proxy in memory {
        assert!(proxy["loaded_bytes"].as_u64().unwrap() > 0, "{proxy}");
        assert!(
            proxy["before_holding_bytes"].as_u64().unwrap() > 0,
            "{proxy}"
        );
        assert_eq!(proxy["connections"], 50);
    }
    let timelines = results["timelines"].as_array().unwrap();
    assert_eq!(
        timelines.len(),
        6,
        "SIGKILL, SIGSTOP and a control run through each proxy"
    );
    for timeline in timelines {
        assert!(
            timeline["summary"]["timeline"].as_array().unwrap().len() >= 10,
            "{timeline}"
        );
        if timeline["route"] == "Coordinator" {
            assert_eq!(timeline["summary"]["failed"], 0, "{timeline}");
        }
        assert_eq!(
            timeline["runs"].as_array().unwrap().len(),
            1,
            "a quick run makes each fault once: {timeline}"
        );
    }

    let report = std::fs::read_to_string(work.path().join("BENCHMARKS.md")).unwrap();
    for section in [
        "## Targets",
        "## Closed loop",
        "## Open loop",
        "## Memory",
        "## Failover",
        "## Fernet decrypt",
        "## Machine",
        "![failover timelines](docs/bench-failover.svg)",
    ] {
        assert!(report.contains(section), "{section} missing:\n{report}");
    }
    let picture = std::fs::read_to_string(work.path().join("docs/bench-failover.svg")).unwrap();
    assert!(picture.starts_with("<svg") && picture.trim_end().ends_with("</svg>"));
    assert_eq!(
        picture.matches("<polyline").count(),
        8,
        "4 panels, 2 lines each"
    );
}
