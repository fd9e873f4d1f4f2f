//! `dagmesh tokens`: API tokens (create, list, revoke) and `whoami`.

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::Duration;

use dagmesh_auth::scope_name;
use dagmesh_proto::v1::token_service_client::TokenServiceClient;
use dagmesh_proto::v1::{
    ApiToken, CreateTokenRequest, ListTokensRequest, RevokeTokenRequest, Scope, WhoAmIRequest,
};
use serde_json::{Value, json};

use super::format::Table;
use super::{Global, OutputFormat, connect, print_json};

#[derive(clap::Subcommand, Debug)]
pub enum TokensCommand {
    /// Create a token; it is printed once and cannot be read back.
    Create {
        /// Unique name, e.g. gpu-pool.
        #[arg(long)]
        name: String,
        /// worker, submit, read, operate or admin (repeat for several).
        #[arg(long = "scope", required = true, value_parser = parse_scope)]
        scopes: Vec<Scope>,
        /// For worker tokens: task types the worker may register, e.g. 'mesh.*' (repeat).
        #[arg(long = "task")]
        tasks: Vec<String>,
        /// For worker tokens: the only labels the worker may claim, KEY=VALUE (repeat).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Lifetime, e.g. 30d or 12h; default: no expiry.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
    /// List tokens (without secrets).
    List {
        /// Include revoked tokens.
        #[arg(long)]
        all: bool,
    },
    /// Revoke a token by id or name.
    Revoke {
        /// The token's id or name.
        #[arg(value_name = "ID_OR_NAME")]
        id_or_name: String,
    },
    /// Show the principal and scopes of the token in use.
    Whoami,
}

fn parse_scope(text: &str) -> Result<Scope, String> {
    match text {
        "worker" => Ok(Scope::Worker),
        "submit" => Ok(Scope::Submit),
        "read" => Ok(Scope::Read),
        "operate" => Ok(Scope::Operate),
        "admin" => Ok(Scope::Admin),
        other => Err(format!(
            "{other:?} is not a scope (worker, submit, read, operate, admin)"
        )),
    }
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{text:?}: expected KEY=VALUE"))
}

pub async fn run(global: &Global, command: TokensCommand) -> anyhow::Result<ExitCode> {
    let mut client = TokenServiceClient::new(connect(global).await?);
    match command {
        TokensCommand::Create {
            name,
            scopes,
            tasks,
            labels,
            ttl,
        } => {
            let request = CreateTokenRequest {
                name,
                scopes: scopes.into_iter().map(|s| s as i32).collect(),
                task_patterns: tasks,
                labels: labels.into_iter().collect::<HashMap<_, _>>(),
                ttl: ttl.map(|ttl| prost_types::Duration {
                    seconds: ttl.as_secs().min(i64::MAX as u64) as i64,
                    nanos: ttl.subsec_nanos() as i32,
                }),
            };
            let response = client.create_token(request).await?.into_inner();
            let token = response.token.unwrap_or_default();
            match global.output {
                OutputFormat::Json => print_json(&json!({
                    "token": token_json(&token),
                    "secret": response.secret,
                })),
                OutputFormat::Text => {
                    eprintln!(
                        "created token {} (id {}, scopes: {}); it is shown only this once:",
                        token.name,
                        token.token_id,
                        scopes_text(&token)
                    );
                    outln!("{}", response.secret);
                }
            }
        }
        TokensCommand::List { all } => {
            let tokens = client
                .list_tokens(ListTokensRequest {
                    include_revoked: all,
                })
                .await?
                .into_inner()
                .tokens;
            match global.output {
                OutputFormat::Json => print_json(
                    &json!({ "tokens": tokens.iter().map(token_json).collect::<Vec<_>>() }),
                ),
                OutputFormat::Text => {
                    let mut table = Table::new(&[
                        "ID",
                        "NAME",
                        "SCOPES",
                        "TASKS",
                        "CREATED BY",
                        "EXPIRES",
                        "REVOKED",
                    ]);
                    for token in &tokens {
                        table.row(vec![
                            token.token_id.clone(),
                            token.name.clone(),
                            scopes_text(token),
                            token.task_patterns.join(","),
                            token.created_by.clone(),
                            time_text(token.expires_at.as_ref(), "never"),
                            time_text(token.revoked_at.as_ref(), "-"),
                        ]);
                    }
                    out!("{}", table.render());
                }
            }
        }
        TokensCommand::Revoke { id_or_name } => {
            let token = client
                .revoke_token(RevokeTokenRequest { token: id_or_name })
                .await?
                .into_inner();
            match global.output {
                OutputFormat::Json => print_json(&token_json(&token)),
                OutputFormat::Text => outln!("revoked token {} ({})", token.name, token.token_id),
            }
        }
        TokensCommand::Whoami => {
            let me = client.who_am_i(WhoAmIRequest {}).await?.into_inner();
            let scopes = scope_names(&me.scopes);
            match global.output {
                OutputFormat::Json => print_json(&json!({
                    "principal": me.principal,
                    "token_id": me.token_id,
                    "scopes": scopes,
                    "task_patterns": me.task_patterns,
                    "labels": me.labels,
                })),
                OutputFormat::Text => {
                    outln!("{} (scopes: {})", me.principal, scopes.join(", "));
                    if !me.task_patterns.is_empty() {
                        outln!("task types: {}", me.task_patterns.join(", "));
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Scope numbers as the names the CLI takes (unknown numbers are left out).
fn scope_names(scopes: &[i32]) -> Vec<&'static str> {
    scopes
        .iter()
        .filter_map(|&s| Scope::try_from(s).ok())
        .map(scope_name)
        .collect()
}

fn scopes_text(token: &ApiToken) -> String {
    scope_names(&token.scopes).join(",")
}

fn time_text(at: Option<&prost_types::Timestamp>, none: &str) -> String {
    match at.and_then(|at| std::time::SystemTime::try_from(*at).ok()) {
        Some(time) => humantime::format_rfc3339_seconds(time).to_string(),
        None => none.to_owned(),
    }
}

fn token_json(token: &ApiToken) -> Value {
    let scopes = scope_names(&token.scopes);
    json!({
        "token_id": token.token_id,
        "name": token.name,
        "scopes": scopes,
        "task_patterns": token.task_patterns,
        "labels": token.labels,
        "created_at": super::json::timestamp(token.created_at.as_ref()),
        "expires_at": super::json::timestamp(token.expires_at.as_ref()),
        "revoked_at": super::json::timestamp(token.revoked_at.as_ref()),
        "created_by": token.created_by,
    })
}
