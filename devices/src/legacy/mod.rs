//! The PC devices every x86 guest expects at fixed ports.

mod acpi_pm;
mod exit;
mod i8042;
mod serial;

pub use acpi_pm::{AcpiPm, ACPI_PM_PORT, ACPI_PM_PORT_LEN, ACPI_RESET_VALUE, ACPI_S5_TYPE};
pub use exit::{ExitSignal, GuestExit};
pub use i8042::I8042;
pub use serial::{EventFdTrigger, Serial};
