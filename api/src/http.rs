//! Just enough HTTP/1.1 for the API: one request per connection, read with `httparse`, the body
//! sized by `Content-Length` and bounded, and responses in the exact form Cloud Hypervisor's
//! server (micro_http) writes, because CH's client parses them by hand:
//!
//! ```text
//! HTTP/1.1 200 \r\n            status code, one space, no reason phrase
//! Server: p2pvmm API\r\n
//! Connection: close\r\n
//! Content-Type: application/json\r\n
//! Content-Length: 17\r\n        always present when there is a body, exact byte count
//! \r\n
//! {"error":"..."}
//! ```
//!
//! A 204 has neither `Content-Type` nor `Content-Length` nor a body. Error bodies are
//! [`crate::ErrorBody`], `{"error": "<message>"}`.

use std::io::{self, Read, Write};

use crate::types::ErrorBody;

/// Largest request body accepted: a `vm.create` with many devices is a few KiB.
pub const BODY_LIMIT: usize = 1 << 20;
/// Largest request line plus headers.
const HEAD_LIMIT: usize = 16 << 10;
const MAX_HEADERS: usize = 32;

/// A parsed request: method, path without the query string, and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
}

/// Why no request came out of the connection.
#[derive(Debug)]
pub enum ReadError {
    /// The peer closed before sending anything.
    Closed,
    /// Reading failed (timeout included).
    Io(io::Error),
    /// The bytes are not a request this server takes; answer with the response and close.
    Reject(Response),
}

/// A request head parsed out of the bytes read so far.
struct Head {
    len: usize,
    method: String,
    path: String,
    content_length: usize,
}

fn reject(status: u16, message: impl Into<String>) -> ReadError {
    ReadError::Reject(Response::error(status, message))
}

/// `Ok(None)` while the head is incomplete.
fn parse_head(buf: &[u8], body_limit: usize) -> Result<Option<Head>, ReadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(reject(400, format!("malformed HTTP request: {e}"))),
    };
    let method = request.method.unwrap_or_default().to_string();
    let target = request.path.unwrap_or_default();
    let path = target.split('?').next().unwrap_or_default().to_string();
    let mut content_length = None;
    for header in request.headers.iter() {
        if header.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(reject(
                411,
                "Transfer-Encoding is not supported: send the body with Content-Length",
            ));
        }
        if header.name.eq_ignore_ascii_case("content-length") {
            let value = std::str::from_utf8(header.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| reject(400, "Content-Length is not a number"))?;
            if content_length.is_some_and(|seen| seen != value) {
                return Err(reject(400, "two different Content-Length headers"));
            }
            content_length = Some(value);
        }
    }
    let content_length = content_length.unwrap_or(0);
    if content_length > body_limit {
        return Err(reject(
            413,
            format!(
                "request body of {content_length} bytes is over the limit of {body_limit} bytes"
            ),
        ));
    }
    Ok(Some(Head {
        len,
        method,
        path,
        content_length,
    }))
}

/// Reads one request. The body is read only after its `Content-Length` has been checked against
/// `body_limit`, so an oversized request costs at most one read buffer.
pub fn read_request<R: Read>(stream: &mut R, body_limit: usize) -> Result<Request, ReadError> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let head = loop {
        let n = stream.read(&mut chunk).map_err(ReadError::Io)?;
        if n == 0 {
            return Err(if buf.is_empty() {
                ReadError::Closed
            } else {
                reject(400, "connection closed inside the request head")
            });
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(head) = parse_head(&buf, body_limit)? {
            break head;
        }
        if buf.len() > HEAD_LIMIT {
            return Err(reject(431, "request head over 16 KiB"));
        }
    };
    let mut body = buf.split_off(head.len);
    body.truncate(head.content_length);
    let missing = head.content_length - body.len();
    let read = stream
        .take(missing as u64)
        .read_to_end(&mut body)
        .map_err(ReadError::Io)?;
    if read < missing {
        return Err(reject(400, "connection closed inside the request body"));
    }
    Ok(Request {
        method: head.method,
        path: head.path,
        body,
    })
}

/// A response as CH's server writes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// JSON text; `None` for 204.
    pub body: Option<String>,
    /// The methods a 405 allows, for its `Allow` header.
    pub allow: Option<&'static str>,
}

impl Response {
    /// 204 No Content.
    pub fn no_content() -> Response {
        Response {
            status: 204,
            body: None,
            allow: None,
        }
    }

    /// `status` with a JSON body.
    pub fn json(status: u16, body: String) -> Response {
        Response {
            status,
            body: Some(body),
            allow: None,
        }
    }

    /// `status` with `{"error": message}`.
    pub fn error(status: u16, message: impl Into<String>) -> Response {
        let body = ErrorBody {
            error: message.into(),
        };
        let text = serde_json::to_string(&body).unwrap_or_else(|_| "{}".into());
        Response::json(status, text)
    }

    /// 405 with the `Allow` header.
    pub fn method_not_allowed(method: &str, path: &str, allow: &'static str) -> Response {
        Response {
            allow: Some(allow),
            ..Response::error(405, format!("{path} does not take {method} (use {allow})"))
        }
    }

    /// The bytes on the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} \r\nServer: p2pvmm API\r\nConnection: close\r\n",
            self.status
        );
        if let Some(allow) = self.allow {
            out.push_str(&format!("Allow: {allow}\r\n"));
        }
        let body = self.body.as_deref().unwrap_or_default();
        if self.status != 204 {
            out.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        out.push_str("\r\n");
        if self.status != 204 {
            out.push_str(body);
        }
        out.into_bytes()
    }

    pub fn write_to<W: Write>(&self, out: &mut W) -> io::Result<()> {
        out.write_all(&self.to_bytes())?;
        out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn read(raw: &[u8]) -> Result<Request, ReadError> {
        read_request(&mut Cursor::new(raw.to_vec()), 64)
    }

    fn rejected_status(result: Result<Request, ReadError>) -> u16 {
        match result {
            Err(ReadError::Reject(response)) => response.status,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn reads_request_line_and_body_by_content_length() {
        let raw = b"PUT /api/v1/vm.add-device?x=1 HTTP/1.1\r\nContent-Length: 4\r\n\r\nbodyEXTRA";

        let request = read(raw).unwrap();

        assert_eq!(request.method, "PUT");
        assert_eq!(request.path, "/api/v1/vm.add-device");
        assert_eq!(request.body, b"body");
    }

    #[test]
    fn no_content_length_means_no_body() {
        let raw = b"PUT /api/v1/vm.boot HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n";

        let request = read(raw).unwrap();

        assert!(request.body.is_empty());
    }

    #[test]
    fn oversized_body_is_413_before_reading_it() {
        let raw = b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 65\r\n\r\n";

        assert_eq!(rejected_status(read(raw)), 413);
    }

    #[test]
    fn chunked_is_411() {
        let raw = b"PUT /api/v1/vm.create HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";

        assert_eq!(rejected_status(read(raw)), 411);
    }

    #[test]
    fn garbage_and_short_bodies_are_400() {
        assert_eq!(rejected_status(read(b"\x01\x02 nonsense\r\n\r\n")), 400);
        assert_eq!(
            rejected_status(read(b"PUT / HTTP/1.1\r\nContent-Length: 9\r\n\r\nab")),
            400
        );
        assert_eq!(
            rejected_status(read(b"PUT / HTTP/1.1\r\nContent-Length: x\r\n\r\n")),
            400
        );
    }

    #[test]
    fn empty_connection_is_closed_not_an_error() {
        assert!(matches!(read(b""), Err(ReadError::Closed)));
    }

    #[test]
    fn response_bytes_match_micro_http() {
        let response = Response::json(200, "{\"a\":1}".into());

        let text = String::from_utf8(response.to_bytes()).unwrap();

        assert_eq!(
            text,
            "HTTP/1.1 200 \r\nServer: p2pvmm API\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: 7\r\n\r\n{\"a\":1}"
        );
    }

    #[test]
    fn no_content_has_no_length_and_no_body() {
        let text = String::from_utf8(Response::no_content().to_bytes()).unwrap();

        assert_eq!(
            text,
            "HTTP/1.1 204 \r\nServer: p2pvmm API\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn error_body_is_json_naming_the_problem() {
        let response = Response::error(400, "iommu: no \"vIOMMU\"");

        let body: ErrorBody = serde_json::from_str(response.body.as_deref().unwrap()).unwrap();

        assert_eq!(body.error, "iommu: no \"vIOMMU\"");
    }
}
