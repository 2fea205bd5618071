//! The gRPC face of the snapshotter: containerd's Snapshots service, each call decoded,
//! run on the blocking pool (the store and the filesystem are synchronous), and its
//! error given the gRPC code containerd's errdefs reads back.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use tonic::{Request, Response, Status};

use super::api::snapshots::snapshots_server::Snapshots;
use super::api::snapshots::{
    CleanupRequest, CommitSnapshotRequest, Info as ApiInfo, Kind as ApiKind, ListSnapshotsRequest,
    ListSnapshotsResponse, MountsRequest, MountsResponse, PrepareSnapshotRequest,
    PrepareSnapshotResponse, RemoveSnapshotRequest, StatSnapshotRequest, StatSnapshotResponse,
    UpdateSnapshotRequest, UpdateSnapshotResponse, UsageRequest, UsageResponse,
    ViewSnapshotRequest, ViewSnapshotResponse,
};
use super::api::types::Mount as ApiMount;
use super::overlay::Mount;
use super::snapshots::{Info, Snapshotter};
use super::store::{Error, Kind, Time};

/// Infos per List message: containerd reads them as a stream of batches.
const LIST_BATCH: usize = 100;

pub struct Service {
    snapshotter: Arc<Snapshotter>,
}

impl Service {
    pub fn new(snapshotter: Arc<Snapshotter>) -> Service {
        Service { snapshotter }
    }

    /// Runs `op` on the blocking pool with the snapshotter.
    async fn run<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Snapshotter) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Status> {
        let snapshotter = self.snapshotter.clone();
        tokio::task::spawn_blocking(move || op(&snapshotter))
            .await
            .map_err(|e| Status::internal(format!("snapshotter task failed: {e}")))?
            .map_err(status)
    }
}

fn status(error: Error) -> Status {
    match error {
        Error::NotFound(m) => Status::not_found(m),
        Error::AlreadyExists(m) => Status::already_exists(m),
        Error::FailedPrecondition(m) => Status::failed_precondition(m),
        Error::InvalidArgument(m) => Status::invalid_argument(m),
        Error::Internal(m) => Status::internal(m),
    }
}

fn mounts(mounts: Vec<Mount>) -> Vec<ApiMount> {
    mounts
        .into_iter()
        .map(|m| ApiMount {
            r#type: m.kind,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

fn timestamp(t: Time) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.seconds,
        nanos: t.nanos,
    }
}

fn info(info: Info) -> ApiInfo {
    let kind = match info.record.kind {
        Kind::View => ApiKind::View,
        Kind::Active => ApiKind::Active,
        Kind::Committed => ApiKind::Committed,
    };
    ApiInfo {
        name: info.name,
        parent: info.record.parent,
        kind: kind as i32,
        created_at: Some(timestamp(info.record.created)),
        updated_at: Some(timestamp(info.record.updated)),
        labels: info.record.labels.into_iter().collect(),
    }
}

fn labels(map: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    map.into_iter().collect()
}

fn required(field: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() {
        return Err(Status::invalid_argument(format!(
            "{field} must not be empty"
        )));
    }
    Ok(())
}

type ListStream = Pin<Box<dyn Stream<Item = Result<ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Snapshots for Service {
    async fn prepare(
        &self,
        request: Request<PrepareSnapshotRequest>,
    ) -> Result<Response<PrepareSnapshotResponse>, Status> {
        let r = request.into_inner();
        required("key", &r.key)?;
        let m = self
            .run(move |s| s.prepare(&r.key, &r.parent, labels(r.labels)))
            .await?;
        Ok(Response::new(PrepareSnapshotResponse { mounts: mounts(m) }))
    }

    async fn view(
        &self,
        request: Request<ViewSnapshotRequest>,
    ) -> Result<Response<ViewSnapshotResponse>, Status> {
        let r = request.into_inner();
        required("key", &r.key)?;
        let m = self
            .run(move |s| s.view(&r.key, &r.parent, labels(r.labels)))
            .await?;
        Ok(Response::new(ViewSnapshotResponse { mounts: mounts(m) }))
    }

    async fn mounts(
        &self,
        request: Request<MountsRequest>,
    ) -> Result<Response<MountsResponse>, Status> {
        let r = request.into_inner();
        let m = self.run(move |s| s.mounts(&r.key)).await?;
        Ok(Response::new(MountsResponse { mounts: mounts(m) }))
    }

    async fn commit(
        &self,
        request: Request<CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        required("name", &r.name)?;
        self.run(move |s| s.commit(&r.name, &r.key, labels(r.labels)))
            .await?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        request: Request<RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        self.run(move |s| s.remove(&r.key)).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        request: Request<StatSnapshotRequest>,
    ) -> Result<Response<StatSnapshotResponse>, Status> {
        let r = request.into_inner();
        let found = self.run(move |s| s.stat(&r.key)).await?;
        Ok(Response::new(StatSnapshotResponse {
            info: Some(info(found)),
        }))
    }

    async fn update(
        &self,
        request: Request<UpdateSnapshotRequest>,
    ) -> Result<Response<UpdateSnapshotResponse>, Status> {
        let r = request.into_inner();
        let given = r
            .info
            .ok_or_else(|| Status::invalid_argument("update names no snapshot"))?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let updated = self
            .run(move |s| s.update(&given.name, labels(given.labels), &paths))
            .await?;
        Ok(Response::new(UpdateSnapshotResponse {
            info: Some(info(updated)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let r = request.into_inner();
        let all = self.run(move |s| s.list(&r.filters)).await?;
        let mut batches: Vec<Result<ListSnapshotsResponse, Status>> = Vec::new();
        let mut infos = all.into_iter().map(info).peekable();
        while infos.peek().is_some() {
            let batch: Vec<ApiInfo> = infos.by_ref().take(LIST_BATCH).collect();
            batches.push(Ok(ListSnapshotsResponse { info: batch }));
        }
        Ok(Response::new(Box::pin(futures_util::stream::iter(batches))))
    }

    async fn usage(
        &self,
        request: Request<UsageRequest>,
    ) -> Result<Response<UsageResponse>, Status> {
        let r = request.into_inner();
        let usage = self.run(move |s| s.usage(&r.key)).await?;
        Ok(Response::new(UsageResponse {
            size: usage.size,
            inodes: usage.inodes,
        }))
    }

    async fn cleanup(&self, _request: Request<CleanupRequest>) -> Result<Response<()>, Status> {
        self.run(|s| s.cleanup()).await?;
        Ok(Response::new(()))
    }
}
