//! Host stdin feeding the guest's serial console.

use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use devices::legacy::Serial;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::terminal::Terminal;

const STDIN_FD: i32 = 0;

/// Whether stdin is in raw mode now, for [`restore_terminal_after_panic`].
static RAW_TERMINAL: AtomicBool = AtomicBool::new(false);

/// Gives a terminal left in raw mode its line mode back, from a panicking thread: straight
/// through termios, since stdin's lock may be held by the thread that panicked.
pub fn restore_terminal_after_panic() {
    if !RAW_TERMINAL.swap(false, Ordering::AcqRel) {
        return;
    }
    // SAFETY: termios is plain data; tcgetattr fills it and tcsetattr only reads it.
    unsafe {
        let mut termios: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(STDIN_FD, &mut termios) == 0 {
            termios.c_lflag |= libc::ICANON | libc::ECHO | libc::ISIG;
            libc::tcsetattr(STDIN_FD, libc::TCSANOW, &termios);
        }
    }
}

/// Reads stdin when it has data and queues the bytes in the serial receive FIFO. On a terminal,
/// stdin is switched to raw mode for the VM's lifetime so keys reach the guest unprocessed.
pub struct ConsoleInput {
    serial: Arc<Mutex<Serial>>,
    raw_terminal: bool,
}

impl ConsoleInput {
    pub fn stdin(serial: Arc<Mutex<Serial>>) -> Self {
        let stdin = std::io::stdin().lock();
        // SAFETY: isatty only inspects the descriptor.
        let is_tty = unsafe { libc::isatty(STDIN_FD) } == 1;
        let raw_terminal = is_tty && stdin.set_raw_mode().is_ok();
        RAW_TERMINAL.store(raw_terminal, Ordering::Release);
        Self {
            serial,
            raw_terminal,
        }
    }
}

impl Drop for ConsoleInput {
    fn drop(&mut self) {
        if self.raw_terminal {
            RAW_TERMINAL.store(false, Ordering::Release);
            if let Err(e) = std::io::stdin().lock().set_canon_mode() {
                log::warn!("restoring the terminal: {e}");
            }
        }
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn init(&mut self, ops: &mut EventOps) {
        // Regular files and /dev/null cannot be polled (EPERM): then there is no console input.
        if let Err(e) = ops.add(Events::new_raw(STDIN_FD, EventSet::IN)) {
            log::debug!("stdin is not pollable, console input disabled: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        let read = if events.event_set().contains(EventSet::IN) {
            std::io::stdin().lock().read(&mut buf)
        } else {
            Ok(0)
        };
        match read {
            Ok(n) if n > 0 => {
                let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
                let queued = serial.enqueue_input(&buf[..n]);
                if queued < n {
                    log::debug!("serial FIFO full: dropped {} input bytes", n - queued);
                }
            }
            other => {
                if let Err(e) = other {
                    log::warn!("reading stdin: {e}");
                }
                let _ = ops.remove(events);
            }
        }
    }
}
