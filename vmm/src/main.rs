//! `p2pvmm`: boots a Linux guest on KVM, with VFIO devices that can DMA to each other.
//!
//! Exit status: 0 when the guest powers off, 3 when it reboots (p2pvmm does not restart it),
//! 4 when it crashes (triple fault excepted, which counts as a reboot), 1 on a VMM error
//! (bad configuration included), 2 on a command-line usage error, 128 + N when signal N
//! (SIGTERM, SIGINT, SIGHUP) stopped it after an orderly shutdown, 159 when a thread made a
//! system call its seccomp filter forbids.

use std::process::ExitCode;

use devices::legacy::GuestExit;

use vmm::config::{self, ConfigError, HostLimits};
use vmm::control::{self, ApiService, Outcome};
use vmm::panics::{self, PanicPoint};
use vmm::seccomp::{self, ThreadKind};
use vmm::{error_chain, signals};

const EXIT_VMM_ERROR: u8 = 1;
const EXIT_GUEST_REBOOT: u8 = 3;
const EXIT_GUEST_CRASH: u8 = 4;

fn main() -> ExitCode {
    vmm::start_phases::mark_process_start();
    panics::install_hook();
    // Before any thread exists, so every thread inherits the mask (see `signals`).
    if let Err(e) = signals::block() {
        eprintln!("p2pvmm: error: blocking SIGTERM/SIGINT/SIGHUP: {e}");
        return ExitCode::from(EXIT_VMM_ERROR);
    }
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "remote") {
        use clap::Parser;
        env_logger::Builder::new()
            .filter_level(log::LevelFilter::Warn)
            .parse_env("P2PVMM_LOG")
            .init();
        let remote = api::cli::RemoteArgs::parse_from(
            std::iter::once("p2pvmm remote".into()).chain(args.into_iter().skip(2)),
        );
        return api::cli::run(remote);
    }
    let startup = match config::load_startup(args) {
        Ok(startup) => startup,
        Err(ConfigError::Usage(e)) => e.exit(),
        Err(e) => return fail(&e),
    };
    if let Err(e) = seccomp::set_mode(startup.seccomp) {
        return fail(&e);
    }
    // Microseconds: the log is how hotplug and BAR-move latencies are read (bench-hotplug.sh).
    env_logger::Builder::new()
        .filter_level(startup.log_level())
        .target(env_logger::Target::Pipe(Box::new(
            vmm::console_output::LogOutput::stderr(),
        )))
        .format_timestamp_micros()
        .parse_env("P2PVMM_LOG")
        .init();

    let host = match HostLimits::probe() {
        Ok(mut host) => {
            if let Ok(kvm) = kvm_ioctls::Kvm::new() {
                host.max_vcpus = kvm.get_max_vcpus() as u32;
            }
            host
        }
        Err(e) => return fail(&e),
    };
    if let Some(vm) = &startup.vm {
        if let Err(e) = vm.validate(&host) {
            return fail(&e);
        }
    }
    // Bound before the VM is built, so a client can connect as soon as p2pvmm runs.
    let api = match &startup.api_socket {
        Some(path) => match serve_api(path, host) {
            Ok(api) => Some(api),
            Err(e) => return fail(&e),
        },
        None => None,
    };

    // Last: everything above ran unfiltered (the API thread has its own filter), and every
    // thread spawned from here on inherits the VMM thread's.
    if let Err(e) = seccomp::install(ThreadKind::Vmm) {
        return fail(&e);
    }
    match control::run(startup.vm, api) {
        Ok(Outcome::VmmShutdown) => {
            log::info!("vmm.shutdown: p2pvmm exits");
            ExitCode::SUCCESS
        }
        Ok(Outcome::Guest(GuestExit::Poweroff)) => {
            log::info!("guest powered off");
            ExitCode::SUCCESS
        }
        Ok(Outcome::Guest(GuestExit::Reset)) => {
            log::info!("guest rebooted; p2pvmm exits with status {EXIT_GUEST_REBOOT}");
            ExitCode::from(EXIT_GUEST_REBOOT)
        }
        Ok(Outcome::Guest(GuestExit::Crash)) => {
            eprintln!("p2pvmm: the guest crashed");
            ExitCode::from(EXIT_GUEST_CRASH)
        }
        Ok(Outcome::Guest(GuestExit::Stopped)) => {
            let signal = signals::received().unwrap_or(libc::SIGTERM);
            eprintln!("p2pvmm: stopped by {}", signals::name(signal));
            ExitCode::from(128u8.saturating_add(u8::try_from(signal).unwrap_or(0)))
        }
        Err(e) => fail(&e),
    }
}

/// Binds the API socket and starts the HTTP thread; requests reach the VMM thread through the
/// returned service.
fn serve_api(path: &std::path::Path, host: HostLimits) -> Result<ApiService, api::ApiError> {
    let server = api::ApiServer::bind(path)?.with_injected_panic(api::InjectedPanic {
        on_accept: panics::injected() == Some(PanicPoint::Api),
        on_request: panics::injected() == Some(PanicPoint::ApiConnection),
    });
    let (sender, channel) = api::channel().map_err(|source| api::ApiError::Bind {
        socket: path.to_path_buf(),
        source,
    })?;
    let setup = || vmm::seccomp::install(ThreadKind::Api).map_err(std::io::Error::other);
    server
        .spawn_with(sender, setup)
        .map_err(|source| api::ApiError::Bind {
            socket: path.to_path_buf(),
            source,
        })?;
    log::info!("API on {}", path.display());
    Ok(ApiService::new(channel, host))
}

/// Prints `e` and its causes on one line.
fn fail(e: &dyn std::error::Error) -> ExitCode {
    eprintln!("p2pvmm: error: {}", error_chain(e));
    ExitCode::from(EXIT_VMM_ERROR)
}
