//! OpenSSH user certificates as Wicket credentials.
//!
//! `wicket ssh login` has the control service sign the user's public key
//! after checking their OIDC token. The certificate carries the verified
//! principal in the `wicket-principal@wicket.dev` extension (JSON), lives no
//! longer than the token it was issued for, and names the user's subject as
//! its key id. A gate that trusts the CA turns the certificate back into an
//! identity, with no round trip to the identity provider; its expiry ends
//! the session as a token's would.

use chrono::{DateTime, Utc};
use russh::keys::{Certificate, PublicKey};
use wicket_core::Principal;
use wicket_identity::Identity;

/// The extension that carries the principal (JSON).
pub use wicket_core::SSH_PRINCIPAL_EXTENSION as PRINCIPAL_EXTENSION;

/// Checks a user certificate against the trusted CA keys at `now` (unix
/// seconds) and returns the identity it carries.
pub fn verify(cert: &Certificate, cas: &[PublicKey], now: u64) -> Result<Identity, String> {
    if cas.is_empty() {
        return Err("this gate trusts no certificate authority".into());
    }
    let fingerprints: Vec<_> = cas
        .iter()
        .map(|k| k.fingerprint(russh::keys::HashAlg::Sha256))
        .collect();
    cert.validate_at(now, fingerprints.iter())
        .map_err(|e| format!("certificate not valid: {e}"))?;
    if cert.cert_type() != russh::keys::ssh_key::certificate::CertType::User {
        return Err("not a user certificate".into());
    }
    let json = cert
        .extensions()
        .get(PRINCIPAL_EXTENSION)
        .ok_or("the certificate carries no Wicket principal")?;
    let principal: Principal = serde_json::from_str(json)
        .map_err(|e| format!("the certificate's principal is malformed: {e}"))?;
    if principal.subject.is_empty() || principal.issuer.is_empty() {
        return Err("the certificate's principal has no subject or issuer".into());
    }
    let expires_at =
        DateTime::<Utc>::from_timestamp(cert.valid_before().min(i64::MAX as u64) as i64, 0)
            .ok_or("the certificate's expiry is out of range")?;
    Ok(Identity {
        principal,
        expires_at,
        claims: serde_json::Value::Null,
    })
}
