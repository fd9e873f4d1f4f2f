//! Partitioned ownership: the processes of a group (the schedulers; the executors next) share a
//! fixed set of partitions through leases in the store, with no coordinator.
//!
//! Each member keeps a lease `members/<group>/<holder>` alive. Every member lists the live ones
//! and assigns each partition to the member with the highest rendezvous hash, so all members
//! compute the same owners from the same rows and a join or a leave moves only the partitions
//! of that member. A member takes the lease `<group>/p-<N>` of each partition it should own once
//! the previous owner has released it (or let it expire) and releases those it should no longer
//! own; the lease's epoch fences the writes of a previous owner that has not noticed yet.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::{Lease, MEMBER_LEASES, MetadataStore, StoreError};

/// A member's announcement that expired this long ago is deleted (each process start leaves
/// one behind), by whichever member refreshes next with a prune due.
const PRUNE_AFTER: Duration = Duration::from_secs(3600);
/// Every this many refreshes (and at the first), a member prunes expired announcements.
const PRUNE_EVERY: u64 = 100;

/// The partition of `key` among `partitions` (xxh3 of its bytes: the same in every version and
/// on every machine, which `std`'s hasher does not promise).
pub fn partition_of(key: &str, partitions: u32) -> u32 {
    let partitions = u64::from(partitions.max(1));
    // Below `partitions`, so it fits.
    u32::try_from(xxh3_64(key.as_bytes()) % partitions).unwrap_or(0)
}

/// The member that owns `partition`: the highest hash of (member, partition), ties broken by
/// name. `None` without members.
pub fn rendezvous_owner(partition: u32, members: &[String]) -> Option<&str> {
    members
        .iter()
        .max_by_key(|member| {
            (
                xxh3_64_with_seed(member.as_bytes(), u64::from(partition)),
                member.as_str(),
            )
        })
        .map(String::as_str)
}

/// A holder name unique to this process: a restarted process must take its leases anew (a new
/// epoch), never inherit its predecessor's.
pub fn unique_holder() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "host".into());
    // No whitespace: a holder may carry an address after a space (`holder_at`).
    let host: String = host
        .chars()
        .filter(|c| !c.is_whitespace())
        .take(64)
        .collect();
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}/pid-{}/{}", std::process::id(), &id[..8])
}

/// A [`unique_holder`] that tells others where to reach it: `<holder> <address>`.
pub fn holder_at(address: &str) -> String {
    format!("{} {address}", unique_holder())
}

/// The address a holder name of [`holder_at`] carries, if any.
pub fn holder_address(holder: &str) -> Option<&str> {
    holder
        .split_once(' ')
        .map(|(_, address)| address.trim())
        .filter(|address| !address.is_empty())
}

/// What one [`Ownership::refresh`] changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Rebalance {
    /// Partitions taken (their state must be read from the store before acting on them).
    pub gained: Vec<u32>,
    /// Partitions handed back because another member should own them now.
    pub released: Vec<u32>,
    /// Partitions someone else took before this member noticed (it was paused or cut off).
    pub lost: Vec<u32>,
}

impl Rebalance {
    pub fn is_empty(&self) -> bool {
        self.gained.is_empty() && self.released.is_empty() && self.lost.is_empty()
    }
}

/// This process's share of a group's partitions.
pub struct Ownership {
    store: Arc<dyn MetadataStore>,
    group: String,
    holder: String,
    partitions: u32,
    ttl: Duration,
    member: Option<Lease>,
    owned: BTreeMap<u32, Lease>,
    /// When a refresh last reached the store: leases are only trusted for a TTL after that.
    refreshed: Option<Instant>,
    /// Refreshes so far, to prune now and then.
    refreshes: u64,
    /// Wants every partition, without announcing itself or looking at other members (see
    /// [`Ownership::wanting_every_partition`]).
    sole: bool,
}

impl Ownership {
    /// `partitions` must be the same in every member of `group` (it is part of the data's
    /// layout); `ttl` is how long a dead member's partitions stay unowned at worst.
    pub fn new(
        store: Arc<dyn MetadataStore>,
        group: &str,
        holder: String,
        partitions: u32,
        ttl: Duration,
    ) -> Self {
        Ownership {
            store,
            group: group.to_owned(),
            holder,
            partitions: partitions.max(1),
            ttl,
            member: None,
            owned: BTreeMap::new(),
            refreshed: None,
            refreshes: 0,
            sole: false,
        }
    }

    /// This member wants every partition of the group and takes each as soon as it is free
    /// (the executor that holds the `executor` lease, while it is the only one that drives
    /// runs): the partition leases then fence its commits like a shared group's, and the day
    /// the group is shared this call goes.
    pub fn wanting_every_partition(self) -> Self {
        Ownership { sole: true, ..self }
    }

    /// Whether this member holds every partition (as of the last refresh).
    pub fn owns_all(&self) -> bool {
        self.owned.len() == self.partitions as usize
    }

    pub fn holder(&self) -> &str {
        &self.holder
    }

    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// How often [`Ownership::refresh`] should run: a third of the TTL, so that one missed
    /// refresh does not lose the leases.
    pub fn refresh_interval(&self) -> Duration {
        self.ttl / 3
    }

    /// Whether the next refresh is due (none yet, or a refresh interval has passed).
    pub fn refresh_due(&self) -> bool {
        self.refreshed
            .is_none_or(|at| at.elapsed() >= self.refresh_interval())
    }

    /// The partition `key` belongs to.
    pub fn partition_of(&self, key: &str) -> u32 {
        partition_of(key, self.partitions)
    }

    /// Whether this member owns the partition of `key` (as of the last refresh).
    pub fn owns_key(&self, key: &str) -> bool {
        self.owned.contains_key(&self.partition_of(key))
    }

    /// The leases of the partitions owned, by partition.
    pub fn owned(&self) -> impl Iterator<Item = (u32, &Lease)> {
        self.owned
            .iter()
            .map(|(partition, lease)| (*partition, lease))
    }

    fn member_prefix(&self) -> String {
        format!("{MEMBER_LEASES}{}/", self.group)
    }

    fn partition_lease(&self, partition: u32) -> String {
        format!("{}/p-{partition}", self.group)
    }

    /// The partition a lease name of [`Ownership::partition_lease`] names; `None` for any
    /// other name (the store answers only names this member sent).
    fn partition_of_lease(&self, name: &str) -> Option<u32> {
        name.strip_prefix(self.group.as_str())?
            .strip_prefix("/p-")?
            .parse()
            .ok()
            .filter(|partition| *partition < self.partitions)
    }

    /// Renews this member's announcement, recomputes the assignment from the live members, and
    /// renews, releases and takes partition leases to match it. When the store cannot be
    /// reached for a whole TTL, every partition counts as lost (someone may have taken it).
    pub async fn refresh(&mut self) -> Result<Rebalance, StoreError> {
        match self.try_refresh().await {
            Ok(rebalance) => {
                self.refreshed = Some(Instant::now());
                Ok(rebalance)
            }
            Err(error) => {
                if self.refreshed.is_some_and(|at| at.elapsed() >= self.ttl) {
                    let lost: Vec<u32> = std::mem::take(&mut self.owned).into_keys().collect();
                    self.member = None;
                    if !lost.is_empty() {
                        tracing::warn!(group = %self.group, %error, partitions = lost.len(),
                            "partitions dropped: the store was unreachable for a whole lease");
                    }
                }
                Err(error)
            }
        }
    }

    /// Renews this member's announcement (pruning old ones now and then) and lists the live
    /// members, this one included.
    async fn announce_and_list_members(&mut self) -> Result<Vec<String>, StoreError> {
        let member_name = format!("{}{}", self.member_prefix(), self.holder);
        self.member = Some(
            self.store
                .acquire_lease(&member_name, &self.holder, self.ttl)
                .await?,
        );
        if self.refreshes.is_multiple_of(PRUNE_EVERY) {
            match self
                .store
                .delete_expired_leases(&self.member_prefix(), PRUNE_AFTER)
                .await
            {
                Ok(0) => {}
                Ok(deleted) => tracing::debug!(group = %self.group, deleted, "pruned old members"),
                Err(error) => tracing::debug!(group = %self.group, %error, "pruning failed"),
            }
        }
        self.refreshes += 1;
        let mut members: Vec<String> = self
            .store
            .list_live_leases(&self.member_prefix())
            .await?
            .into_iter()
            .map(|lease| lease.holder)
            .collect();
        if !members.contains(&self.holder) {
            members.push(self.holder.clone());
        }
        Ok(members)
    }

    async fn try_refresh(&mut self) -> Result<Rebalance, StoreError> {
        let mut rebalance = Rebalance::default();
        let members = if self.sole {
            vec![self.holder.clone()]
        } else {
            self.announce_and_list_members().await?
        };
        let wanted = |partition: u32| rendezvous_owner(partition, &members) == Some(&self.holder);

        // Hand back what another member should own now (rare: a member joined), then renew
        // the rest and take what is wanted and free, in one store call.
        let unwanted: Vec<(u32, Lease)> = self
            .owned
            .iter()
            .filter(|(partition, _)| !wanted(**partition))
            .map(|(partition, lease)| (*partition, lease.clone()))
            .collect();
        for (partition, lease) in unwanted {
            match self.store.release_lease(&lease).await {
                Ok(()) => rebalance.released.push(partition),
                Err(StoreError::Fenced { .. }) => rebalance.lost.push(partition),
                Err(error) => return Err(error),
            }
            self.owned.remove(&partition);
        }
        let keep: Vec<Lease> = self.owned.values().cloned().collect();
        let take: Vec<String> = (0..self.partitions)
            .filter(|partition| wanted(*partition) && !self.owned.contains_key(partition))
            .map(|partition| self.partition_lease(partition))
            .collect();
        let claimed = self
            .store
            .claim_leases(&self.holder, self.ttl, &keep, &take)
            .await?;
        for lease in claimed.kept {
            if let Some(partition) = self.partition_of_lease(&lease.name) {
                self.owned.insert(partition, lease);
            }
        }
        for name in &claimed.lost {
            let Some(partition) = self.partition_of_lease(name) else {
                continue;
            };
            self.owned.remove(&partition);
            rebalance.lost.push(partition);
        }
        // A name of `take` another member still holds is not in `taken`: it has not handed it
        // over yet, so the next refresh tries again.
        for lease in claimed.taken {
            if let Some(partition) = self.partition_of_lease(&lease.name) {
                self.owned.insert(partition, lease);
                rebalance.gained.push(partition);
            }
        }
        rebalance.gained.sort_unstable();
        rebalance.released.sort_unstable();
        rebalance.lost.sort_unstable();
        if !rebalance.is_empty() {
            tracing::info!(
                group = %self.group,
                members = members.len(),
                owned = self.owned.len(),
                gained = rebalance.gained.len(),
                released = rebalance.released.len(),
                lost = rebalance.lost.len(),
                "partitions rebalanced"
            );
        }
        Ok(rebalance)
    }

    /// Hands every lease back (a clean shutdown), so the other members take over at once.
    pub async fn release_all(&mut self) {
        let owned = std::mem::take(&mut self.owned);
        for lease in owned.values().chain(self.member.take().as_ref()) {
            if let Err(error) = self.store.release_lease(lease).await {
                tracing::debug!(lease = %lease.name, %error, "could not release a lease");
            }
        }
        self.refreshed = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_stable_and_in_range() {
        // Fixed values: a change here moves every stored run and schedule to another owner.
        assert_eq!(partition_of("run-1", 256), partition_of("run-1", 256));
        for key in ["", "a", "schedule/x", "ü"] {
            assert!(partition_of(key, 7) < 7);
        }
        assert_eq!(partition_of("anything", 0), 0);
    }

    #[test]
    fn rendezvous_moves_only_the_partitions_of_a_member_that_leaves() {
        let three: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let two: Vec<String> = ["a", "b"].map(String::from).to_vec();
        let mut counts = BTreeMap::<&str, u32>::new();
        for partition in 0..300 {
            let before = rendezvous_owner(partition, &three).unwrap();
            *counts.entry(before).or_default() += 1;
            let after = rendezvous_owner(partition, &two).unwrap();
            if before != "c" {
                assert_eq!(before, after, "partition {partition} moved needlessly");
            }
        }
        // Roughly even: each of three members owns a fair share.
        for (member, count) in counts {
            assert!((60..=140).contains(&count), "{member} owns {count} of 300");
        }
        assert_eq!(rendezvous_owner(1, &[]), None);
    }
}
