//! vCPU threads: each runs `KVM_RUN` and dispatches port I/O and MMIO exits to the buses.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use devices::legacy::{ExitSignal, GuestExit};
use devices::Bus;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::panics::{self, PanicPoint};
use crate::seccomp::ThreadKind;

/// The signal that interrupts `KVM_RUN` so a vCPU thread notices it should stop.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

/// Installs the (empty) handler for the kick signal; its only job is to make `KVM_RUN` return
/// `EINTR`.
pub fn register_kick_handler() -> std::io::Result<()> {
    extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    register_signal_handler(kick_signal(), handle_kick)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// State shared by all vCPU threads.
pub struct VcpuShared {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub exit: Arc<ExitSignal>,
    pub stop: Arc<AtomicBool>,
    pub pause: PauseGate,
}

/// Holds vCPU threads outside `KVM_RUN` while the VM is paused (API `vm.pause`).
#[derive(Default)]
pub struct PauseGate {
    /// (paused, threads parked at the gate)
    state: Mutex<(bool, usize)>,
    changed: Condvar,
}

impl PauseGate {
    fn lock(&self) -> std::sync::MutexGuard<'_, (bool, usize)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Parks the calling vCPU thread while paused; returns at once otherwise or once `stop` is set.
    fn wait_while_paused(&self, stop: &AtomicBool) {
        let mut state = self.lock();
        if !state.0 {
            return;
        }
        state.1 += 1;
        self.changed.notify_all();
        while state.0 && !stop.load(Ordering::Acquire) {
            state = self
                .changed
                .wait_timeout(state, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        state.1 -= 1;
        self.changed.notify_all();
    }

    pub fn is_paused(&self) -> bool {
        self.lock().0
    }
}

/// Pauses every vCPU: raises the gate, then kicks each thread out of `KVM_RUN` until all of them
/// are parked (or have ended). Returns once no vCPU runs guest code.
pub fn pause_all(gate: &PauseGate, threads: &[JoinHandle<()>]) {
    gate.lock().0 = true;
    loop {
        let running = threads.iter().filter(|t| !t.is_finished()).count();
        let parked = gate.lock().1;
        if parked >= running {
            return;
        }
        for thread in threads.iter().filter(|t| !t.is_finished()) {
            if let Err(e) = thread.kill(kick_signal()) {
                log::warn!("kicking a vCPU to pause it: {e}");
            }
        }
        let state = gate.lock();
        let _ = gate
            .changed
            .wait_timeout(state, Duration::from_millis(1))
            .unwrap_or_else(|e| e.into_inner());
    }
}

/// Lets paused vCPUs run again.
pub fn resume_all(gate: &PauseGate) {
    gate.lock().0 = false;
    gate.changed.notify_all();
}

pub struct Vcpu {
    fd: VcpuFd,
    index: u8,
    shared: Arc<VcpuShared>,
}

impl Vcpu {
    pub fn new(fd: VcpuFd, index: u8, shared: Arc<VcpuShared>) -> Self {
        Self { fd, index, shared }
    }

    /// Starts the vCPU on its own thread.
    pub fn spawn(self) -> std::io::Result<JoinHandle<()>> {
        let builder = std::thread::Builder::new().name(format!("vcpu{}", self.index));
        crate::seccomp::spawn(ThreadKind::Vcpu, builder, move || self.run())
    }

    fn run(mut self) {
        // The boot vCPU panics after its first exit when `P2PVMM_X_PANIC=vcpu` asks for it.
        let mut first_exit = self.index == 0;
        while !self.shared.stop.load(Ordering::Acquire) {
            self.shared.pause.wait_while_paused(&self.shared.stop);
            if self.shared.stop.load(Ordering::Acquire) {
                return;
            }
            if let Some(exit) = self.run_once() {
                self.shared.exit.request(exit);
                return;
            }
            if std::mem::take(&mut first_exit) {
                panics::maybe_panic(PanicPoint::Vcpu);
            }
        }
    }

    /// One `KVM_RUN`; returns why the guest must end, if it must.
    fn run_once(&mut self) -> Option<GuestExit> {
        let index = self.index;
        let shared = &self.shared;
        if index == 0 {
            crate::start_phases::first_guest_entry();
        }
        match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                shared.pio.read(u64::from(port), data);
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                shared.pio.write(u64::from(port), data);
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !shared.mmio.read(addr, data) {
                    log::debug!("vcpu{index}: read of unbacked MMIO {addr:#x}");
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !shared.mmio.write(addr, data) {
                    log::debug!("vcpu{index}: write to unbacked MMIO {addr:#x}");
                }
            }
            Ok(VcpuExit::Hlt) | Ok(VcpuExit::Intr) => {}
            Ok(VcpuExit::Shutdown) => {
                log::warn!("vcpu{index}: triple fault, resetting");
                return Some(GuestExit::Reset);
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                log::info!("vcpu{index}: system event {kind}");
                return Some(match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => GuestExit::Poweroff,
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => GuestExit::Reset,
                    _ => GuestExit::Crash,
                });
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                log::error!("vcpu{index}: entry failed (reason {reason:#x}, host cpu {cpu})");
                return Some(GuestExit::Crash);
            }
            Ok(VcpuExit::InternalError) => {
                // SAFETY: for KVM_EXIT_INTERNAL_ERROR, KVM filled the run structure's `internal`
                // member of the exit union; `ndata` is bounded by the array below.
                let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
                let ndata = (internal.ndata as usize).min(internal.data.len());
                log::error!(
                    "vcpu{index}: KVM internal error (suberror {}, data {:x?})",
                    internal.suberror,
                    &internal.data[..ndata]
                );
                return Some(GuestExit::Crash);
            }
            Ok(other) => {
                log::warn!("vcpu{index}: unhandled exit {other:?}");
            }
            Err(e) if matches!(e.errno(), libc::EINTR | libc::EAGAIN) => {
                // Kicked: clear the request so the next KVM_RUN does not return at once.
                self.fd.set_kvm_immediate_exit(0);
            }
            Err(e) => {
                log::error!("vcpu{index}: KVM_RUN failed: {e}");
                return Some(GuestExit::Crash);
            }
        }
        None
    }
}

/// Stops every vCPU thread: raises the stop flag, then signals each thread until it has left
/// `KVM_RUN` and returned.
pub fn stop_all(stop: &AtomicBool, threads: Vec<JoinHandle<()>>) {
    stop.store(true, Ordering::Release);
    for thread in threads {
        let name = thread.thread().name().unwrap_or("vcpu").to_owned();
        while !thread.is_finished() {
            if let Err(e) = thread.kill(kick_signal()) {
                log::warn!("kicking {name}: {e}");
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        if thread.join().is_err() {
            log::error!("{name} panicked");
        }
    }
}
