//! The network edge: the accept loop ([`run`]) and one driver task per connection ([`connection`]).
//! Connections are capped by a semaphore; shutdown is a watch channel every task listens to.

pub mod connection;
mod io;
pub mod limits;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::server::ServerState;

/// Accepts connections until `shutdown` turns true, then waits (briefly) for the drivers to finish.
pub async fn run(
    state: Arc<ServerState>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(state.config.max_connections));
    let mut conns = JoinSet::new();
    loop {
        let permit = tokio::select! {
            _ = shutdown.changed() => break,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            _ = shutdown.changed() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and similar: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let id = state.next_conn_id();
        let span = tracing::debug_span!("conn", id);
        let slot = match state.limits.admit(peer.ip()) {
            Ok(slot) => slot,
            Err(refusal) => {
                tracing::debug!(peer = %peer.ip(), reason = %refusal.message, "connection refused");
                conns.spawn(
                    async move {
                        connection::refuse(stream, &refusal).await;
                        drop(permit);
                    }
                    .instrument(span),
                );
                continue;
            }
        };
        let state = state.clone();
        let shutdown = shutdown.clone();
        conns.spawn(
            async move {
                connection::serve(state, stream, peer, shutdown).await;
                drop(slot);
                drop(permit);
            }
            .instrument(span),
        );
    }
    drop(listener);
    let drain = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(5), drain)
        .await
        .is_err()
    {
        conns.abort_all();
    }
}
