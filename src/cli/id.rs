//! `call id new|show|import`.

use std::io::Read;

use anyhow::Context;
use clap::Subcommand;
use nostr_sdk::prelude::*;

use super::config::Settings;
use crate::group::{parse_secret_key, Home};

#[derive(Subcommand, Debug)]
pub enum IdCommand {
    /// Make a new Nostr identity in this home.
    New,
    /// Print this home's public key (npub and hex).
    Show,
    /// Use an existing secret key (nsec1… or hex). `-` reads it from stdin, which keeps it
    /// out of the shell history and the process list.
    Import {
        #[arg(value_name = "NSEC")]
        secret: SecretArg,
    },
}

/// A secret given on the command line; `Debug` does not show it.
#[derive(Clone)]
pub struct SecretArg(String);

impl std::str::FromStr for SecretArg {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_string()))
    }
}

impl std::fmt::Debug for SecretArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretArg([redacted])")
    }
}

pub fn run(settings: &Settings, cmd: &IdCommand) -> anyhow::Result<u8> {
    // `show` only reads: it works during a call and creates no home.
    let home = match cmd {
        IdCommand::Show => Home::open_read(&settings.home)?,
        _ => Home::open(&settings.home)?,
    };
    let keys = match cmd {
        IdCommand::New => {
            let keys = Keys::generate();
            home.set_identity(&keys)?;
            keys
        }
        IdCommand::Import { secret } => {
            let text = if secret.0 == "-" {
                let mut s = String::new();
                std::io::stdin()
                    .read_to_string(&mut s)
                    .context("reading the secret key from stdin")?;
                s
            } else {
                secret.0.clone()
            };
            let keys = parse_secret_key(text.trim())?;
            home.set_identity(&keys)?;
            keys
        }
        IdCommand::Show => home.keys()?,
    };
    let pk = keys.public_key();
    let npub = pk.to_bech32().context("encoding npub")?;
    if settings.json {
        println!(
            "{}",
            serde_json::json!({ "npub": npub, "hex": pk.to_hex(), "home": home.dir() })
        );
    } else {
        println!("npub {npub}\nhex  {}", pk.to_hex());
    }
    Ok(super::exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_of_an_import_hides_the_key() {
        let cmd = IdCommand::Import {
            secret: "nsec1secretsecret".parse().unwrap(),
        };
        assert!(!format!("{cmd:?}").contains("secretsecret"));
    }
}
