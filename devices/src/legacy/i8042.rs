//! The i8042 keyboard controller, kept only for its reset line (command 0xFE on port 0x64).

use std::sync::Arc;

use vm_superio::{I8042Device, Trigger};

use crate::bus::BusDevice;
use crate::legacy::{ExitSignal, GuestExit};

/// Pulsing the reset line ends the guest with `GuestExit::Reset`.
struct ResetLine(Arc<ExitSignal>);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        log::info!("guest pulsed the i8042 reset line");
        self.0.request(GuestExit::Reset);
        Ok(())
    }
}

/// Sits at ports 0x60..0x65; `offset` 0 is the data port and 4 the command port.
pub struct I8042(I8042Device<ResetLine>);

impl I8042 {
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self(I8042Device::new(ResetLine(exit)))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = self.0.read(offset as u8);
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&value) = data.first() {
            let _ = self.0.write(offset as u8, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_fe_resets() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut dev = I8042::new(exit.clone());
        dev.write(4, &[0xfe]);
        assert_eq!(exit.reason(), Some(GuestExit::Reset));
    }
}
