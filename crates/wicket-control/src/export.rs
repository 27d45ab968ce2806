//! Audit export: every stored audit event, in the order it was stored,
//! streamed to a JSON Lines HTTP endpoint and/or as OpenTelemetry log
//! records over OTLP/gRPC.
//!
//! Each destination has a cursor in the database (`export_cursors`): the
//! exporter reads the events after it, sends a batch, and moves the cursor
//! only once the destination accepted it, so delivery is at least once
//! (a crash or a lost lease re-sends the last batch; receivers dedupe by
//! event id). It reads at its own pace from what is already stored, so a
//! slow or dead destination delays the export and never the sidecars'
//! audit stream. With several replicas, one holds each destination's lease
//! (30 s, renewed as it goes) and the others stand by.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::watch;
use wicket_core::AuditEvent;
use wicket_store::Store;

use crate::otlp;

/// How long a replica's hold on a destination lasts without renewal.
const LEASE: Duration = Duration::from_secs(30);
/// How long a hole in the positions is waited for before it is taken as
/// a rolled-back transaction (PostgreSQL assigns positions at insert, so a
/// later transaction can commit first).
const HOLE_GRACE: Duration = Duration::from_secs(10);
/// Longest pause between retries.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Where events go.
pub enum Sink {
    /// `POST` of `application/x-ndjson` batches.
    Jsonl {
        /// The client.
        http: reqwest::Client,
        /// The endpoint.
        url: String,
        /// A bearer token, when the endpoint wants one.
        token: Option<String>,
    },
    /// OTLP/gRPC logs.
    Otlp {
        /// A lazily connected channel to the collector.
        channel: tonic::transport::Channel,
    },
}

impl Sink {
    /// A JSON Lines sink.
    pub fn jsonl(url: &str, token: Option<String>) -> Result<Sink, String> {
        let parsed =
            url::Url::parse(url).map_err(|e| format!("invalid export URL `{url}`: {e}"))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(format!(
                "the JSON Lines export URL must be http(s): `{url}`"
            ));
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("export http client: {e}"))?;
        Ok(Sink::Jsonl {
            http,
            url: url.to_string(),
            token,
        })
    }

    /// An OTLP/gRPC sink (`http://` or `https://` with the system's roots).
    pub fn otlp(endpoint: &str) -> Result<Sink, String> {
        let mut ep = tonic::transport::Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| format!("invalid OTLP endpoint `{endpoint}`: {e}"))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30));
        if endpoint.starts_with("https://") {
            ep = ep
                .tls_config(tonic::transport::ClientTlsConfig::new().with_native_roots())
                .map_err(|e| format!("OTLP TLS: {e}"))?;
        } else if !endpoint.starts_with("http://") {
            return Err(format!("the OTLP endpoint must be http(s): `{endpoint}`"));
        }
        Ok(Sink::Otlp {
            channel: ep.connect_lazy(),
        })
    }

    /// Delivers one batch (`(position, stored event)`), or says why not.
    async fn send(&self, batch: &[(i64, String)]) -> Result<(), String> {
        match self {
            Sink::Jsonl { http, url, token } => {
                let mut body = String::with_capacity(batch.iter().map(|(_, b)| b.len() + 1).sum());
                for (_, b) in batch {
                    body.push_str(b);
                    body.push('\n');
                }
                let (first, last) = (batch[0].0, batch[batch.len() - 1].0);
                let mut req = http
                    .post(url)
                    .header("content-type", "application/x-ndjson")
                    .header("wicket-export-positions", format!("{first}-{last}"))
                    .body(body);
                if let Some(t) = token {
                    req = req.bearer_auth(t);
                }
                let resp = req
                    .send()
                    .await
                    .map_err(|e| format!("cannot reach it: {e}"))?;
                if resp.status().is_success() {
                    Ok(())
                } else {
                    Err(format!("it answered HTTP {}", resp.status()))
                }
            }
            Sink::Otlp { channel } => {
                let observed = Utc::now().timestamp_nanos_opt().unwrap_or(0).max(0) as u64;
                let records = batch
                    .iter()
                    .map(
                        |(_, stored)| match serde_json::from_str::<AuditEvent>(stored) {
                            Ok(e) => otlp::log_record(&e, stored, observed),
                            // Never dropped: sent as it is stored.
                            Err(_) => otlp::LogRecord {
                                observed_time_unix_nano: observed,
                                severity_number: 13,
                                severity_text: "WARN".into(),
                                body: Some(otlp::AnyValue {
                                    value: Some(otlp::any_value::Value::StringValue(
                                        stored.clone(),
                                    )),
                                }),
                                event_name: "wicket.audit.unreadable".into(),
                                ..Default::default()
                            },
                        },
                    )
                    .collect();
                let mut grpc = tonic::client::Grpc::new(channel.clone());
                grpc.ready()
                    .await
                    .map_err(|e| format!("cannot reach it: {e}"))?;
                let codec = tonic_prost::ProstCodec::<
                    otlp::ExportLogsServiceRequest,
                    otlp::ExportLogsServiceResponse,
                >::default();
                let resp = grpc
                    .unary(
                        tonic::Request::new(otlp::request(records)),
                        tonic::codegen::http::uri::PathAndQuery::from_static(otlp::EXPORT_PATH),
                        codec,
                    )
                    .await
                    .map_err(|s| format!("it answered {:?}: {}", s.code(), s.message()))?;
                if let Some(p) = &resp.get_ref().partial_success
                    && p.rejected_log_records > 0
                {
                    // Permanent by the protocol: retrying would not help.
                    tracing::warn!(
                        rejected = p.rejected_log_records,
                        error = %p.error_message,
                        "the OTLP collector rejected part of an audit export batch"
                    );
                }
                Ok(())
            }
        }
    }
}

/// One destination's exporter.
pub struct Exporter {
    /// Its cursor's name (`jsonl`, `otlp`).
    pub name: &'static str,
    /// Where to.
    pub sink: Sink,
    /// Events per batch.
    pub batch: u32,
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn lease_end() -> i64 {
    now_ms() + LEASE.as_millis() as i64
}

/// How many of `rows` (after `position`) may go now: the run with no hole
/// in the positions, or, when `skip_hole`, past one hole at the front.
fn ready(position: i64, rows: &[(i64, String)], skip_hole: bool) -> usize {
    let mut expect = position + 1;
    for (n, (pos, _)) in rows.iter().enumerate() {
        if *pos != expect && !(n == 0 && skip_hole) {
            return n;
        }
        expect = pos + 1;
    }
    rows.len()
}

impl Exporter {
    /// Runs forever: holds the lease when it can, and exports.
    /// `appended` ticks when events were stored (so the export follows
    /// within milliseconds rather than at the next poll).
    pub async fn run(
        self,
        store: Arc<dyn Store>,
        owner: String,
        mut appended: watch::Receiver<u64>,
    ) {
        let mut backoff = Duration::from_millis(500);
        loop {
            let position = match store
                .export_claim(self.name, &owner, now_ms(), lease_end())
                .await
            {
                Ok(Some(p)) => p,
                Ok(None) => {
                    // Another replica exports; stand by.
                    tokio::time::sleep(LEASE / 3).await;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(export = self.name, error = %e, "cannot read the export cursor");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            tracing::info!(export = self.name, position, "exporting audit events");
            self.export_while_leased(&store, &owner, position, &mut appended)
                .await;
        }
    }

    /// Renews the lease when a third of it has passed since `renewed`;
    /// `false` when another replica holds it now. A store error keeps
    /// going (the lease runs on; the next renewal tries again).
    async fn keep_lease(
        &self,
        store: &Arc<dyn Store>,
        owner: &str,
        position: i64,
        renewed: &mut Instant,
    ) -> bool {
        if renewed.elapsed() < LEASE / 3 {
            return true;
        }
        match store
            .export_advance(self.name, owner, position, 0, lease_end())
            .await
        {
            Ok(true) => {
                *renewed = Instant::now();
                true
            }
            Ok(false) => false,
            Err(e) => {
                tracing::warn!(export = self.name, error = %e, "cannot renew the export lease");
                true
            }
        }
    }

    /// Exports from `position` until the lease is lost.
    async fn export_while_leased(
        &self,
        store: &Arc<dyn Store>,
        owner: &str,
        mut position: i64,
        appended: &mut watch::Receiver<u64>,
    ) {
        let mut hole_since: Option<(i64, Instant)> = None;
        let mut renewed = Instant::now();
        let mut backoff = Duration::from_millis(500);
        loop {
            let rows = match store.events_after(position, self.batch).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(export = self.name, error = %e, "cannot read audit events to export");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            let skip =
                matches!(hole_since, Some((p, t)) if p == position && t.elapsed() >= HOLE_GRACE);
            let n = ready(position, &rows, skip);
            if n == 0 {
                if !rows.is_empty() && hole_since.is_none_or(|(p, _)| p != position) {
                    hole_since = Some((position, Instant::now()));
                }
                // Nothing to send: keep the lease, wait for news.
                if !self.keep_lease(store, owner, position, &mut renewed).await {
                    return;
                }
                let wait = if rows.is_empty() {
                    Duration::from_secs(1)
                } else {
                    Duration::from_millis(200)
                };
                let _ = tokio::time::timeout(wait, appended.changed()).await;
                continue;
            }
            if skip {
                tracing::warn!(
                    export = self.name,
                    after = position,
                    next = rows[0].0,
                    "skipping a gap in audit positions (a rolled-back write)"
                );
            }
            let batch = &rows[..n];
            let mut attempt = 0u32;
            loop {
                match self.sink.send(batch).await {
                    Ok(()) => break,
                    Err(e) => {
                        attempt += 1;
                        if attempt == 1 || attempt.is_multiple_of(10) {
                            tracing::warn!(export = self.name, attempt, error = %e, "audit export batch not delivered; retrying");
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        if !self.keep_lease(store, owner, position, &mut renewed).await {
                            return;
                        }
                    }
                }
            }
            backoff = Duration::from_millis(500);
            let last = batch[n - 1].0;
            match store
                .export_advance(self.name, owner, last, n as u64, lease_end())
                .await
            {
                Ok(true) => {
                    position = last;
                    renewed = Instant::now();
                    hole_since = None;
                }
                // Another replica took over; it re-sends from the stored
                // cursor (at least once).
                Ok(false) => return,
                Err(e) => {
                    tracing::warn!(export = self.name, error = %e, "cannot store the export cursor; the batch will be sent again");
                    tokio::time::sleep(backoff).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ready;

    fn rows(p: &[i64]) -> Vec<(i64, String)> {
        p.iter().map(|p| (*p, String::new())).collect()
    }

    #[test]
    fn holes_hold_the_export_until_skipped() {
        assert_eq!(ready(0, &rows(&[1, 2, 3]), false), 3);
        assert_eq!(ready(0, &rows(&[1, 2, 4, 5]), false), 2);
        assert_eq!(ready(2, &rows(&[4, 5]), false), 0);
        assert_eq!(ready(2, &rows(&[4, 5, 7]), true), 2);
        assert_eq!(ready(0, &rows(&[]), true), 0);
    }
}
