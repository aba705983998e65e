//! Hardware-reduced ACPI power management: the sleep control, sleep status and reset registers
//! that the FADT points at. Writing S5 to sleep control powers the guest off; writing the reset
//! value to the reset register resets it.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::legacy::{ExitSignal, GuestExit};

/// First port of the block: sleep control at +0, sleep status at +1, reset at +2.
pub const ACPI_PM_PORT: u64 = 0x600;
pub const ACPI_PM_PORT_LEN: u64 = 3;
/// The SLP_TYP value the DSDT's `_S5_` object announces.
pub const ACPI_S5_TYPE: u8 = 5;
/// The value the FADT tells the guest to write to the reset register.
pub const ACPI_RESET_VALUE: u8 = 1;

const SLEEP_CONTROL: u64 = 0;
const RESET: u64 = 2;
const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;

pub struct AcpiPm {
    exit: Arc<ExitSignal>,
}

impl AcpiPm {
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self { exit }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status never reports a wake: the guest does not come back from S5.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            SLEEP_CONTROL if value & SLP_EN != 0 => {
                let sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
                if sleep_type == ACPI_S5_TYPE {
                    log::info!("guest entered ACPI S5: powering off");
                    self.exit.request(GuestExit::Poweroff);
                } else {
                    log::warn!("guest asked for unsupported sleep state {sleep_type}");
                }
            }
            RESET if value == ACPI_RESET_VALUE => {
                log::info!("guest wrote the ACPI reset register");
                self.exit.request(GuestExit::Reset);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_powers_off_and_reset_resets() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut pm = AcpiPm::new(exit.clone());
        pm.write(SLEEP_CONTROL, &[(3 << SLP_TYP_SHIFT) | SLP_EN]);
        assert_eq!(exit.reason(), None, "S3 is not a power-off");
        pm.write(SLEEP_CONTROL, &[(ACPI_S5_TYPE << SLP_TYP_SHIFT) | SLP_EN]);
        assert_eq!(exit.reason(), Some(GuestExit::Poweroff));

        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut pm = AcpiPm::new(exit.clone());
        pm.write(RESET, &[ACPI_RESET_VALUE]);
        assert_eq!(exit.reason(), Some(GuestExit::Reset));
    }
}
