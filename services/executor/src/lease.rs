//! The executor lease: one executor drives the runs of a database at a time.
//!
//! At start the executor takes the lease `executor` in the store (a standby waits until it is
//! free); every commit carries the lease's epoch and the store refuses a stale one, so an
//! executor that lost the lease (paused, partitioned, replaced) cannot write after its
//! successor started, even before it notices. A task renews the lease every third of its TTL;
//! when renewal fails for longer than the TTL, or the store says another holder took it, the
//! engine stops. Each partition holds a lease of its own as well (`executor/p-N`, see
//! `crate::partitions`), which fences the commits of that partition's runs.

use std::sync::Arc;
use std::time::Duration;

use dagmesh_metastore::{Lease, MetadataStore, StoreError};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::ExecError;

/// The lease name of the (single, for now) executor of a database.
pub(crate) const EXECUTOR_LEASE: &str = "executor";

/// Takes the executor lease. With `standby`, waits while another executor holds it (logging
/// who); without, refuses with a message naming the holder.
pub(crate) async fn acquire(
    store: &Arc<dyn MetadataStore>,
    holder: &str,
    ttl: Duration,
    standby: bool,
) -> Result<Lease, ExecError> {
    let mut logged = false;
    loop {
        match store.acquire_lease(EXECUTOR_LEASE, holder, ttl).await {
            Ok(lease) => {
                tracing::info!(holder, epoch = lease.epoch, "took the executor lease");
                return Ok(lease);
            }
            Err(StoreError::LeaseHeld {
                holder: other,
                expires_in,
                ..
            }) => {
                let message = format!(
                    "another executor ({other}) drives this database; its lease expires in \
                     {:.1}s unless it renews it",
                    expires_in.as_secs_f64()
                );
                if !standby {
                    return Err(ExecError::FailedPrecondition(format!(
                        "{message}; not waiting as a standby (--no-standby)"
                    )));
                }
                if !logged {
                    tracing::warn!("standby: {message}; waiting to take over");
                    logged = true;
                }
                let wait = expires_in.clamp(Duration::from_millis(50), ttl / 3);
                tokio::time::sleep(wait).await;
            }
            Err(error) => return Err(error.into()),
        }
    }
}

/// Takes the executor lease if it is free (or expired); `None` while another executor holds it.
pub(crate) async fn try_acquire(
    store: &Arc<dyn MetadataStore>,
    holder: &str,
    ttl: Duration,
) -> Result<Option<Lease>, ExecError> {
    match store.acquire_lease(EXECUTOR_LEASE, holder, ttl).await {
        Ok(lease) => {
            tracing::info!(holder, epoch = lease.epoch, "took the executor lease");
            Ok(Some(lease))
        }
        Err(StoreError::LeaseHeld { .. }) => Ok(None),
        Err(error) => Err(error.into()),
    }
}

/// Renews `lease` every third of `ttl` until `stop` fires (or its sender is dropped). Sends on
/// `lost` (and stops) when the store says another holder took the lease, or when no renewal
/// succeeded for a whole `ttl` (someone may have taken it since). Releasing the lease is the
/// engine's job once this task has ended, so a late renewal cannot extend a released lease.
pub(crate) fn spawn_renewal(
    store: Arc<dyn MetadataStore>,
    mut lease: Lease,
    ttl: Duration,
    lost: oneshot::Sender<String>,
    mut stop: oneshot::Receiver<()>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut renewed = Instant::now();
        loop {
            tokio::select! {
                () = tokio::time::sleep(ttl / 3) => {}
                _ = &mut stop => return,
            }
            match store.renew_lease(&lease, ttl).await {
                Ok(next) => {
                    lease = next;
                    renewed = Instant::now();
                }
                Err(error @ StoreError::Fenced { .. }) => {
                    let _ = lost.send(format!("lost the executor lease: {error}"));
                    return;
                }
                Err(error) if renewed.elapsed() >= ttl => {
                    let _ = lost.send(format!(
                        "could not renew the executor lease for {}s ({error}); another \
                         executor may have taken over",
                        ttl.as_secs_f64()
                    ));
                    return;
                }
                Err(error) => tracing::warn!(%error, "executor lease renewal failed; retrying"),
            }
        }
    })
}

/// Hands the lease back after a clean stop, so that a standby (or the next start) takes over
/// at once instead of waiting for the TTL.
pub(crate) async fn release(store: &Arc<dyn MetadataStore>, lease: &Lease) {
    match store.release_lease(lease).await {
        Ok(()) => tracing::info!(epoch = lease.epoch, "released the executor lease"),
        Err(error) => tracing::warn!(%error, "could not release the executor lease"),
    }
}
