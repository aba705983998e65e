//! The REST API of p2pvmm: HTTP/1.1 over a Unix socket, wire-compatible with Cloud
//! Hypervisor's API on the endpoints both have (so `ch-remote` and clients generated from CH's
//! OpenAPI document work), plus p2pvmm's P2P endpoints.
//!
//! The server is thin: [`ApiServer`] parses and validates requests on its own threads and
//! forwards them as [`ApiRequest`]s over [`channel`] to the VMM thread, which owns the VM,
//! answers through a [`Responder`] and is woken by [`ApiChannel::eventfd`]. [`Client`] and the
//! `p2pvmm remote` CLI ([`cli`]) talk to it.

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
pub use server::{ApiServer, IO_TIMEOUT, MAX_CONNECTIONS, REPLY_TIMEOUT};
pub use types::*;
