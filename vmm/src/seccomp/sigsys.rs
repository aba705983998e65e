//! The SIGSYS handler of `--seccomp true`: names the thread and the forbidden call on stderr,
//! then ends the process with status 159 (128 + SIGSYS). It runs in signal context, so it only
//! formats into a stack buffer and calls `write` and `_exit`, which every filter allows.

use std::cell::Cell;
use std::io;

use super::syscall_names::NAMES;
use super::ThreadKind;

/// The exit status after a forbidden system call.
pub const EXIT_SECCOMP: i32 = 128 + libc::SIGSYS;

thread_local! {
    /// The calling thread's filter, for the message (no allocation, readable in the handler).
    static KIND: Cell<Option<ThreadKind>> = const { Cell::new(None) };
}

pub(super) fn set_thread_kind(kind: ThreadKind) {
    KIND.with(|k| k.set(Some(kind)));
}

pub(super) fn install_handler() -> io::Result<()> {
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler has the
    // three-argument signature SA_SIGINFO requires and only calls async-signal-safe functions.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handle_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// `siginfo_t`'s SIGSYS fields (`_sigsys` in the kernel's union), after signo, errno and code.
#[repr(C)]
struct SigsysInfo {
    _signo: libc::c_int,
    _errno: libc::c_int,
    _code: libc::c_int,
    _pad: libc::c_int,
    _call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    _arch: libc::c_uint,
}

extern "C" fn handle_sigsys(
    _: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a SIGSYS siginfo, whose layout SigsysInfo mirrors.
    let syscall = unsafe { (*info.cast::<SigsysInfo>()).syscall };
    // SAFETY: with SA_SIGINFO the third argument is the interrupted thread's ucontext; RSI
    // holds the system call's second argument (an ioctl's request).
    let arg1 =
        unsafe { (*context.cast::<libc::ucontext_t>()).uc_mcontext.gregs[libc::REG_RSI as usize] };
    let kind = KIND.with(|k| k.get());
    let mut message = Message::default();
    message.push(b"p2pvmm: seccomp: the ");
    message.push(kind.map_or("unfiltered", ThreadKind::name).as_bytes());
    message.push(b" thread made a forbidden system call: ");
    write_call(&mut message, syscall, arg1 as u64);
    message.push(b"; exiting with status 159\n");
    // SAFETY: write and _exit are async-signal-safe; the buffer outlives the call.
    unsafe {
        libc::write(2, message.bytes.as_ptr().cast(), message.len);
        libc::_exit(EXIT_SECCOMP);
    }
}

/// `name (number)`, with the request of an ioctl: what the message says of the call.
fn write_call(message: &mut Message, syscall: libc::c_int, arg1: u64) {
    let name = usize::try_from(syscall)
        .ok()
        .and_then(|n| NAMES.get(n))
        .filter(|name| !name.is_empty());
    message.push(name.map_or("unknown", |n| n).as_bytes());
    message.push(b" (");
    message.push_decimal(i64::from(syscall));
    message.push(b")");
    if i64::from(syscall) == libc::SYS_ioctl {
        message.push(b" request ");
        message.push_hex(arg1 & 0xffff_ffff);
    }
}

/// A fixed buffer that formats without allocating.
struct Message {
    bytes: [u8; 256],
    len: usize,
}

impl Default for Message {
    fn default() -> Self {
        Self {
            bytes: [0; 256],
            len: 0,
        }
    }
}

impl Message {
    fn push(&mut self, text: &[u8]) {
        let room = self.bytes.len() - self.len;
        let n = text.len().min(room);
        self.bytes[self.len..self.len + n].copy_from_slice(&text[..n]);
        self.len += n;
    }

    fn push_decimal(&mut self, value: i64) {
        if value < 0 {
            self.push(b"-");
        }
        let mut digits = [0u8; 20];
        let mut rest = value.unsigned_abs();
        let mut at = digits.len();
        loop {
            at -= 1;
            digits[at] = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        self.push(&digits[at..]);
    }

    fn push_hex(&mut self, value: u64) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut digits = [0u8; 16];
        let mut rest = value;
        let mut at = digits.len();
        loop {
            at -= 1;
            digits[at] = HEX[(rest & 0xf) as usize];
            rest >>= 4;
            if rest == 0 {
                break;
            }
        }
        self.push(b"0x");
        self.push(&digits[at..]);
    }

    #[cfg(test)]
    fn text(&self) -> &str {
        std::str::from_utf8(&self.bytes[..self.len]).unwrap_or("<not utf-8>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(syscall: libc::c_long, arg1: u64) -> String {
        let mut m = Message::default();
        write_call(&mut m, syscall as libc::c_int, arg1);
        m.text().to_owned()
    }

    #[test]
    fn calls_are_named_with_their_number() {
        assert_eq!(call(libc::SYS_socket, 0), "socket (41)");
        assert_eq!(call(libc::SYS_execve, 0), "execve (59)");
        assert_eq!(call(9999, 0), "unknown (9999)");
        assert_eq!(call(-1, 0), "unknown (-1)");
    }

    #[test]
    fn an_ioctl_names_its_request() {
        assert_eq!(
            call(libc::SYS_ioctl, 0xffff_ffff_c008_ae67),
            "ioctl (16) request 0xc008ae67"
        );
    }

    #[test]
    fn the_buffer_truncates_instead_of_overflowing() {
        let mut m = Message::default();
        for _ in 0..100 {
            m.push(b"0123456789");
        }
        assert_eq!(m.len, 256);
    }
}
