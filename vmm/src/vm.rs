//! A KVM virtual machine: guest RAM, in-kernel interrupt controllers, the legacy devices, the
//! kernel loaded and ready, and the vCPUs that run it.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use devices::legacy::{
    AcpiPm, ExitSignal, GuestExit, Serial, ACPI_PM_PORT, ACPI_PM_PORT_LEN, I8042,
};
use devices::{Bus, BusRange};
use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::{acpi, boot, cpuid, regs};
use crate::config::{KernelDecompress, SerialConfig, SlotZap, VmConfig};
use crate::console::ConsoleInput;
use crate::console_output::LineOutput;
use crate::control::{ApiService, ApiStop};
use crate::device_manager::{ram_backing, DeviceManager, DeviceManagerError, Platform};
use crate::event_loop::{self, EventLoop};
use crate::interrupts::KvmInterrupts;
use crate::layout::{MemoryLayout, KVM_IDENTITY_MAP_START, KVM_TSS_START};
use crate::memory::GuestRam;
use crate::signals::StopSignals;
use crate::slots::MemorySlots;
use crate::start_phases::StartPhases;
use crate::vcpu::{self, PauseGate, Vcpu, VcpuShared};

const SERIAL_PORT: u64 = 0x3f8;
const SERIAL_PORT_LEN: u64 = 8;
const SERIAL_GSI: u32 = 4;
const I8042_PORT: u64 = 0x60;
const I8042_PORT_LEN: u64 = 5;
/// Guest physical address bits assumed when KVM does not report them.
const DEFAULT_PHYS_BITS: u8 = 36;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("guest RAM could not be mapped for device DMA: {0}")]
    RamMap(String),
    #[error("opening /dev/kvm: {0}")]
    Kvm(#[source] kvm_ioctls::Error),
    #[error("{what}: {source}")]
    KvmIoctl {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("memory layout: {0}")]
    Layout(#[from] crate::layout::LayoutError),
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error("vCPU {index}: {source}")]
    VcpuRegs {
        index: u8,
        #[source]
        source: regs::RegsError,
    },
    #[error("vCPU {index} CPUID: {source}")]
    Cpuid {
        index: u8,
        #[source]
        source: cpuid::CpuidError,
    },
    #[error("placing {what} on the I/O bus: {source}")]
    Bus {
        what: &'static str,
        #[source]
        source: devices::BusError,
    },
    #[error("serial output file {path:?}: {source}")]
    SerialFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("event loop: {0}")]
    EventLoop(#[from] event_loop::EventLoopError),
    #[error(transparent)]
    Devices(#[from] DeviceManagerError),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::KvmIoctl { what, source }
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> VmError {
    move |source| VmError::Io { what, source }
}

/// How often the event loop looks at pending ejects' deadlines.
const EJECT_TICK: std::time::Duration = std::time::Duration::from_millis(500);

/// Why [`Vm::run`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmEnd {
    /// The guest ended (or a stop signal ended it).
    Guest(GuestExit),
    /// An API request stopped the VM; the VMM goes on.
    Api(ApiStop),
}

/// A VM ready to run. Field order matters for drop: vCPUs and the VM fd go before guest RAM.
pub struct Vm {
    config: VmConfig,
    vcpus: Vec<Vcpu>,
    shared: Arc<VcpuShared>,
    serial: Arc<Mutex<Serial>>,
    serial_to_stdout: bool,
    devices: DeviceManager,
    _vm: Arc<VmFd>,
    _ram: GuestRam,
}

impl Vm {
    /// Builds the whole machine from a validated config. Nothing runs until [`Vm::run`].
    pub fn new(config: &VmConfig) -> Result<Self, VmError> {
        let mut phases = StartPhases::begin();
        // Reading (and decompressing) the kernel needs no VM: it runs beside the VM's setup.
        let kernel = KernelReader::start(config);
        let kvm = Kvm::new().map_err(VmError::Kvm)?;
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let phys_bits = supported
            .as_slice()
            .iter()
            .find(|e| e.function == 0x8000_0008)
            .map(|e| (e.eax & 0xff) as u8)
            .unwrap_or(DEFAULT_PHYS_BITS);
        let mmio64_size = config
            .mmio64_size
            .map_or(crate::layout::MMIO64_MIN_SIZE, |s| s.0);
        let layout = MemoryLayout::with_mmio64(config.memory.size.0, phys_bits, mmio64_size)?;
        log::debug!("guest layout ({phys_bits} physical address bits): {layout:x?}");

        let vm = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
        vm.set_tss_address(KVM_TSS_START as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm.set_identity_map_address(KVM_IDENTITY_MAP_START)
            .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        vm.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        if config.slot_zap == SlotZap::Slot {
            let only = crate::slots::zap_only_deleted_slots(&vm)
                .map_err(kvm_err("KVM_CAP_DISABLE_QUIRKS2 (slot_zap = \"slot\")"))?;
            if only {
                log::info!("KVM zaps only a deleted memory slot's mappings (slot_zap = slot)");
            } else {
                log::warn!(
                    "slot_zap = slot: this kernel cannot turn off KVM_X86_QUIRK_SLOT_ZAP_ALL \
                     (Linux 6.12 and later can); KVM keeps zapping every mapping"
                );
            }
        }
        phases.end("kvm");

        let ram = GuestRam::new(&layout, ram_backing(config))?;
        let first_device_slot = ram.register(&vm)?;
        let slots = Arc::new(MemorySlots::new(
            vm.clone(),
            first_device_slot,
            kvm.get_nr_memslots() as u32,
        ));
        phases.end("memory");

        let exit = Arc::new(ExitSignal::new().map_err(io_err("creating the exit eventfd"))?);
        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        let serial = Arc::new(Mutex::new(serial_device(&vm, &config.serial)?));
        let place = |what, base, len, device| {
            pio.insert(BusRange::new(base, len), device)
                .map_err(|source| VmError::Bus { what, source })
        };
        place("serial", SERIAL_PORT, SERIAL_PORT_LEN, serial.clone())?;
        place(
            "i8042",
            I8042_PORT,
            I8042_PORT_LEN,
            Arc::new(Mutex::new(I8042::new(exit.clone()))),
        )?;
        place(
            "ACPI PM",
            ACPI_PM_PORT,
            ACPI_PM_PORT_LEN,
            Arc::new(Mutex::new(AcpiPm::new(exit.clone()))),
        )?;

        let kernel = kernel.finish()?;
        let kernel = boot::load(
            &ram.memory,
            &layout,
            &kernel,
            config.initramfs.as_deref(),
            &config.cmdline,
        )?;
        phases.end("kernel");
        let devices = DeviceManager::new(
            config,
            Platform {
                vm: &vm,
                ram: &ram,
                layout: &layout,
                pio: &pio,
                mmio: &mmio,
                slots: &slots,
                exit: &exit,
                interrupts: Arc::new(KvmInterrupts::new(vm.clone())),
            },
        )?;
        phases.end("devices");
        acpi::write_tables(
            &ram.memory,
            config.cpus,
            &devices.dsdt_aml(),
            devices.last_bus(),
        )?;
        regs::write_boot_tables(&ram.memory)
            .map_err(|source| VmError::VcpuRegs { index: 0, source })?;
        phases.end("acpi");

        let shared = Arc::new(VcpuShared {
            pio,
            mmio,
            exit,
            stop: Arc::new(AtomicBool::new(false)),
            pause: PauseGate::default(),
        });
        let topology = cpuid::Topology { cpus: config.cpus };
        let mut vcpus = Vec::with_capacity(usize::from(config.cpus));
        for index in 0..config.cpus {
            let fd = vm
                .create_vcpu(u64::from(index))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            let table = cpuid::vcpu_cpuid(&supported, index, topology)
                .map_err(|source| VmError::Cpuid { index, source })?;
            fd.set_cpuid2(&table).map_err(kvm_err("KVM_SET_CPUID2"))?;
            let setup = || -> Result<(), regs::RegsError> {
                regs::setup_msrs(&fd)?;
                regs::setup_fpu(&fd)?;
                regs::setup_lapic(&fd)?;
                if let Some(xcr0) = cpuid::full_xcr0(&table) {
                    regs::setup_xcr0(&fd, xcr0)?;
                }
                if index == 0 {
                    regs::setup_boot_vcpu(&fd, kernel.entry)?;
                }
                Ok(())
            };
            setup().map_err(|source| VmError::VcpuRegs { index, source })?;
            vcpus.push(Vcpu::new(fd, index, shared.clone()));
        }
        phases.end("vcpus");

        Ok(Self {
            config: config.clone(),
            vcpus,
            shared,
            serial,
            serial_to_stdout: matches!(config.serial, SerialConfig::Stdout),
            devices,
            _vm: vm,
            _ram: ram,
        })
    }

    /// Runs the guest until it powers off, resets or crashes, or an API request stops it; then
    /// stops every vCPU thread and releases the devices. Serves `api` meanwhile.
    pub fn run(mut self, api: Option<&mut ApiService>) -> Result<VmEnd, VmError> {
        vcpu::register_kick_handler().map_err(io_err("installing the vCPU kick handler"))?;
        let stop = StopSignals::new(self.shared.exit.clone())
            .map_err(io_err("watching for SIGTERM/SIGINT/SIGHUP"))?;
        let console = self
            .serial_to_stdout
            .then(|| ConsoleInput::stdin(self.serial.clone()));
        let mut threads = Vec::with_capacity(self.vcpus.len());
        let mut result = Ok(None);
        for vcpu in self.vcpus.drain(..) {
            match vcpu.spawn() {
                Ok(thread) => threads.push(thread),
                Err(source) => {
                    result = Err(VmError::Io {
                        what: "spawning a vCPU thread",
                        source,
                    });
                    break;
                }
            }
        }
        if result.is_ok() {
            result = self.serve(console, stop, &threads, api);
        }
        vcpu::resume_all(&self.shared.pause);
        vcpu::stop_all(&self.shared.stop, threads);
        let ram_map_failure = self.devices.ram_map_failure();
        self.devices.shut_down();
        if let Some(why) = ram_map_failure {
            return Err(VmError::RamMap(why));
        }
        Ok(match result? {
            Some(stop) => VmEnd::Api(stop),
            None => VmEnd::Guest(self.shared.exit.reason().unwrap_or(GuestExit::Crash)),
        })
    }

    /// The event loop while the vCPUs run: until the guest ends or a request stops the VM.
    fn serve(
        &mut self,
        console: Option<ConsoleInput>,
        stop: StopSignals,
        threads: &[std::thread::JoinHandle<()>],
        mut api: Option<&mut ApiService>,
    ) -> Result<Option<ApiStop>, VmError> {
        let mut wakes = vec![self.devices.eject_event()];
        wakes.extend(api.as_ref().map(|a| a.eventfd()));
        let mut events = EventLoop::new(&self.shared.exit, console, stop, &wakes)?;
        crate::panics::maybe_panic(crate::panics::PanicPoint::Vmm);
        while self.shared.exit.reason().is_none() {
            // While an eject is pending, wake up to enforce its deadline.
            let tick = self.devices.eject_pending().then_some(EJECT_TICK);
            if !events.wait_at_most(tick)? && tick.is_none() {
                continue;
            }
            // The guest's ejects first: a request that follows sees the device gone.
            for id in self.devices.process_ejects() {
                self.config.devices.retain(|d| d.id != id);
                for group in &mut self.config.p2p_groups {
                    group.devices.retain(|d| d != &id);
                }
            }
            if let Some(api) = api.as_deref_mut() {
                let mut running = RunningVm {
                    config: &mut self.config,
                    devices: &mut self.devices,
                    shared: &self.shared,
                    threads,
                };
                if let Some(stop) = api.serve_running(&mut running) {
                    return Ok(Some(stop));
                }
            }
        }
        Ok(None)
    }
}

/// What API requests may do to a running VM.
pub struct RunningVm<'a> {
    pub config: &'a mut VmConfig,
    pub devices: &'a mut DeviceManager,
    shared: &'a VcpuShared,
    threads: &'a [std::thread::JoinHandle<()>],
}

impl RunningVm<'_> {
    pub fn is_paused(&self) -> bool {
        self.shared.pause.is_paused()
    }

    /// Stops every vCPU outside `KVM_RUN`; returns once none runs guest code.
    pub fn pause(&mut self) {
        vcpu::pause_all(&self.shared.pause, self.threads);
    }

    pub fn resume(&mut self) {
        vcpu::resume_all(&self.shared.pause);
    }

    /// The configuration after a hotplug: what `vm.info` shows and a reboot boots.
    pub fn set_config(&mut self, config: VmConfig) {
        *self.config = config;
    }
}

fn serial_device(vm: &VmFd, config: &SerialConfig) -> Result<Serial, VmError> {
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("creating the serial irqfd"))?;
    vm.register_irqfd(&irq, SERIAL_GSI)
        .map_err(kvm_err("KVM_IRQFD for the serial port"))?;
    let lines = match config {
        SerialConfig::Stdout => LineOutput::stdout(),
        SerialConfig::Off => return Ok(Serial::new(irq, Box::new(std::io::sink()))),
        SerialConfig::File(path) => {
            LineOutput::new(Box::new(std::fs::File::create(path).map_err(|source| {
                VmError::SerialFile {
                    path: path.clone(),
                    source,
                }
            })?))
        }
    }
    .map_err(io_err("starting the console output thread"))?;
    Ok(Serial::new(irq, Box::new(lines)))
}

/// The kernel being read and decompressed on a thread of its own while the VM is set up.
enum KernelReader {
    Thread(std::thread::JoinHandle<Result<boot::KernelImage, boot::BootError>>),
    /// The thread could not be spawned: read on this thread instead, when needed.
    Inline(PathBuf, KernelDecompress),
}

impl KernelReader {
    fn start(config: &VmConfig) -> Self {
        let (path, how) = (config.kernel.clone(), config.kernel_decompress);
        let read = {
            let path = path.clone();
            move || boot::read_kernel(&path, how)
        };
        // The thread inherits the VMM thread's seccomp filter.
        match std::thread::Builder::new()
            .name("kernel-read".into())
            .spawn(read)
        {
            Ok(handle) => Self::Thread(handle),
            Err(e) => {
                log::debug!("no thread to read the kernel on ({e}); reading it later");
                Self::Inline(path, how)
            }
        }
    }

    fn finish(self) -> Result<boot::KernelImage, boot::BootError> {
        match self {
            // A panic there aborts the process (panic = "abort"), so join only fails in tests.
            Self::Thread(handle) => handle
                .join()
                .unwrap_or(Err(boot::BootError::ReadThreadPanicked)),
            Self::Inline(path, how) => boot::read_kernel(&path, how),
        }
    }
}
