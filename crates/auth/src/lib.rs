//! Who may call what, for every dagmesh gRPC service.
//!
//! - [`Principal`]: who a call comes from (a token's name and scopes), put into each request's
//!   extensions by [`AuthLayer`] and read by handlers that authorize further (a worker's task
//!   types, the actor recorded on a run).
//! - [`rules`]: the scope each RPC needs — one table, checked against the proto descriptors in a
//!   test so that a new RPC cannot be left open by forgetting it.
//! - [`Authenticator`]: turns a bearer token into a principal (API tokens stored as hashes in the
//!   metadata store, cached for a few seconds; the services' shared internal token).
//! - [`AuthLayer`]: the tower layer in front of every server: UNAUTHENTICATED without valid
//!   credentials, PERMISSION_DENIED without the scope.
//! - [`TokenApi`]: the `TokenService` (create, list, revoke, who-am-I).
//! - [`jwt`]: JWTs from an identity provider (JWKS file, issuer, audience, scopes from a claim).

mod authenticator;
pub mod jwt;
mod layer;
mod principal;
pub mod rules;
mod service;
pub mod tokens;

pub use authenticator::{Authenticator, CACHE_TTL};
pub use layer::{AuthLayer, AuthService};
pub use principal::{Principal, pattern_matches, scope_name};
pub use service::TokenApi;
