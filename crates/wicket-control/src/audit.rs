//! The audit admin service: what `wicket audit verify` reads (chains,
//! seals, roots, the public key) and signing a root on demand.

use tonic::{Request, Response, Status};
use wicket_proto::v1;
use wicket_proto::v1::audit_admin_service_server::AuditAdminService;

use crate::admin::AdminApi;
use crate::auth::Permission;
use crate::state::storage;

fn page(limit: u32) -> u32 {
    match limit {
        0 => 1000,
        n => n.min(1000),
    }
}

#[tonic::async_trait]
impl AuditAdminService for AdminApi {
    async fn get_audit_key(
        &self,
        req: Request<v1::GetAuditKeyRequest>,
    ) -> Result<Response<v1::AuditKey>, Status> {
        self.allow(&req, Permission::Read).await?;
        let n = &self.control.notary;
        Ok(Response::new(v1::AuditKey {
            public_key: n.public_openssh().to_string(),
            key_id: n.key_id().to_string(),
            raw: n.public_raw().to_vec(),
        }))
    }

    async fn get_audit_chain(
        &self,
        req: Request<v1::GetAuditChainRequest>,
    ) -> Result<Response<v1::AuditChain>, Status> {
        self.allow(&req, Permission::Read).await?;
        let r = req.get_ref();
        if r.session_id.is_empty() || r.session_id.len() > 256 {
            return Err(Status::invalid_argument("session_id must be 1..=256 bytes"));
        }
        let store = &self.control.store;
        let found = store
            .chain_head(&r.session_id)
            .await
            .map_err(storage)?
            .is_some();
        let events = store
            .chain_events(&r.session_id, r.after_index, page(r.limit))
            .await
            .map_err(storage)?;
        // Seal and roots travel with every page: a verifier reading the
        // last page has them as they were after the events it read.
        let seal = store.get_seal(&r.session_id).await.map_err(storage)?;
        let checkpoints = store.checkpoints(&r.session_id).await.map_err(storage)?;
        let unchained = store
            .unchained_events(&r.session_id)
            .await
            .map_err(storage)?;
        let deletion = store.get_deletion(&r.session_id).await.map_err(storage)?;
        Ok(Response::new(v1::AuditChain {
            found,
            events: events.into_iter().map(Into::into).collect(),
            seal: seal.map(Into::into),
            checkpoints: checkpoints.into_iter().map(Into::into).collect(),
            unchained,
            deletion: deletion.map(Into::into),
        }))
    }

    async fn list_audit_roots(
        &self,
        req: Request<v1::ListAuditRootsRequest>,
    ) -> Result<Response<v1::ListAuditRootsResponse>, Status> {
        self.allow(&req, Permission::Read).await?;
        let r = req.get_ref();
        let roots = self
            .control
            .store
            .list_roots(r.after_seq, page(r.limit))
            .await
            .map_err(storage)?;
        Ok(Response::new(v1::ListAuditRootsResponse {
            roots: roots.iter().map(Into::into).collect(),
        }))
    }

    async fn list_audit_root_leaves(
        &self,
        req: Request<v1::ListAuditRootLeavesRequest>,
    ) -> Result<Response<v1::ListAuditRootLeavesResponse>, Status> {
        self.allow(&req, Permission::Read).await?;
        let r = req.get_ref();
        let leaves = self
            .control
            .store
            .root_leaves(r.seq, &r.after_session, page(r.limit))
            .await
            .map_err(storage)?;
        Ok(Response::new(v1::ListAuditRootLeavesResponse {
            leaves: leaves.iter().map(Into::into).collect(),
        }))
    }

    async fn list_audit_sessions(
        &self,
        req: Request<v1::ListAuditSessionsRequest>,
    ) -> Result<Response<v1::ListAuditSessionsResponse>, Status> {
        self.allow(&req, Permission::Read).await?;
        let r = req.get_ref();
        let session_ids = self
            .control
            .store
            .session_ids(&r.after_session, page(r.limit))
            .await
            .map_err(storage)?;
        Ok(Response::new(v1::ListAuditSessionsResponse { session_ids }))
    }

    async fn get_recording_chunk(
        &self,
        req: Request<v1::GetRecordingChunkRequest>,
    ) -> Result<Response<v1::RecordingChunk>, Status> {
        self.allow(&req, Permission::Read).await?;
        let key = &req.get_ref().key;
        match self.control.recordings.get(key).await {
            Ok(Some(data)) => Ok(Response::new(v1::RecordingChunk { found: true, data })),
            Ok(None) => Ok(Response::new(v1::RecordingChunk::default())),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
                Err(Status::invalid_argument("not a recording chunk key"))
            }
            // A chunk that no longer decompresses was changed.
            Err(e)
                if e.kind() == std::io::ErrorKind::Other
                    || e.kind() == std::io::ErrorKind::InvalidData =>
            {
                tracing::warn!(chunk = %key, error = %e, "recording chunk does not decompress");
                Ok(Response::new(v1::RecordingChunk {
                    found: true,
                    data: Vec::new(),
                }))
            }
            Err(e) => {
                tracing::error!(chunk = %key, error = %e, "cannot read a recording chunk");
                Err(Status::unavailable(
                    "recording storage unavailable; try again",
                ))
            }
        }
    }

    async fn apply_retention(
        &self,
        req: Request<v1::ApplyRetentionRequest>,
    ) -> Result<Response<v1::ApplyRetentionResponse>, Status> {
        let who = self.allow(&req, Permission::Admin).await?;
        let deleted = self.control.apply_retention().await.map_err(storage)?;
        tracing::info!(by = %who.label(), deleted = deleted.len(), "retention applied on request");
        Ok(Response::new(v1::ApplyRetentionResponse { deleted }))
    }

    async fn create_audit_root(
        &self,
        req: Request<v1::CreateAuditRootRequest>,
    ) -> Result<Response<v1::CreateAuditRootResponse>, Status> {
        let who = self.allow(&req, Permission::Admin).await?;
        let roots = self
            .control
            .notary
            .make_roots(self.control.store.as_ref())
            .await
            .map_err(storage)?;
        tracing::info!(by = %who.label(), roots = roots.len(), "audit root requested");
        Ok(Response::new(v1::CreateAuditRootResponse {
            roots: roots.iter().map(Into::into).collect(),
        }))
    }
}
