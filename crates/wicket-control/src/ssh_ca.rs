//! The SSH user certificate authority: signs the public keys of signed-in
//! principals (`wicket ssh login`) so a person's plain `ssh` reaches the SSH
//! gate without pasting a token.
//!
//! The CA key is Ed25519. It comes from `--ssh-ca-key-file`, or is created
//! once and kept in the database (`keys` table), so every replica signs
//! with the same key. Its public half travels to the SSH gates in their
//! policy bundles.

use std::path::Path;

use chrono::{DateTime, Utc};
use ssh_key::certificate::{Builder, CertType};
use ssh_key::private::Ed25519Keypair;
use ssh_key::{LineEnding, PrivateKey, PublicKey};
use tonic::Status;
use wicket_core::Principal;
use wicket_store::Store;

/// The extension that carries the principal (JSON).
pub use wicket_core::SSH_PRINCIPAL_EXTENSION as PRINCIPAL_EXTENSION;

/// The CA.
pub struct SshCa {
    key: PrivateKey,
    public: String,
}

impl std::fmt::Debug for SshCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshCa")
            .field("public", &self.public)
            .finish()
    }
}

fn random<const N: usize>() -> Result<[u8; N], String> {
    let mut b = [0u8; N];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| "no random source".to_string())?;
    Ok(b)
}

/// An unencrypted OpenSSH Ed25519 private key from `file`, or else the
/// one kept in the store under `name` (created there once, so replicas
/// share it). `what` names it in errors.
pub(crate) async fn ed25519_key(
    store: &dyn Store,
    name: &str,
    file: Option<&Path>,
    what: &str,
) -> Result<PrivateKey, String> {
    let pem = match file {
        Some(f) => std::fs::read_to_string(f)
            .map_err(|e| format!("cannot read the {what} {}: {e}", f.display()))?,
        None => {
            let fresh = PrivateKey::from(Ed25519Keypair::from_seed(&random::<32>()?))
                .to_openssh(LineEnding::LF)
                .map_err(|e| format!("cannot encode an {what}: {e}"))?;
            store
                .key_or_insert(name, &fresh)
                .await
                .map_err(|e| format!("cannot store the {what}: {e}"))?
        }
    };
    let key = PrivateKey::from_openssh(pem.as_bytes())
        .map_err(|e| format!("the {what} does not parse: {e}"))?;
    if key.is_encrypted() {
        return Err(format!("the {what} is encrypted; give an unencrypted key"));
    }
    if key.key_data().ed25519().is_none() {
        return Err(format!("the {what} must be an Ed25519 key"));
    }
    Ok(key)
}

impl SshCa {
    /// Loads the CA key from `file`, or from the store (creating it there once).
    pub async fn load(store: &dyn Store, file: Option<&Path>) -> Result<SshCa, String> {
        let key = ed25519_key(store, "ssh_user_ca", file, "SSH CA key").await?;
        let public = key
            .public_key()
            .to_openssh()
            .map_err(|e| format!("cannot encode the SSH CA public key: {e}"))?;
        Ok(SshCa { key, public })
    }

    /// The CA's public key, OpenSSH one-line form.
    pub fn public(&self) -> &str {
        &self.public
    }

    /// Signs `public_key` for `principal`, valid from a minute ago until
    /// `until` (the caller's token expiry) or `max_seconds` from now,
    /// whichever comes first.
    pub fn sign(
        &self,
        public_key: &str,
        principal: &Principal,
        until: DateTime<Utc>,
        max_seconds: u64,
    ) -> Result<(String, DateTime<Utc>), Status> {
        if public_key.len() > 16 * 1024 {
            return Err(Status::invalid_argument("public key too long"));
        }
        let key = PublicKey::from_openssh(public_key.trim()).map_err(|e| {
            Status::invalid_argument(format!(
                "not an OpenSSH public key (`ssh-ed25519 AAAA…`): {e}"
            ))
        })?;
        let now = Utc::now();
        let cap = now + chrono::Duration::seconds(max_seconds.min(30 * 86_400) as i64);
        let until = until.min(cap);
        if until <= now {
            return Err(Status::unauthenticated("the token has expired"));
        }
        let after = (now.timestamp() - 60).max(0) as u64;
        let before = until.timestamp().max(0) as u64;
        let internal = |e: ssh_key::Error| {
            tracing::error!(error = %e, "cannot sign an SSH certificate");
            Status::internal("cannot sign the certificate")
        };
        let nonce = random::<16>().map_err(Status::internal)?;
        let mut b = Builder::new(nonce.to_vec(), key.key_data().clone(), after, before)
            .map_err(internal)?;
        let principal_json =
            serde_json::to_string(principal).map_err(|e| Status::internal(e.to_string()))?;
        b.serial(u64::from_be_bytes(random::<8>().map_err(Status::internal)?))
            .map_err(internal)?
            .cert_type(CertType::User)
            .map_err(internal)?
            .key_id(format!("{} via wicket", principal.label()))
            .map_err(internal)?
            .valid_principal(principal.subject.clone())
            .map_err(internal)?
            .extension("permit-port-forwarding", "")
            .map_err(internal)?
            .extension("permit-pty", "")
            .map_err(internal)?
            .extension(PRINCIPAL_EXTENSION, principal_json)
            .map_err(internal)?;
        let cert = b.sign(&self.key).map_err(internal)?;
        let text = cert.to_openssh().map_err(internal)?;
        Ok((text, until))
    }
}
