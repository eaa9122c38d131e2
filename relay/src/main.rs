use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CALL_RELAY_LOG")
                .unwrap_or_else(|_| "info,moq_transport=error".into()),
        )
        .with_writer(std::io::stderr)
        // Colour codes only where a person reads them, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = call_relay::RelayConfig::parse();
    let relay = call_relay::Relay::bind(&config).await?;
    println!("moq   {}", relay.moq_url());
    println!("nostr {}", relay.nostr_url());
    println!("fingerprint {}", relay.fingerprint());
    match relay.state_dir() {
        Some(dir) => println!("state {}", dir.display()),
        None => println!("state none (ephemeral)"),
    }
    // Ctrl-C or SIGTERM closes every MoQ session with a reason before the process exits.
    relay.run_until(call_relay::stop_signal()).await;
    Ok(())
}
