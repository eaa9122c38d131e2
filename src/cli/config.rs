//! Where a user's state lives and which relays to use: flags override environment variables
//! (clap does both), which override `$CALL_HOME/config.toml`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use url::Url;

use crate::transport::{Delivery, TokenPolicy};

/// Flags shared by the identity, key and group commands.
#[derive(Args, Debug, Clone)]
pub struct CommonArgs {
    /// Directory holding identity, MLS state and config.toml [default: the platform data
    /// dir, e.g. ~/.local/share/call].
    #[arg(long, env = "CALL_HOME", global = true)]
    pub home: Option<PathBuf>,
    /// Nostr relay(s), comma-separated (ws:// or wss://). Falls back to `nostr_relays` in
    /// config.toml.
    #[arg(
        long = "nostr-relay",
        env = "CALL_NOSTR_RELAYS",
        value_delimiter = ',',
        global = true,
        value_parser = parse_nostr_url
    )]
    pub nostr_relays: Vec<Url>,
    /// MoQ relay for calls (moqt:// or https://). Falls back to `moq_relay` in config.toml.
    #[arg(long, env = "CALL_MOQ_RELAY", global = true, value_parser = parse_moq_url)]
    pub moq_relay: Option<Url>,
    /// Seconds to wait for relays to answer a query.
    #[arg(long, env = "CALL_NOSTR_TIMEOUT", default_value_t = 10, global = true,
          value_parser = clap::value_parser!(u64).range(1..=600))]
    pub timeout: u64,
    /// Print exactly one JSON object on stdout.
    #[arg(long, global = true)]
    pub json: bool,
}

/// `$CALL_HOME/config.toml`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub nostr_relays: Vec<Url>,
    pub moq_relay: Option<Url>,
    /// `auto`, `always` or `never`: when `call join` presents the relay token.
    pub relay_token: Option<String>,
    /// SHA-256 fingerprint (hex) of the MoQ relay's certificate, as `--moq-fingerprint`.
    pub moq_fingerprint: Option<String>,
    /// `stream` or `datagram`: how frames travel in a call `call join` starts.
    pub delivery: Option<String>,
}

/// A MoQ relay URL: `moqt://` (raw QUIC) or `https://` (WebTransport), with a host.
pub fn parse_moq_url(s: &str) -> Result<Url, String> {
    let url = Url::parse(s).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(url.scheme(), "moqt" | "https") {
        return Err(format!(
            "`{}://` is not a MoQ relay; use moqt://HOST:PORT (or https:// for WebTransport)",
            url.scheme()
        ));
    }
    if url.host().is_none() {
        return Err("the URL has no host".into());
    }
    Ok(url)
}

/// A Nostr relay URL: `ws://` or `wss://`.
pub fn parse_nostr_url(s: &str) -> Result<Url, String> {
    let url = Url::parse(s).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(url.scheme(), "ws" | "wss") {
        return Err(format!(
            "`{}://` is not a Nostr relay; use ws:// or wss://",
            url.scheme()
        ));
    }
    Ok(url)
}

/// A certificate fingerprint: 32 bytes of hex, `:` separators allowed.
pub fn parse_fingerprint(s: &str) -> Result<String, String> {
    crate::transport::CertVerification::fingerprint(s)?;
    Ok(s.to_string())
}

/// Settings after flags, environment and file are combined.
#[derive(Debug, Clone)]
pub struct Settings {
    pub home: PathBuf,
    pub nostr_relays: Vec<Url>,
    pub moq_relay: Option<Url>,
    /// From config.toml; `call join --relay-token` overrides it.
    pub relay_token: Option<TokenPolicy>,
    /// From config.toml; `--moq-fingerprint` (and `--moq-insecure`) override it.
    pub moq_fingerprint: Option<String>,
    /// From config.toml; `--delivery` overrides it.
    pub delivery: Option<Delivery>,
    pub timeout: Duration,
    pub json: bool,
}

impl CommonArgs {
    pub fn resolve(&self) -> anyhow::Result<Settings> {
        let home = match &self.home {
            Some(h) => h.clone(),
            None => dirs::data_dir()
                .context("no platform data directory; set CALL_HOME or --home")?
                .join("call"),
        };
        let file = read_config(&home)?;
        let relay_token = file
            .relay_token
            .as_deref()
            .map(str::parse::<TokenPolicy>)
            .transpose()
            .with_context(|| format!("{}: relay_token", home.join("config.toml").display()))?;
        let moq_fingerprint = file
            .moq_fingerprint
            .map(|f| parse_fingerprint(&f))
            .transpose()
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("{}: moq_fingerprint", home.join("config.toml").display()))?;
        let delivery = file
            .delivery
            .as_deref()
            .map(str::parse::<Delivery>)
            .transpose()
            .with_context(|| format!("{}: delivery", home.join("config.toml").display()))?;
        Ok(Settings {
            relay_token,
            delivery,
            moq_fingerprint,
            nostr_relays: if self.nostr_relays.is_empty() {
                file.nostr_relays
            } else {
                self.nostr_relays.clone()
            },
            moq_relay: self.moq_relay.clone().or(file.moq_relay),
            timeout: Duration::from_secs(self.timeout),
            json: self.json,
            home,
        })
    }
}

fn read_config(home: &Path) -> anyhow::Result<ConfigFile> {
    let path = home.join("config.toml");
    match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str(&text).with_context(|| format!("{}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ConfigFile::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_parses_and_rejects_unknown_keys() {
        let c: ConfigFile = toml::from_str(
            "nostr_relays = [\"ws://a:1\", \"wss://b\"]\nmoq_relay = \"moqt://m:4443\"",
        )
        .unwrap();
        assert_eq!(c.nostr_relays.len(), 2);
        assert_eq!(c.moq_relay.unwrap().as_str(), "moqt://m:4443");
        assert!(toml::from_str::<ConfigFile>("nostr_relay = []").is_err());
        let c: ConfigFile = toml::from_str("relay_token = \"never\"").unwrap();
        assert_eq!(c.relay_token.as_deref(), Some("never"));
    }

    #[test]
    fn a_bad_relay_token_policy_in_the_file_is_refused_with_its_name() {
        let dir = std::env::temp_dir().join(format!("call-config-rt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let args = CommonArgs {
            home: Some(dir.clone()),
            nostr_relays: vec![],
            moq_relay: None,
            timeout: 5,
            json: false,
        };
        std::fs::write(dir.join("config.toml"), "relay_token = \"sometimes\"").unwrap();
        let err = format!("{:#}", args.resolve().unwrap_err());
        assert!(
            err.contains("relay_token") && err.contains("sometimes"),
            "{err}"
        );
        std::fs::write(dir.join("config.toml"), "moq_fingerprint = \"zz\"").unwrap();
        let err = format!("{:#}", args.resolve().unwrap_err());
        assert!(err.contains("moq_fingerprint"), "{err}");
        let fp = "ab".repeat(32);
        std::fs::write(
            dir.join("config.toml"),
            format!("moq_fingerprint = \"{fp}\""),
        )
        .unwrap();
        assert_eq!(args.resolve().unwrap().moq_fingerprint, Some(fp));
        std::fs::write(dir.join("config.toml"), "relay_token = \"Never\"").unwrap();
        assert_eq!(
            args.resolve().unwrap().relay_token,
            Some(TokenPolicy::Never)
        );
        std::fs::write(dir.join("config.toml"), "delivery = \"datagram\"").unwrap();
        assert_eq!(args.resolve().unwrap().delivery, Some(Delivery::Datagram));
        std::fs::write(dir.join("config.toml"), "delivery = \"pigeon\"").unwrap();
        let err = format!("{:#}", args.resolve().unwrap_err());
        assert!(err.contains("delivery") && err.contains("pigeon"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn relay_urls_and_fingerprints_are_checked_as_flags() {
        assert!(parse_moq_url("moqt://127.0.0.1:4443").is_ok());
        assert!(parse_moq_url("https://relay.example/moq").is_ok());
        assert!(parse_moq_url("http://127.0.0.1:4443")
            .unwrap_err()
            .contains("moqt://"));
        assert!(parse_nostr_url("wss://relay.example").is_ok());
        assert!(parse_nostr_url("https://relay.example").is_err());
        assert!(parse_fingerprint("zz").is_err());
        assert!(parse_fingerprint(&format!("{}ab", "ab:".repeat(31))).is_ok());
    }

    #[test]
    fn flags_override_the_file() {
        let dir = std::env::temp_dir().join(format!("call-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.toml"), "nostr_relays = [\"ws://file:1\"]").unwrap();
        let mut args = CommonArgs {
            home: Some(dir.clone()),
            nostr_relays: vec![],
            moq_relay: None,
            timeout: 5,
            json: false,
        };
        assert_eq!(
            args.resolve().unwrap().nostr_relays[0].as_str(),
            "ws://file:1/"
        );
        args.nostr_relays = vec![Url::parse("ws://flag:2").unwrap()];
        assert_eq!(
            args.resolve().unwrap().nostr_relays[0].as_str(),
            "ws://flag:2/"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
