//! The REST API of p2pvmm: HTTP/1.1 over a Unix socket, wire-compatible with Cloud
//! Hypervisor's API on the endpoints both have (so `ch-remote` and clients generated from CH's
//! OpenAPI document work), plus p2pvmm's P2P endpoints.
//!
//! The server is thin: [`ApiServer`] parses and validates requests on its own threads and
//! forwards them as [`ApiRequest`]s over [`channel`] to the VMM thread, which owns the VM,
//! answers through a [`Responder`] and is woken by [`ApiChannel::eventfd`]. [`Client`] and the
//! `p2pvmm remote` CLI ([`cli`]) talk to it.
//!
//! Wiring it into a VMM:
//!
//! ```no_run
//! use api::{ApiReply, ApiRequest, ApiServer, ApiFailure};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let (sender, channel) = api::channel()?;
//! ApiServer::bind("/run/p2pvmm.sock".as_ref())?.spawn(sender)?;
//! // Register channel.eventfd() in the event loop; when it is readable:
//! for (request, responder) in channel.drain() {
//!     responder.send(match request {
//!         ApiRequest::VmBoot => Ok(ApiReply::Empty),
//!         _ => Err(ApiFailure::not_found("no VM")),
//!     });
//! }
//! # Ok(()) }
//! ```
//!
//! Errors are answered as `{"error": "<message naming the field or cause>"}` with the status
//! the VMM chose (400, 404, 409, 500) or the server's own (400, 403, 404, 405, 408, 411, 413, 431,
//! 503).

pub mod cli;
pub mod client;
mod error;
pub mod http;
pub mod openapi;
mod p2p_table;
mod request;
pub mod routes;
mod server;
mod types;

pub use client::{Client, ClientError};
pub use error::ApiError;
pub use p2p_table::{format_table, P2pTable, P2pTableRow};
pub use request::{
    channel, ApiChannel, ApiFailure, ApiReply, ApiRequest, ApiResult, ApiSender, Responder,
};
pub use server::{ApiServer, InjectedPanic, IO_TIMEOUT, MAX_CONNECTIONS, REPLY_TIMEOUT};
pub use types::*;
