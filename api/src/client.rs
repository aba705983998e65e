//! A client for the API socket, to the same contract as Cloud Hypervisor's `api_client`: one
//! request per connection, the status taken from the status line's code alone (servers may or
//! may not write a reason phrase), the body exactly `Content-Length` bytes, and a 204 without
//! `Content-Length` read as empty.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

use crate::routes::API_ROOT;
use crate::server::REPLY_TIMEOUT;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot connect to the API socket {}: {source}", .socket.display())]
    Connect {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("API socket {}: {source}", .socket.display())]
    Io {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("API socket {}: malformed response: {why}", .socket.display())]
    Malformed { socket: PathBuf, why: String },
}

/// Talks to one API socket.
#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
}

/// The status code of `HTTP/1.1 200`, `HTTP/1.1 200 ` or `HTTP/1.1 200 OK`.
fn status_code(status_line: &str) -> Option<u16> {
    let mut parts = status_line.split_ascii_whitespace();
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok()
}

/// The `Content-Length` among the header lines, if there is one.
fn content_length(head: &str) -> Result<Option<usize>, String> {
    for line in head.split("\r\n").skip(1) {
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("content-length") {
                return value
                    .trim()
                    .parse()
                    .map(Some)
                    .map_err(|_| format!("Content-Length `{}` is not a number", value.trim()));
            }
        }
    }
    Ok(None)
}

impl Client {
    pub fn new(socket: &Path) -> Client {
        Client {
            socket: socket.to_path_buf(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn io(&self, source: io::Error) -> ClientError {
        ClientError::Io {
            socket: self.socket.clone(),
            source,
        }
    }

    fn malformed(&self, why: impl Into<String>) -> ClientError {
        ClientError::Malformed {
            socket: self.socket.clone(),
            why: why.into(),
        }
    }

    /// Sends `method /api/v1/<endpoint>` with an optional JSON body; answers the status code and
    /// the body (empty when there is none). Any status is `Ok`: the caller decides what failed.
    pub fn request(
        &self,
        method: &str,
        endpoint: &str,
        body: Option<&str>,
    ) -> Result<(u16, String), ClientError> {
        let mut stream =
            UnixStream::connect(&self.socket).map_err(|source| ClientError::Connect {
                socket: self.socket.clone(),
                source,
            })?;
        // The server waits up to REPLY_TIMEOUT for the VMM; leave it room to say so itself.
        let timeout = REPLY_TIMEOUT + Duration::from_secs(10);
        stream
            .set_read_timeout(Some(timeout))
            .map_err(|e| self.io(e))?;
        let mut message =
            format!("{method} {API_ROOT}{endpoint} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n");
        if let Some(body) = body {
            message.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        message.push_str("\r\n");
        message.push_str(body.unwrap_or_default());
        stream
            .write_all(message.as_bytes())
            .and_then(|()| stream.flush())
            .map_err(|e| self.io(e))?;
        self.read_response(&mut stream)
    }

    fn read_response(&self, stream: &mut impl Read) -> Result<(u16, String), ClientError> {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at;
            }
            let n = stream.read(&mut chunk).map_err(|e| self.io(e))?;
            if n == 0 {
                return Err(self.malformed("connection closed before the end of the headers"));
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = std::str::from_utf8(&buf[..head_end])
            .map_err(|_| self.malformed("headers are not UTF-8"))?
            .to_string();
        let status_line = head.split("\r\n").next().unwrap_or_default();
        let status = status_code(status_line)
            .ok_or_else(|| self.malformed(format!("bad status line `{status_line}`")))?;
        let mut body = buf.split_off(head_end + 4);
        match content_length(&head).map_err(|why| self.malformed(why))? {
            Some(length) => {
                let missing = length.saturating_sub(body.len());
                stream
                    .take(missing as u64)
                    .read_to_end(&mut body)
                    .map_err(|e| self.io(e))?;
                if body.len() < length {
                    return Err(self.malformed("connection closed inside the body"));
                }
                body.truncate(length);
            }
            None if status == 204 || (100..200).contains(&status) => body.clear(),
            None => {
                stream.read_to_end(&mut body).map_err(|e| self.io(e))?;
            }
        }
        let body = String::from_utf8(body).map_err(|_| self.malformed("body is not UTF-8"))?;
        Ok((status, body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn parse(raw: &str) -> Result<(u16, String), ClientError> {
        Client::new(Path::new("/test.sock"))
            .read_response(&mut Cursor::new(raw.as_bytes().to_vec()))
    }

    #[test]
    fn status_line_with_or_without_reason_phrase() {
        assert_eq!(status_code("HTTP/1.1 200"), Some(200));
        assert_eq!(status_code("HTTP/1.1 404 "), Some(404));
        assert_eq!(status_code("HTTP/1.0 204 No Content"), Some(204));
        assert_eq!(status_code("HTTP/1.1 2000"), None);
        assert_eq!(status_code("SIP/2.0 200 OK"), None);
    }

    #[test]
    fn reads_exactly_content_length_bytes() {
        let raw = "HTTP/1.1 200 \r\nContent-Length: 2\r\n\r\n{}trailing";

        assert_eq!(parse(raw).unwrap(), (200, "{}".to_string()));
    }

    #[test]
    fn no_content_without_length_is_empty() {
        let raw = "HTTP/1.1 204 \r\nServer: p2pvmm API\r\n\r\n";

        assert_eq!(parse(raw).unwrap(), (204, String::new()));
    }

    #[test]
    fn truncated_body_is_an_error() {
        let raw = "HTTP/1.1 200 \r\ncontent-length: 10\r\n\r\n{}";

        assert!(matches!(parse(raw), Err(ClientError::Malformed { .. })));
    }

    #[test]
    fn connection_failure_names_the_socket() {
        let client = Client::new(Path::new("/nonexistent/p2pvmm.sock"));

        let error = client.request("GET", "vmm.ping", None).unwrap_err();

        assert!(
            error.to_string().contains("/nonexistent/p2pvmm.sock"),
            "{error}"
        );
    }
}
