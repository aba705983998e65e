//! api-probe: one raw HTTP request to p2pvmm's API socket, checked the way Cloud Hypervisor's
//! client reads answers (status from the status line, which carries no reason phrase; the body
//! exactly `Content-Length` bytes). Runs in the lab's L1, statically linked; prints one line:
//!   `API-PROBE <METHOD> <endpoint> status=<code> wire=<ok|why> sent=<time> body=<body on one line>`
//! (`sent`: CLOCK_REALTIME in seconds as the request was written, for resources/bench-hotplug.sh)
//! and exits 0 when the answer was well formed (whatever its status).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::Duration;

use p2pvmm_tests::clock::realtime_stamp;

fn usage() -> &'static str {
    "usage: api-probe SOCKET METHOD ENDPOINT [BODY | --size N]
  ENDPOINT   e.g. vm.info (under /api/v1/) or /raw/path
  BODY       request body as given; --size N sends N bytes of 'x' with its Content-Length"
}

/// Checks the status line and headers; returns (status, body) or why the answer is malformed.
fn parse(answer: &[u8]) -> Result<(u16, String), String> {
    let text = String::from_utf8_lossy(answer);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or("no blank line after the headers")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let rest = status_line
        .strip_prefix("HTTP/1.1 ")
        .ok_or_else(|| format!("status line {status_line:?} is not HTTP/1.1"))?;
    let code = rest.get(..3).unwrap_or_default();
    if rest.get(3..).is_some_and(|r| !r.trim().is_empty()) {
        return Err(format!(
            "status line {status_line:?} carries a reason phrase"
        ));
    }
    let status: u16 = code
        .parse()
        .map_err(|_| format!("status line {status_line:?} has no code"))?;
    let length = lines.find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse::<usize>().ok())
            .flatten()
    });
    match length {
        Some(n) if n != body.len() => Err(format!(
            "Content-Length {n} but the body has {} bytes",
            body.len()
        )),
        None if !body.is_empty() => Err("a body without Content-Length".to_owned()),
        _ => Ok((status, body.to_owned())),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [socket, method, endpoint, rest @ ..] = args.as_slice() else {
        eprintln!("{}", usage());
        return ExitCode::from(2);
    };
    let body = match rest {
        [] => String::new(),
        [flag, n] if flag == "--size" => "x".repeat(n.parse().unwrap_or(0)),
        [body] => body.clone(),
        _ => {
            eprintln!("{}", usage());
            return ExitCode::from(2);
        }
    };
    let path = if endpoint.starts_with('/') {
        endpoint.clone()
    } else {
        format!("/api/v1/{endpoint}")
    };
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\nContent-Type: \
         application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut sent = String::from("-");
    let result = UnixStream::connect(socket)
        .and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(150)))?;
            sent = realtime_stamp();
            // A server that refuses a huge body may close before reading it all.
            let _ = s.write_all(request.as_bytes());
            let mut answer = Vec::new();
            s.read_to_end(&mut answer)?;
            Ok(answer)
        })
        .map_err(|e| format!("{socket}: {e}"));
    let (status, wire, body) = match result.map(|a| parse(&a)) {
        Ok(Ok((status, body))) => (status.to_string(), "ok".to_owned(), body),
        Ok(Err(why)) => ("-".to_owned(), why, String::new()),
        Err(e) => ("-".to_owned(), e, String::new()),
    };
    println!(
        "API-PROBE {method} {endpoint} status={status} wire={} sent={sent} body={}",
        wire.replace(' ', "_"),
        body.replace('\n', " ")
    );
    if wire == "ok" {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn reads_answers_as_chs_client_does() {
        let ok = b"HTTP/1.1 200 \r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}";
        assert_eq!(parse(ok), Ok((200, "{}".to_owned())));
        assert_eq!(parse(b"HTTP/1.1 204\r\n\r\n"), Ok((204, String::new())));
        assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").is_err());
        assert!(parse(b"HTTP/1.1 200 \r\nContent-Length: 5\r\n\r\n{}").is_err());
        assert!(parse(b"HTTP/1.1 200 \r\n\r\n{}").is_err());
    }
}
