//! Guest-visible hotplug of VFIO devices into P2P groups, through ACPI (Linux's acpiphp), as
//! Cloud Hypervisor and QEMU's ACPI mode do: the DSDT describes each spare slot with `_EJ0`, a
//! Generic Event Device interrupt tells the guest a slot changed, and the guest's `_EJ0` says
//! when it has let go of a device. ACPI rather than native pciehp because an orderly pciehp
//! unplug waits 5 s for the attention button (lab: 5.1 s under QEMU) and ACPI's takes ~0.07 s.
//!
//! Add: the device is opened in its group's IOMMU domain, its BARs join the group's P2P table,
//! its model goes into a free slot of the group, then the guest is told. Remove: the guest is
//! asked to eject; once its `_EJ0` runs (the driver's remove has run, the device still
//! reachable), the VMM thread unplugs it, its P2P mappings go, and it is reset and closed.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::pci::{AcpiHotplug, PciRoot, HOTPLUG_GED_GSI, HOTPLUG_IO_BASE, HOTPLUG_IO_LEN};
use devices::{Bus, BusRange};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use super::hotplug_faults::{HotplugFaults, HotplugStep};
use super::DeviceManagerError;

/// Slot numbers the guest's `_EJ0` wrote (on a vCPU thread), for the VMM thread to act on.
pub struct EjectQueue {
    numbers: Mutex<Vec<u32>>,
    event: EventFd,
}

impl EjectQueue {
    fn push(&self, number: u32) {
        self.numbers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(number);
        if let Err(e) = self.event.write(1) {
            log::error!("cannot wake the VMM thread for the eject of slot {number}: {e}");
        }
    }

    fn take(&self) -> Vec<u32> {
        let _ = self.event.read();
        std::mem::take(&mut *self.numbers.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// How long the guest has to let go of a device after `vm.remove-device`. A guest that has not
/// run `_EJ0` by then (no acpiphp, a driver stuck in its remove) loses the device anyway, as on a
/// surprise removal: the VMM must not hold a device (and its IOMMU mappings) a guest can keep
/// forever.
pub const EJECT_TIMEOUT: Duration = Duration::from_secs(30);

/// One spare slot and who holds it.
#[derive(Debug)]
pub struct SlotUse {
    pub name: String,
    pub number: u32,
    /// The P2P group whose devices this slot takes.
    pub group: String,
    /// The device plugged here, by id.
    pub device: Option<String>,
    /// When the guest was asked to eject it.
    pub eject_requested: Option<Instant>,
}

/// The hotplug controller, its slots and the eject queue.
pub struct Hotplug {
    pub controller: Arc<AcpiHotplug>,
    ejected: Arc<EjectQueue>,
    pub slots: Vec<SlotUse>,
    faults: HotplugFaults,
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> DeviceManagerError {
    move |source| DeviceManagerError::Hotplug {
        what: what.to_owned(),
        source: Box::new(source),
    }
}

impl Hotplug {
    /// Places the controller on the I/O bus and wires its GED interrupt; `slot_group` names the
    /// group each of `root`'s hotplug slots belongs to.
    pub fn new(
        vm: &VmFd,
        pio: &Bus,
        root: &PciRoot,
        slot_group: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, DeviceManagerError> {
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("creating the GED eventfd"))?;
        vm.register_irqfd(&irq, HOTPLUG_GED_GSI)
            .map_err(|e| DeviceManagerError::Hotplug {
                what: format!("KVM_IRQFD for the GED on GSI {HOTPLUG_GED_GSI}"),
                source: Box::new(e),
            })?;
        let ejected = Arc::new(EjectQueue {
            numbers: Mutex::new(Vec::new()),
            event: EventFd::new(libc::EFD_NONBLOCK)
                .map_err(io_err("creating the eject eventfd"))?,
        });
        let queue = ejected.clone();
        let controller = Arc::new(AcpiHotplug::new(
            irq,
            Box::new(move |number| queue.push(number)),
        ));
        pio.insert(
            BusRange::new(HOTPLUG_IO_BASE, HOTPLUG_IO_LEN),
            Arc::new(Mutex::new(controller.clone())),
        )?;
        let slots = root
            .hotplug_slots()
            .into_iter()
            .filter_map(|slot| {
                let group = slot_group(&slot.name)?;
                Some(SlotUse {
                    name: slot.name,
                    number: slot.number,
                    group,
                    device: None,
                    eject_requested: None,
                })
            })
            .collect();
        Ok(Self {
            controller,
            ejected,
            slots,
            faults: HotplugFaults::from_env(),
        })
    }

    /// The eventfd the VMM thread watches for ejects.
    pub fn eject_event(&self) -> &EventFd {
        &self.ejected.event
    }

    /// Slot numbers whose eject the guest completed since the last call.
    pub fn take_ejected(&self) -> Vec<u32> {
        self.ejected.take()
    }

    /// A free slot of `group`.
    pub fn free_slot(&self, group: &str) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| s.group == group && s.device.is_none())
    }

    pub fn slot_of_device(&self, id: &str) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| s.device.as_deref() == Some(id))
    }
}

impl super::DeviceManager {
    /// Hotplugs `device` (in the configuration already, checked like a cold-plugged one) into a
    /// free slot of `group`: opened in the group's domain, its BARs in the group's P2P table,
    /// its model in the slot, then the guest told. Returns where the guest finds it. A failure
    /// at any step undoes the steps before it.
    pub fn hot_add(
        &mut self,
        device: &crate::config::DeviceConfig,
        group: Option<&str>,
        clique: Option<u8>,
    ) -> Result<devices::pci::Bdf, ApiFailure> {
        let id = &device.id;
        let group = group.ok_or_else(|| {
            ApiFailure::bad_request(format!(
                "device {id}: a hotplugged device joins a P2P group (p2p_group), whose slots \
                 take it"
            ))
        })?;
        let slot = self.hotplug.free_slot(group).ok_or_else(|| {
            ApiFailure::conflict(format!(
                "P2P group {group} has no free hotplug slot (slots = N in its [[p2p_group]])"
            ))
        })?;
        let passthrough = self
            .passthrough
            .as_mut()
            .ok_or_else(|| ApiFailure::internal("no passthrough state for hotplug"))?;
        let domain = passthrough
            .domains
            .iter()
            .position(|d| d.plan.name == group)
            .ok_or_else(|| ApiFailure::internal(format!("no IOMMU domain for group {group}")))?;
        let fault = self.hotplug.faults.next_attempt();
        let injected = |step: HotplugStep| DeviceManagerError::Injected {
            id: id.clone(),
            step: step.name(),
        };
        let opened = passthrough
            .hot_open(
                device,
                domain,
                clique,
                &self.mapper,
                &self.interrupts,
                fault,
            )
            .map_err(|e| ApiFailure::bad_request(crate::error_chain(&e)))?;
        let shared: devices::pci::SharedPciDevice = opened.model.clone();
        let name = self.hotplug.slots[slot].name.clone();
        let number = self.hotplug.slots[slot].number;
        let plugged = if fault == Some(HotplugStep::Plug) {
            Err(injected(HotplugStep::Plug).to_string())
        } else {
            self.root
                .plug(&name, shared.clone())
                .map_err(|e| e.to_string())
        };
        let bdf = match plugged {
            Ok(bdf) => bdf,
            Err(e) => {
                passthrough.release(opened, &self.mapper);
                return Err(ApiFailure::internal(format!("slot {name}: {e}")));
            }
        };
        if let Some(gsi) = self.root.segment().intx_gsi(&shared) {
            let mut model = opened.model.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = model.connect_intx(gsi) {
                log::warn!("{id}: INTx on GSI {gsi} unavailable: {e}");
            }
        }
        let notified = if fault == Some(HotplugStep::Notify) {
            Err(injected(HotplugStep::Notify).to_string())
        } else {
            self.hotplug
                .controller
                .notify_inserted(number)
                .map_err(|e| e.to_string())
        };
        if let Err(e) = notified {
            if let Err(e) = self.root.unplug(&name) {
                log::error!("slot {name}: undoing a failed hotplug: {e}");
            }
            passthrough.release(opened, &self.mapper);
            return Err(ApiFailure::internal(format!(
                "slot {name}: telling the guest: {e}"
            )));
        }
        passthrough.devices.push(opened);
        let slot = &mut self.hotplug.slots[slot];
        slot.device = Some(id.clone());
        slot.eject_requested = None;
        log::info!("{id}: hotplugged into slot {name} (#{number}) of group {group} at {bdf}");
        Ok(bdf)
    }

    /// Whether a device waits for the guest's `_EJ0`.
    pub fn eject_pending(&self) -> bool {
        self.hotplug
            .slots
            .iter()
            .any(|s| s.eject_requested.is_some() && s.device.is_some())
    }

    /// Asks the guest to let go of hotplugged device `id`; it leaves once the guest's `_EJ0`
    /// ran ([`Self::process_ejects`]). Asking again repeats the request.
    pub fn hot_remove(&mut self, id: &str) -> Result<(), ApiFailure> {
        let Some(slot) = self.hotplug.slot_of_device(id) else {
            let cold = self.root.placements().contains_key(id);
            return Err(if cold {
                ApiFailure::conflict(format!(
                    "device {id} was plugged at boot, not into a hotplug slot; it stays"
                ))
            } else {
                ApiFailure::not_found(format!("no device with id {id:?}"))
            });
        };
        let slot = &mut self.hotplug.slots[slot];
        self.hotplug
            .controller
            .request_eject(slot.number)
            .map_err(|e| ApiFailure::internal(format!("slot {}: {e}", slot.name)))?;
        slot.eject_requested = Some(Instant::now());
        log::info!(
            "{id}: eject requested from slot {} (#{})",
            slot.name,
            slot.number
        );
        Ok(())
    }

    /// Completes the ejects the guest has done: unplugs each device (its BARs leave the guest's
    /// address space), then releases it. Returns the ids that left.
    pub fn process_ejects(&mut self) -> Vec<String> {
        let mut gone = Vec::new();
        let mut numbers = self.hotplug.take_ejected();
        for slot in &self.hotplug.slots {
            if slot
                .eject_requested
                .is_some_and(|t| t.elapsed() >= EJECT_TIMEOUT && slot.device.is_some())
            {
                log::warn!(
                    "{}: the guest did not release it within {EJECT_TIMEOUT:?} of the eject \
                     request; removing it anyway (surprise removal)",
                    slot.device.as_deref().unwrap_or("?")
                );
                numbers.push(slot.number);
            }
        }
        for number in numbers {
            let Some(slot) = self.hotplug.slots.iter_mut().find(|s| s.number == number) else {
                log::warn!("guest ejected slot #{number}, which is no hotplug slot of a group");
                continue;
            };
            let Some(id) = slot.device.take() else {
                log::warn!("guest ejected empty slot {} (#{number})", slot.name);
                continue;
            };
            let waited = slot.eject_requested.take().map(|t| t.elapsed());
            if let Err(e) = self.root.unplug(&slot.name) {
                log::error!("{id}: unplugging from slot {}: {e}", slot.name);
            }
            if let Some(passthrough) = self.passthrough.as_mut() {
                if let Some(index) = passthrough.devices.iter().position(|d| d.config.id == id) {
                    let device = passthrough.devices.remove(index);
                    passthrough.release(device, &self.mapper);
                }
            }
            log::info!(
                "{id}: ejected by the guest from slot {} ({waited:?} after the request)",
                slot.name
            );
            gone.push(id);
        }
        gone
    }
}

use api::ApiFailure;
