//! Stopping the VM on SIGTERM, SIGINT or SIGHUP as if the guest had ended: vCPUs stopped, devices
//! reset and released, the terminal restored, then exit with 128 + the signal's number.
//!
//! The signals are blocked in every thread (the mask is set before any thread is spawned, and
//! threads inherit it) and read from a signalfd by the event loop, so no handler runs in signal
//! context and a signal that arrives while the VM is being built waits there until the loop runs.

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use devices::legacy::{ExitSignal, GuestExit};
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

/// The signals that stop the VM.
const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// Which stop signal arrived, if any (0: none).
static RECEIVED: AtomicI32 = AtomicI32::new(0);

/// The stop signal that ended the VM, if one did.
pub fn received() -> Option<libc::c_int> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        signal => Some(signal),
    }
}

/// The signal's name, for messages.
pub fn name(signal: libc::c_int) -> &'static str {
    match signal {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}

fn stop_set() -> libc::sigset_t {
    let mut set = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set it is given; sigaddset only adds valid signal
    // numbers to it.
    unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        for signal in STOP_SIGNALS {
            libc::sigaddset(set.as_mut_ptr(), signal);
        }
        set.assume_init()
    }
}

/// Blocks the stop signals in the calling thread and every thread it spawns afterwards. Call it
/// first thing in `main`.
pub fn block() -> io::Result<()> {
    let set = stop_set();
    // SAFETY: pthread_sigmask reads a valid, initialised set; the old mask is not wanted.
    let ret = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    Ok(())
}

/// Reads the (blocked) stop signals and asks the VM to end when one arrives.
pub struct StopSignals {
    fd: OwnedFd,
    exit: Arc<ExitSignal>,
}

impl StopSignals {
    pub fn new(exit: Arc<ExitSignal>) -> io::Result<Self> {
        let set = stop_set();
        // SAFETY: signalfd(-1, ...) creates a new descriptor for a valid set; checked below.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd, exit })
    }

    /// The next pending stop signal, if any.
    fn read(&self) -> io::Result<Option<libc::c_int>> {
        let mut info = MaybeUninit::<libc::signalfd_siginfo>::uninit();
        let len = size_of::<libc::signalfd_siginfo>();
        // SAFETY: reads at most `len` bytes into memory of exactly that size, which we own.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), info.as_mut_ptr().cast(), len) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock => Ok(None),
                _ => Err(e),
            };
        }
        if n as usize != len {
            return Err(io::Error::other(format!("short signalfd read: {n} bytes")));
        }
        // SAFETY: the kernel filled the whole struct (checked above).
        let info = unsafe { info.assume_init() };
        Ok(libc::c_int::try_from(info.ssi_signo).ok())
    }
}

impl StopSignals {
    /// Reads every pending stop signal; the first one is remembered and ends the VM.
    fn drain(&self) {
        loop {
            match self.read() {
                Ok(Some(signal)) => {
                    log::warn!("{}: stopping the VM", name(signal));
                    let _ =
                        RECEIVED.compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst);
                    self.exit.request(GuestExit::Stopped);
                }
                Ok(None) => return,
                Err(e) => {
                    log::error!("reading the signalfd: {e}");
                    return;
                }
            }
        }
    }
}

impl MutEventSubscriber for StopSignals {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            log::error!("cannot watch for SIGTERM/SIGINT/SIGHUP: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        self.drain();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One test only: it blocks signals for its thread and raises one at it.
    #[test]
    fn a_blocked_stop_signal_is_read_and_ends_the_vm() {
        block().unwrap();
        let exit = Arc::new(ExitSignal::new().unwrap());
        let stop = StopSignals::new(exit.clone()).unwrap();
        assert_eq!(stop.read().unwrap(), None, "nothing pending yet");
        // SAFETY: sends SIGHUP to this very thread, where it is blocked: it stays pending.
        let ret = unsafe { libc::pthread_kill(libc::pthread_self(), libc::SIGHUP) };
        assert_eq!(ret, 0);
        stop.drain();
        assert_eq!(received(), Some(libc::SIGHUP));
        assert_eq!(exit.reason(), Some(GuestExit::Stopped));
        assert_eq!(name(libc::SIGHUP), "SIGHUP");
    }
}
