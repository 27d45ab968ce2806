//! Project automation, std only so it builds in seconds.
//!
//! - `cargo xtask test`  — install what the tests need (apt, npm) where missing,
//!   start PostgreSQL and the npm `oidc-provider` on loopback, run fmt, clippy
//!   and the whole test suite, smoke-test the demo, stop the peers.
//! - `cargo xtask demo`  — the control service on SQLite with a demo policy and a
//!   local identity provider; writes `target/demo/env`.
//! - `cargo xtask peers` — start the test peers and print their environment.
//! - `cargo xtask bench [policy|mask|pg|pg-mask|ssh|k8s|http]` — benchmarks, with their reference figures.

mod bench;
mod bench_http;
mod bench_k8s;
mod bench_ssh;
mod demo;
mod demo_http;
mod demo_k8s;
mod peers;
mod regress;
mod sshd;
mod util;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cmd = args.first().map(String::as_str).unwrap_or("help");
    let rest = &args[args.len().min(1)..];
    let result = match cmd {
        "test" => test(rest),
        "demo" => demo::run(rest),
        "peers" => peers::run_forever(),
        "bench" => bench(rest),
        "fuzz" => fuzz(rest),
        "help" | "--help" | "-h" => {
            println!(
                "usage: cargo xtask <test [--no-lint] [-- TEST ARGS] | demo [--check] | peers | bench [policy|mask|pg|pg-mask|ssh|k8s|http] | fuzz [pg|mask|k8s|spdy] [SECONDS]>"
            );
            Ok(())
        }
        other => Err(format!(
            "unknown xtask command `{other}` (try `cargo xtask help`)"
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn test(args: &[String]) -> Result<(), String> {
    let lint = !args.iter().any(|a| a == "--no-lint");
    let extra: Vec<String> = args
        .iter()
        .skip_while(|a| *a != "--")
        .skip(1)
        .cloned()
        .collect();
    util::step("checking prerequisites");
    peers::ensure_installed()?;
    if lint {
        util::step("cargo fmt --check");
        util::run("cargo", &["fmt", "--all", "--", "--check"], &[])?;
        util::step("cargo clippy");
        util::run(
            "cargo",
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--quiet",
                "--",
                "-D",
                "warnings",
            ],
            &[],
        )?;
    }
    helm_checks()?;
    util::step("starting PostgreSQL and oidc-provider");
    let peers = peers::Peers::start()?;
    util::step("cargo test");
    // The end-to-end tests run the binaries `cargo test` builds for the
    // packages' own integration tests.
    let mut env = peers.env();
    env.push((
        "WICKET_TEST_PYTHON".into(),
        peers::python().display().to_string(),
    ));
    env.push((
        "WICKET_BIN_DIR".into(),
        std::env::var("CARGO_TARGET_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|_| util::root().join("target"))
            .join("debug")
            .display()
            .to_string(),
    ));
    let mut cargo_args: Vec<&str> = vec!["test", "--workspace", "--no-fail-fast"];
    if !extra.is_empty() {
        cargo_args.push("--");
        cargo_args.extend(extra.iter().map(String::as_str));
    }
    let (tests, totals) = util::run_tests(&cargo_args, &env);
    let demo = if tests.is_ok() && extra.is_empty() {
        util::step("demo smoke test (cargo xtask demo --check)");
        // `cargo test` built every binary the demo needs (their packages'
        // integration tests use them): no second build with other features.
        demo::run(&["--check".to_string(), "--no-build".to_string()])
    } else {
        Ok(())
    };
    drop(peers);
    let demo_ok = u64::from(demo.is_ok() && extra.is_empty());
    let demo_failed = u64::from(demo.is_err());
    let summary = format!(
        "wicket: {} passed, {} failed, {} skipped",
        totals.passed + demo_ok,
        totals.failed + demo_failed,
        totals.ignored
    );
    if let Err(e) = tests.and(demo) {
        println!("{summary}");
        return Err(e);
    }
    util::step("all tests passed");
    println!("{summary}");
    Ok(())
}

/// `helm lint --strict` and `helm template` of the chart, with the test
/// values (the chart's tests then check what it renders).
fn helm_checks() -> Result<(), String> {
    let helm = peers::helm();
    if !helm.exists() {
        util::step("helm is not installed: skipping helm lint and helm template");
        return Ok(());
    }
    let helm = helm.display().to_string();
    let chart = util::root().join("deploy/helm/wicket");
    let values = chart.join("ci/test-values.yaml").display().to_string();
    let chart = chart.display().to_string();
    util::step("helm lint --strict deploy/helm/wicket");
    util::run(&helm, &["lint", "--strict", "-f", &values, &chart], &[])?;
    util::step("helm template deploy/helm/wicket");
    let out = std::process::Command::new(&helm)
        .args([
            "template",
            "wicket",
            &chart,
            "-f",
            &values,
            "--namespace",
            "wicket",
        ])
        .output()
        .map_err(|e| format!("cannot run helm: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "helm template failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let objects = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("kind: "))
        .count();
    println!("helm template: {objects} objects");
    Ok(())
}

fn bench(args: &[String]) -> Result<(), String> {
    let which = args.first().map(String::as_str).unwrap_or("all");
    if which == "all" {
        bench(&["policy".to_string()])?;
        bench(&["mask".to_string()])?;
        bench(&["pg".to_string()])?;
        bench(&["pg-mask".to_string()])?;
        bench(&["ssh".to_string()])?;
        bench(&["k8s".to_string()])?;
        bench(&["http".to_string()])?;
        bench(&["approvals".to_string()])?;
        return bench(&["audit".to_string()]);
    }
    match which {
        "policy" => {
            util::step("policy decision latency (200 rules); target p99 <= 20µs");
            util::run(
                "cargo",
                &["bench", "-p", "wicket-policy", "--bench", "decide"],
                &[],
            )
        }
        "mask" => {
            util::step("masking throughput, every detector on; target >= 200 MB/s per core");
            util::run(
                "cargo",
                &["bench", "-p", "wicket-mask", "--bench", "mask"],
                &[],
            )
        }
        "pg" => bench::pg(),
        "pg-mask" => bench::pg_mask(),
        "ssh" => {
            util::step(
                "SSH: 200 MB scp and 10,000-line echo, direct vs ProxyJump vs wicket-ssh; targets >= 0.7x direct throughput, <= 1 ms added p99 echo",
            );
            bench_ssh::ssh()
        }
        "k8s" => {
            util::step(
                "Kubernetes: GET pod latency and rate, and 100 MB exec stdout, direct vs wicket-k8s; targets <= 200 µs added p50, >= 0.8x exec throughput",
            );
            bench_k8s::k8s()
        }
        "http" => {
            util::step(
                "HTTP: GET latency and rate, direct vs nginx vs wicket-http; targets >= nginx's requests/s, <= 100 µs added p50",
            );
            bench_http::http()
        }
        "approvals" => {
            util::step(
                "approvals: decision to waiting sidecar over 1,000 approvals, on SQLite, on PostgreSQL and across two replicas; target <= 100 ms",
            );
            let pg = peers::Postgres::start(0)?;
            pg.psql("postgres", "CREATE DATABASE approvals")?;
            util::run(
                "cargo",
                &["bench", "-p", "wicket-control", "--bench", "approvals"],
                &[("WICKET_BENCH_PG_URL".into(), pg.url("approvals"))],
            )
        }
        "audit" => {
            util::step(
                "audit ingest from 4 concurrent sidecar streams into SQLite and PostgreSQL (fsync on); target >= 50,000 events/s",
            );
            // The test peers run PostgreSQL without fsync; a figure for
            // durable audit needs it on.
            let pg = peers::Postgres::start_with(0, &["-c", "fsync=on"])?;
            pg.psql("postgres", "CREATE DATABASE audit")?;
            util::run(
                "cargo",
                &["bench", "-p", "wicket-control", "--bench", "audit"],
                &[("WICKET_BENCH_PG_URL".into(), pg.url("audit"))],
            )
        }
        other => Err(format!(
            "unknown benchmark `{other}` (available: policy, mask, pg, pg-mask, ssh, k8s, http, approvals, audit)"
        )),
    }
}

/// `cargo xtask fuzz [pg|mask|k8s|spdy] [SECONDS]`: the PostgreSQL wire-codec,
/// the masking-engine, the exec channel-frame or the SPDY fuzz target under
/// cargo fuzz.
fn fuzz(args: &[String]) -> Result<(), String> {
    let target = args.first().map(String::as_str).unwrap_or("pg");
    let (dir, bin, what) = match target {
        "pg" => ("crates/wicket-pg", "codec", "the PostgreSQL wire codec"),
        "mask" => ("crates/wicket-mask", "mask", "the masking engine"),
        "k8s" => (
            "crates/wicket-k8s",
            "frames",
            "the exec channel-frame (WebSocket) decoder",
        ),
        "spdy" => (
            "crates/wicket-k8s",
            "spdy",
            "the SPDY/3.1 frame and header-block decoder",
        ),
        _ => {
            return Err(format!(
                "unknown fuzz target `{target}` (available: pg, mask, k8s, spdy)"
            ));
        }
    };
    let secs = args.get(1).map(String::as_str).unwrap_or("60");
    if !util::have("cargo-fuzz") {
        util::step("cargo install cargo-fuzz");
        util::run("cargo", &["install", "--locked", "cargo-fuzz"], &[])?;
    }
    util::step(&format!("fuzzing {what} for {secs} s"));
    // cargo fuzz needs nightly features; the stable toolchain provides them on request.
    let status = std::process::Command::new("cargo")
        .args(["fuzz", "run", bin, "--", &format!("-max_total_time={secs}")])
        .current_dir(util::root().join(dir))
        .env("RUSTC_BOOTSTRAP", "1")
        .status()
        .map_err(|e| format!("cargo fuzz: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("cargo fuzz failed ({status})"))
    }
}
