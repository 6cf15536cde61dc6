//! `tern token …`: the principals that may call the API, managed on the database directly (no
//! server needed). A token is printed once, when it is created; the database keeps its SHA-256.

use anyhow::{bail, Result};
use clap::Subcommand;

use tern::api::auth::new_principal;
use tern::domain::auth::{Credential, Role};
use tern::domain::limits::{Problems, MAX_ID};
use tern::domain::Timestamp;
use tern::store::StoreError;

use super::{open_store, Cli};

#[derive(Subcommand, Clone)]
pub(crate) enum TokenCommand {
    /// Create a principal and print its bearer token (shown this once). With --certificate, no
    /// token: a client certificate whose subject common name is NAME gets the role.
    Create {
        name: String,
        /// viewer (read, watch), operator (start, end, cancel, resolve) or admin (inventory,
        /// mappings).
        #[arg(long, value_parser = role)]
        role: Role,
        #[arg(long)]
        certificate: bool,
    },
    /// List the principals (never their tokens).
    List,
    /// Revoke a principal: its token or certificate stops working at once.
    Revoke { name: String },
}

fn role(s: &str) -> Result<Role, String> {
    Role::parse(s).ok_or_else(|| format!("{s:?} is not a role: viewer, operator or admin"))
}

pub(crate) async fn run(cli: &Cli, cmd: &TokenCommand) -> Result<()> {
    let store = open_store(cli).await?;
    match cmd {
        TokenCommand::Create {
            name,
            role,
            certificate,
        } => {
            let mut p = Problems::new();
            p.required("NAME", name, MAX_ID);
            if !p.is_empty() {
                bail!("{p}");
            }
            let credential = if *certificate {
                Credential::Certificate
            } else {
                Credential::Token
            };
            let (row, token) = new_principal(name.trim(), *role, credential, Timestamp::now());
            match store.add_principal(&row).await {
                Err(StoreError::Conflict { .. }) => {
                    bail!(
                        "{} exists already: revoke it first (tern token revoke {})",
                        row.name,
                        row.name
                    )
                }
                other => other?,
            }
            match token {
                Some(token) => {
                    eprintln!(
                        "created {} ({}); its token, shown this once (give it as TERN_TOKEN or TERN_TOKEN_FILE):",
                        row.name, row.role
                    );
                    println!("{token}");
                }
                None => eprintln!(
                    "created {} ({}): a client certificate whose subject common name is {} gets this role",
                    row.name, row.role, row.name
                ),
            }
        }
        TokenCommand::List => {
            super::print_table(
                &["name", "role", "credential", "created", "revoked"],
                &[],
                store.principals().await?.into_iter().map(|p| {
                    vec![
                        p.name,
                        p.role.to_string(),
                        p.credential.as_str().to_string(),
                        p.created_at.to_rfc3339(),
                        p.revoked_at.map(|t| t.to_rfc3339()).unwrap_or_else(|| "-".into()),
                    ]
                }),
            );
        }
        TokenCommand::Revoke { name } => {
            if !store.revoke_principal(name.trim(), Timestamp::now()).await? {
                bail!("no active principal named {name:?} (tern token list)");
            }
            eprintln!("revoked {name}");
        }
    }
    Ok(())
}
