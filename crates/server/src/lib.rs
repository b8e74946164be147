//! natter-server: the library behind `natterd`.
//!
//! # Layout
//! - [`config`]: [`ServerConfig`], every knob with its default.
//! - [`server`]: [`Server::start`] binds the listener, opens the store and runs until shut down.
//! - [`transport`]: accept loop, Noise handshake, hello and login, one driver task per connection.
//! - [`handlers`]: one module per request kind, turning a request into a response.
//! - [`registration`]: phone-number registration: codes, rate limits, SMS gateways.
//! - [`delivery`]: routing to online devices (the [`delivery::Router`]).
//! - [`directory`]: open companion link sessions and device-list watchers (in memory).
//! - [`media`]: media blobs: transfer tokens, the blob store and the HTTP service.
//! - [`store`]: the [`store::Store`] trait and its backends (SQLite by default).
//! - [`bus`]: the [`bus::Bus`] between nodes of a cluster (NATS), or none on a single node.
//!
//! The server routes and stores ciphertext only; it never holds a private key of a user or a plaintext.

pub mod bus;
pub mod config;
pub mod delivery;
pub mod directory;
pub mod handlers;
pub mod media;
pub mod registration;
pub mod server;
pub mod store;
pub mod transport;

pub use config::ServerConfig;
pub use server::{Server, ServerState};

/// Milliseconds since the Unix epoch, by the system clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
