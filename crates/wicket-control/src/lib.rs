//! The Wicket control service.
//!
//! Stores policy, audit events, approvals and sessions ([`wicket_store`]),
//! pushes per-connection policy bundles to sidecars, and serves the admin
//! API the `wicket` CLI uses. Admin calls carry OIDC access tokens
//! ([`auth::Authenticator`]); sidecars carry per-sidecar credentials.

pub mod access;
pub mod admin;
pub mod audit;
pub mod auth;
pub mod config;
pub mod console;
pub mod export;
pub mod notary;
pub mod notify;
pub mod otlp;
pub mod recordings;
pub mod sidecar;
pub mod ssh_ca;
pub mod state;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use wicket_proto::v1::access_service_server::AccessServiceServer;
use wicket_proto::v1::approval_admin_service_server::ApprovalAdminServiceServer;
use wicket_proto::v1::approval_gate_service_server::ApprovalGateServiceServer;
use wicket_proto::v1::audit_admin_service_server::AuditAdminServiceServer;
use wicket_proto::v1::audit_service_server::AuditServiceServer;
use wicket_proto::v1::bundle_service_server::BundleServiceServer;
use wicket_proto::v1::connection_admin_service_server::ConnectionAdminServiceServer;
use wicket_proto::v1::credential_service_server::CredentialServiceServer;
use wicket_proto::v1::policy_admin_service_server::PolicyAdminServiceServer;
use wicket_proto::v1::principal_admin_service_server::PrincipalAdminServiceServer;
use wicket_proto::v1::session_admin_service_server::SessionAdminServiceServer;
use wicket_proto::v1::sidecar_admin_service_server::SidecarAdminServiceServer;
use wicket_proto::v1::trace_service_server::TraceServiceServer;

pub use config::Config;

/// Discovers the OIDC issuer, retrying while it comes up.
async fn validator(cfg: &Config) -> Result<wicket_identity::Validator, String> {
    let mut icfg = wicket_identity::Config::new(cfg.oidc_issuer.clone(), cfg.oidc_audience.clone());
    icfg.groups_claim = cfg.groups_claim.clone();
    icfg.agent_rules = cfg
        .agent_rules
        .iter()
        .map(|r| r.parse())
        .collect::<Result<_, _>>()?;
    wicket_identity::Validator::discover_with_retry(icfg, 16).await
}

/// Runs the service on `listener` until `shutdown` resolves.
pub async fn run(
    cfg: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let store = wicket_store::open(&cfg.database_url)
        .await
        .map_err(|e| format!("cannot open database: {e}"))?;
    let validator = Arc::new(validator(&cfg).await?);
    let roles = auth::Roles {
        admin: cfg.admin_group.clone(),
        approver: cfg.approver_group.clone(),
        auditor: cfg.auditor_group.clone(),
    };
    let authn = auth::Authenticator::new(validator, roles, store.clone());
    let ssh_ca = ssh_ca::SshCa::load(store.as_ref(), cfg.ssh_ca_key_file.as_deref()).await?;
    let notary = notary::Notary::load(store.as_ref(), cfg.audit_key_file.as_deref()).await?;
    let exporters = cfg.exporters()?;
    let notifier = notify::Notifier::start(cfg.notifications()?)?;
    let control = state::Control::new(
        store,
        authn,
        ssh_ca,
        notary,
        cfg.recordings()?,
        cfg.ssh_cert_max_seconds,
        notifier,
    )
    .await?;
    if let Some(path) = &cfg.policy_file {
        let doc = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read policy file {}: {e}", path.display()))?;
        let name = path.display().to_string();
        match control
            .apply_policy(&doc, &name, "wicket-control --policy-file")
            .await
        {
            Ok(Ok((version, _, changed))) => {
                tracing::info!(version, changed, file = %name, "policy file loaded")
            }
            Ok(Err(errors)) => return Err(format!("policy file refused:\n{errors}")),
            Err(status) => return Err(format!("cannot store policy: {}", status.message())),
        }
    }
    if let Some(path) = &cfg.sidecar_credentials_file {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read sidecar credentials file {name}: {e}"))?;
        let list = config::provisioned_sidecars(&text, &name)?;
        let mut changed = 0;
        for s in &list {
            if control
                .store
                .put_sidecar(s)
                .await
                .map_err(|e| format!("cannot store sidecar credential `{}`: {e}", s.name))?
            {
                changed += 1;
            }
        }
        tracing::info!(file = %name, credentials = list.len(), changed, "sidecar credentials loaded");
    }
    tokio::spawn(control.clone().upkeep(Duration::from_secs(5)));
    tokio::spawn(control.clone().follow_replicas());
    // 0 turns a periodic task off (then `wicket audit retention` and
    // `wicket audit root` run it on demand).
    if cfg.retention_interval > 0 {
        tokio::spawn(
            control
                .clone()
                .retention(Duration::from_secs(u64::from(cfg.retention_interval))),
        );
    }
    let owner = uuid::Uuid::new_v4().simple().to_string();
    for exporter in exporters {
        tokio::spawn(exporter.run(
            control.store.clone(),
            owner.clone(),
            control.appended.subscribe(),
        ));
    }
    if cfg.audit_root_interval > 0 {
        tokio::spawn(
            control
                .clone()
                .audit_roots(Duration::from_secs(u64::from(cfg.audit_root_interval))),
        );
    }
    if let (Some(console), Some(addr)) = (cfg.console()?, cfg.console_listen) {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen for the console on {addr}: {e}"))?;
        console::spawn(control.clone(), console, listener).await?;
    }

    let max = cfg.max_message_bytes;
    let side = sidecar::SidecarApi {
        control: control.clone(),
    };
    let adm = admin::AdminApi {
        control: control.clone(),
    };
    let (health, health_svc) = tonic_health::server::health_reporter();
    health
        .set_serving::<BundleServiceServer<sidecar::SidecarApi>>()
        .await;
    health
        .set_serving::<AuditServiceServer<sidecar::SidecarApi>>()
        .await;
    health
        .set_serving::<ApprovalGateServiceServer<sidecar::SidecarApi>>()
        .await;
    health
        .set_serving::<TraceServiceServer<sidecar::SidecarApi>>()
        .await;
    health
        .set_serving::<ConnectionAdminServiceServer<admin::AdminApi>>()
        .await;
    health
        .set_serving::<PolicyAdminServiceServer<admin::AdminApi>>()
        .await;
    health
        .set_serving::<AccessServiceServer<admin::AdminApi>>()
        .await;
    health
        .set_serving::<ApprovalAdminServiceServer<admin::AdminApi>>()
        .await;
    health
        .set_serving::<SessionAdminServiceServer<admin::AdminApi>>()
        .await;
    health
        .set_serving::<AuditAdminServiceServer<admin::AdminApi>>()
        .await;
    health
        .set_serving::<PrincipalAdminServiceServer<admin::AdminApi>>()
        .await;
    health
        .set_serving::<SidecarAdminServiceServer<admin::AdminApi>>()
        .await;
    health
        .set_serving::<CredentialServiceServer<admin::AdminApi>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(wicket_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| format!("reflection: {e}"))?;

    /// HTTP/2 receive window per stream (a connection has twice this).
    const REPORT_WINDOW: u32 = 2 * 1024 * 1024;

    macro_rules! limited {
        ($server:ident, $api:expr) => {
            $server::new($api.clone())
                .max_decoding_message_size(max)
                .max_encoding_message_size(max.max(16 * 1024 * 1024))
        };
    }

    let mut builder = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        // A sidecar's audit report (up to a MiB) arrives without waiting
        // for window updates: HTTP/2's default 64 KiB windows made every
        // full report stall three or four times on the round trip.
        .initial_stream_window_size(Some(REPORT_WINDOW))
        .initial_connection_window_size(Some(2 * REPORT_WINDOW))
        .concurrency_limit_per_connection(256);
    if let (Some(cert), Some(key)) = (&cfg.tls_cert, &cfg.tls_key) {
        let cert =
            std::fs::read(cert).map_err(|e| format!("cannot read {}: {e}", cert.display()))?;
        let key = std::fs::read(key).map_err(|e| format!("cannot read {}: {e}", key.display()))?;
        builder = builder
            .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
            .map_err(|e| format!("TLS: {e}"))?;
    }
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(%addr, database = %cfg.database_url.split('@').next_back().unwrap_or(""), issuer = %cfg.oidc_issuer, "wicket-control serving");
    builder
        .add_service(health_svc)
        .add_service(reflection)
        .add_service(limited!(BundleServiceServer, side))
        .add_service(limited!(AuditServiceServer, side))
        .add_service(limited!(ApprovalGateServiceServer, side))
        .add_service(limited!(TraceServiceServer, side))
        .add_service(limited!(ConnectionAdminServiceServer, adm))
        .add_service(limited!(PolicyAdminServiceServer, adm))
        .add_service(limited!(ApprovalAdminServiceServer, adm))
        .add_service(limited!(AccessServiceServer, adm))
        .add_service(limited!(SessionAdminServiceServer, adm))
        .add_service(limited!(AuditAdminServiceServer, adm))
        .add_service(limited!(PrincipalAdminServiceServer, adm))
        .add_service(limited!(SidecarAdminServiceServer, adm))
        .add_service(limited!(CredentialServiceServer, adm))
        // Without TCP_NODELAY a stream's small frames (an approval
        // decision after its pending note, an RPC's trailers) wait for the
        // peer's delayed ACK: 40 ms each on Linux. `tcp_nodelay` on the
        // builder covers only listeners tonic binds itself.
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
        .map_err(|e| format!("server: {e}"))
}
