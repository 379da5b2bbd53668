//! The control socket of `cdp protect`: a Unix socket (mode 0600) through
//! which `cdp point` asks for an application-consistent (tagged) point. This
//! module owns the socket file (`socket.rs`: private, never over anything
//! but a stale socket, removed on exit), the line protocol
//! ([`protocol`], "Control socket, version 1" in `docs/FORMATS.md`), the
//! server inside protect ([`server`]) and the client ([`client`]).
//!
//! A `tag` request inserts a tagged barrier (a flush, then the tag in the
//! capture stream), replies with its sequence number at once (so the
//! application can be thawed), and replies again once the target has made
//! the point durable.
pub mod client;
pub mod protocol;
pub mod server;
mod socket;

use std::path::PathBuf;

pub use client::{ClientError, ControlClient};
pub use protocol::{ErrorCode, ProtocolError, Reply, Request};
pub use server::{ControlContext, ControlServer};

/// Why the control socket cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {}: {op}: {source}", .path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket {}: something other than a socket is there; refusing to replace it", .path.display())]
    NotASocket { path: PathBuf },
    #[error("control socket {}: another process listens on it (is another cdp protect running?)", .path.display())]
    InUse { path: PathBuf },
}
