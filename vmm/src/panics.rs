//! What a panic does in p2pvmm: whichever thread panics, the process logs one line naming the
//! thread and the message, gives the terminal back, and aborts (exit status 134, SIGABRT).
//!
//! p2pvmm builds with `panic = "abort"`, and the hook aborts itself too, so a debug build (which
//! unwinds) behaves the same: no thread dies alone while the others wait for it (a dead vCPU in a
//! running VM, a dead console flusher holding the guest's output, a dead API thread behind an open
//! socket). Nothing the skipped `Drop`s do is needed for safety: the kernel releases every fd, map
//! and pin with the process (VFIO resets a device when its last fd closes), as a `kill -9` shows
//! (lab tests/crash.rs); the terminal is restored here, the API socket's stale file is replaced by
//! the next p2pvmm (its lock died with this one).
//!
//! `P2PVMM_X_PANIC=THREAD` (a test knob, like `P2PVMM_X_HOTPLUG_FAIL`) panics on purpose in one
//! thread at a defined point, so tests can check the above for every kind of thread.

use std::io::Write;
use std::sync::OnceLock;

use crate::console_output::LogOutput;

pub const PANIC_ENV: &str = "P2PVMM_X_PANIC";

/// A thread that `P2PVMM_X_PANIC` can make panic, and where.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PanicPoint {
    /// The last vCPU thread, on its first VM exit.
    Vcpu,
    /// The VMM thread, in its event loop once the vCPUs run.
    Vmm,
    /// The API accept thread, when a client connects.
    Api,
    /// An API connection thread, once it has read a request.
    ApiConnection,
    /// The console flusher, when it first writes a partial line.
    Console,
    /// The P2P table reporter, when it first logs the table.
    P2pReport,
}

impl PanicPoint {
    const ALL: [PanicPoint; 6] = [
        Self::Vcpu,
        Self::Vmm,
        Self::Api,
        Self::ApiConnection,
        Self::Console,
        Self::P2pReport,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Vcpu => "vcpu",
            Self::Vmm => "vmm",
            Self::Api => "api",
            Self::ApiConnection => "api-conn",
            Self::Console => "console",
            Self::P2pReport => "p2p-report",
        }
    }

    fn parse(word: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == word.trim())
            .ok_or_else(|| {
                let names: Vec<_> = Self::ALL.iter().map(|p| p.name()).collect();
                format!(
                    "{PANIC_ENV}: unknown thread {word:?} (use {})",
                    names.join(", ")
                )
            })
    }
}

/// The point chosen in the environment, read once; an unparsable value injects nothing.
pub fn injected() -> Option<PanicPoint> {
    static CHOSEN: OnceLock<Option<PanicPoint>> = OnceLock::new();
    *CHOSEN.get_or_init(|| {
        let value = std::env::var(PANIC_ENV).ok()?;
        match PanicPoint::parse(&value) {
            Ok(point) => {
                log::warn!(
                    "{PANIC_ENV}={} is set: that thread panics on purpose",
                    point.name()
                );
                Some(point)
            }
            Err(e) => {
                log::warn!("{e}; no panic injected");
                None
            }
        }
    })
}

/// Panics if `point` is the one chosen in the environment (reported at the caller's line).
#[track_caller]
pub fn maybe_panic(point: PanicPoint) {
    if injected() == Some(point) {
        panic!("{PANIC_ENV}={}: injected panic", point.name());
    }
}

/// Installs the hook: one line on stderr naming the thread, the terminal restored, then abort.
pub fn install_hook() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        // The VMM's event loop runs on the main thread.
        let role = if name == "main" {
            " (the VMM thread)"
        } else {
            ""
        };
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        let location = info
            .location()
            .map_or_else(String::new, |l| format!(" at {l}"));
        // Straight to stderr, not through `log`: the logger's lock may be the one this thread
        // held when it panicked. `LogOutput` still starts the line after an open console line.
        let line = format!(
            "p2pvmm: error: thread '{name}'{role} panicked{location}: {message}; p2pvmm aborts\n"
        );
        let _ = LogOutput::stderr().write_all(line.as_bytes());
        crate::console::restore_terminal_after_panic();
        std::process::abort();
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_point_parses_by_its_name() {
        for point in PanicPoint::ALL {
            assert_eq!(PanicPoint::parse(point.name()), Ok(point));
        }
    }

    #[test]
    fn an_unknown_thread_is_named_with_the_choices() {
        let e = PanicPoint::parse("gpu").unwrap_err();
        assert!(e.contains("\"gpu\"") && e.contains("p2p-report"), "{e}");
    }
}
