//! Real curl (HTTP/1.1, h2c, h2 over TLS) and a real WebSocket client
//! through wicket-http to the demo app of `wicket_testkit::httpapp`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wicket_proto::v1;
use wicket_testkit::idp::TokenSpec;
use wicket_teststack::http::{APP_KEY, HttpStack};

const POLICY: &str = "
agents: {require_reasoning: true}
connections:
  - name: api
    protocol: http
    masking:
      fields:
        - {path: '$..ssn', style: redact}
        - {path: '$..card', style: partial}
      detectors: [email]
    http:
      headers: [x-tenant]
      routes:
        - {name: customers, path: '/api/customers/**'}
        - {name: graphql, methods: [POST], path: /graphql, body_fields: ['$.operationName']}
        - {name: upload, methods: [POST, PUT], path: /upload, kind: upload}
        - {name: small-upload, methods: [POST], path: /small-upload, kind: upload, max_body_bytes: 1000}
grants:
  - id: people
    groups: [staff, dba]
  - id: agents
    groups: [agents]
rules:
  - id: reads
    effect: allow
    match: {protocols: [http], commands: [read, websocket, upload]}
  - id: graphql
    effect: allow
    match: {protocols: [http], verbs: [POST]}
    condition: \"command.objects.exists(o, o == 'route:graphql')\"
  - id: no-graphql-deletes
    description: nobody deletes users through GraphQL
    effect: deny
    match: {protocols: [http]}
    condition: \"command.objects.exists(o, o == 'field:$.operationName=DeleteUser')\"
  - id: blocked-tenant
    effect: deny
    match: {protocols: [http]}
    condition: \"command.objects.exists(o, o == 'header:x-tenant=blocked')\"
  - id: dba-writes
    effect: allow
    match: {protocols: [http], commands: [write], groups: [dba]}
  - id: deletes-need-approval
    effect: review
    match: {protocols: [http], commands: [delete]}
    review: {approvers: [dba], timeout: 30s}
";

fn out_text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// curl with the bearer token and the usual flags; `-w` prints the status
/// and HTTP version on the last line.
fn curl(token: &str, args: &[&str]) -> Command {
    let mut c = Command::new("curl");
    c.args(["-sS", "--max-time", "120", "-H"])
        .arg(format!("Authorization: Bearer {token}"))
        .args(["-w", "\n%{http_code} %{http_version}"])
        .args(args);
    c
}

/// Runs curl; returns (body, status, http version).
fn run(mut c: Command) -> (String, u16, String) {
    let o = c
        .output()
        .unwrap_or_else(|e| panic!("cannot run curl: {e}"));
    let (out, err) = out_text(&o);
    assert!(o.status.success(), "{c:?} failed: {err}\n{out}");
    let (body, last) = out.rsplit_once('\n').unwrap_or(("", &out));
    let mut it = last.split(' ');
    let status = it.next().unwrap_or("0").parse().unwrap_or(0);
    (
        body.to_string(),
        status,
        it.next().unwrap_or("").to_string(),
    )
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("curl thread")
}

/// The status code curl gets for `url` with `args` (and no token).
async fn status_of(args: &[&str], url: &str) -> String {
    let mut c = Command::new("curl");
    c.args(["-sS", "-o", "/dev/null", "-w", "%{http_code}"])
        .args(args)
        .arg(url);
    let o = blocking(move || c.output().unwrap()).await;
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn human(hs: &HttpStack, name: &str, groups: &[&str]) -> String {
    hs.stack.idp.mint(&TokenSpec::human(name, groups))
}

/// The result of a command: its own `command_result` event, or the command
/// itself when the spool merged the result into it.
fn result_of<'a>(events: &'a [v1::AuditEvent], command: &'a v1::AuditEvent) -> &'a v1::AuditEvent {
    events
        .iter()
        .find(|e| {
            e.kind == v1::AuditKind::CommandResult as i32
                && e.details.get("command_id") == Some(&command.id)
        })
        .unwrap_or_else(|| {
            assert!(
                command.details.contains_key("result_id"),
                "no result for {command:#?}"
            );
            command
        })
}

fn rule(e: &v1::AuditEvent) -> String {
    e.decision
        .as_ref()
        .map(|d| d.rule.clone())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_over_http1_h2c_and_h2_are_masked_credentialed_and_audited() {
    let hs = HttpStack::start(POLICY).await;
    let staff = human(&hs, "sue", &["staff"]);
    let url = format!("{}/api/customers", hs.url());
    let tls_url = format!("{}/api/customers", hs.tls_url());
    let ca = hs.ca_file.display().to_string();
    let (t, u) = (staff.clone(), url.clone());
    let h1 = blocking(move || {
        run(curl(
            &t,
            &[
                "--http1.1",
                "-H",
                "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "-H",
                "Wicket-Reasoning: listing customers for the weekly report",
                &u,
            ],
        ))
    })
    .await;
    let (t, u) = (staff.clone(), url.clone());
    let h2c = blocking(move || run(curl(&t, &["--http2-prior-knowledge", &u]))).await;
    let t = staff.clone();
    let h2 = blocking(move || run(curl(&t, &["--http2", "--cacert", &ca, &tls_url]))).await;
    assert_eq!((h1.1, h1.2.as_str()), (200, "1.1"));
    assert_eq!((h2c.1, h2c.2.as_str()), (200, "2"));
    assert_eq!((h2.1, h2.2.as_str()), (200, "2"));
    for (body, _, v) in [&h1, &h2c, &h2] {
        let json: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{v}: {e}: {body}"));
        let first = &json["items"][0];
        assert_eq!(first["name"], "Ada Lovelace", "{body}");
        assert_eq!(first["ssn"], "[redacted:ssn]", "{body}");
        let card = first["card"].as_str().unwrap();
        assert!(
            card.ends_with("1111") && !card.contains("4111 1111"),
            "{card}"
        );
        assert!(!body.contains("@example."), "emails masked: {body}");
    }
    // The app saw the gate's key, never the caller's token, and the trace.
    let seen = hs.app.seen();
    assert!(seen.len() >= 3);
    for s in &seen {
        let h = |n: &str| {
            s.headers
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(h("x-api-key"), Some(APP_KEY));
        assert_eq!(h("authorization"), None);
        assert_eq!(h("wicket-reasoning"), None);
        assert_eq!(h("accept-encoding"), Some("identity"));
        assert_eq!(h("x-forwarded-for"), Some("127.0.0.1"));
        assert!(h("wicket-session").is_some());
    }
    assert!(
        seen.iter()
            .any(|s| s.headers.iter().any(|(k, v)| k == "traceparent"
                && v == "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"))
    );

    // A gzip answer the app sends even though the gate asked for identity
    // is decoded and masked; the client gets it plain.
    let (t, u) = (
        staff.clone(),
        format!("{}/api/customers/2?gzip=force", hs.url()),
    );
    let (body, status, _) = blocking(move || run(curl(&t, &["--compressed", &u]))).await;
    assert_eq!(status, 200, "{body}");
    let json: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["name"], "Alan Turing");
    assert_eq!(json["ssn"], "[redacted:ssn]");
    assert!(!body.contains("alan@example.org"));
    // Text is masked by the detectors.
    let (t, u) = (staff.clone(), format!("{}/text", hs.url()));
    let (body, status, _) = blocking(move || run(curl(&t, &[&u]))).await;
    assert_eq!(status, 200);
    assert!(body.starts_with("Contact [redacted:email]"), "{body}");

    // The audit: one command and one result per request, with the principal,
    // the route, the trace, and what was masked.
    let events = hs.stack.events().await;
    let commands: Vec<&v1::AuditEvent> = events
        .iter()
        .filter(|e| e.kind == v1::AuditKind::Command as i32)
        .collect();
    assert_eq!(commands.len(), 5, "{events:#?}");
    let traced = commands
        .iter()
        .find(|e| {
            e.reasoning
                .as_ref()
                .is_some_and(|r| r.reasoning == "listing customers for the weekly report")
        })
        .expect("reasoning recorded");
    assert_eq!(
        traced.reasoning.as_ref().unwrap().trace_id,
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
    assert_eq!(traced.principal.as_ref().unwrap().subject, "sue");
    assert_eq!(
        traced.details.get("route").map(String::as_str),
        Some("customers")
    );
    assert_eq!(traced.command.as_ref().unwrap().text, "GET /api/customers");
    assert_eq!(rule(traced), "reads");
    assert_eq!(wicket_teststack::results(&events).len(), 5);
    let r = result_of(&events, traced);
    assert_eq!(r.details.get("status").map(String::as_str), Some("200"));
    assert_eq!(r.details.get("complete").map(String::as_str), Some("true"));
    assert_eq!(r.masked.get("field:$..ssn"), Some(&3));
    assert_eq!(r.masked.get("email"), Some(&3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_held_and_unexplained_requests_are_refused_with_problems() {
    let hs = HttpStack::start(POLICY).await;
    let staff = human(&hs, "sue", &["staff"]);
    let dba = human(&hs, "dan", &["dba", "wicket-approvers"]);
    let agent = hs.stack.idp.mint(&TokenSpec::agent("bot", &["agents"]));

    // A GraphQL operation named by policy is refused, naming the rule.
    let (t, u) = (staff.clone(), format!("{}/graphql", hs.url()));
    let (body, status, _) = blocking(move || {
        run(curl(
            &t,
            &[
                "-H",
                "content-type: application/json",
                "--data",
                r#"{"operationName":"DeleteUser","query":"mutation DeleteUser { x }"}"#,
                &u,
            ],
        ))
    })
    .await;
    assert_eq!(status, 403, "{body}");
    let p: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(p["type"], "urn:wicket:problem:denied");
    assert_eq!(p["rule"], "no-graphql-deletes");
    assert_eq!(p["status"], 403);
    assert!(p["detail"].as_str().unwrap().contains("no-graphql-deletes"));
    // Another operation passes, its answer masked.
    let (t, u) = (staff.clone(), format!("{}/graphql", hs.url()));
    let (body, status, _) = blocking(move || {
        run(curl(
            &t,
            &[
                "-H",
                "content-type: application/json",
                "--data",
                r#"{"operationName":"ListUsers"}"#,
                &u,
            ],
        ))
    })
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("ListUsers") && body.contains("[redacted:email]"),
        "{body}"
    );
    // A selected header is policy's to read.
    let (t, u) = (staff.clone(), format!("{}/hello", hs.url()));
    let (_, status, _) = blocking(move || run(curl(&t, &["-H", "x-tenant: blocked", &u]))).await;
    assert_eq!(status, 403);

    // An agent without reasoning is refused; with it, served.
    let (t, u) = (agent.clone(), format!("{}/hello", hs.url()));
    let (body, status, _) = blocking(move || run(curl(&t, &[&u]))).await;
    assert_eq!(status, 403);
    assert!(body.contains("require-reasoning"), "{body}");
    let (t, u) = (agent.clone(), format!("{}/hello", hs.url()));
    let (_, status, _) = blocking(move || {
        run(curl(
            &t,
            &["-H", "Wicket-Reasoning: health check before deploy", &u],
        ))
    })
    .await;
    assert_eq!(status, 200);

    // A held DELETE waits for a DBA: approved, it reaches the app.
    let (t, u) = (staff.clone(), format!("{}/api/customers/3", hs.url()));
    let held = blocking(move || run(curl(&t, &["-X", "DELETE", &u])));
    let approve = hs.stack.decide_next(&dba, true, |a| {
        assert!(
            a.request
                .as_ref()
                .unwrap()
                .command
                .as_ref()
                .unwrap()
                .text
                .contains("DELETE /api/customers/3")
        );
    });
    let ((body, status, _), ()) = tokio::join!(held, approve);
    assert_eq!(status, 204, "{body}");
    assert!(hs.app.seen().iter().any(|s| s.method == "DELETE"));
    // Denied, the client gets the approver's reason.
    let (t, u) = (staff.clone(), format!("{}/api/customers/2", hs.url()));
    let held = blocking(move || run(curl(&t, &["-X", "DELETE", &u])));
    let deny = hs.stack.decide_next(&dba, false, |_| {});
    let ((body, status, _), ()) = tokio::join!(held, deny);
    assert_eq!(status, 403);
    assert!(body.contains("not today"), "{body}");
    // A client that goes away while held: the approval is withdrawn, the
    // request never reaches the app, and the audit says so.
    let mut gone = curl(
        &staff,
        &["-X", "DELETE", &format!("{}/api/customers/1", hs.url())],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let abandoned = hs
        .stack
        .withdrawn_after_leaving(&dba, || gone.kill().unwrap())
        .await;
    let _ = gone.wait();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        hs.app
            .seen()
            .iter()
            .filter(|s| s.method == "DELETE")
            .count(),
        1
    );

    let events = hs.stack.events().await;
    let commands: Vec<&v1::AuditEvent> = events
        .iter()
        .filter(|e| e.kind == v1::AuditKind::Command as i32)
        .collect();
    let rules: Vec<String> = commands.iter().map(|e| rule(e)).collect();
    assert!(
        rules.contains(&"no-graphql-deletes".to_string()),
        "{rules:?}"
    );
    assert!(
        rules.contains(&"require-reasoning".to_string()),
        "{rules:?}"
    );
    assert!(rules.contains(&"blocked-tenant".to_string()), "{rules:?}");
    let gql = commands
        .iter()
        .find(|e| rule(e) == "no-graphql-deletes")
        .unwrap();
    assert!(
        gql.command
            .as_ref()
            .unwrap()
            .text
            .contains("$.operationName=DeleteUser")
    );
    let deletes: Vec<&str> = commands
        .iter()
        .filter(|e| rule(e) == "deletes-need-approval")
        .filter_map(|e| e.details.get("approval_outcome").map(String::as_str))
        .collect();
    assert_eq!(deletes, ["approved", "denied", "abandoned"]);
    assert!(
        commands
            .iter()
            .any(|e| e.details.get("approval") == Some(&abandoned)
                && e.decision.as_ref().unwrap().effect == v1::Effect::Deny as i32),
        "the abandoned DELETE is recorded as refused"
    );
    let agent_ok = commands
        .iter()
        .find(|e| {
            e.reasoning
                .as_ref()
                .is_some_and(|r| r.reasoning == "health check before deploy")
        })
        .expect("the agent's reasoning");
    assert_eq!(agent_ok.principal.as_ref().unwrap().subject, "bot");
}

/// Peak resident memory of this process, in MiB.
fn peak_rss_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
        / 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gigabyte_streams_both_ways_and_events_are_not_buffered() {
    let hs = HttpStack::start(POLICY).await;
    let staff = human(&hs, "sue", &["staff"]);
    const GB: u64 = 1 << 30;
    let file = hs.stack.dir.path().join("big.bin");
    std::fs::File::create(&file).unwrap().set_len(GB).unwrap();
    let (t, u, f) = (
        staff.clone(),
        format!("{}/upload", hs.url()),
        file.display().to_string(),
    );
    let started = Instant::now();
    let (body, status, _) = blocking(move || {
        run(curl(
            &t,
            &["-H", "content-type: application/octet-stream", "-T", &f, &u],
        ))
    })
    .await;
    let up = started.elapsed();
    assert_eq!(status, 200, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["bytes"], GB);
    let (t, u) = (staff.clone(), format!("{}/download?bytes={GB}", hs.url()));
    let started = Instant::now();
    let o = blocking(move || {
        Command::new("curl")
            .args([
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{size_download}",
                "-H",
            ])
            .arg(format!("Authorization: Bearer {t}"))
            .arg(&u)
            .output()
            .unwrap()
    })
    .await;
    let down = started.elapsed();
    assert_eq!(String::from_utf8_lossy(&o.stdout), format!("200 {GB}"));
    eprintln!(
        "1 GiB up in {up:?}, down in {down:?}; peak RSS {} MiB",
        peak_rss_mib()
    );
    assert!(
        peak_rss_mib() < 512,
        "memory stays bounded: {} MiB",
        peak_rss_mib()
    );

    // Server-sent events leave as they come, masked.
    let u = format!("{}/events?n=3&ms=1500", hs.url());
    let t = staff.clone();
    let lines = blocking(move || {
        let mut child = Command::new("curl")
            .args(["-sS", "-N", "-H"])
            .arg(format!("Authorization: Bearer {t}"))
            .arg(&u)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let started = Instant::now();
        let mut got = Vec::new();
        for line in BufReader::new(child.stdout.take().unwrap()).lines() {
            got.push((started.elapsed(), line.unwrap()));
        }
        let _ = child.wait();
        got
    })
    .await;
    let data: Vec<&(Duration, String)> = lines
        .iter()
        .filter(|(_, l)| l.starts_with("data:"))
        .collect();
    assert_eq!(data.len(), 3, "{lines:?}");
    assert!(
        data[0].0 < Duration::from_millis(1200),
        "the first event was held back: {lines:?}"
    );
    assert!(data[2].0 >= Duration::from_millis(2900), "{lines:?}");
    assert!(
        data.iter()
            .all(|(_, l)| l.contains("[redacted:email]") && !l.contains("@example.com")),
        "{lines:?}"
    );

    let events = hs.stack.events().await;
    let results = wicket_teststack::results(&events);
    assert!(
        results
            .iter()
            .any(|e| e.details.get("bytes_in") == Some(&GB.to_string()))
    );
    assert!(
        results
            .iter()
            .any(|e| e.details.get("bytes_out") == Some(&GB.to_string()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_are_relayed_and_audited() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let hs = HttpStack::start(POLICY).await;
    let staff = human(&hs, "sue", &["staff"]);
    let mut req = format!("ws://{}/ws", hs.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {staff}").parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(req)
        .await
        .expect("handshake through the gate");
    assert_eq!(resp.status(), 101);
    for i in 0..3 {
        ws.send(Message::Text(format!("hello {i}").into()))
            .await
            .unwrap();
        let m = ws.next().await.unwrap().unwrap();
        assert_eq!(m.into_text().unwrap().as_str(), format!("hello {i}"));
    }
    // The echo comes back masked, as a response body would: the
    // detectors on text, the field rules on JSON; binary data intact.
    ws.send(Message::Text("write to ann@example.com".into()))
        .await
        .unwrap();
    let m = ws.next().await.unwrap().unwrap().into_text().unwrap();
    assert!(m.starts_with("write to "), "{m}");
    assert!(!m.contains("ann@example.com"), "{m}");
    ws.send(Message::Text(
        r#"{"name": "Ann", "ssn": "123-45-6789"}"#.into(),
    ))
    .await
    .unwrap();
    let m = ws.next().await.unwrap().unwrap().into_text().unwrap();
    let v: serde_json::Value = serde_json::from_str(&m).unwrap();
    assert_eq!(v["name"], "Ann");
    assert_ne!(v["ssn"], "123-45-6789", "{m}");
    ws.send(Message::Binary(vec![0u8, 0xff, 7].into()))
        .await
        .unwrap();
    let m = ws.next().await.unwrap().unwrap();
    assert_eq!(m.into_data().to_vec(), vec![0u8, 0xff, 7]);
    ws.close(None).await.unwrap();
    while ws.next().await.is_some() {}
    drop(ws);
    // Without a token, no upgrade.
    let err = tokio_tungstenite::connect_async(format!("ws://{}/ws", hs.addr))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");

    tokio::time::sleep(Duration::from_millis(300)).await;
    let events = hs.stack.events().await;
    let cmd = events
        .iter()
        .find(|e| e.kind == v1::AuditKind::Command as i32)
        .unwrap();
    assert_eq!(
        cmd.command
            .as_ref()
            .unwrap()
            .classification
            .as_ref()
            .unwrap()
            .kind,
        "websocket"
    );
    let result = result_of(&events, cmd);
    assert_eq!(
        result.details.get("status").map(String::as_str),
        Some("101")
    );
    assert!(result.details["bytes_in"].parse::<u64>().unwrap() > 20);
    assert_eq!(result.masked.get("email"), Some(&1), "{:?}", result.masked);
    assert_eq!(
        result.masked.get("field:$..ssn"),
        Some(&1),
        "{:?}",
        result.masked
    );
}

/// Sends raw bytes to the gate and returns everything it answers before
/// closing (or `wait` passes).
async fn raw(hs: &HttpStack, bytes: &[u8], wait: Duration) -> String {
    let mut s = tokio::net::TcpStream::connect(hs.addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_clearly_and_the_gate_carries_on() {
    let hs = HttpStack::start_with(POLICY, |c| {
        c.body_idle = Duration::from_secs(1);
        c.header_timeout = Duration::from_secs(1);
    })
    .await;
    let staff = human(&hs, "sue", &["staff"]);
    let hello = format!("{}/hello", hs.url());

    // No token, a bad one, an expired one: 401 problems.
    let u = hello.clone();
    let o = blocking(move || {
        Command::new("curl")
            .args(["-sS", "-i", &u])
            .output()
            .unwrap()
    })
    .await;
    let (out, _) = out_text(&o);
    assert!(out.starts_with("HTTP/1.1 401"), "{out}");
    assert!(out.contains("www-authenticate: Bearer"), "{out}");
    assert!(out.contains("application/problem+json"), "{out}");
    let expired = hs.stack.idp.mint(&TokenSpec {
        ttl_seconds: -600,
        ..TokenSpec::human("sue", &["staff"])
    });
    for t in [
        "not-a-jwt".to_string(),
        expired,
        hs.stack
            .idp
            .mint_with_foreign_key(&TokenSpec::human("sue", &["staff"])),
    ] {
        let u = hello.clone();
        let (body, status, _) = blocking(move || run(curl(&t, &[&u]))).await;
        assert_eq!(status, 401, "{body}");
        assert!(body.contains("urn:wicket:problem:unauthorized"), "{body}");
    }

    // A header flood: 431, no panic.
    let (t, u) = (staff.clone(), hello.clone());
    let (_, status, _) = blocking(move || {
        let mut c = curl(&t, &[&u]);
        for i in 0..300 {
            c.args(["-H", &format!("x-flood-{i}: {}", "a".repeat(100))]);
        }
        run(c)
    })
    .await;
    assert_eq!(status, 431);

    // Request smuggling: Content-Length and Transfer-Encoding together, in
    // either order, first on the connection or behind a good request:
    // refused with 400 (as nginx does), the connection closed, and neither
    // that request nor the one hidden in its body reaches the app.
    let hidden = format!(
        "GET /api/customers/1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {staff}\r\n\r\n"
    );
    let good = format!("GET /hello HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {staff}\r\n\r\n");
    // Without a token too (refused at once, not audited: no one to name).
    let auth = format!("Authorization: Bearer {staff}\r\n");
    for (before, framing, auth) in [
        (
            "",
            "Content-Length: 4\r\nTransfer-Encoding: chunked",
            auth.as_str(),
        ),
        (
            "",
            "transfer-encoding: chunked\r\ncontent-length: 4",
            auth.as_str(),
        ),
        (
            good.as_str(),
            "Content-Length: 4\r\nTransfer-Encoding: chunked",
            auth.as_str(),
        ),
        ("", "Content-Length: 4\r\nTransfer-Encoding: chunked", ""),
    ] {
        let uploads = hs
            .app
            .seen()
            .iter()
            .filter(|s| s.uri.contains("upload"))
            .count();
        let smuggle = format!(
            "{before}POST /upload HTTP/1.1\r\nHost: x\r\n{auth}{framing}\r\n\r\n0\r\n\r\n{hidden}"
        );
        let answer = raw(&hs, smuggle.as_bytes(), Duration::from_secs(3)).await;
        let last = answer.rsplit("HTTP/1.1 ").next().unwrap_or("");
        assert!(last.starts_with("400"), "{answer}");
        assert!(last.contains("connection: close"), "{answer}");
        assert!(
            last.contains("Content-Length and Transfer-Encoding"),
            "{answer}"
        );
        assert_eq!(
            answer.matches("HTTP/1.1 ").count(),
            1 + usize::from(!before.is_empty()),
            "{answer}"
        );
        assert!(!answer.contains("Ada"), "{answer}");
        assert_eq!(
            hs.app
                .seen()
                .iter()
                .filter(|s| s.uri.contains("upload"))
                .count(),
            uploads,
            "the refused request never ran"
        );
        assert!(
            !hs.app.seen().iter().any(|s| s.uri.contains("customers")),
            "the smuggled request never ran"
        );
    }
    // A chunked upload whose body holds such a head is just data.
    let body = "POST /x HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n";
    let chunked = format!(
        "POST /upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {staff}\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n{good}",
        body.len()
    );
    let answer = raw(&hs, chunked.as_bytes(), Duration::from_secs(2)).await;
    assert_eq!(answer.matches("HTTP/1.1 200").count(), 2, "{answer}");
    // Two different Content-Lengths.
    let dup = format!(
        "POST /upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {staff}\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\nabcd"
    );
    let answer = raw(&hs, dup.as_bytes(), Duration::from_secs(3)).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");

    // A path that climbs above the root, a malformed escape: 400, audited.
    for p in ["/a/../../etc/passwd", "/bad%zzescape"] {
        let req = format!(
            "GET {p} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {staff}\r\nConnection: close\r\n\r\n"
        );
        let answer = raw(&hs, req.as_bytes(), Duration::from_secs(3)).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{p}: {answer}");
        assert!(answer.contains("bad-path"), "{answer}");
    }
    // An encoded path is matched as the app will read it.
    let (t, u) = (staff.clone(), format!("{}/api/%63ustomers/./1", hs.url()));
    let (body, status, _) = blocking(move || run(curl(&t, &["--path-as-is", &u]))).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        hs.app
            .seen()
            .iter()
            .any(|s| s.uri.ends_with("/api/customers/1"))
    );

    // Over a route's body limit, declared or streamed: 413.
    let (t, u) = (staff.clone(), format!("{}/small-upload", hs.url()));
    let (body, status, _) =
        blocking(move || run(curl(&t, &["--data-binary", &"x".repeat(5000), &u]))).await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("request-too-large"), "{body}");
    let (t, u) = (staff.clone(), format!("{}/small-upload", hs.url()));
    let (body, status, _) = blocking(move || {
        run(curl(
            &t,
            &[
                "-H",
                "Transfer-Encoding: chunked",
                "--data-binary",
                &"x".repeat(5000),
                &u,
            ],
        ))
    })
    .await;
    assert_eq!(status, 413, "{body}");

    // A slow client stalling its body is cut (408) after the idle limit.
    let mut s = tokio::net::TcpStream::connect(hs.addr).await.unwrap();
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {staff}\r\nContent-Length: 100\r\n\r\nonly-a-little"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // A slow client dribbling its headers (slowloris) is cut off.
    let mut s = tokio::net::TcpStream::connect(hs.addr).await.unwrap();
    s.write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Slow: 1")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the connection stayed open");
    assert!(started.elapsed() < Duration::from_secs(5));
    let answer = String::from_utf8_lossy(&buf);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );

    // A JSON body the policy reads that is not JSON: refused, not guessed.
    let (t, u) = (staff.clone(), format!("{}/graphql", hs.url()));
    let (body, status, _) = blocking(move || {
        run(curl(
            &t,
            &[
                "-H",
                "content-type: text/plain",
                "--data",
                "operationName=DeleteUser",
                &u,
            ],
        ))
    })
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("bad-body"), "{body}");

    // And the gate still serves.
    let (t, u) = (staff.clone(), hello.clone());
    let (body, status, _) = blocking(move || run(curl(&t, &[&u]))).await;
    assert_eq!((status, body.as_str()), (200, r#"{"hello":"world"}"#));
    let events = hs.stack.events().await;
    let rules: Vec<String> = events
        .iter()
        .filter(|e| e.kind == v1::AuditKind::Command as i32)
        .map(rule)
        .collect();
    assert!(
        rules.iter().filter(|r| *r == "bad-path").count() == 2,
        "{rules:?}"
    );
    assert!(rules.iter().any(|r| r == "request-too-large"), "{rules:?}");
    assert!(rules.iter().any(|r| r == "bad-body"), "{rules:?}");
    assert_eq!(
        rules.iter().filter(|r| *r == "bad-framing").count(),
        3,
        "{rules:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_upstreams_and_masked_body_capture() {
    let hs = HttpStack::start_opts(POLICY, true, |c| c.capture_bytes = 4096).await;
    let dba = human(&hs, "dan", &["dba"]);
    let (t, u) = (dba.clone(), format!("{}/api/customers", hs.url()));
    let body = r#"{"name":"Bob","email":"bob@example.com","ssn":"111-22-3333"}"#;
    let (out, status, version) = blocking(move || {
        run(curl(
            &t,
            &[
                "--http1.1",
                "-H",
                "content-type: application/json",
                "--data",
                body,
                &u,
            ],
        ))
    })
    .await;
    assert_eq!((status, version.as_str()), (201, "1.1"), "{out}");
    assert!(
        !out.contains("bob@example.com") && !out.contains("111-22-3333"),
        "{out}"
    );
    // The gate spoke HTTP/2 to the app, for an HTTP/1.1 client.
    assert!(
        hs.app.seen().iter().all(|s| s.version == "HTTP/2.0"),
        "{:?}",
        hs.app.seen()
    );
    let events = hs.stack.events().await;
    let cmd = events
        .iter()
        .find(|e| e.kind == v1::AuditKind::Command as i32)
        .unwrap();
    let r = result_of(&events, cmd);
    let req = &r.details["request_body"];
    let resp = &r.details["response_body"];
    for captured in [req, resp] {
        assert!(captured.contains("Bob"), "{captured}");
        assert!(
            !captured.contains("bob@example.com") && !captured.contains("111-22-3333"),
            "{captured}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn people_log_in_with_a_browser_and_the_cookie_stays_at_the_gate() {
    browser_login(None).await;
}

/// The same with sessions sealed into the browser's cookies (the gate's
/// replicas share the key): the session is read back from the cookies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_sessions_sealed_for_replicas_work_the_same() {
    browser_login(Some(wicket_sidecar::secret::Secret::Value(
        "a shared secret of more than thirty-two characters".into(),
    )))
    .await;
}

async fn browser_login(session_key: Option<wicket_sidecar::secret::Secret>) {
    let sealed = session_key.is_some();
    let hs = HttpStack::start_login(POLICY, session_key).await;
    hs.stack
        .idp
        .set_device_user(TokenSpec::human("bea", &["staff"]));
    let jar = hs.stack.dir.path().join("cookies.txt");
    let jar_s = jar.display().to_string();
    // A browser without a token: sent to the identity provider, back to the
    // callback, then to the page it asked for, with a session cookie.
    let u = format!("{}/api/customers/1", hs.url());
    let (j, u2) = (jar_s.clone(), u.clone());
    let o = blocking(move || {
        Command::new("curl")
            .args([
                "-sS",
                "-L",
                "-c",
                &j,
                "-b",
                &j,
                "-H",
                "Accept: text/html",
                "-H",
                "Cookie: theme=dark",
            ])
            .args(["-w", "\n%{http_code} %{num_redirects}", &u2])
            .output()
            .unwrap()
    })
    .await;
    let (out, err) = out_text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        out.contains("Ada Lovelace") && out.ends_with("200 3"),
        "{out}"
    );
    assert!(!out.contains("123-45-6789"), "{out}");
    let cookies = std::fs::read_to_string(&jar).unwrap();
    assert!(cookies.contains("wicket_session"), "{cookies}");
    // Sealed, the cookie carries the session itself (far longer than an id).
    let value_len = cookies
        .lines()
        .find(|l| l.contains("\twicket_session\t"))
        .and_then(|l| l.rsplit('\t').next())
        .map_or(0, str::len);
    assert_eq!(value_len > 200, sealed, "{cookies}");
    assert!(
        cookies.contains("#HttpOnly_"),
        "the cookie is HttpOnly: {cookies}"
    );
    // The cookie alone now works (no redirect), and never reaches the app.
    let (j, u2) = (jar_s.clone(), format!("{}/headers", hs.url()));
    let o = blocking(move || {
        Command::new("curl")
            .args(["-sS", "-b", &j, "-H", "Cookie: theme=dark", &u2])
            .output()
            .unwrap()
    })
    .await;
    let (out, _) = out_text(&o);
    let h: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(h["cookie"], "theme=dark", "{out}");
    assert!(h.get("authorization").is_none());
    assert!(!hs.app.seen().iter().any(|s| {
        s.headers
            .iter()
            .any(|(k, v)| k == "cookie" && v.contains("wicket_session"))
    }));
    // A forged cookie gets no session; an API client without a token gets 401.
    assert_eq!(
        status_of(&["-H", "Cookie: wicket_session=forged"], &u).await,
        "401"
    );
    // Logging out clears the browser's cookie…
    let (j, u2) = (jar_s.clone(), format!("{}/.wicket/logout", hs.url()));
    let o = blocking(move || {
        Command::new("curl")
            .args(["-sS", "-i", "-b", &j, "-c", &j, &u2])
            .output()
            .unwrap()
    })
    .await;
    let (out, _) = out_text(&o);
    assert!(
        out.lines().any(|l| l
            .to_ascii_lowercase()
            .starts_with("set-cookie: wicket_session=; path=/; httponly")
            && l.contains("Max-Age=0")),
        "{out}"
    );
    // …and a gate holding its sessions forgets this one, so even a copy
    // of the cookie kept from before gets nothing. (Sealed, clearing the
    // cookie is all a gate without a shared store can do: a copy lasts as
    // long as its token, as the README says.)
    if !sealed {
        assert_eq!(status_of(&["-b", &jar_s], &u).await, "401");
    }
    // The requests are the person's, in the audit.
    let events = hs.stack.events().await;
    assert!(
        events
            .iter()
            .any(|e| e.kind == v1::AuditKind::Command as i32
                && e.principal.as_ref().is_some_and(|p| p.subject == "bea"))
    );
}
