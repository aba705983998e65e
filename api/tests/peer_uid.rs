//! Only the server's own uid may use the API: the socket is 0600, and even through a socket
//! made reachable the server checks `SO_PEERCRED` and answers anyone else 403. The client runs
//! in a forked child that drops to uid 65534 (`nobody`), so the test needs root.

use std::ffi::CString;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use api::{channel, ApiServer};

/// Child exit codes.
const GOT_403: i32 = 0;
const CONNECT_REFUSED: i32 = 1;
const OTHER_ANSWER: i32 = 2;
const SETUID_FAILED: i32 = 3;

/// Forks a child that becomes uid 65534, connects to `socket` and reads the first bytes.
fn connect_as_nobody(socket: &Path) -> i32 {
    let path = CString::new(socket.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(path.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: the child only calls async-signal-safe functions on memory prepared before the
    // fork, then _exits; the parent waits for it.
    unsafe {
        let pid = libc::fork();
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            libc::alarm(10);
            if libc::setuid(65534) != 0 {
                libc::_exit(SETUID_FAILED);
            }
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            let addr_ptr = (&addr as *const libc::sockaddr_un).cast::<libc::sockaddr>();
            if libc::connect(fd, addr_ptr, len) != 0 {
                libc::_exit(CONNECT_REFUSED);
            }
            let mut buf = [0u8; 16];
            let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
            let code = if n >= 13 && &buf[..13] == b"HTTP/1.1 403 " {
                GOT_403
            } else {
                OTHER_ANSWER
            };
            libc::_exit(code);
        }
        let mut status = 0;
        assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
        assert!(libc::WIFEXITED(status), "child died: status {status:#x}");
        libc::WEXITSTATUS(status)
    }
}

#[test]
fn other_uids_are_refused() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("skipped: needs root to run a client as another uid");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let (sender, _vmm) = channel().unwrap();
    ApiServer::bind(&socket).unwrap().spawn(sender).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();

    let through_mode = connect_as_nobody(&socket);
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let through_peercred = connect_as_nobody(&socket);

    assert_eq!(
        through_mode, CONNECT_REFUSED,
        "0600 socket let uid 65534 connect"
    );
    assert_eq!(
        through_peercred, GOT_403,
        "SO_PEERCRED check did not refuse uid 65534"
    );
}
