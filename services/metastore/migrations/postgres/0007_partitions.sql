-- Partitions of runs (issue 11): each executor replica drives the runs of the partitions whose
-- leases (`executor/p-N`) it holds. The count is fixed when the database is first used.

-- The cluster's fixed settings: one row, written once by InitCluster.
CREATE TABLE cluster (
    id         INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    partitions INTEGER NOT NULL
);

-- Run.partition, copied so that recovery reads only its partitions. Runs written before this
-- migration are in partition 0.
ALTER TABLE runs ADD COLUMN partition_no INTEGER NOT NULL DEFAULT 0;
CREATE INDEX runs_by_partition ON runs (partition_no, state, run_id);
