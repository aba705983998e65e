//! The guest's serial output, written a line at a time.
//!
//! The 16550 hands over one byte per guest write and flushes after each. Written straight
//! through, every VMM log line that shares the terminal or file (`2>&1`) can land in the middle
//! of a guest line, and every guest byte costs a syscall. So whole lines go out in one write,
//! and a partial line (a shell prompt, a progress dot) goes out once the guest has been quiet
//! for [`PARTIAL_LINE_DELAY`], so nothing waits for a newline that may never come. When such a
//! partial line sits on a terminal or file that the log shares, [`LogOutput`] ends it before
//! writing a log record, so the record starts a line of its own.

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::seccomp::ThreadKind;

/// How long a partial line waits for more bytes before it is written anyway. Under nested
/// virtualization a guest's UART can pause that long inside a line (measured: over 50 ms).
pub const PARTIAL_LINE_DELAY: Duration = Duration::from_millis(200);

/// Whether the guest's last bytes on stdout left a line open.
static STDOUT_MID_LINE: AtomicBool = AtomicBool::new(false);

/// A partial line this long is written without waiting (a guest that never sends a newline).
const MAX_PENDING: usize = 4096;

/// A [`Write`] for the serial device that writes complete lines through to `out` and leaves
/// partial lines to a flusher thread.
pub struct LineOutput {
    shared: Arc<Shared>,
    flusher: Option<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    delay: Duration,
}

struct State {
    out: Box<dyn Write + Send>,
    pending: Vec<u8>,
    last_byte: Instant,
    closed: bool,
    /// Whether a write to `out` failed already (reported once, not once per byte).
    failed: bool,
    /// Whether `out` is stdout, whose open line [`LogOutput`] must know of.
    stdout: bool,
}

impl State {
    /// Writes the first `len` pending bytes to `out`.
    fn emit(&mut self, len: usize) {
        let result = self
            .out
            .write_all(&self.pending[..len])
            .and_then(|()| self.out.flush());
        if self.stdout && len > 0 {
            STDOUT_MID_LINE.store(self.pending[len - 1] != b'\n', Ordering::Relaxed);
        }
        self.pending.drain(..len);
        match result {
            Ok(()) => self.failed = false,
            Err(e) if !self.failed => {
                self.failed = true;
                log::warn!("guest console output failed (bytes are dropped until it works): {e}");
            }
            Err(_) => {}
        }
    }
}

impl LineOutput {
    /// The guest console on p2pvmm's stdout.
    pub fn stdout() -> io::Result<Self> {
        Self::with_delay(Box::new(io::stdout()), PARTIAL_LINE_DELAY, true)
    }

    /// The guest console into `out` (a file of its own).
    pub fn new(out: Box<dyn Write + Send>) -> io::Result<Self> {
        Self::with_delay(out, PARTIAL_LINE_DELAY, false)
    }

    fn with_delay(out: Box<dyn Write + Send>, delay: Duration, stdout: bool) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                out,
                pending: Vec::new(),
                last_byte: Instant::now(),
                closed: false,
                failed: false,
                stdout,
            }),
            wake: Condvar::new(),
            delay,
        });
        let flusher = {
            let shared = shared.clone();
            let builder = std::thread::Builder::new().name("console-out".into());
            crate::seccomp::spawn(ThreadKind::Console, builder, move || {
                shared.flush_partial_lines()
            })?
        };
        Ok(Self {
            shared,
            flusher: Some(flusher),
        })
    }
}

impl Shared {
    /// A poisoned lock only means a writer panicked mid-append; the bytes are still worth writing.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The flusher: writes a partial line once the guest has been quiet for the delay, and
    /// whatever is left when the output closes.
    fn flush_partial_lines(&self) {
        let mut state = self.lock();
        loop {
            if state.closed {
                let len = state.pending.len();
                state.emit(len);
                return;
            }
            if state.pending.is_empty() {
                state = self.wake.wait(state).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            // Woken for the guest's first bytes, holding the lock the vCPUs' writes need.
            crate::panics::maybe_panic(crate::panics::PanicPoint::Console);
            let quiet = state.last_byte.elapsed();
            if quiet >= self.delay {
                let len = state.pending.len();
                state.emit(len);
            } else {
                state = self
                    .wake
                    .wait_timeout(state, self.delay - quiet)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
    }
}

impl Write for LineOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut state = self.shared.lock();
        let was_empty = state.pending.is_empty();
        state.pending.extend_from_slice(buf);
        state.last_byte = Instant::now();
        if let Some(end) = state.pending.iter().rposition(|&b| b == b'\n') {
            state.emit(end + 1);
        } else if state.pending.len() >= MAX_PENDING {
            let len = state.pending.len();
            state.emit(len);
        }
        if was_empty && !state.pending.is_empty() {
            self.shared.wake.notify_one();
        }
        Ok(buf.len())
    }

    /// The serial device flushes after every byte; lines are what this output flushes by.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for LineOutput {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
        if let Some(flusher) = self.flusher.take() {
            if flusher.join().is_err() {
                log::warn!("the console output flusher panicked");
            }
        }
    }
}

/// The log's destination (stderr) for `env_logger`: when stderr is where stdout goes (a
/// terminal, `2>&1`) and the guest left a line open there, the record starts on a new line.
pub struct LogOutput {
    shares_stdout: bool,
}

impl LogOutput {
    pub fn stderr() -> Self {
        Self {
            shares_stdout: same_file(&io::stdout(), &io::stderr()),
        }
    }
}

/// Whether two descriptors are the same file (device and inode).
fn same_file(a: &impl AsRawFd, b: &impl AsRawFd) -> bool {
    let id = |fd: i32| {
        // SAFETY: fstat writes into the zeroed struct it is given and reads nothing else.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: see above; `st` is a valid, writable stat buffer.
        (unsafe { libc::fstat(fd, &mut st) } == 0).then_some((st.st_dev, st.st_ino))
    };
    matches!((id(a.as_raw_fd()), id(b.as_raw_fd())), (Some(x), Some(y)) if x == y)
}

impl Write for LogOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut err = io::stderr().lock();
        if self.shares_stdout && STDOUT_MID_LINE.swap(false, Ordering::Relaxed) {
            err.write_all(b"\n")?;
        }
        err.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records each write `out` receives.
    #[derive(Clone, Default)]
    struct Writes(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Writes {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Writes {
        fn taken(&self) -> Vec<String> {
            let writes = self.0.lock().unwrap();
            writes
                .iter()
                .map(|w| String::from_utf8_lossy(w).into_owned())
                .collect()
        }
    }

    /// An output whose flusher never fires within a test, so only lines are written.
    fn lines_only(writes: &Writes) -> LineOutput {
        LineOutput::with_delay(Box::new(writes.clone()), Duration::from_secs(3600), false).unwrap()
    }

    fn byte_by_byte(out: &mut LineOutput, text: &str) {
        for b in text.bytes() {
            out.write_all(&[b]).unwrap();
            out.flush().unwrap();
        }
    }

    #[test]
    fn the_log_knows_when_it_shares_the_console_file() {
        let path = std::env::temp_dir().join(format!("p2pvmm-same-file-{}", std::process::id()));
        let a = std::fs::File::create(&path).unwrap();
        let b = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        let null = std::fs::File::open("/dev/null").unwrap();
        assert!(same_file(&a, &b));
        assert!(!same_file(&a, &null));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn whole_lines_go_out_in_one_write() {
        let writes = Writes::default();
        let mut out = lines_only(&writes);
        byte_by_byte(&mut out, "HP-STEP plugged-1\nEDU-DMA: ok\n");
        assert_eq!(writes.taken(), ["HP-STEP plugged-1\n", "EDU-DMA: ok\n"]);
    }

    #[test]
    fn a_prompt_goes_out_once_the_guest_is_quiet() {
        let writes = Writes::default();
        let mut out =
            LineOutput::with_delay(Box::new(writes.clone()), Duration::from_millis(20), false)
                .unwrap();
        byte_by_byte(&mut out, "boot\nlogin: ");
        let deadline = Instant::now() + Duration::from_secs(5);
        while writes.taken().concat() != "boot\nlogin: " && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let taken = writes.taken();
        assert_eq!(taken.concat(), "boot\nlogin: ");
        assert_eq!(taken[0], "boot\n");
    }

    #[test]
    fn a_partial_line_is_written_when_the_output_closes() {
        let writes = Writes::default();
        let mut out = lines_only(&writes);
        byte_by_byte(&mut out, "no newline");
        assert!(writes.taken().is_empty());
        drop(out);
        assert_eq!(writes.taken().concat(), "no newline");
    }

    #[test]
    fn a_line_without_end_is_written_in_bounded_pieces() {
        let writes = Writes::default();
        let mut out = lines_only(&writes);
        out.write_all(&vec![b'x'; MAX_PENDING + 10]).unwrap();
        let first = writes.taken().first().map(String::len);
        assert_eq!(first, Some(MAX_PENDING + 10));
    }
}
