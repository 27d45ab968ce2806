//! The demo's HTTP part: the demo customer API of `wicket-testkit` (a
//! small JSON service holding personal data, which demands an API key only
//! the gate holds) and wicket-http in front of it.

use std::path::Path;
use std::process::Command;

use crate::util::{Children, env_get, port_open, wait_for};

/// The demo API behind its gate.
pub struct DemoHttp {
    /// The gate's port.
    pub port: u16,
    /// The gate's metrics port.
    pub admin_port: u16,
    /// The app's port.
    pub app_port: u16,
}

impl DemoHttp {
    /// `http://127.0.0.1:PORT` of the gate.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// Starts the demo API and wicket-http.
pub fn start(
    dir: &Path,
    bin: &Path,
    env: &[(String, String)],
    control_url: &str,
    check: bool,
    kids: &mut Children,
) -> Result<DemoHttp, String> {
    let hdir = dir.join("http");
    std::fs::create_dir_all(&hdir).map_err(|e| e.to_string())?;
    let [app_port, port, admin_port] =
        crate::util::demo_ports(check, [7488, 8480, 9473], "the HTTP demo")?;
    // The API key only the gate holds (the caller never sees it).
    let key_file = hdir.join("api-key");
    if !key_file.exists() {
        std::fs::write(&key_file, format!("demo-{}", random_hex()?)).map_err(|e| e.to_string())?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600));
        }
    }
    kids.spawn_logged(
        "wicket-demo-app",
        Command::new(bin.join("wicket-demo-app"))
            .args([
                "--listen",
                &format!("127.0.0.1:{app_port}"),
                "--api-key-file",
            ])
            .arg(&key_file),
        &dir.join("demo-app.log"),
    )?;
    wait_for(20, "the demo API", || port_open(app_port))?;
    crate::demo::start_gate(
        dir,
        bin,
        env,
        control_url,
        ("wicket-http", "demo-api"),
        (port, admin_port),
        &[
            ("WICKET_HTTP_LISTEN", format!("127.0.0.1:{port}")),
            (
                "WICKET_HTTP_UPSTREAM",
                format!("http://127.0.0.1:{app_port}"),
            ),
            ("WICKET_HTTP_UPSTREAM_HEADER", "X-Api-Key".into()),
            (
                "WICKET_HTTP_UPSTREAM_HEADER_FILE",
                key_file.display().to_string(),
            ),
        ],
        kids,
    )?;
    Ok(DemoHttp {
        port,
        admin_port,
        app_port,
    })
}

/// 16 random bytes from the kernel, in hex (xtask stays std-only).
fn random_hex() -> Result<String, String> {
    use std::io::Read;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| format!("cannot read /dev/urandom: {e}"))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// The demo agent's curl through wicket-http: a masked read, a refused
/// export, and an agent without reasoning refused.
pub fn check(env: &[(String, String)], h: &DemoHttp) -> Result<(), String> {
    let token = env_get(env, "WICKET_AGENT_TOKEN");
    let curl = |args: &[&str]| -> Result<(String, String), String> {
        let o = Command::new("curl")
            .args(["-sS", "-w", "\n%{http_code}", "-H"])
            .arg(format!("Authorization: Bearer {token}"))
            .args(args)
            .output()
            .map_err(|e| format!("curl: {e}"))?;
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        let (body, code) = out.rsplit_once('\n').unwrap_or(("", &out));
        Ok((body.to_string(), code.to_string()))
    };
    let why = "Wicket-Reasoning: demo check";
    let (body, code) = curl(&["-H", why, &format!("{}/api/customers", h.url())])?;
    if code != "200" || !body.contains("Ada Lovelace") {
        return Err(format!(
            "demo check: GET /api/customers through wicket-http failed: {code} {body}"
        ));
    }
    if body.contains("ada@example.com") || body.contains("123-45-6789") {
        return Err(format!("demo check: personal data was not masked: {body}"));
    }
    let (body, code) = curl(&["-H", why, &format!("{}/download?bytes=100", h.url())])?;
    if code != "403" || !body.contains("no-bulk-export-for-agents") {
        return Err(format!(
            "demo check: an agent's export was not refused: {code} {body}"
        ));
    }
    let (body, code) = curl(&[&format!("{}/api/customers/1", h.url())])?;
    if code != "403" || !body.contains("require-reasoning") {
        return Err(format!(
            "demo check: an agent without reasoning was not refused: {code} {body}"
        ));
    }
    Ok(())
}
