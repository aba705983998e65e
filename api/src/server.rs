//! The API server: a Unix socket only its owner's uid may use, an accept loop on the
//! `p2pvmm-api` thread and one short-lived thread per connection (at most
//! [`MAX_CONNECTIONS`]), so a slow client or a long VMM action does not block other clients.
//! Each connection carries one request: it is read, routed, parsed and validated here, forwarded
//! to the VMM thread, and the VMM's answer written back.

use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::error::ApiError;
use crate::http::{self, ReadError, Request, Response, BODY_LIMIT};
use crate::openapi::cached_document;
use crate::request::{ApiReply, ApiSender};
use crate::routes;

/// Connections served at once; more are answered 503 at once.
pub const MAX_CONNECTIONS: usize = 8;
/// How long a client may take to send its request, and to take the answer.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request waits for the VMM's answer by default.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// A bound API socket, not yet serving.
#[derive(Debug)]
pub struct ApiServer {
    listener: UnixListener,
    socket: PathBuf,
    /// Held (flocked) for as long as the server lives, so a second p2pvmm cannot take the path.
    lock: File,
    reply_timeout: Duration,
    panics: InjectedPanic,
}

/// A test knob (p2pvmm's `P2PVMM_X_PANIC=api` / `api-conn`): where the server panics on purpose.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InjectedPanic {
    /// The accept thread, when a client connects.
    pub on_accept: bool,
    /// A connection thread, once it has read a request.
    pub on_request: bool,
}

fn lock_path(socket: &Path) -> PathBuf {
    let mut path = socket.as_os_str().to_owned();
    path.push(".lock");
    PathBuf::from(path)
}

/// Creates the socket with mode 0600. The umask is process-wide, so it is set only around the
/// `bind` call; the mode is then set again explicitly in case another thread raced it.
fn bind_private(socket: &Path) -> io::Result<UnixListener> {
    // SAFETY: umask only swaps the process file-mode mask; it cannot fail.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(socket);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound?;
    fs::set_permissions(socket, fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

impl ApiServer {
    /// Takes `<path>.lock`, replaces a stale socket at `path` (one no live process holds the
    /// lock of) and binds a fresh one with mode 0600. Fails naming the socket if another p2pvmm
    /// holds the lock.
    pub fn bind(path: &Path) -> Result<ApiServer, ApiError> {
        let lock_path = lock_path(path);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|source| ApiError::Lock {
                path: lock_path.clone(),
                source,
            })?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let source = io::Error::last_os_error();
            return Err(if source.kind() == ErrorKind::WouldBlock {
                ApiError::SocketInUse {
                    socket: path.to_path_buf(),
                }
            } else {
                ApiError::Lock {
                    path: lock_path,
                    source,
                }
            });
        }
        // With the lock held, whatever is at the path is left over from a dead process.
        match fs::remove_file(path) {
            Ok(()) => log::info!("removed stale API socket {}", path.display()),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(source) => {
                return Err(ApiError::Bind {
                    socket: path.to_path_buf(),
                    source,
                })
            }
        }
        let listener = bind_private(path).map_err(|source| ApiError::Bind {
            socket: path.to_path_buf(),
            source,
        })?;
        Ok(ApiServer {
            listener,
            socket: path.to_path_buf(),
            lock,
            reply_timeout: REPLY_TIMEOUT,
            panics: InjectedPanic::default(),
        })
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// How long a request waits for the VMM (default [`REPLY_TIMEOUT`]).
    pub fn with_reply_timeout(mut self, timeout: Duration) -> ApiServer {
        self.reply_timeout = timeout;
        self
    }

    /// Panics on purpose where `panics` says (a test knob).
    pub fn with_injected_panic(mut self, panics: InjectedPanic) -> ApiServer {
        self.panics = panics;
        self
    }

    /// Serves on the `p2pvmm-api` thread until the process exits.
    pub fn spawn(self, sender: ApiSender) -> io::Result<JoinHandle<()>> {
        self.spawn_with(sender, || Ok(()))
    }

    /// Like [`spawn`](Self::spawn), with `setup` run first on the new thread (the VMM installs
    /// the API thread's seccomp filter there, which its connection threads inherit). A failed
    /// `setup` is this call's error, and nothing is served.
    pub fn spawn_with<F>(self, sender: ApiSender, setup: F) -> io::Result<JoinHandle<()>>
    where
        F: FnOnce() -> io::Result<()> + Send + 'static,
    {
        let (ready, result) = std::sync::mpsc::sync_channel(1);
        let thread = thread::Builder::new()
            .name("p2pvmm-api".into())
            .spawn(move || {
                let outcome = setup();
                let ok = outcome.is_ok();
                let _ = ready.send(outcome);
                if ok {
                    self.accept_loop(sender);
                }
            })?;
        match result.recv() {
            Ok(Ok(())) => Ok(thread),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(io::Error::other("the API thread ended during its set-up")),
        }
    }

    fn accept_loop(self, sender: ApiSender) {
        let _lock = &self.lock;
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        let active = Arc::new(AtomicUsize::new(0));
        log::info!("API listening on {}", self.socket.display());
        for stream in self.listener.incoming() {
            let mut stream = match stream {
                Ok(stream) => stream,
                Err(e) => {
                    log::warn!("API socket {}: accept failed: {e}", self.socket.display());
                    // Out of descriptors and the like: do not spin.
                    thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            if self.panics.on_accept {
                panic!("injected panic on the API accept thread");
            }
            let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
            match peer_uid(&stream) {
                Ok(uid) if uid == euid => {}
                Ok(uid) => {
                    log::warn!(
                        "API socket {}: refused a connection from uid {uid}: only uid {euid} may use it",
                        self.socket.display()
                    );
                    let message = format!("uid {uid} may not use this API socket");
                    let _ = Response::error(403, message).write_to(&mut stream);
                    continue;
                }
                Err(e) => {
                    log::warn!(
                        "API socket {}: cannot read the peer's uid: {e}",
                        self.socket.display()
                    );
                    continue;
                }
            }
            if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                active.fetch_sub(1, Ordering::SeqCst);
                let busy = format!("more than {MAX_CONNECTIONS} API requests at once; retry");
                let _ = Response::error(503, busy).write_to(&mut stream);
                continue;
            }
            let slot = ConnectionSlot(Arc::clone(&active));
            let sender = sender.clone();
            let reply_timeout = self.reply_timeout;
            let panic_on_request = self.panics.on_request;
            let spawned = thread::Builder::new()
                .name("p2pvmm-api-conn".into())
                .spawn(move || {
                    let _slot = slot;
                    serve_connection(stream, &sender, reply_timeout, panic_on_request);
                });
            if let Err(e) = spawned {
                log::warn!("API: cannot start a connection thread: {e}");
            }
        }
    }
}

/// Frees a connection slot when its thread ends, however it ends.
struct ConnectionSlot(Arc<AtomicUsize>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The uid of the process at the other end, from `SO_PEERCRED`.
fn peer_uid(stream: &UnixStream) -> io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

fn serve_connection(
    mut stream: UnixStream,
    sender: &ApiSender,
    reply_timeout: Duration,
    panic_on_request: bool,
) {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let response = match http::read_request(&mut stream, BODY_LIMIT) {
        Ok(request) => {
            if panic_on_request {
                panic!("injected panic on an API connection thread");
            }
            let response = answer(&request, sender, reply_timeout);
            log::debug!(
                "API {} {} -> {}",
                request.method,
                request.path,
                response.status
            );
            response
        }
        Err(ReadError::Closed) => return,
        Err(ReadError::Io(e))
            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
        {
            Response::error(
                408,
                format!("the request did not arrive within {IO_TIMEOUT:?}"),
            )
        }
        Err(ReadError::Io(e)) => {
            log::debug!("API: reading a request failed: {e}");
            return;
        }
        Err(ReadError::Reject(response)) => {
            // The client may still be sending what was refused (a body over the limit): closing
            // with it unread would reset the connection before the client reads the answer.
            if let Err(e) = response.write_to(&mut stream) {
                log::debug!("API: writing the answer failed: {e}");
            }
            drain(&mut stream);
            return;
        }
    };
    if let Err(e) = response.write_to(&mut stream) {
        log::debug!("API: writing the answer failed: {e}");
    }
}

/// Most a refused request may still send before the server closes on it anyway.
const DRAIN_LIMIT: u64 = 64 << 20;

/// Ends the answer (the client sees EOF) and discards what the client still sends, up to
/// [`DRAIN_LIMIT`] and the read timeout.
fn drain(stream: &mut UnixStream) {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = io::copy(&mut Read::by_ref(stream).take(DRAIN_LIMIT), &mut io::sink());
}

/// Routes one request and produces its response.
fn answer(request: &Request, sender: &ApiSender, reply_timeout: Duration) -> Response {
    let Some(route) = routes::find(&request.path) else {
        return Response::error(404, format!("no endpoint {}", request.path));
    };
    let method = route.method.as_str();
    if request.method != method {
        return Response::method_not_allowed(&request.method, &request.path, method);
    }
    let forwarded = match route.handler.request(&request.body) {
        None => return Response::json(200, cached_document().to_string()),
        Some(Err(failure)) => return Response::error(failure.status, failure.message),
        Some(Ok(forwarded)) => forwarded,
    };
    match sender.request(forwarded, reply_timeout) {
        Ok(ApiReply::Empty) => Response::no_content(),
        Ok(ApiReply::Json(value)) => Response::json(200, value.to_string()),
        Err(failure) => {
            if failure.status >= 500 {
                log::warn!(
                    "API {} {}: {}",
                    request.method,
                    request.path,
                    failure.message
                );
            }
            Response::error(failure.status, failure.message)
        }
    }
}
