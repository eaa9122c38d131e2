//! Flags shared by the commands that take part in calls (`call join`, `call listen`) or look
//! at them on the MoQ relay (`call calls`): one definition, one set of `CALL_*` variables.

use clap::builder::BoolishValueParser;
use clap::Args;

use super::config::Settings;
use crate::call::loopback::{SinkSpec, SourceSpec};
use crate::transport::{CertVerification, Delivery, TokenPolicy};

/// How to reach a call's MoQ relay.
#[derive(Args, Debug, Clone)]
pub struct RelayArgs {
    /// Pin the MoQ relay's certificate by its SHA-256 fingerprint (hex).
    #[arg(long, env = "CALL_MOQ_FINGERPRINT", conflicts_with = "moq_insecure",
          value_parser = super::config::parse_fingerprint)]
    pub moq_fingerprint: Option<String>,
    /// Accept any MoQ relay certificate. For development only.
    #[arg(long, env = "CALL_MOQ_INSECURE", value_parser = BoolishValueParser::new())]
    pub moq_insecure: bool,
    /// When to present the call's relay token in SETUP: `auto` (present it; without it if
    /// the relay refuses the session), `always`, `never`. Falls back to `relay_token` in
    /// config.toml, then `auto`.
    #[arg(long, env = "CALL_RELAY_TOKEN", value_name = "auto|always|never")]
    pub relay_token: Option<TokenPolicy>,
}

impl MediaArgs {
    /// The flag's choice, else `delivery` in config.toml (`None`: the default, stream).
    pub fn delivery(&self, settings: &Settings) -> Option<Delivery> {
        self.delivery.or(settings.delivery)
    }
}

impl RelayArgs {
    /// The flags' choice, else `moq_fingerprint` in config.toml, else the web PKI.
    pub fn verification(&self, settings: &Settings) -> anyhow::Result<CertVerification> {
        Ok(match (&self.moq_fingerprint, self.moq_insecure) {
            (Some(fp), _) => CertVerification::fingerprint(fp)
                .map_err(|e| anyhow::anyhow!("--moq-fingerprint: {e}"))?,
            (None, true) => CertVerification::Insecure,
            (None, false) => match &settings.moq_fingerprint {
                Some(fp) => CertVerification::fingerprint(fp)
                    .map_err(|e| anyhow::anyhow!("moq_fingerprint in config.toml: {e}"))?,
                None => CertVerification::WebPki,
            },
        })
    }

    pub fn token_policy(&self, settings: &Settings) -> TokenPolicy {
        self.relay_token
            .or(settings.relay_token)
            .unwrap_or_default()
    }
}

/// Audio and relay of a call we take part in.
#[derive(Args, Debug, Clone)]
pub struct MediaArgs {
    /// Audio in: device[:NAME], tone[:HZ], silence, wav:PATH (a bot leaves when it ends).
    #[arg(long, env = "CALL_SOURCE", default_value = "device")]
    pub source: SourceSpec,
    /// Audio out (every peer mixed): device[:NAME], null, wav:PATH.
    #[arg(long, env = "CALL_SINK", default_value = "device")]
    pub sink: SinkSpec,
    /// Leave after this many seconds; without it, until Ctrl-C.
    #[arg(short, long, env = "CALL_SECONDS", value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub seconds: Option<u64>,
    /// How frames travel in a call we start: `stream` (a QUIC stream per frame, lost
    /// packets retransmitted) or `datagram` (a MoQ datagram per frame, never retransmitted;
    /// FEC and concealment cover losses). A joined call uses its offer's. Falls back to
    /// `delivery` in config.toml, then `stream`. Example: --delivery datagram
    #[arg(long, env = "CALL_DELIVERY", value_name = "stream|datagram")]
    pub delivery: Option<Delivery>,
    #[command(flatten)]
    pub relay: RelayArgs,
}
