//! How devices ask the VMM to end the guest.

use std::sync::atomic::{AtomicU8, Ordering};

use vmm_sys_util::eventfd::EventFd;

/// Why the guest stopped running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest powered off (ACPI S5).
    Poweroff,
    /// The guest asked for a reset (ACPI reset register, i8042, triple fault).
    Reset,
    /// The guest could not continue (KVM internal error, failed entry).
    Crash,
    /// The VMM was told to stop the guest (SIGTERM, SIGINT, SIGHUP).
    Stopped,
}

impl GuestExit {
    fn code(self) -> u8 {
        match self {
            GuestExit::Poweroff => 1,
            GuestExit::Reset => 2,
            GuestExit::Crash => 3,
            GuestExit::Stopped => 4,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(GuestExit::Poweroff),
            2 => Some(GuestExit::Reset),
            3 => Some(GuestExit::Crash),
            4 => Some(GuestExit::Stopped),
            _ => None,
        }
    }
}

/// An eventfd the VMM's event loop waits on, plus the first reason given. Later requests keep the
/// first reason: a guest that powers off and then faults while being stopped powered off.
pub struct ExitSignal {
    event: EventFd,
    reason: AtomicU8,
}

impl ExitSignal {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            event: EventFd::new(libc::EFD_NONBLOCK)?,
            reason: AtomicU8::new(0),
        })
    }

    /// Records `exit` (unless a reason is already recorded) and wakes the event loop.
    pub fn request(&self, exit: GuestExit) {
        let _ = self
            .reason
            .compare_exchange(0, exit.code(), Ordering::SeqCst, Ordering::SeqCst);
        if let Err(e) = self.event.write(1) {
            log::error!("cannot signal guest exit {exit:?}: {e}");
        }
    }

    /// The first reason recorded, if any.
    pub fn reason(&self) -> Option<GuestExit> {
        GuestExit::from_code(self.reason.load(Ordering::SeqCst))
    }

    /// The eventfd to poll.
    pub fn event(&self) -> &EventFd {
        &self.event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let signal = ExitSignal::new().unwrap();
        assert_eq!(signal.reason(), None);
        signal.request(GuestExit::Poweroff);
        signal.request(GuestExit::Crash);
        assert_eq!(signal.reason(), Some(GuestExit::Poweroff));
        assert_eq!(signal.event().read().unwrap(), 2);
    }
}
