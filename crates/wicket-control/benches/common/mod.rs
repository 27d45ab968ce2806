//! What the control service's benchmarks share: a replica on a database,
//! trusting the bench's identity provider, with a policy and a sidecar
//! credential.

use tonic::transport::Channel;
use wicket_proto::v1;
use wicket_testkit::idp::{TestIdp, TokenSpec};
use wicket_teststack::{auth, connect, spawn_control};

/// Starts a control replica on `database` trusting `idp`.
pub async fn replica(idp: &TestIdp, database: &str) -> Channel {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let cfg = wicket_control::Config::defaults(&idp.issuer(), database, addr);
    spawn_control(cfg, listener);
    connect(&addr.to_string()).await
}

/// Applies `policy` on `channel` and returns a sidecar credential for
/// connection `orders-db`.
pub async fn prepare(idp: &TestIdp, channel: &Channel, policy: &str) -> String {
    let admin = idp.mint(&TokenSpec::human("root", &["wicket-admins"]));
    v1::policy_admin_service_client::PolicyAdminServiceClient::new(channel.clone())
        .apply_policy(auth(
            v1::ApplyPolicyRequest {
                document: policy.into(),
                source_name: "bench".into(),
            },
            &admin,
        ))
        .await
        .expect("policy");
    v1::sidecar_admin_service_client::SidecarAdminServiceClient::new(channel.clone())
        .create_sidecar_credential(auth(
            v1::CreateSidecarCredentialRequest {
                name: "bench".into(),
                connections: vec!["orders-db".into()],
            },
            &admin,
        ))
        .await
        .expect("sidecar credential")
        .into_inner()
        .token
}
