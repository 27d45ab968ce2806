//! The audit notary: signs session seals and roots (see
//! `wicket_core::evidence`) with the control service's Ed25519 audit key.
//!
//! The key comes from `--audit-key-file` (an OpenSSH Ed25519 private key),
//! or is created once and kept in the database, so every replica signs
//! with the same key. Auditors pin its public half (`wicket audit key`) and
//! verify records with it; signatures are what a database writer cannot
//! forge.

use std::path::Path;

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use chrono::Utc;
use wicket_core::evidence::{self, Leaf, Root, Seal};
use wicket_store::{Store, StoreError};

/// Sessions per root at most; more make several roots in one run.
const LEAVES_PER_ROOT: u32 = 50_000;

/// The signer.
pub struct Notary {
    pair: Ed25519KeyPair,
    openssh: String,
    key_id: String,
}

impl std::fmt::Debug for Notary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notary")
            .field("key_id", &self.key_id)
            .finish()
    }
}

impl Notary {
    /// Loads the audit key from `file`, or from the store (creating it
    /// there once).
    pub async fn load(store: &dyn Store, file: Option<&Path>) -> Result<Notary, String> {
        let key = crate::ssh_ca::ed25519_key(store, "audit_signing", file, "audit key").await?;
        let seed = key
            .key_data()
            .ed25519()
            .map(|k| k.private.to_bytes())
            .ok_or("the audit key must be an Ed25519 key")?;
        let pair = Ed25519KeyPair::from_seed_unchecked(&seed)
            .map_err(|_| "the audit key is not a valid Ed25519 key".to_string())?;
        let openssh = key
            .public_key()
            .to_openssh()
            .map_err(|e| format!("cannot encode the audit public key: {e}"))?;
        let key_id = evidence::key_id(pair.public_key().as_ref());
        Ok(Notary {
            pair,
            openssh,
            key_id,
        })
    }

    /// The public key, OpenSSH one-line form.
    pub fn public_openssh(&self) -> &str {
        &self.openssh
    }

    /// The public key's raw 32 bytes.
    pub fn public_raw(&self) -> &[u8] {
        self.pair.public_key().as_ref()
    }

    /// The key's short id.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Seals a session's chain as it stands (a later, longer seal replaces
    /// it). `None` for an unknown session or an empty chain.
    pub async fn seal(
        &self,
        store: &dyn Store,
        session_id: &str,
    ) -> Result<Option<Seal>, StoreError> {
        let Some((len, head)) = store.chain_head(session_id).await? else {
            return Ok(None);
        };
        if len == 0 {
            return Ok(None);
        }
        let sealed_at_ms = Utc::now().timestamp_millis();
        let msg = evidence::seal_message(session_id, len, &head, sealed_at_ms);
        let seal = Seal {
            len,
            head,
            sealed_at_ms,
            signature: self.pair.sign(&msg).as_ref().to_vec(),
            key_id: self.key_id.clone(),
        };
        store.put_seal(session_id, &seal).await?;
        Ok(Some(seal))
    }

    /// Deletes a session on purpose, leaving a signed record of its chain
    /// as it was; `false` when it is held (or gone) by then.
    pub async fn delete(
        &self,
        store: &dyn Store,
        session_id: &str,
        reason: &str,
    ) -> Result<bool, StoreError> {
        let Some((len, head)) = store.chain_head(session_id).await? else {
            return Ok(false);
        };
        let mut d = evidence::Deletion {
            session_id: session_id.to_string(),
            len,
            head,
            deleted_at_ms: Utc::now().timestamp_millis(),
            reason: reason.to_string(),
            signature: Vec::new(),
            key_id: self.key_id.clone(),
        };
        d.signature = self.pair.sign(&d.message()).as_ref().to_vec();
        store.delete_session(&d).await
    }

    /// Signs roots over every session whose chain grew since the last
    /// root; returns them (none when nothing grew, or when another replica
    /// made the root first).
    pub async fn make_roots(&self, store: &dyn Store) -> Result<Vec<Root>, StoreError> {
        let mut made = Vec::new();
        loop {
            let leaves: Vec<Leaf> = store.unrooted(LEAVES_PER_ROOT).await?;
            if leaves.is_empty() {
                return Ok(made);
            }
            let last = store.last_root().await?;
            let (seq, prev) = match &last {
                Some(r) => (r.seq + 1, evidence::root_id(&r.message())),
                None => (1, evidence::GENESIS),
            };
            let hashes: Vec<_> = leaves.iter().map(Leaf::hash).collect();
            let mut root = Root {
                seq,
                created_at_ms: Utc::now().timestamp_millis(),
                prev,
                root: evidence::merkle_root(&hashes),
                leaves: leaves.len() as u64,
                signature: Vec::new(),
                key_id: self.key_id.clone(),
            };
            root.signature = self.pair.sign(&root.message()).as_ref().to_vec();
            match store.put_root(&root, &leaves).await {
                Ok(()) => {
                    tracing::info!(seq, sessions = leaves.len(), "audit root signed");
                    made.push(root);
                }
                // Another replica signed this one; it covers what we saw.
                Err(StoreError::Conflict) => return Ok(made),
                Err(e) => return Err(e),
            }
            if (leaves.len() as u32) < LEAVES_PER_ROOT {
                return Ok(made);
            }
        }
    }
}
