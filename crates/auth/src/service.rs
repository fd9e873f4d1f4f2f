use std::sync::Arc;

use dagmesh_proto::v1::token_service_server::{TokenService, TokenServiceServer};
use dagmesh_proto::v1::{
    ApiToken, CreateTokenRequest, CreateTokenResponse, ListTokensRequest, ListTokensResponse,
    RevokeTokenRequest, Scope, WhoAmIRequest, WhoAmIResponse,
};
use tonic::{Request, Response, Status};

use crate::{Authenticator, Principal, tokens};

/// `TokenService` over the metadata store. Scopes are checked by the [`crate::AuthLayer`].
pub struct TokenApi {
    authenticator: Arc<Authenticator>,
}

impl TokenApi {
    pub fn new(authenticator: Arc<Authenticator>) -> Self {
        Self { authenticator }
    }

    pub fn into_service(self) -> TokenServiceServer<Self> {
        TokenServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl TokenService for TokenApi {
    async fn create_token(
        &self,
        request: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        let principal = Principal::of(&request);
        let (stored, secret) = tokens::new_token(request.into_inner(), &principal.name)
            .map_err(Status::invalid_argument)?;
        let token = stored.token.clone();
        self.authenticator.store().put_token(stored).await?;
        if let Some(token) = &token {
            tracing::info!(name = %token.name, id = %token.token_id, by = %principal.name, "token created");
        }
        Ok(Response::new(CreateTokenResponse { token, secret }))
    }

    async fn list_tokens(
        &self,
        request: Request<ListTokensRequest>,
    ) -> Result<Response<ListTokensResponse>, Status> {
        let include_revoked = request.into_inner().include_revoked;
        let tokens = self
            .authenticator
            .store()
            .list_tokens()
            .await?
            .into_iter()
            .filter_map(|stored| stored.token)
            .filter(|token| include_revoked || token.revoked_at.is_none())
            .collect();
        Ok(Response::new(ListTokensResponse { tokens }))
    }

    async fn revoke_token(
        &self,
        request: Request<RevokeTokenRequest>,
    ) -> Result<Response<ApiToken>, Status> {
        let principal = Principal::of(&request);
        let name = request.into_inner().token;
        dagmesh_proto::limits::check_len("token", &name, dagmesh_proto::limits::MAX_NAME_LEN)
            .map_err(Status::invalid_argument)?;
        if name.is_empty() {
            return Err(Status::invalid_argument("token: an id or name is required"));
        }
        let stored = self.authenticator.store().revoke_token(&name).await?;
        let token = stored.token.unwrap_or_default();
        self.authenticator.forget(&token.token_id);
        tracing::info!(name = %token.name, id = %token.token_id, by = %principal.name, "token revoked");
        Ok(Response::new(token))
    }

    async fn who_am_i(
        &self,
        request: Request<WhoAmIRequest>,
    ) -> Result<Response<WhoAmIResponse>, Status> {
        let principal = Principal::of(&request);
        Ok(Response::new(WhoAmIResponse {
            principal: principal.name.to_string(),
            scopes: principal.scopes.iter().map(|&s: &Scope| s as i32).collect(),
            task_patterns: principal.task_patterns,
            labels: principal.labels,
            token_id: principal.token_id,
        }))
    }
}
