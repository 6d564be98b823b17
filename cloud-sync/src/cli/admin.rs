//! Keys and registrations: new meter keys and admin tokens, meters and gateways registered
//! with an endpoint, API tokens made, revoked and listed.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Subcommand;
use countersign_cloud::auth::Role;
use countersign_cloud::client;
use countersign_protocol::keys::{parse_public_key, read_secret, write_secret, SECRET_KEY_BYTES};
use rand_core::{OsRng, RngCore};

use super::{http, read_token};

/// Commands of keys, registrations and API tokens.
#[derive(Subcommand)]
pub(crate) enum AdminCommand {
    /// Write a new random meter HMAC key (mode 0600; refuses to overwrite).
    KeygenMeter {
        /// Where to write it.
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a new random admin token (mode 0600; refuses to overwrite).
    KeygenToken {
        /// Where to write it.
        #[arg(long)]
        out: PathBuf,
    },
    /// Register a meter's HMAC key with an endpoint.
    RegisterMeter {
        /// Endpoint base URL, e.g. https://rating.example:8443.
        #[arg(long)]
        endpoint: String,
        /// The admin token file.
        #[arg(long)]
        token_file: PathBuf,
        /// The meter's id.
        #[arg(long)]
        meter_id: u64,
        /// The meter's key file (from keygen-meter).
        #[arg(long)]
        key_file: PathBuf,
    },
    /// Register a gateway's Ed25519 public key with an endpoint.
    RegisterGateway {
        /// Endpoint base URL.
        #[arg(long)]
        endpoint: String,
        /// The admin token file.
        #[arg(long)]
        token_file: PathBuf,
        /// The gateway's id.
        #[arg(long)]
        gateway_id: u64,
        /// The gateway's public key, 64 hex digits.
        #[arg(long)]
        public_key: String,
    },
    /// Make an API token: writes 32 random bytes (hex, mode 0600) to --out and registers
    /// only their SHA-256 with the endpoint, under a unique name and a role.
    CreateToken {
        /// Endpoint base URL.
        #[arg(long)]
        endpoint: String,
        /// An admin token file (the bootstrap admin_token_file or an admin API token).
        #[arg(long)]
        token_file: PathBuf,
        /// The new token's name (A-Z a-z 0-9 . _ -, at most 64).
        #[arg(long)]
        name: String,
        /// `query` (read usage) or `admin` (also register and manage tokens).
        #[arg(long, value_parser = role_arg)]
        role: Role,
        /// Where to write the new token (refuses to overwrite).
        #[arg(long)]
        out: PathBuf,
    },
    /// Revoke an API token by name.
    RevokeToken {
        /// Endpoint base URL.
        #[arg(long)]
        endpoint: String,
        /// An admin token file.
        #[arg(long)]
        token_file: PathBuf,
        /// The token's name.
        #[arg(long)]
        name: String,
    },
    /// List API tokens (names and roles) as JSON.
    ListTokens {
        /// Endpoint base URL.
        #[arg(long)]
        endpoint: String,
        /// An admin token file.
        #[arg(long)]
        token_file: PathBuf,
    },
}

fn role_arg(s: &str) -> Result<Role, String> {
    Role::parse(s).ok_or_else(|| format!("expected 'query' or 'admin', got '{s}'"))
}

/// Runs one command of this area.
pub(crate) async fn run(command: AdminCommand) -> Result<()> {
    match command {
        AdminCommand::KeygenMeter { out } => {
            keygen(&out, "meter key", countersign_protocol::keys::generate_meter_key())
        }
        AdminCommand::KeygenToken { out } => {
            let mut token = [0u8; SECRET_KEY_BYTES];
            OsRng.fill_bytes(&mut token);
            keygen(&out, "admin token", token)
        }
        AdminCommand::RegisterMeter { endpoint, token_file, meter_id, key_file } => {
            let token = read_token(&token_file)?;
            let key = read_secret(&key_file).context("reading the meter key")?;
            client::register_meter(&http()?, &endpoint, &token, meter_id, &key)
                .await
                .with_context(|| format!("registering meter {meter_id}"))?;
            println!("meter {meter_id} registered");
            Ok(())
        }
        AdminCommand::RegisterGateway { endpoint, token_file, gateway_id, public_key } => {
            let token = read_token(&token_file)?;
            let key = parse_public_key(&public_key).context("--public-key")?;
            client::register_gateway(&http()?, &endpoint, &token, gateway_id, &key)
                .await
                .with_context(|| format!("registering gateway {gateway_id}"))?;
            println!("gateway {gateway_id} registered");
            Ok(())
        }
        AdminCommand::CreateToken { endpoint, token_file, name, role, out } => {
            let token = read_token(&token_file)?;
            let mut secret = [0u8; SECRET_KEY_BYTES];
            OsRng.fill_bytes(&mut secret);
            // Written first: a token registered but lost would be useless, one written but
            // not registered is harmless (delete the file, run again).
            write_secret(&out, &secret).context("writing the new token")?;
            client::create_token(&http()?, &endpoint, &token, &name, role, &secret)
                .await
                .with_context(|| format!("registering token {name}"))?;
            println!("token {name} ({}) written to {} (mode 0600)", role.as_str(), out.display());
            Ok(())
        }
        AdminCommand::RevokeToken { endpoint, token_file, name } => {
            let token = read_token(&token_file)?;
            client::revoke_token(&http()?, &endpoint, &token, &name)
                .await
                .with_context(|| format!("revoking token {name}"))?;
            println!("token {name} revoked");
            Ok(())
        }
        AdminCommand::ListTokens { endpoint, token_file } => {
            let token = read_token(&token_file)?;
            let list = client::list_tokens(&http()?, &endpoint, &token).await.context("listing tokens")?;
            println!("{}", serde_json::to_string_pretty(&list).context("encoding the answer")?);
            Ok(())
        }
    }
}

fn keygen(out: &Path, what: &str, secret: [u8; SECRET_KEY_BYTES]) -> Result<()> {
    write_secret(out, &secret).with_context(|| format!("writing the {what}"))?;
    println!("wrote {what} to {} (mode 0600)", out.display());
    Ok(())
}
