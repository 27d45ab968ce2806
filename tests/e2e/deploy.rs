//! The deployment files: the images (`deploy/docker`) and the compose
//! quickstart (`deploy/compose`).
//!
//! No container engine runs here, so the images are checked for what makes
//! them work (hadolint, one per binary, multi-stage, non-root, and every
//! library the binary links present in the distroless base), and the compose
//! file is run as written without containers: each service's binary starts
//! with the image's `ENV` and the service's `environment` and `command`,
//! service names and container paths mapped to local ones, and psql goes
//! through the gate as the file's header says.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Kill, bin, root, wait_port};
use serde_json::Value;
use wicket_testkit::{env, free_port};

fn venv_tool(name: &str) -> PathBuf {
    PathBuf::from(env::require("WICKET_TEST_PYTHON")).with_file_name(name)
}

/// A YAML file as JSON (PyYAML, as compose and Kubernetes tools read it).
fn yaml(path: &Path) -> Value {
    let out = Command::new(env::require("WICKET_TEST_PYTHON"))
        .args([
            "-c",
            "import sys, json, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
        ])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Every `[[bin]]` of the workspace's crates: (binary, package).
fn workspace_binaries() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(root().join("crates")).unwrap() {
        let manifest = entry.unwrap().path().join("Cargo.toml");
        let Ok(text) = std::fs::read_to_string(&manifest) else {
            continue;
        };
        let package = text
            .lines()
            .find_map(|l| l.strip_prefix("name = \""))
            .unwrap()
            .trim_end_matches('"')
            .to_string();
        let mut lines = text.lines();
        while let Some(l) = lines.next() {
            if l.trim() == "[[bin]]"
                && let Some(name) = lines.next().and_then(|n| n.strip_prefix("name = \""))
            {
                out.push((name.trim_end_matches('"').to_string(), package.clone()));
            }
        }
    }
    out.sort();
    out
}

/// Binaries that ship as images (test fixtures do not, but the demo
/// identity provider does, for the compose quickstart).
fn shipped(bin: &str) -> bool {
    !matches!(bin, "wicket-demo-app" | "wicket-fake-kube")
}

/// `ENV` lines of a Dockerfile's final stage.
fn image_env(dockerfile: &str) -> Vec<(String, String)> {
    let last = dockerfile.rfind("\nFROM ").unwrap();
    dockerfile[last..]
        .lines()
        .filter_map(|l| l.strip_prefix("ENV "))
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap();
            (k.to_string(), v.to_string())
        })
        .collect()
}

#[test]
fn every_binary_has_a_small_non_root_image() {
    let hadolint = venv_tool("hadolint");
    for (name, package) in workspace_binaries().into_iter().filter(|(b, _)| shipped(b)) {
        let path = root().join(format!("deploy/docker/{name}.Dockerfile"));
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|_| panic!("{name} has no {}", path.display()));
        let froms: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
        assert!(froms.len() >= 2, "{name}: multi-stage");
        assert_eq!(
            *froms.last().unwrap(),
            "FROM gcr.io/distroless/cc-debian12:nonroot",
            "{name}"
        );
        assert!(
            text.contains(&format!(
                "cargo build --release --locked -p {package} --bin {name}"
            )),
            "{name}: builds the binary from the locked workspace"
        );
        assert!(text.contains("\nUSER 65532:65532\n"), "{name}: non-root");
        assert!(
            text.contains(&format!("ENTRYPOINT [\"/usr/local/bin/{name}\"]")),
            "{name}"
        );
        // Every variable the image sets is one the binary reads.
        let source = binary_source(&package);
        for (k, _) in image_env(&text) {
            assert!(
                source.contains(&format!("env = \"{k}\"")),
                "{name}: ENV {k}"
            );
        }
        let lint = Command::new(&hadolint).arg(&path).output().unwrap();
        assert!(
            lint.status.success(),
            "hadolint {name}: {}",
            String::from_utf8_lossy(&lint.stdout)
        );
        // distroless/cc holds glibc and libgcc: the binary must need no more.
        let ldd = Command::new("ldd").arg(bin(&name)).output().unwrap();
        let libs = String::from_utf8_lossy(&ldd.stdout);
        for lib in libs.lines().filter_map(|l| l.split_whitespace().next()) {
            let base = lib.rsplit('/').next().unwrap();
            let known = [
                "linux-vdso.so",
                "libc.so",
                "libm.so",
                "libgcc_s.so",
                "ld-linux-x86-64.so",
                "libpthread.so",
                "libdl.so",
                "librt.so",
            ];
            assert!(
                known.iter().any(|k| base.starts_with(k)),
                "{name} links {lib}, which distroless/cc does not have"
            );
        }
    }
    let ignore = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    assert!(
        ignore.lines().any(|l| l == "target/"),
        "builds do not send target/"
    );
}

/// The sources declaring a package binary's flags (with the shared ones).
fn binary_source(package: &str) -> String {
    let mut s = String::new();
    for f in [
        format!("crates/{package}/src/main.rs"),
        format!("crates/{package}/src/config.rs"),
        format!("crates/{package}/src/bin/demo_idp.rs"),
        "crates/wicket-sidecar/src/config.rs".into(),
        "crates/wicket-sidecar/src/process.rs".into(),
    ] {
        s.push_str(&std::fs::read_to_string(root().join(f)).unwrap_or_default());
    }
    s
}

fn psql(url: &str, sql: &str) -> std::process::Output {
    Command::new("psql")
        .args([
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-A",
            "-t",
            "-d",
            url,
            "-c",
            sql,
        ])
        .output()
        .unwrap()
}

/// Waits until the gate's `/readyz` (on its admin port) says 200: it has
/// its policy bundle from the control service.
fn wait_ready(admin: u16) {
    use std::io::{Read, Write};
    let start = Instant::now();
    loop {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", admin)) {
            let _ = s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let mut buf = String::new();
            let _ = s.read_to_string(&mut buf);
            if buf.starts_with("HTTP/1.1 200") {
                return;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the gate never became ready"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_compose_quickstart_runs_as_written() {
    let dir = root().join("deploy/compose");
    let compose = yaml(&dir.join("compose.yaml"));
    let services = compose["services"].as_object().unwrap();
    let tmp = tempfile::tempdir().unwrap();

    // The compose network's names and the containers' paths, here.
    let pg_url = url::Url::parse(&env::postgres_url()).unwrap();
    let pg_host = format!("{}:{}", pg_url.host_str().unwrap(), pg_url.port().unwrap());
    let (idp, control, gate, admin) = (free_port(), free_port(), free_port(), free_port());
    let mut map: Vec<(String, String)> = vec![
        ("http://idp:7480".into(), format!("http://127.0.0.1:{idp}")),
        (
            "http://control:7470".into(),
            format!("http://127.0.0.1:{control}"),
        ),
        ("postgres:5432".into(), pg_host.clone()),
        ("0.0.0.0:7480".into(), format!("127.0.0.1:{idp}")),
        ("0.0.0.0:7470".into(), format!("127.0.0.1:{control}")),
        ("0.0.0.0:6432".into(), format!("127.0.0.1:{gate}")),
        ("0.0.0.0:9470".into(), format!("127.0.0.1:{admin}")),
        (
            "/tmp/wicket-demo.env".into(),
            tmp.path().join("demo.env").display().to_string(),
        ),
    ];
    for (name, s) in compose["secrets"].as_object().unwrap() {
        let file = dir.join(s["file"].as_str().unwrap());
        assert!(file.exists(), "secret {name}: {}", file.display());
        map.push((format!("/run/secrets/{name}"), file.display().to_string()));
    }
    let mut env_of: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let mut args_of: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, svc) in services {
        let mut local = map.clone();
        for v in svc["volumes"].as_array().into_iter().flatten() {
            let v = v.as_str().unwrap();
            let mut parts = v.split(':');
            let (src, dst) = (parts.next().unwrap(), parts.next().unwrap());
            let here = if src.starts_with('.') {
                dir.join(src)
            } else {
                let d = tmp.path().join(format!("{name}-{src}"));
                std::fs::create_dir_all(&d).unwrap();
                d
            };
            assert!(here.exists(), "{name}: {src}");
            local.push((dst.to_string(), here.display().to_string()));
        }
        local.sort_by_key(|(from, _)| std::cmp::Reverse(from.len()));
        let tr = |s: &str| {
            local
                .iter()
                .fold(s.to_string(), |acc, (from, to)| acc.replace(from, to))
        };
        let mut vars = Vec::new();
        if let Some(file) = svc["build"]["dockerfile"].as_str() {
            let text = std::fs::read_to_string(root().join(file)).unwrap();
            vars.extend(image_env(&text).into_iter().map(|(k, v)| (k, tr(&v))));
        }
        for (k, v) in svc["environment"].as_object().into_iter().flatten() {
            vars.push((k.clone(), tr(v.as_str().unwrap())));
        }
        env_of.insert(name.clone(), vars);
        args_of.insert(
            name.clone(),
            svc["command"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|a| tr(a.as_str().unwrap()))
                .collect(),
        );
        for dep in svc["depends_on"]
            .as_array()
            .map(|a| a.iter().map(|d| d.as_str().unwrap().to_string()).collect())
            .or_else(|| {
                svc["depends_on"]
                    .as_object()
                    .map(|o| o.keys().cloned().collect())
            })
            .unwrap_or_else(Vec::<String>::new)
        {
            assert!(
                services.contains_key(&dep),
                "{name} depends on unknown {dep}"
            );
        }
    }

    // The postgres service: its user, password and database, and the init
    // scripts it mounts, on the test PostgreSQL.
    let pg_env: BTreeMap<_, _> = env_of["postgres"].iter().cloned().collect();
    let password = std::fs::read_to_string(&pg_env["POSTGRES_PASSWORD_FILE"]).unwrap();
    let (user, db) = (&pg_env["POSTGRES_USER"], &pg_env["POSTGRES_DB"]);
    let admin_url = env::postgres_url();
    for sql in [
        format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
        format!(
            "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{user}') THEN CREATE ROLE {user} LOGIN; END IF; END $$"
        ),
        format!("ALTER ROLE {user} PASSWORD '{}'", password.trim()),
        format!("CREATE DATABASE {db} OWNER {user}"),
    ] {
        let o = psql(&admin_url, &sql);
        assert!(
            o.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let mut app_url = pg_url.clone();
    app_url.set_username(user).unwrap();
    app_url.set_password(Some(password.trim())).unwrap();
    app_url.set_path(db);
    for v in services["postgres"]["volumes"].as_array().unwrap() {
        let v = v.as_str().unwrap();
        if v.contains("/docker-entrypoint-initdb.d/") {
            let src = dir.join(v.split(':').next().unwrap());
            let o = psql(app_url.as_str(), &std::fs::read_to_string(src).unwrap());
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
    }

    // The three Wicket services, as their images and the file configure them.
    let mut procs = Kill(Vec::new());
    let binary = |svc: &str| {
        let file = services[svc]["build"]["dockerfile"].as_str().unwrap();
        bin(file
            .trim_start_matches("deploy/docker/")
            .trim_end_matches(".Dockerfile"))
    };
    for (svc, port) in [("idp", idp), ("control", control), ("pg", gate)] {
        let mut cmd = Command::new(binary(svc));
        cmd.args(&args_of[svc])
            .envs(env_of[svc].iter().cloned())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        procs.0.push(cmd.spawn().unwrap());
        wait_port(port, svc);
    }

    // The header's psql, with the agent's token from the idp's env file.
    let tokens = std::fs::read_to_string(tmp.path().join("demo.env")).unwrap();
    let agent = tokens
        .lines()
        .find_map(|l| l.strip_prefix("export WICKET_AGENT_TOKEN='"))
        .unwrap()
        .trim_end_matches('\'');
    let header = std::fs::read_to_string(dir.join("compose.yaml")).unwrap();
    assert!(
        header.contains("port=6432 dbname=demo"),
        "the header's psql"
    );
    let conninfo = format!(
        "host=localhost port={gate} dbname={db} user=demo-agent sslmode=require sslrootcert=/nonexistent"
    );
    wait_ready(admin);
    let run = |sql: &str| {
        let o = Command::new("psql")
            .args(["-X", "-A", "-t", "-d", &conninfo, "-c", sql])
            .env("PGPASSWORD", agent)
            .env("PGOPTIONS", "-c wicket.reasoning=trying\\ the\\ quickstart")
            .output()
            .unwrap();
        let text =
            String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
        (o.status.success(), text)
    };
    let (ok, out) = run("SELECT id, email, ssn FROM customers ORDER BY id");
    assert!(ok, "{out}");
    assert!(
        out.contains("1|a") && !out.contains("ada@example.com"),
        "masked: {out}"
    );
    assert!(!out.contains("078-05-1120"), "masked: {out}");
    let (ok, out) = run("DROP TABLE customers");
    assert!(!ok && out.contains("refused by rule"), "{out}");
}
