//! KVM implementation of the devices' `InterruptController`: GSI routing for MSI vectors and
//! irqfds for every line.
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole table, so the table kept here always holds KVM's
//! default PIC/IOAPIC routes for the legacy GSIs plus one route per routed MSI vector.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use devices::interrupt::{InterruptController, InterruptError, IntxLine, MsiMessage, MsiVector};
use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

/// IOAPIC inputs: GSIs below this are the legacy lines.
pub const IOAPIC_PINS: u32 = 24;
/// KVM's default routing table size limit.
const MAX_GSI: u32 = 4095;

struct Table {
    msi_routes: BTreeMap<u32, MsiMessage>,
    free_gsis: Vec<u32>,
    next_gsi: u32,
}

pub struct KvmInterrupts {
    vm: Arc<VmFd>,
    table: Mutex<Table>,
}

fn os(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> InterruptError {
    move |e| InterruptError::Os {
        what,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

fn irqchip_route(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut entry = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    entry.u.irqchip.irqchip = irqchip;
    entry.u.irqchip.pin = pin;
    entry
}

fn msi_route(gsi: u32, message: MsiMessage) -> kvm_irq_routing_entry {
    let mut entry = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    entry.u.msi.address_lo = message.address as u32;
    entry.u.msi.address_hi = (message.address >> 32) as u32;
    entry.u.msi.data = message.data;
    entry
}

/// KVM's default legacy routes: PIC inputs for GSIs 0-15 (2 is the cascade) and IOAPIC pins.
fn legacy_routes() -> Vec<kvm_irq_routing_entry> {
    let mut routes = Vec::new();
    for gsi in 0..16 {
        if gsi == 2 {
            continue;
        }
        let chip = if gsi < 8 {
            KVM_IRQCHIP_PIC_MASTER
        } else {
            KVM_IRQCHIP_PIC_SLAVE
        };
        routes.push(irqchip_route(gsi, chip, gsi % 8));
    }
    for gsi in 0..IOAPIC_PINS {
        routes.push(irqchip_route(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    routes
}

impl KvmInterrupts {
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self {
            vm,
            table: Mutex::new(Table {
                msi_routes: BTreeMap::new(),
                free_gsis: Vec::new(),
                next_gsi: IOAPIC_PINS,
            }),
        }
    }

    fn commit(&self, table: &Table) -> Result<(), InterruptError> {
        let mut entries = legacy_routes();
        entries.extend(table.msi_routes.iter().map(|(&gsi, &m)| msi_route(gsi, m)));
        let routing = KvmIrqRouting::from_entries(&entries).map_err(|_| InterruptError::NoGsi)?;
        self.vm
            .set_gsi_routing(&routing)
            .map_err(os("KVM_SET_GSI_ROUTING"))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl InterruptController for KvmInterrupts {
    fn allocate_msi(&self) -> Result<MsiVector, InterruptError> {
        let event = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| InterruptError::Os {
            what: "creating an MSI eventfd",
            source,
        })?;
        let mut table = self.lock();
        let gsi = match table.free_gsis.pop() {
            Some(gsi) => gsi,
            None if table.next_gsi <= MAX_GSI => {
                table.next_gsi += 1;
                table.next_gsi - 1
            }
            None => return Err(InterruptError::NoGsi),
        };
        Ok(MsiVector { gsi, event })
    }

    fn route_msi(
        &self,
        vector: &MsiVector,
        message: Option<MsiMessage>,
    ) -> Result<(), InterruptError> {
        let mut table = self.lock();
        let was_routed = table.msi_routes.contains_key(&vector.gsi);
        match message {
            Some(message) => {
                let previous = table.msi_routes.insert(vector.gsi, message);
                if previous != Some(message) {
                    if let Err(e) = self.commit(&table) {
                        match previous {
                            Some(p) => table.msi_routes.insert(vector.gsi, p),
                            None => table.msi_routes.remove(&vector.gsi),
                        };
                        return Err(e);
                    }
                }
                if !was_routed {
                    self.vm
                        .register_irqfd(&vector.event, vector.gsi)
                        .map_err(os("KVM_IRQFD"))?;
                }
            }
            None if was_routed => {
                self.vm
                    .unregister_irqfd(&vector.event, vector.gsi)
                    .map_err(os("KVM_IRQFD deassign"))?;
                table.msi_routes.remove(&vector.gsi);
                self.commit(&table)?;
            }
            None => {}
        }
        Ok(())
    }

    fn free_msi(&self, vector: MsiVector) {
        if let Err(e) = self.route_msi(&vector, None) {
            log::warn!("releasing GSI {}: {e}", vector.gsi);
        }
        self.lock().free_gsis.push(vector.gsi);
    }

    fn connect_intx(&self, gsi: u32) -> Result<IntxLine, InterruptError> {
        let new_event = |what| {
            EventFd::new(libc::EFD_NONBLOCK).map_err(|source| InterruptError::Os { what, source })
        };
        let trigger = new_event("creating an INTx eventfd")?;
        let resample = new_event("creating an INTx resample eventfd")?;
        self.vm
            .register_irqfd_with_resample(&trigger, &resample, gsi)
            .map_err(os("KVM_IRQFD with resample"))?;
        Ok(IntxLine {
            gsi,
            trigger,
            resample,
        })
    }

    fn disconnect_intx(&self, line: IntxLine) {
        if let Err(e) = self.vm.unregister_irqfd(&line.trigger, line.gsi) {
            log::warn!("disconnecting INTx GSI {}: {e}", line.gsi);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_routes_match_kvm_defaults() {
        let routes = legacy_routes();
        // 15 PIC routes (no cascade) + 24 IOAPIC routes.
        assert_eq!(routes.len(), 15 + 24);
        // SAFETY: reading the union variant these entries were built with.
        let pin = |e: &kvm_irq_routing_entry| unsafe { (e.u.irqchip.irqchip, e.u.irqchip.pin) };
        let slave = routes.iter().find(|e| e.gsi == 10).map(pin);
        assert_eq!(slave, Some((KVM_IRQCHIP_PIC_SLAVE, 2)));
        assert!(routes
            .iter()
            .any(|e| e.gsi == 23 && pin(e) == (KVM_IRQCHIP_IOAPIC, 23)));
    }

    #[test]
    fn msi_route_splits_the_address() {
        let e = msi_route(
            30,
            MsiMessage {
                address: 0x1_fee0_1000,
                data: 0x4041,
            },
        );
        // SAFETY: reading the union variant this entry was built with.
        let msi = unsafe { e.u.msi };
        assert_eq!(
            (msi.address_lo, msi.address_hi, msi.data),
            (0xfee0_1000, 1, 0x4041)
        );
        assert_eq!(e.type_, KVM_IRQ_ROUTING_MSI);
    }
}
