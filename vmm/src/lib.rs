//! The p2pvmm VMM as a library: everything but `main`.
//!
//! `main.rs` is a thin binary over it. The split exists so that code outside the binary can
//! drive the same parsers `main` does: the fuzz targets in `tests/fuzz` feed arbitrary text and
//! arguments to [`config`] and API bodies to [`control::convert`]. Only what `main` and those
//! targets need is public.

mod arch;
pub mod config;
mod console;
pub mod console_output;
pub mod control;
mod device_manager;
mod event_loop;
mod interrupts;
mod kvm_vfio;
mod layout;
mod memory;
pub mod panics;
pub mod seccomp;
pub mod signals;
mod slots;
pub mod start_phases;
mod vcpu;
mod vm;

/// `e` and its causes on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
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
    line
}
