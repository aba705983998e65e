//! `p2pvmm`: boots a Linux guest on KVM, with VFIO devices that can DMA to each other.
//!
//! Exit status: 0 when the guest powers off, 3 when it reboots (p2pvmm does not restart it),
//! 4 when it crashes (triple fault excepted, which counts as a reboot), 1 on a VMM error
//! (bad configuration included), 2 on a command-line usage error, 128 + N when signal N
//! (SIGTERM, SIGINT, SIGHUP) stopped it after an orderly shutdown.

mod arch;
mod config;
mod console;
mod device_manager;
mod event_loop;
mod interrupts;
mod kvm_vfio;
mod layout;
mod memory;
mod signals;
mod slots;
mod vcpu;
mod vm;

use std::process::ExitCode;

use devices::legacy::GuestExit;

use crate::config::{ConfigError, HostLimits};
use crate::vm::Vm;

const EXIT_VMM_ERROR: u8 = 1;
const EXIT_GUEST_REBOOT: u8 = 3;
const EXIT_GUEST_CRASH: u8 = 4;

fn main() -> ExitCode {
    // Before any thread exists, so every thread inherits the mask (see `signals`).
    if let Err(e) = signals::block() {
        eprintln!("p2pvmm: error: blocking SIGTERM/SIGINT/SIGHUP: {e}");
        return ExitCode::from(EXIT_VMM_ERROR);
    }
    let loaded = match config::load(std::env::args_os()) {
        Ok(loaded) => loaded,
        Err(ConfigError::Usage(e)) => e.exit(),
        Err(e) => return fail(&e),
    };
    env_logger::Builder::new()
        .filter_level(loaded.log_level())
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
    if let Err(e) = loaded.vm.validate(&host) {
        return fail(&e);
    }

    let exit = Vm::new(&loaded.vm).and_then(Vm::run);
    match exit {
        Ok(GuestExit::Poweroff) => {
            log::info!("guest powered off");
            ExitCode::SUCCESS
        }
        Ok(GuestExit::Reset) => {
            log::info!("guest rebooted; p2pvmm exits with status {EXIT_GUEST_REBOOT}");
            ExitCode::from(EXIT_GUEST_REBOOT)
        }
        Ok(GuestExit::Crash) => {
            eprintln!("p2pvmm: the guest crashed");
            ExitCode::from(EXIT_GUEST_CRASH)
        }
        Ok(GuestExit::Stopped) => {
            let signal = signals::received().unwrap_or(libc::SIGTERM);
            eprintln!("p2pvmm: stopped by {}", signals::name(signal));
            ExitCode::from(128u8.saturating_add(u8::try_from(signal).unwrap_or(0)))
        }
        Err(e) => fail(&e),
    }
}

/// Prints `e` and its causes on one line.
fn fail(e: &dyn std::error::Error) -> ExitCode {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    eprintln!("p2pvmm: error: {line}");
    ExitCode::from(EXIT_VMM_ERROR)
}
