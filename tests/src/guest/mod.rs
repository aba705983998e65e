//! Pieces shared by the static test programs that run inside lab guests (`edu-dma`,
//! `msix-probe`, `bar-walk`): drive a PCI function from userspace through VFIO in no-IOMMU mode. Linux only,
//! no dependencies beyond libc, so the programs link statically.
//!
//! - [`sysfs`]: find a function, turn on no-IOMMU mode, bind vfio-pci, map a sysfs resource.
//! - [`edu`]: QEMU's edu DMA engine; [`page`]: DMA pages with their physical addresses.
//! - [`vfio`]: the legacy container, the device fd, regions, interrupts through eventfds.
//! - [`Fail`] / [`Result`]: a failed step with its reason, printed on the program's result line.
//! - [`EventFd`]: the eventfd VFIO signals on each interrupt.

pub mod edu;
pub mod page;
pub mod sysfs;
pub mod vfio;

use std::fmt;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// Parses a guest program's arguments with `parse`. On `--help` (parse gives `None`) prints the
/// usage and returns exit status 0; on bad arguments prints the usage and the program's result
/// line `TAG: FAIL arguments: ...` (the only line the lab tests read) and returns status 2.
pub fn args_or_exit<A>(
    tag: &str,
    usage: &str,
    parse: impl FnOnce(&[String]) -> std::result::Result<Option<A>, String>,
) -> std::result::Result<A, std::process::ExitCode> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    match parse(&argv) {
        Ok(Some(args)) => Ok(args),
        Ok(None) => {
            println!("{usage}");
            Err(std::process::ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("{usage}");
            println!("{tag}: FAIL arguments: {e}");
            Err(std::process::ExitCode::from(2))
        }
    }
}

/// A failed step: what was being done, and why (errno text included for OS errors).
#[derive(Debug)]
pub struct Fail {
    step: String,
    detail: String,
}

impl Fail {
    pub fn msg(step: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            step: step.into(),
            detail: detail.into(),
        }
    }
    pub fn io(step: impl Into<String>, e: std::io::Error) -> Self {
        Self::msg(step, e.to_string())
    }
    /// Capture errno of the libc call that just failed.
    pub fn last_os(step: impl Into<String>) -> Self {
        Self::io(step, std::io::Error::last_os_error())
    }
    pub fn context(self, what: impl Into<String>) -> Self {
        Self {
            detail: format!("{} ({})", self.detail, what.into()),
            ..self
        }
    }
}

impl fmt::Display for Fail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.step, self.detail)
    }
}

pub type Result<T> = std::result::Result<T, Fail>;

/// A non-blocking eventfd that VFIO signals on each interrupt.
pub struct EventFd(OwnedFd);

impl EventFd {
    pub fn new() -> Result<Self> {
        // SAFETY: eventfd has no memory-safety preconditions.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(Fail::last_os("eventfd"));
        }
        // SAFETY: fd is a fresh fd that nothing else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// Wait up to `timeout_ms` for the counter to become non-zero; returns and clears it (0 on
    /// timeout).
    pub fn wait(&self, timeout_ms: u64) -> Result<u64> {
        let deadline = Instant::now() + Duration::from_millis(timeout_ms);
        loop {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .as_millis();
            let mut pfd = libc::pollfd {
                fd: self.raw(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: pfd is one live pollfd, matching nfds = 1.
            let r = unsafe { libc::poll(&mut pfd, 1, i32::try_from(left).unwrap_or(i32::MAX)) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Fail::io("poll eventfd", e));
            }
            if r == 0 {
                return Ok(0);
            }
            return self.take();
        }
    }

    /// Read and clear the counter without blocking (0 if it is zero).
    pub fn take(&self) -> Result<u64> {
        let mut v = 0u64;
        // SAFETY: reads exactly 8 bytes into a live u64.
        let n = unsafe { libc::read(self.raw(), (&mut v as *mut u64).cast(), 8) };
        if n == 8 {
            return Ok(v);
        }
        let e = std::io::Error::last_os_error();
        if n < 0 && e.kind() == std::io::ErrorKind::WouldBlock {
            return Ok(0);
        }
        Err(Fail::msg("read eventfd", format!("returned {n}: {e}")))
    }
}
