//! Rust SDK for dagmesh: step workers and a client for backends
