use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tonic::Status;
use tower::Layer;
use tower_service::Service;

use crate::rules::{self, Access};
use crate::{Authenticator, Principal};

/// The tower layer in front of every dagmesh server: checks the bearer token of each call
/// against [`rules::access`] and attaches the [`Principal`] for the handlers. Without an
/// authenticator (authentication off) every call passes as anonymous.
#[derive(Clone)]
pub struct AuthLayer {
    authenticator: Option<Arc<Authenticator>>,
}

impl AuthLayer {
    pub fn new(authenticator: Arc<Authenticator>) -> Self {
        Self {
            authenticator: Some(authenticator),
        }
    }

    /// Lets every call through (`--no-auth`).
    pub fn disabled() -> Self {
        Self {
            authenticator: None,
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.authenticator.is_some()
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            authenticator: self.authenticator.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    authenticator: Option<Arc<Authenticator>>,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for AuthService<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        // The clone that was polled ready serves this call; the fresh clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let Some(authenticator) = self.authenticator.clone() else {
            return Box::pin(inner.call(request));
        };
        Box::pin(async move {
            let path = request.uri().path().to_owned();
            // A gRPC-web call (a browser) is refused in its own content type, or the browser's
            // client would not read the status.
            let web_type = request
                .headers()
                .get(http::header::CONTENT_TYPE)
                .filter(|value| value.as_bytes().starts_with(b"application/grpc-web"))
                .cloned();
            match authorize(&authenticator, &path, request.headers()).await {
                Ok(Some(principal)) => {
                    request.extensions_mut().insert(principal);
                    inner.call(request).await
                }
                Ok(None) => inner.call(request).await,
                Err(status) => {
                    tracing::debug!(path, code = ?status.code(), message = status.message(), "call refused");
                    let mut response = status.into_http();
                    if let Some(web_type) = web_type {
                        response
                            .headers_mut()
                            .insert(http::header::CONTENT_TYPE, web_type);
                    }
                    Ok(response)
                }
            }
        })
    }
}

/// The principal of a call to `path`, None for a public path, or the status that refuses it.
async fn authorize(
    authenticator: &Authenticator,
    path: &str,
    headers: &http::HeaderMap,
) -> Result<Option<Principal>, Status> {
    let access = rules::access(path);
    if access == Access::Public {
        return Ok(None);
    }
    let token = bearer(headers)?;
    let principal = authenticator.authenticate(token).await?;
    if let Access::Scope(needed) = access
        && !principal.allows(needed)
    {
        let scopes = principal.scope_list();
        return Err(Status::permission_denied(format!(
            "{} (scopes: {}) may not call {path}: it needs the {} scope",
            principal.name,
            if scopes.is_empty() { "none" } else { &scopes },
            crate::scope_name(needed)
        )));
    }
    Ok(Some(principal))
}

/// The longest bearer token looked at: dagmesh tokens are 85 bytes, JWTs a few KiB.
const MAX_BEARER_LEN: usize = 8192;

fn bearer(headers: &http::HeaderMap) -> Result<&str, Status> {
    let missing = || {
        Status::unauthenticated(
            "missing credentials: this server needs `authorization: Bearer <token>` metadata \
             (CLI and SDKs: --token or DAGMESH_TOKEN; create one with `dagmesh tokens create`)",
        )
    };
    let value = headers
        .get(http::header::AUTHORIZATION)
        .ok_or_else(missing)?;
    let value = value.to_str().map_err(|_| {
        Status::unauthenticated("invalid credentials: the authorization header is not ASCII")
    })?;
    let (scheme, token) = value.split_once(' ').ok_or_else(|| {
        Status::unauthenticated("invalid credentials: expected `authorization: Bearer <token>`")
    })?;
    if token.len() > MAX_BEARER_LEN {
        return Err(Status::unauthenticated(format!(
            "invalid credentials: the bearer token is {} bytes, over the limit of {MAX_BEARER_LEN}",
            token.len()
        )));
    }
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(Status::unauthenticated(
            "invalid credentials: expected `authorization: Bearer <token>`",
        ));
    }
    Ok(token.trim())
}
