//! Where volumes and restore points live, as the server sees it.
//!
//! The traits and their types are `slipway-backend`'s (re-exported here, so the server's code
//! names them `crate::backend::…`): keeping them out of this crate lets `crates/aws` implement
//! them without compiling the server. What stays here is the embedded local default's volume
//! backend, which needs the store.

use std::path::PathBuf;

use async_trait::async_trait;

pub use slipway_backend::{
    BackendError, RemoteRestorePoint, RemoteSnapshot, SnapshotBackend, SnapshotRequest,
    VolumeBackend, VolumeHandle, VolumeRequest,
};

/// The local default: each source disk is a sparse file under the data dir.
#[derive(Debug, Clone)]
pub struct LocalVolumes {
    pub root: PathBuf,
}

#[async_trait]
impl VolumeBackend for LocalVolumes {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn adopt(&self) -> Result<Vec<VolumeHandle>, BackendError> {
        Ok(vec![])
    }

    async fn ensure(&self, req: &VolumeRequest) -> Result<VolumeHandle, BackendError> {
        let path = self
            .root
            .join(&req.source)
            .join(format!("{}.raw", req.disk));
        let p = path.clone();
        let size = req.size;
        let created = tokio::task::spawn_blocking(move || {
            slipway_store::FileVolume::open_or_create(&p, size).map(|(_, created)| created)
        })
        .await
        .map_err(|e| BackendError::Permanent(e.to_string()))?
        .map_err(|e| BackendError::Permanent(e.to_string()))?;
        Ok(VolumeHandle {
            source: req.source.clone(),
            disk: req.disk.clone(),
            volume_id: path.display().to_string(),
            path,
            created,
        })
    }
}
