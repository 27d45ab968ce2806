//! Who may call what.
//!
//! Admin-facing calls carry an OIDC access token; its groups give a role.
//! Sidecar-facing calls carry a per-sidecar credential `wks_<id>_<secret>`
//! issued by `CreateSidecarCredential`: only the SHA-256 of the secret is
//! stored, compared in constant time, and each credential is scoped to the
//! connections it serves.

use std::sync::Arc;

use aws_lc_rs::digest;
use subtle::ConstantTimeEq;
use tonic::Status;
use tonic::metadata::MetadataMap;
use wicket_core::Principal;
use wicket_identity::{AuthError, Validator};
use wicket_store::{SidecarRecord, Store};

/// What an admin-facing call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// Read policy, connections, sessions, audit and approvals.
    Read,
    /// Approve or deny held commands.
    Decide,
    /// Change policy, terminate sessions, revoke principals, manage sidecars.
    Admin,
}

/// Group names of the three roles.
#[derive(Debug, Clone)]
pub struct Roles {
    /// Everything.
    pub admin: String,
    /// Read plus decide.
    pub approver: String,
    /// Read only.
    pub auditor: String,
}

/// Checks callers.
pub struct Authenticator {
    validator: Arc<Validator>,
    roles: Roles,
    store: Arc<dyn Store>,
}

/// Whether the call carries a sidecar credential (`wks_…`) rather than a
/// principal's token.
pub fn carries_sidecar_credential(md: &MetadataMap) -> bool {
    bearer(md).is_ok_and(|t| t.starts_with("wks_"))
}

fn bearer(md: &MetadataMap) -> Result<&str, Status> {
    let value = md
        .get("authorization")
        .ok_or_else(|| Status::unauthenticated("missing `authorization: Bearer <token>` metadata"))?
        .to_str()
        .map_err(|_| Status::unauthenticated("malformed authorization metadata"))?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or_else(|| {
            Status::unauthenticated("authorization metadata must be `Bearer <token>`")
        })?;
    Ok(token.trim())
}

/// SHA-256 of a sidecar secret, hex.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(digest::digest(&digest::SHA256, secret.as_bytes()))
}

impl Authenticator {
    /// A new authenticator.
    pub fn new(validator: Arc<Validator>, roles: Roles, store: Arc<dyn Store>) -> Self {
        Authenticator {
            validator,
            roles,
            store,
        }
    }

    /// Authenticates an admin-facing call and checks its permission.
    pub async fn admin(&self, md: &MetadataMap, need: Permission) -> Result<Principal, Status> {
        let p = self.user(md).await?.principal;
        self.check(&p, need)?;
        Ok(p)
    }

    /// Whether `p` holds a role that allows `need`.
    pub fn check(&self, p: &Principal, need: Permission) -> Result<(), Status> {
        let r = &self.roles;
        let ok = p.in_group(&r.admin)
            || match need {
                Permission::Read => p.in_group(&r.auditor) || p.in_group(&r.approver),
                Permission::Decide => p.in_group(&r.approver),
                Permission::Admin => false,
            };
        if !ok {
            let groups = match need {
                Permission::Read => format!("{}, {} or {}", r.admin, r.approver, r.auditor),
                Permission::Decide => format!("{} or {}", r.admin, r.approver),
                Permission::Admin => r.admin.clone(),
            };
            return Err(Status::permission_denied(format!(
                "{} is not allowed to do this (requires membership of {groups})",
                p.label()
            )));
        }
        Ok(())
    }

    /// Authenticates any signed-in, unrevoked principal (no role needed).
    pub async fn user(&self, md: &MetadataMap) -> Result<wicket_identity::Identity, Status> {
        self.user_token(bearer(md)?).await
    }

    /// [`Authenticator::user`] for a token already taken from its carrier
    /// (the console's session cookie).
    pub async fn user_token(&self, token: &str) -> Result<wicket_identity::Identity, Status> {
        if token.starts_with("wks_") {
            return Err(Status::permission_denied(
                "sidecar credentials cannot call the admin API",
            ));
        }
        let identity = self.validator.validate(token).await.map_err(|e| match e {
            AuthError::Unavailable(ref detail) => {
                tracing::warn!(%detail, "token validation: identity provider unavailable");
                Status::unavailable(e.to_string())
            }
            other => Status::unauthenticated(other.to_string()),
        })?;
        let p = &identity.principal;
        let revoked = self
            .store
            .is_revoked(&p.issuer, &p.subject, chrono::Utc::now())
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "revocation lookup failed");
                Status::unavailable("storage unavailable")
            })?;
        if revoked {
            return Err(Status::permission_denied(format!(
                "{} has been revoked",
                p.label()
            )));
        }
        Ok(identity)
    }

    /// Authenticates a sidecar and, when given, checks it serves `connection`.
    pub async fn sidecar(
        &self,
        md: &MetadataMap,
        connection: Option<&str>,
    ) -> Result<SidecarRecord, Status> {
        let token = bearer(md)?;
        let invalid = || Status::unauthenticated("invalid sidecar credential");
        let rest = token.strip_prefix("wks_").ok_or_else(invalid)?;
        let (id, secret) = rest.split_once('_').ok_or_else(invalid)?;
        let record = self
            .store
            .get_sidecar(id)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "sidecar lookup failed");
                Status::unavailable("storage unavailable")
            })?
            .ok_or_else(invalid)?;
        let given = hash_secret(secret);
        if !bool::from(given.as_bytes().ct_eq(record.secret_hash.as_bytes())) || record.revoked {
            return Err(invalid());
        }
        if let Some(c) = connection
            && !record.connections.iter().any(|x| x == c || x == "*")
        {
            return Err(Status::permission_denied(format!(
                "sidecar `{}` is not registered for connection `{c}`",
                record.name
            )));
        }
        Ok(record)
    }
}
