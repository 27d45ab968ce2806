//! The webhook binary over HTTPS, as the API server calls it: reviews,
//! health, metrics, refusals of bad requests, certificate rotation, and
//! `wicket-injector check` against it and a real control service.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::net::TcpStream;
use wicket_testkit::tls::TestCa;

const BIN: &str = env!("CARGO_BIN_EXE_wicket-injector");

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/{name}.json",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn client(ca_pem: &str) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// One request over a fresh TLS connection: `(status, body)`, or the TLS
/// error.
async fn call(
    port: u16,
    ca_pem: &str,
    method: &str,
    path: &str,
    ctype: &str,
    body: Vec<u8>,
) -> Result<(u16, String), String> {
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let tls = client(ca_pem)
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", ctype)
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn config(dir: &Path, control: &str) -> std::path::PathBuf {
    let path = dir.join("config.json");
    std::fs::write(
        &path,
        serde_json::json!({
            "control": {"url": control},
            "oidc": {"issuer": "https://idp.example.com"},
            "nativeSidecars": "auto",
        })
        .to_string(),
    )
    .unwrap();
    path
}

struct Running {
    child: tokio::process::Child,
    port: u16,
}

async fn start(dir: &Path, cert: &Path, key: &Path, control: &str) -> Running {
    let port = wicket_testkit::free_port();
    let child = tokio::process::Command::new(BIN)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--config")
        .arg(config(dir, control))
        .arg("--tls-cert")
        .arg(cert)
        .arg("--tls-key")
        .arg(key)
        .args([
            "--kubernetes-version",
            "v1.30.1",
            "--tls-reload-seconds",
            "1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Running { child, port };
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("wicket-injector did not start");
}

#[tokio::test]
async fn the_webhook_answers_over_https_and_refuses_bad_requests() {
    wicket_testkit::init_crypto();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("injector CA");
    let (cert, key) = ca.issue(&[]).write(dir.path(), "tls").unwrap();
    let mut w = start(dir.path(), &cert, &key, "http://127.0.0.1:1").await;
    let p = w.port;
    let pem = &ca.cert_pem;

    let (s, b) = call(p, pem, "GET", "/healthz", "text/plain", vec![])
        .await
        .unwrap();
    assert_eq!((s, b.as_str()), (200, "ok\n"));
    let (s, b) = call(p, pem, "POST", "/mutate", "application/json", fixture("pg"))
        .await
        .unwrap();
    assert_eq!(s, 200);
    let review: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert_eq!(review["response"]["allowed"], true);
    assert!(review["response"]["patch"].is_string());
    let (s, b) = call(
        p,
        pem,
        "POST",
        "/mutate",
        "application/json",
        fixture("deployment"),
    )
    .await
    .unwrap();
    assert_eq!(s, 200);
    assert!(b.contains("only mutates pods"), "{b}");

    // Refusals: not JSON, not a review, too big, wrong method, unknown path.
    let (s, _) = call(p, pem, "POST", "/mutate", "text/plain", fixture("pg"))
        .await
        .unwrap();
    assert_eq!(s, 415);
    let (s, b) = call(
        p,
        pem,
        "POST",
        "/mutate",
        "application/json",
        b"{]".to_vec(),
    )
    .await
    .unwrap();
    assert_eq!(s, 400);
    assert!(b.contains("not an AdmissionReview"), "{b}");
    let big = vec![b' '; 9 * 1024 * 1024];
    let (s, _) = call(p, pem, "POST", "/mutate", "application/json", big)
        .await
        .unwrap();
    assert_eq!(s, 413);
    let (s, _) = call(p, pem, "GET", "/mutate", "text/plain", vec![])
        .await
        .unwrap();
    assert_eq!(s, 405);
    let (s, _) = call(p, pem, "GET", "/nope", "text/plain", vec![])
        .await
        .unwrap();
    assert_eq!(s, 404);
    // A client that connects and sends nothing does not hold up others.
    let idle = TcpStream::connect(("127.0.0.1", p)).await.unwrap();
    let (_, b) = call(p, pem, "GET", "/metrics", "text/plain", vec![])
        .await
        .unwrap();
    assert!(
        b.contains("wicket_injector_reviews_total{result=\"injected\"} 1"),
        "{b}"
    );
    assert!(
        b.contains("wicket_injector_reviews_total{result=\"denied\"} 1"),
        "{b}"
    );
    assert!(
        b.contains("wicket_injector_reviews_total{result=\"invalid\"} 3"),
        "{b}"
    );
    drop(idle);

    // A rotated certificate (another CA) is served without a restart.
    let ca2 = TestCa::new("rotated CA");
    let issued = ca2.issue(&[]);
    let tmp = dir.path().join("tls.new");
    std::fs::write(&tmp, &issued.key_pem).unwrap();
    std::fs::rename(&tmp, &key).unwrap();
    std::fs::write(&tmp, &issued.cert_pem).unwrap();
    std::fs::rename(&tmp, &cert).unwrap();
    let mut rotated = false;
    for _ in 0..40 {
        if call(p, &ca2.cert_pem, "GET", "/healthz", "text/plain", vec![])
            .await
            .is_ok()
        {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(rotated, "the rotated certificate was not picked up");
    assert!(
        call(p, pem, "GET", "/healthz", "text/plain", vec![])
            .await
            .is_err()
    );

    // SIGTERM stops it cleanly.
    let pid = w.child.id().unwrap();
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(15), w.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn check_reports_the_webhook_and_the_control_service() {
    wicket_testkit::init_crypto();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("injector CA");
    let (cert, key) = ca.issue(&[]).write(dir.path(), "tls").unwrap();
    let ca_file = dir.path().join("ca.crt");
    std::fs::write(&ca_file, &ca.cert_pem).unwrap();

    // A real control service.
    let idp = wicket_testkit::idp::TestIdp::start("wicket").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut cfg = wicket_control::Config::defaults(
        &idp.issuer(),
        &format!("sqlite:{}", dir.path().join("w.db").display()),
        addr,
    );
    // Served over TLS, as the chart deploys it.
    let control_ca = TestCa::new("control CA");
    let (ccert, ckey) = control_ca.issue(&[]).write(dir.path(), "control").unwrap();
    let control_ca_file = dir.path().join("control-ca.crt");
    std::fs::write(&control_ca_file, &control_ca.cert_pem).unwrap();
    cfg.tls_cert = Some(ccert);
    cfg.tls_key = Some(ckey);
    tokio::spawn(async move {
        wicket_control::run(cfg, listener, std::future::pending())
            .await
            .unwrap()
    });
    let control = format!("https://localhost:{}", addr.port());
    let w = start(dir.path(), &cert, &key, &control).await;

    let check = |args: Vec<String>| async move {
        let out = tokio::process::Command::new(BIN)
            .arg("check")
            .args(args)
            .output()
            .await
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let injector = format!("https://localhost:{}/healthz", w.port);
    let ca_arg = ca_file.display().to_string();
    let mut ok = (false, String::new());
    for _ in 0..100 {
        ok = check(vec![
            "--injector".into(),
            injector.clone(),
            "--ca".into(),
            ca_arg.clone(),
            "--control".into(),
            control.clone(),
            "--control-ca".into(),
            control_ca_file.display().to_string(),
        ])
        .await;
        if ok.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok.0, "{}", ok.1);
    assert!(
        ok.1.contains("answered 200") && ok.1.contains("is serving"),
        "{}",
        ok.1
    );
    // The wrong CA and a dead control service fail, saying so.
    let other = dir.path().join("other.crt");
    std::fs::write(&other, TestCa::new("other").cert_pem).unwrap();
    let (good, out) = check(vec![
        "--injector".into(),
        injector,
        "--ca".into(),
        other.display().to_string(),
    ])
    .await;
    assert!(!good && out.contains("TLS failed"), "{out}");
    let (good, out) = check(vec!["--control".into(), "http://127.0.0.1:1".into()]).await;
    assert!(
        !good && out.contains("cannot reach the control service"),
        "{out}"
    );
}
