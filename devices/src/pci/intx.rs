//! Legacy INTx routing: which IOAPIC input each function's interrupt pin drives.
//!
//! The scheme, which the DSDT's `\_SB.PCI0._PRT` describes to the guest and the VMM uses to
//! wire passthrough functions:
//! - On the root bus, pin INTx (0 = INTA .. 3 = INTD) of device `d` drives
//!   GSI `16 + (d + x) % 8`: the eight IOAPIC inputs above the ISA range, spread so that
//!   neighbouring slots and the pins of one slot land on different lines. Lines are shared,
//!   level-triggered and active-low, as PCI INTx is.
//! - Below a bridge (root port, switch port), the standard swizzle applies at every bridge
//!   crossed: a function at device `d` of the bridge's secondary bus asserting INTx appears on
//!   the bridge as INT((d + x) % 4). What reaches the root bus is then the root port's slot
//!   and the swizzled pin. Linux performs the same walk (`pci_common_swizzle`) when the root
//!   port has no `_PRT` of its own, so both sides agree by construction.
//!
//! Pins use the Interrupt Pin register's encoding at the API: 1 = INTA .. 4 = INTD, 0 = none.

/// The first GSI used for PCI INTx.
pub const INTX_GSI_BASE: u32 = 16;
/// How many GSIs, from [`INTX_GSI_BASE`], PCI INTx lines are spread over.
pub const INTX_GSI_COUNT: u32 = 8;
/// Device numbers on a bus.
pub const DEVICES_PER_BUS: u8 = 32;

/// The pin (1..=4) a bridge presents on its primary side for `pin` (1..=4) asserted by device
/// `device` of its secondary bus; `None` for an invalid pin.
pub fn bridge_swizzle(device: u8, pin: u8) -> Option<u8> {
    let index = pin_index(pin)?;
    Some((device % 4 + index) % 4 + 1)
}

/// The GSI pin `pin` (1..=4) of root-bus device `device` drives.
pub fn root_bus_gsi(device: u8, pin: u8) -> Option<u32> {
    let index = pin_index(pin)?;
    Some(INTX_GSI_BASE + (u32::from(device % DEVICES_PER_BUS) + u32::from(index)) % INTX_GSI_COUNT)
}

/// The GSI of a function's `pin` (1..=4), given the device numbers on the way to it: the
/// root-bus device first (the function itself, or the root port above it), then the device
/// number at each bus below, the function's own last. `None` for no pin or an empty path.
pub fn gsi_for_path(devices: &[u8], pin: u8) -> Option<u32> {
    let (root, below) = devices.split_first()?;
    let mut pin = pin;
    for device in below.iter().rev() {
        pin = bridge_swizzle(*device, pin)?;
    }
    root_bus_gsi(*root, pin)
}

/// Every root-bus (device, pin index 0..=3, GSI), in `_PRT` order.
pub fn root_bus_routes() -> impl Iterator<Item = (u8, u8, u32)> {
    (0..DEVICES_PER_BUS).flat_map(|device| {
        (0..4u8).filter_map(move |index| {
            root_bus_gsi(device, index + 1).map(|gsi| (device, index, gsi))
        })
    })
}

fn pin_index(pin: u8) -> Option<u8> {
    (1..=4).contains(&pin).then(|| pin - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTA: u8 = 1;
    const INTB: u8 = 2;
    const INTC: u8 = 3;
    const INTD: u8 = 4;

    #[test]
    fn swizzle_follows_the_pci_bridge_spec_table() {
        // PCI-to-PCI Bridge spec, table 9-1: device 0 keeps the pin, device 1 rotates by one.
        assert_eq!(bridge_swizzle(0, INTA), Some(INTA));
        assert_eq!(bridge_swizzle(0, INTD), Some(INTD));
        assert_eq!(bridge_swizzle(1, INTA), Some(INTB));
        assert_eq!(bridge_swizzle(1, INTD), Some(INTA));
        assert_eq!(bridge_swizzle(2, INTC), Some(INTA));
        assert_eq!(bridge_swizzle(5, INTA), Some(INTB));
        assert_eq!(bridge_swizzle(31, INTB), Some(INTA));
    }

    #[test]
    fn no_pin_has_no_route() {
        assert_eq!(bridge_swizzle(1, 0), None);
        assert_eq!(root_bus_gsi(3, 0), None);
        assert_eq!(root_bus_gsi(3, 5), None);
        assert_eq!(gsi_for_path(&[3], 0), None);
        assert_eq!(gsi_for_path(&[], INTA), None);
    }

    #[test]
    fn root_bus_spreads_slots_and_pins_over_gsis_16_to_23() {
        assert_eq!(root_bus_gsi(0, INTA), Some(16));
        assert_eq!(root_bus_gsi(1, INTA), Some(17));
        assert_eq!(root_bus_gsi(1, INTB), Some(18));
        assert_eq!(root_bus_gsi(7, INTA), Some(23));
        assert_eq!(root_bus_gsi(7, INTB), Some(16));
        assert_eq!(root_bus_gsi(31, INTD), Some(16 + (31 + 3) % 8));
        assert!(root_bus_routes().all(|(_, _, gsi)| (16..=23).contains(&gsi)));
    }

    #[test]
    fn a_root_bus_function_uses_its_own_slot() {
        assert_eq!(gsi_for_path(&[4], INTA), Some(20));
        assert_eq!(gsi_for_path(&[4], INTC), Some(22));
    }

    #[test]
    fn device_0_behind_a_root_port_uses_the_ports_slot_and_pin() {
        // 00:03.0 root port, function at 01:00.0.
        assert_eq!(gsi_for_path(&[3, 0], INTA), root_bus_gsi(3, INTA));
        assert_eq!(gsi_for_path(&[3, 0], INTB), root_bus_gsi(3, INTB));
    }

    #[test]
    fn switch_downstream_ports_rotate_the_pin() {
        // Root port 00:02.0, upstream port 01:00.0, downstream port i at 02:i.0, function at
        // 03:00.0 (or 04:00.0, ...): only the downstream port's device number rotates.
        for port in 0..4u8 {
            let pin = bridge_swizzle(port, INTA).unwrap();
            assert_eq!(gsi_for_path(&[2, 0, port, 0], INTA), root_bus_gsi(2, pin));
        }
        assert_eq!(gsi_for_path(&[2, 0, 1, 0], INTA), Some(19)); // 16 + (2 + INTB)
        assert_eq!(gsi_for_path(&[2, 0, 3, 0], INTB), Some(16 + 2));
    }

    #[test]
    fn swizzle_applies_at_every_level_bottom_up() {
        // Device 2 on bus below a bridge at device 1 below root port 00:05.0:
        // INTA -> (2 + 0) % 4 = INTC at the inner bridge -> (1 + 2) % 4 = INTD at the port.
        assert_eq!(gsi_for_path(&[5, 1, 2], INTA), root_bus_gsi(5, INTD));
    }

    #[test]
    fn prt_lists_four_pins_for_every_device() {
        let routes: Vec<_> = root_bus_routes().collect();
        assert_eq!(routes.len(), 32 * 4);
        assert_eq!(routes[0], (0, 0, 16));
        assert_eq!(routes[5], (1, 1, 18));
        assert_eq!(routes[127], (31, 3, 16 + (31 + 3) % 8));
    }
}
