//! A webhook receiver for tests: keeps every request it is sent and
//! answers with the statuses it was told to (then 200), so tests can check
//! payloads, signatures and retries.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    /// Path and query.
    pub path: String,
    /// Headers, names lowercased, in order.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
    /// The status it was answered with.
    pub status: u16,
}

impl Received {
    /// The first header named `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

/// A running receiver.
#[derive(Clone)]
pub struct HookServer {
    addr: std::net::SocketAddr,
    got: Arc<Mutex<Vec<Received>>>,
}

impl HookServer {
    /// Listens on a free loopback port; answers the first requests with
    /// `statuses`, in order, and every later one with 200.
    pub async fn start(statuses: &[u16]) -> HookServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let server = HookServer {
            addr: listener.local_addr().expect("addr"),
            got: Arc::default(),
        };
        let plan = Arc::new(Mutex::new(std::collections::VecDeque::from(
            statuses.to_vec(),
        )));
        let got = server.got.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (got, plan) = (got.clone(), plan.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let (got, plan) = (got.clone(), plan.clone());
                        async move {
                            let path = req.uri().to_string();
                            let headers = req
                                .headers()
                                .iter()
                                .map(|(n, v)| {
                                    (n.as_str().to_string(), v.to_str().unwrap_or("").to_string())
                                })
                                .collect();
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes().to_vec())
                                .unwrap_or_default();
                            let status = plan.lock().expect("plan").pop_front().unwrap_or(200);
                            got.lock().expect("got").push(Received {
                                path,
                                headers,
                                body,
                                status,
                            });
                            let mut r = Response::new(Full::new(Bytes::from_static(b"ok")));
                            *r.status_mut() =
                                StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
                            Ok::<_, Infallible>(r)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        server
    }

    /// `http://ADDR/hook`.
    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// Every request so far.
    pub fn received(&self) -> Vec<Received> {
        self.got.lock().expect("got").clone()
    }

    /// Waits (up to `limit`) until `n` requests arrived; returns them all.
    pub async fn wait_for(&self, n: usize, limit: Duration) -> Vec<Received> {
        let end = Instant::now() + limit;
        loop {
            let got = self.received();
            if got.len() >= n || Instant::now() >= end {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
