//! Our NBD protocol layer (fixed newstyle, structured replies, the
//! `base:allocation` metadata context), serving any [`BlockDevice`]. The
//! `nbd` crate was not used; `docs/NBD.md` says why.
pub mod handshake;
pub mod inbound;
pub mod outbound;
pub mod transmission;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncRead;
use tokio_util::sync::CancellationToken;

use crate::device::BlockDevice;
use handshake::{HandshakeEnd, Session};
use inbound::Inbound;
use outbound::ReplySink;
use transmission::TransmissionEnd;
use wire::*;

/// How an export presents itself.
#[derive(Debug, Clone, Default)]
pub struct ExportConfig {
    pub name: String,
    pub description: String,
    pub read_only: bool,
}

/// A device served under a name.
#[derive(Debug)]
pub struct Export<D> {
    pub config: ExportConfig,
    pub device: D,
}

impl<D: BlockDevice> Export<D> {
    /// The export answers to its own name and to the empty (default) name.
    pub fn answers_to(&self, name: &str) -> bool {
        name.is_empty() || name == self.config.name
    }

    pub fn transmission_flags(&self, session: Session) -> u16 {
        let mut flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_CACHE;
        // Every connection shares one backing descriptor, so a flush on any
        // of them covers writes completed on all of them.
        flags |= FLAG_CAN_MULTI_CONN;
        if self.config.read_only {
            flags |= FLAG_READ_ONLY;
        } else {
            flags |= FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
        }
        if session.structured_replies {
            flags |= FLAG_SEND_DF;
        }
        flags
    }
}

/// How a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionEnd {
    #[error("negotiation: {0}")]
    Handshake(#[from] HandshakeEnd),
    #[error("transmission: {0}")]
    Transmission(#[from] TransmissionEnd),
}

impl ConnectionEnd {
    /// Whether the connection ended the way the protocol means connections to end.
    pub fn is_orderly(&self) -> bool {
        matches!(
            self,
            ConnectionEnd::Handshake(HandshakeEnd::Aborted)
                | ConnectionEnd::Transmission(TransmissionEnd::Disconnect)
                | ConnectionEnd::Transmission(TransmissionEnd::Hangup)
                | ConnectionEnd::Transmission(TransmissionEnd::Shutdown)
        )
    }
}

/// How long a client may keep a shutting-down server waiting: to finish its
/// negotiation, or to accept a reply it is being sent.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Completes [`SHUTDOWN_GRACE`] after `shutdown` is cancelled.
pub async fn grace_after(shutdown: &CancellationToken) {
    shutdown.cancelled().await;
    tokio::time::sleep(SHUTDOWN_GRACE).await;
}

/// Runs one client connection from greeting to close.
pub async fn serve_connection<R, W, D>(
    reader: R,
    mut writer: W,
    export: Arc<Export<D>>,
    shutdown: CancellationToken,
) -> ConnectionEnd
where
    R: AsyncRead + Unpin,
    W: ReplySink,
    D: BlockDevice,
{
    let mut inbound = Inbound::new(reader);
    let negotiation = handshake::negotiate(&mut inbound, &mut writer, &export, &shutdown);
    let session = tokio::select! {
        result = negotiation => match result {
            Ok(session) => session,
            Err(end) => return end.into(),
        },
        // A client that says nothing must not hold up a shutdown.
        () = grace_after(&shutdown) => return HandshakeEnd::Shutdown.into(),
    };
    transmission::serve(inbound, writer, export, session, shutdown)
        .await
        .into()
}
