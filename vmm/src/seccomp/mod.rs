//! Seccomp filters, one per thread kind, installed by each thread as it starts.
//!
//! A guest that gets code execution in p2pvmm (through a device model bug, say) holds a process
//! with VFIO devices, guest RAM and IOMMU domains; the filters leave it only the system calls
//! its thread needs. `--seccomp true` (the default) traps any other call: the SIGSYS handler
//! names the thread and the call on stderr and the process exits with 159 (128 + SIGSYS), the
//! kernel releasing devices and mappings with the fds. `--seccomp log` lets such a call through
//! and the kernel logs it (audit type 1326, with the thread's name); `false` installs nothing.
//!
//! Filters stack: a thread keeps the filters of the thread that spawned it. The VMM thread's
//! filter is installed first (in `main`, before any VM exists, as a rebuilt VM runs under it
//! too), so every other list is a subset of it; the API thread is spawned before it and starts
//! from nothing.

mod filters;
mod sigsys;
mod syscall_names;

use std::collections::HashMap;
use std::sync::OnceLock;
use std::thread::{Builder, JoinHandle};

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

pub use filters::ThreadKind;
pub use sigsys::EXIT_SECCOMP;

/// What `--seccomp` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompMode {
    /// Trap system calls outside the thread's list: named on stderr, exit status 159.
    #[value(name = "true")]
    Trap,
    /// No filters.
    #[value(name = "false")]
    Off,
    /// Let them through; the kernel logs each one (audit type 1326).
    #[value(name = "log")]
    Log,
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the {kind} seccomp filter: {source}")]
    Build {
        kind: ThreadKind,
        #[source]
        source: seccompiler::BackendError,
    },
    #[error("installing the SIGSYS handler: {0}")]
    Handler(#[source] std::io::Error),
    #[error("installing the {kind} seccomp filter: {source}")]
    Install {
        kind: ThreadKind,
        #[source]
        source: seccompiler::Error,
    },
    #[error("the seccomp mode was already set")]
    AlreadySet,
}

/// The compiled filters of this process, one per thread kind; none with `--seccomp false`.
struct Filters {
    mode: SeccompMode,
    programs: HashMap<ThreadKind, BpfProgram>,
}

static FILTERS: OnceLock<Filters> = OnceLock::new();

/// Compiles every thread kind's filter for `mode` and, when trapping, installs the SIGSYS
/// handler. Call once, before installing any filter; until then (unit tests) threads start
/// without filters.
pub fn set_mode(mode: SeccompMode) -> Result<(), SeccompError> {
    let mut programs = HashMap::new();
    if mode != SeccompMode::Off {
        let mismatch = match mode {
            SeccompMode::Log => SeccompAction::Log,
            _ => SeccompAction::Trap,
        };
        for kind in ThreadKind::ALL {
            programs.insert(kind, compile(kind, mismatch.clone())?);
        }
    }
    if mode == SeccompMode::Trap {
        sigsys::install_handler().map_err(SeccompError::Handler)?;
    }
    FILTERS
        .set(Filters { mode, programs })
        .map_err(|_| SeccompError::AlreadySet)
}

/// The mode set by [`set_mode`] (`Off` before).
pub fn mode() -> SeccompMode {
    FILTERS.get().map_or(SeccompMode::Off, |f| f.mode)
}

fn compile(kind: ThreadKind, mismatch: SeccompAction) -> Result<BpfProgram, SeccompError> {
    let build = |source| SeccompError::Build { kind, source };
    let filter = SeccompFilter::new(
        kind.rules().map_err(build)?,
        mismatch,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(build)?;
    BpfProgram::try_from(filter).map_err(build)
}

/// Installs `kind`'s filter on the calling thread (nothing with `--seccomp false` or before
/// [`set_mode`]). For the SIGSYS message, the thread is named after `kind`'s filter.
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    let Some(program) = FILTERS.get().and_then(|f| f.programs.get(&kind)) else {
        return Ok(());
    };
    sigsys::set_thread_kind(kind);
    seccompiler::apply_filter(program).map_err(|source| SeccompError::Install { kind, source })?;
    log::debug!("seccomp: {kind} filter installed ({:?})", mode());
    forbidden_call_if_asked(kind);
    Ok(())
}

/// Spawns a thread that installs `kind`'s filter before it runs `body`; fails (and `body`
/// never runs) when the filter cannot be installed.
pub fn spawn<F>(kind: ThreadKind, builder: Builder, body: F) -> std::io::Result<JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    let (installed, result) = std::sync::mpsc::sync_channel(1);
    let thread = builder.spawn(move || {
        let outcome = install(kind);
        let ok = outcome.is_ok();
        let _ = installed.send(outcome);
        // Without its filter the thread must not run; `spawn` reports why.
        if ok {
            body();
        }
    })?;
    match result.recv() {
        Ok(Ok(())) => Ok(thread),
        Ok(Err(e)) => Err(std::io::Error::other(e.to_string())),
        Err(_) => Err(std::io::Error::other(format!(
            "the {kind} thread ended before installing its seccomp filter"
        ))),
    }
}

/// Test knob: `P2PVMM_X_SECCOMP_PROBE=<thread kind>` makes that kind's thread call `socket`,
/// which no filter allows, right after installing its filter: what an exploited thread would
/// try, for the lab to see it caught.
fn forbidden_call_if_asked(kind: ThreadKind) {
    if std::env::var("P2PVMM_X_SECCOMP_PROBE").is_ok_and(|k| k == kind.name()) {
        log::warn!("P2PVMM_X_SECCOMP_PROBE: the {kind} thread calls socket()");
        // SAFETY: socket has no memory arguments; a descriptor it returns is closed at once.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            if fd >= 0 {
                libc::close(fd);
            }
        }
    }
}

#[cfg(test)]
mod tests;
