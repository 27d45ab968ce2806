//! A small HTTP service holding personal data, for the HTTP gate's tests,
//! demo and benchmark: a JSON API of customers, GraphQL-style posts,
//! streamed uploads and downloads, server-sent events, gzip answers, a
//! WebSocket echo, and an echo of the headers it was sent. It speaks
//! HTTP/1.1 and HTTP/2 (prior knowledge) and, when given a key, refuses
//! requests that do not carry it (so tests see the gate's injected
//! credential).
//!
//! | route | answer |
//! |---|---|
//! | `GET /api/customers` | JSON list (names, emails, SSNs, cards); gzip when accepted, or always with `?gzip=force` |
//! | `GET /api/customers/{id}` | one customer |
//! | `POST /api/customers` | echoes the JSON body, 201 |
//! | `DELETE /api/customers/{id}` | 204 |
//! | `POST /graphql` | `{"data": {"operation": NAME}}` |
//! | `POST /upload` | `{"bytes": N}` after reading the body |
//! | `GET /download?bytes=N` | N bytes of `application/octet-stream`, streamed |
//! | `GET /events?n=N&ms=M` | N server-sent events M ms apart, each with an email |
//! | `GET /ws` | WebSocket echo |
//! | `GET /headers` | the request headers as JSON |
//! | `GET /text` | `text/plain` with personal data |
//! | `GET /hello` | `{"hello":"world"}` (for benchmarks) |

use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::protocol::Role;

type Body = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// A request the app saw.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Method.
    pub method: String,
    /// Path and query.
    pub uri: String,
    /// Headers (lower-case names).
    pub headers: Vec<(String, String)>,
    /// HTTP version (`HTTP/1.1`, `HTTP/2.0`).
    pub version: String,
}

/// The running app.
#[derive(Clone)]
pub struct DemoApp {
    /// Where it listens.
    pub addr: SocketAddr,
    key: Option<(String, String)>,
    seen: Arc<Mutex<Vec<Seen>>>,
    record: bool,
}

impl std::fmt::Debug for DemoApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DemoApp").field("addr", &self.addr).finish()
    }
}

/// The demo's customers.
pub fn customers() -> Value {
    json!([
        {"id": 1, "name": "Ada Lovelace", "email": "ada@example.com", "ssn": "123-45-6789",
         "card": "4111 1111 1111 1111", "plan": "pro"},
        {"id": 2, "name": "Alan Turing", "email": "alan@example.org", "ssn": "987-65-4321",
         "card": "5500 0000 0000 0004", "plan": "free"},
        {"id": 3, "name": "Grace Hopper", "email": "grace@example.net", "ssn": "078-05-1120",
         "card": "3400 0000 0000 009", "plan": "team"}
    ])
}

fn full(status: StatusCode, ctype: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", ctype)
        .body(Full::new(body.into()).map_err(|n| match n {}).boxed())
        .expect("response")
}

fn json_resp(status: StatusCode, v: &Value, gzip: bool) -> Response<Body> {
    if !gzip {
        return full(status, "application/json", v.to_string());
    }
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let _ = enc.write_all(v.to_string().as_bytes());
    let mut r = full(status, "application/json", enc.finish().unwrap_or_default());
    r.headers_mut()
        .insert("content-encoding", "gzip".parse().expect("header"));
    r
}

fn query(uri: &hyper::Uri, name: &str) -> Option<String> {
    url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

impl DemoApp {
    /// Starts on `listen`; with `key = Some((header, value))` every request
    /// must carry that header with that value. `record` keeps every
    /// request for [`DemoApp::seen`] (off for benchmarks).
    pub async fn start(listen: &str, key: Option<(String, String)>, record: bool) -> DemoApp {
        let listener = TcpListener::bind(listen).await.expect("bind the demo app");
        let app = DemoApp {
            addr: listener.local_addr().expect("addr"),
            key,
            seen: Default::default(),
            record,
        };
        let a = app.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let a = a.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let a = a.clone();
                        async move { Ok::<_, Infallible>(a.handle(req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        app
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The requests seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let headers: Vec<(String, String)> = req
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        if self.record {
            self.seen.lock().expect("seen").push(Seen {
                method: req.method().to_string(),
                uri: req.uri().to_string(),
                headers: headers.clone(),
                version: format!("{:?}", req.version()),
            });
        }
        if let Some((name, value)) = &self.key
            && req
                .headers()
                .get(name.as_str())
                .and_then(|v| v.to_str().ok())
                != Some(value.as_str())
        {
            return full(
                StatusCode::UNAUTHORIZED,
                "application/json",
                r#"{"error":"missing or wrong API credential"}"#,
            );
        }
        let path = req.uri().path().to_string();
        let gzip_ok = req
            .headers()
            .get("accept-encoding")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("gzip"));
        let force_gzip = query(req.uri(), "gzip").as_deref() == Some("force");
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (req.method().clone(), segs.as_slice()) {
            (Method::GET, ["hello"]) => {
                full(StatusCode::OK, "application/json", r#"{"hello":"world"}"#)
            }
            (Method::GET, ["headers"]) => {
                let map: serde_json::Map<String, Value> = headers
                    .into_iter()
                    .map(|(k, v)| (k, Value::String(v)))
                    .collect();
                full(
                    StatusCode::OK,
                    "application/json",
                    Value::Object(map).to_string(),
                )
            }
            (Method::GET, ["api", "customers"]) => json_resp(
                StatusCode::OK,
                &json!({"items": customers()}),
                gzip_ok || force_gzip,
            ),
            (Method::GET, ["api", "customers", id]) => {
                match customers().as_array().and_then(|a| {
                    a.iter()
                        .find(|c| c["id"].as_u64().map(|n| n.to_string()).as_deref() == Some(*id))
                        .cloned()
                }) {
                    Some(c) => json_resp(StatusCode::OK, &c, gzip_ok || force_gzip),
                    None => full(
                        StatusCode::NOT_FOUND,
                        "application/json",
                        r#"{"error":"no such customer"}"#,
                    ),
                }
            }
            (Method::POST, ["api", "customers"]) => {
                let body = crate::body_bytes(req).await;
                full(StatusCode::CREATED, "application/json", body)
            }
            (Method::DELETE, ["api", "customers", _]) => Response::builder()
                .status(StatusCode::NO_CONTENT)
                .body(Full::new(Bytes::new()).map_err(|n| match n {}).boxed())
                .expect("response"),
            (Method::POST, ["graphql"]) => {
                let body = crate::body_bytes(req).await;
                let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                full(
                    StatusCode::OK,
                    "application/json",
                    json!({"data": {"operation": v["operationName"], "contact": "ops@example.com"}}).to_string(),
                )
            }
            (Method::POST | Method::PUT, ["upload"]) => {
                let mut body = req.into_body();
                let mut n: u64 = 0;
                while let Some(f) = body.frame().await {
                    match f {
                        Ok(f) => n += f.data_ref().map(|d| d.len() as u64).unwrap_or(0),
                        Err(e) => {
                            return full(
                                StatusCode::BAD_REQUEST,
                                "text/plain",
                                format!("body broke off: {e}"),
                            );
                        }
                    }
                }
                full(
                    StatusCode::OK,
                    "application/json",
                    json!({"bytes": n}).to_string(),
                )
            }
            (Method::GET, ["download"]) => {
                let total: u64 = query(req.uri(), "bytes")
                    .and_then(|b| b.parse().ok())
                    .unwrap_or(1 << 20);
                let (tx, rx) =
                    tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
                tokio::spawn(async move {
                    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
                    let mut left = total;
                    while left > 0 {
                        let n = left.min(chunk.len() as u64) as usize;
                        if tx.send(Ok(Frame::data(chunk.slice(..n)))).await.is_err() {
                            return;
                        }
                        left -= n as u64;
                    }
                });
                let stream = tokio_stream_from(rx);
                Response::builder()
                    .header("content-type", "application/octet-stream")
                    .header("content-length", total.to_string())
                    .body(BodyExt::boxed(StreamBody::new(stream)))
                    .expect("response")
            }
            (Method::GET, ["events"]) => {
                let n: u32 = query(req.uri(), "n")
                    .and_then(|b| b.parse().ok())
                    .unwrap_or(3);
                let ms: u64 = query(req.uri(), "ms")
                    .and_then(|b| b.parse().ok())
                    .unwrap_or(300);
                let (tx, rx) =
                    tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
                tokio::spawn(async move {
                    for i in 0..n {
                        let ev = format!(
                            "id: {i}\nevent: customer\ndata: {}\n\n",
                            json!({"seq": i, "email": format!("user{i}@example.com")})
                        );
                        if tx.send(Ok(Frame::data(Bytes::from(ev)))).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                });
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .header("cache-control", "no-cache")
                    .body(BodyExt::boxed(StreamBody::new(tokio_stream_from(rx))))
                    .expect("response")
            }
            (Method::GET, ["text"]) => full(
                StatusCode::OK,
                "text/plain; charset=utf-8",
                "Contact ada@example.com or call about SSN 123-45-6789.\n",
            ),
            (Method::GET, ["ws"]) => websocket(req),
            _ => full(
                StatusCode::NOT_FOUND,
                "application/json",
                r#"{"error":"not found"}"#,
            ),
        }
    }
}

/// A stream of a channel's items.
fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// The WebSocket echo.
fn websocket(mut req: Request<Incoming>) -> Response<Body> {
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        return full(
            StatusCode::BAD_REQUEST,
            "text/plain",
            "not a WebSocket handshake",
        );
    };
    let accept = crate::kube::ws_accept(key.as_bytes());
    let on = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(io) = on.await else { return };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(io),
            Role::Server,
            None,
        )
        .await;
        while let Some(Ok(m)) = ws.next().await {
            if m.is_close() {
                let _ = ws.close(None).await;
                break;
            }
            if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                break;
            }
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-accept", accept)
        .body(Full::new(Bytes::new()).map_err(|n| match n {}).boxed())
        .expect("response")
}
