//! The partitions an executor drives.
//!
//! Runs hash into the cluster's partitions (`init_cluster`; a run's `partition`), and each
//! partition has a lease `executor/p-<N>` whose epoch fences every commit that touches one of
//! its runs, beside the executor's own lease (`crate::lease`). The executor that holds the
//! `executor` lease wants every partition: it takes each one as soon as it is free, renews them
//! all with one store call every third of the TTL, and tells the engine which partitions it
//! gained (the engine then recovers their runs from the store) and which it lost (the engine
//! forgets their runs). When executors share the partitions (`--share-partitions`,
//! ARCHITECTURE.md "Scale-out"), each one is a member of the group and takes its rendezvous
//! share over the live members instead.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use dagmesh_metastore::ownership::Ownership;
use dagmesh_metastore::{Lease, MetadataStore};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::ExecError;
use crate::engine::{Command, EngineHandle, PartitionChange};

/// The lease group of the executors' partitions (`executor/p-<N>`).
pub(crate) const GROUP: &str = "executor";

/// This executor's partitions, and what the engine was told of them (partition → epoch).
pub(crate) struct Partitions {
    ownership: Ownership,
    told: BTreeMap<u32, u64>,
}

impl Partitions {
    /// Takes the partition leases. A predecessor that died without handing them back renewed
    /// them up to a refresh interval after its executor lease, which this executor already
    /// took: waits that long at most for them to expire, then starts with what it has (the
    /// keeper takes the rest as they come free).
    ///
    /// With `share`, the executor is one member of the `executor` group and wants only its
    /// rendezvous share of the partitions: it starts with what is free of that share, and the
    /// keeper takes the rest as the others hand it over.
    pub async fn take(
        store: Arc<dyn MetadataStore>,
        holder: &str,
        partitions: u32,
        ttl: Duration,
        share: bool,
    ) -> Result<(Self, Vec<(u32, Lease)>), ExecError> {
        let mut ownership = Ownership::new(store, GROUP, holder.to_owned(), partitions, ttl);
        if !share {
            ownership = ownership.wanting_every_partition();
        }
        let give_up = Instant::now() + ttl + ownership.refresh_interval();
        loop {
            ownership.refresh().await?;
            if share || ownership.owns_all() || Instant::now() >= give_up {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100).min(ttl / 3)).await;
        }
        if !share && !ownership.owns_all() {
            tracing::warn!(
                owned = ownership.owned().count(),
                partitions,
                "some partitions are still held by a previous executor; taking them as they come free"
            );
        }
        let driven: Vec<(u32, Lease)> = ownership
            .owned()
            .map(|(partition, lease)| (partition, lease.clone()))
            .collect();
        let told = driven
            .iter()
            .map(|(partition, lease)| (*partition, lease.epoch))
            .collect();
        Ok((Partitions { ownership, told }, driven))
    }

    /// Keeps the leases until the engine stops, then hands them back so that the next executor
    /// takes them at once, and says so on `released`.
    pub fn spawn_keeper(
        mut self,
        engine: EngineHandle,
        released: oneshot::Sender<()>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(self.ownership.refresh_interval());
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await; // the first tick is now: `take` just refreshed
            loop {
                tokio::select! {
                    () = engine.closed() => break,
                    _ = tick.tick() => {}
                }
                if let Err(error) = self.ownership.refresh().await {
                    tracing::warn!(%error, "could not renew the partition leases");
                }
                let change = self.change();
                if (!change.gained.is_empty() || !change.dropped.is_empty())
                    && engine.send(Command::Partitions(change)).await.is_err()
                {
                    break;
                }
            }
            self.ownership.release_all().await;
            let _ = released.send(());
        })
    }

    /// What changed since the engine was last told: a partition taken again after it was lost
    /// has a new epoch, so it is dropped (its old runs) and gained (from the store) at once.
    fn change(&mut self) -> PartitionChange {
        let mut change = PartitionChange::default();
        let owned: BTreeMap<u32, &Lease> = self.ownership.owned().collect();
        for (partition, epoch) in &self.told {
            if owned
                .get(partition)
                .is_none_or(|lease| lease.epoch != *epoch)
            {
                change.dropped.push(*partition);
            }
        }
        for (partition, lease) in &owned {
            if self.told.get(partition) != Some(&lease.epoch) {
                change.gained.push((*partition, (*lease).clone()));
            }
        }
        for partition in &change.dropped {
            self.told.remove(partition);
        }
        for (partition, lease) in &change.gained {
            self.told.insert(*partition, lease.epoch);
        }
        change
    }
}
