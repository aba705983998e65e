//! Errors of the API crate itself: a request value that fails validation, and a socket that
//! cannot be served. Failures the VMM reports travel as [`crate::ApiFailure`] instead, because
//! they cross a thread boundary as plain data with an HTTP status attached.

use std::io;
use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ApiError {
    /// A request field has a value p2pvmm does not accept. `field` is the JSON path of the field
    /// (`devices[1].iommu`), so the user can find it in what they sent.
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    /// Another live process holds the socket's lock file.
    #[error(
        "API socket {} is in use by another running p2pvmm (it holds {}.lock)",
        .socket.display(),
        .socket.display()
    )]
    SocketInUse { socket: PathBuf },
    /// The lock file could not be opened or locked.
    #[error("cannot lock {}: {source}", .path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The socket could not be created.
    #[error("cannot create API socket {}: {source}", .socket.display())]
    Bind {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl ApiError {
    /// A validation error naming `field`.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ApiError {
        ApiError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The same error with its field placed inside `prefix` (`iommu` in `devices[1]` becomes
    /// `devices[1].iommu`), so a nested type's `validate` does not need to know where it sits.
    pub fn within(self, prefix: &str) -> ApiError {
        match self {
            ApiError::Invalid { field, reason } => ApiError::Invalid {
                field: format!("{prefix}.{field}"),
                reason,
            },
            other => other,
        }
    }
}
