//! natterd: the Natter server. A thin binary over natter-server.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use natter_server::{Server, ServerConfig};

/// The Natter server.
#[derive(Parser, Debug)]
#[command(name = "natterd", version, about = "The Natter server")]
struct Args {
    /// Data directory (database, server key).
    #[arg(long, env = "NATTERD_DATA", default_value = "./natter-data")]
    data: PathBuf,
    /// Address to listen on.
    #[arg(long, env = "NATTERD_LISTEN", default_value = "127.0.0.1:5222")]
    listen: SocketAddr,
    /// Where registration codes go: console, file:PATH or http:URL.
    #[arg(long, env = "NATTERD_SMS_GATEWAY", default_value = "console")]
    sms_gateway: String,
    /// Maximum simultaneous connections.
    #[arg(long, default_value_t = 18_000)]
    max_connections: usize,
    /// Registration codes one client IP may request per hour.
    #[arg(long, default_value_t = 20)]
    codes_per_ip_per_hour: u32,
    /// Code verifications one client IP may attempt per hour.
    #[arg(long, default_value_t = 60)]
    verifies_per_ip_per_hour: u32,
    /// Registration codes one number may receive per hour.
    #[arg(long, default_value_t = 5)]
    codes_per_number_per_hour: u32,
    /// Companions of a phone that has not connected for this many days are logged out.
    #[arg(long, default_value_t = 14)]
    companion_logout_days: u64,
    /// Address of the blob (media) HTTP service.
    #[arg(long, env = "NATTERD_HTTP_LISTEN", default_value = "127.0.0.1:5223")]
    http_listen: SocketAddr,
    /// Storage quota per account for media blobs, in MiB.
    #[arg(long, default_value_t = 10 * 1024)]
    media_quota_mib: u64,
    /// Numbers one account may look up in contact discovery per day.
    #[arg(long, default_value_t = natter_proto::limits::DISCOVERY_ACCOUNT_QUOTA)]
    discovery_account_quota: u32,
    /// Numbers one client IP may look up in contact discovery per day.
    #[arg(long, default_value_t = natter_proto::limits::DISCOVERY_IP_QUOTA)]
    discovery_ip_quota: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NATTERD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut config = ServerConfig::new(&args.data);
    config.listen = args.listen;
    config.sms_gateway = args.sms_gateway;
    config.max_connections = args.max_connections;
    config.registration.codes_per_ip_per_hour = args.codes_per_ip_per_hour;
    config.registration.verifies_per_ip_per_hour = args.verifies_per_ip_per_hour;
    config.registration.codes_per_number_per_hour = args.codes_per_number_per_hour;
    config.companion_logout_after =
        std::time::Duration::from_secs(args.companion_logout_days.max(1) * 24 * 3600);
    config.http_listen = Some(args.http_listen);
    config.media_quota_bytes = args.media_quota_mib.saturating_mul(1024 * 1024);
    config.discovery_account_quota = args.discovery_account_quota;
    config.discovery_ip_quota = args.discovery_ip_quota;
    let server = Server::start(config)
        .await
        .with_context(|| format!("starting natterd in {}", args.data.display()))?;
    eprintln!(
        "natterd listening on {} (media on http://{}, server key {})",
        server.local_addr(),
        server.http_addr(),
        hex::encode(server.public_key())
    );
    wait_for_signal().await;
    eprintln!("natterd shutting down");
    server.shutdown().await;
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
