//! The PostgreSQL gate.
//!
//! A client (psql, any driver) connects to `wicket-pg` as to PostgreSQL and
//! sends its OIDC access token as the password. The gate validates it, checks
//! the grant, logs in upstream with credentials only it holds, and relays the
//! wire protocol, classifying every statement with the real PostgreSQL parser
//! and deciding it by policy before it reaches the server.
//!
//! - `codec`: framing, bounded before allocation.
//! - `upstream`: the sidecar's own login (SCRAM-SHA-256, md5, cleartext).
//! - `classify`: `pg_query` classification, objects, flags, risk.
//! - `reasoning`: sqlcommenter comments, `SET wicket.reasoning`, `PGOPTIONS`.
//! - `proxy`: startup, authentication and the gated relay.

pub mod classify;
pub mod codec;
pub mod mask;
pub mod proxy;
pub mod reasoning;
pub mod results;
pub mod strict;
pub mod upstream;

use std::sync::Arc;

use tokio::net::TcpListener;

pub use proxy::{PgConfig, PgGate};

/// Accepts clients on `listener` until `shutdown` resolves.
pub async fn serve(
    gate: Arc<PgGate>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    tokio::spawn(gate.clone().handle(stream, peer));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            _ = &mut shutdown => return,
        }
    }
}
