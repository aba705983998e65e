//! The API server's request path without the socket: arbitrary bytes, handed out in chunks of
//! a size the input picks, through `http::read_request` (httparse, Content-Length, limits),
//! then routing, the method check and the route's handler (body parse and validation), as
//! `server.rs`'s `serve_connection` and `answer` do.
//!
//! Checked beyond not panicking: every answer the server would write (a rejection, a handler's
//! failure, a 404 or 405) is a well-formed HTTP response whose Content-Length is its body's
//! length, since Cloud Hypervisor's client parses answers by hand.

#![no_main]

use api::http::{self, ReadError, Response};
use api::routes;
use libfuzzer_sys::fuzz_target;
use p2pvmm_fuzz::Chunked;

/// Small, so that the over-the-limit answer (413) is reachable.
const BODY_LIMIT: usize = 4096;

fn check_wire(response: &Response) {
    let bytes = response.to_bytes();
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut parsed = httparse::Response::new(&mut headers);
    let len = match parsed.parse(&bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        other => panic!(
            "unparsable answer {other:?}: {:?}",
            String::from_utf8_lossy(&bytes)
        ),
    };
    assert_eq!(parsed.code, Some(response.status));
    let body = &bytes[len..];
    let length = parsed
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map(|h| String::from_utf8_lossy(h.value).parse::<usize>());
    match length {
        Some(Ok(n)) => assert_eq!(n, body.len(), "Content-Length is not the body's length"),
        Some(Err(e)) => panic!("bad Content-Length: {e}"),
        None => assert!(body.is_empty() && response.status == 204),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, raw)) = data.split_first() else {
        return;
    };
    let mut stream = Chunked::new(raw, usize::from(chunk) * 16 + 1);
    let request = match http::read_request(&mut stream, BODY_LIMIT) {
        Ok(request) => request,
        Err(ReadError::Reject(response)) => return check_wire(&response),
        Err(ReadError::Closed) | Err(ReadError::Io(_)) => return,
    };
    assert!(request.body.len() <= BODY_LIMIT);
    let Some(route) = routes::find(&request.path) else {
        return check_wire(&Response::error(
            404,
            format!("no endpoint {}", request.path),
        ));
    };
    let method = route.method.as_str();
    if request.method != method {
        return check_wire(&Response::method_not_allowed(
            &request.method,
            &request.path,
            method,
        ));
    }
    if let Some(Err(failure)) = route.handler.request(&request.body) {
        check_wire(&Response::error(failure.status, failure.message));
    }
});
