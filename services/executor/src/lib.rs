//! The dagmesh run-executor: advances runs and dispatches steps to workers
