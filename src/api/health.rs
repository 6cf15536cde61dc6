//! gRPC health (`grpc.health.v1`), kept true by a probe: the server as a whole (`""`) and its
//! services are SERVING while the database answers and NOT_SERVING while it does not (a
//! Kubernetes readiness probe then takes the pod out of the Service); `tern.cloud` says, on its
//! own, whether CloudStack answers (a server whose cloud is down still serves reads and queues
//! failovers, so the cloud does not take it out). `tern.alive` is SERVING while the process
//! answers (liveness).

use std::sync::Arc;
use std::time::Duration;

use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use super::pb::failover_service_server::FailoverServiceServer;
use super::pb::workflow_service_server::WorkflowServiceServer;
use super::{FailoverApi, WorkflowApi};
use crate::steps::failover::FailoverDeps;
use crate::store::Diagnostics;

/// The health service name of the cloud check.
pub const CLOUD: &str = "tern.cloud";

/// A health service name that is SERVING while the process answers at all: for liveness
/// probes, which must not restart a server because its database is down.
pub const ALIVE: &str = "tern.alive";

/// How often the probe asks; a check that takes longer than this counts as down.
pub const EVERY: Duration = Duration::from_secs(5);

fn status(up: bool) -> ServingStatus {
    if up {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}

/// Whether the database answers one round trip within [`EVERY`].
async fn database_up(store: &dyn Diagnostics) -> bool {
    match tokio::time::timeout(EVERY, store.ping()).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "health: the database does not answer");
            false
        }
        Err(_) => {
            tracing::warn!(timeout = ?EVERY, "health: the database did not answer in time");
            false
        }
    }
}

/// Whether CloudStack answers a read of the first configured service offering within [`EVERY`].
async fn cloud_up(deps: Option<&FailoverDeps>) -> bool {
    let Some(deps) = deps else { return false };
    let Some(offering) = deps.config.service_offering_ids.first() else {
        return false;
    };
    match tokio::time::timeout(EVERY, deps.cloud.find_service_offering(offering)).await {
        Ok(Ok(Some(_))) => true,
        Ok(Ok(None)) => {
            tracing::warn!(offering = %offering, "health: the configured service offering is not in CloudStack");
            false
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "health: CloudStack does not answer");
            false
        }
        Err(_) => {
            tracing::warn!(timeout = ?EVERY, "health: CloudStack did not answer in time");
            false
        }
    }
}

async fn report(reporter: &HealthReporter, (db, cloud): (bool, bool)) {
    let failover = <FailoverServiceServer<FailoverApi> as tonic::server::NamedService>::NAME;
    let workflow = <WorkflowServiceServer<WorkflowApi> as tonic::server::NamedService>::NAME;
    for service in ["", failover, workflow] {
        reporter.set_service_status(service, status(db)).await;
    }
    reporter.set_service_status(CLOUD, status(cloud)).await;
}

/// The statuses before the first probe: the database was opened a moment ago; the cloud is
/// not known yet.
pub(crate) async fn starting(reporter: &HealthReporter) {
    reporter.set_service_status(ALIVE, ServingStatus::Serving).await;
    report(reporter, (true, false)).await;
}

/// Probes the database and the cloud every [`EVERY`] and reports what it finds, until dropped.
pub(crate) async fn probe(reporter: HealthReporter, store: Arc<dyn Diagnostics>, cloud: Option<Arc<FailoverDeps>>) {
    let mut was = (true, false);
    loop {
        let now = (database_up(store.as_ref()).await, cloud_up(cloud.as_deref()).await);
        if was != now {
            tracing::info!(database = now.0, cloud = now.1, "health changed");
            report(&reporter, now).await;
            was = now;
        }
        tokio::time::sleep(EVERY).await;
    }
}
