//! The 16550 console (vm-superio) on a bus, interrupting through an eventfd the VMM wires to an
//! irqfd.

use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Raises the serial IRQ by writing the eventfd KVM listens on.
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    pub fn new(event: EventFd) -> Self {
        Self(event)
    }
}

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

pub struct Serial(vm_superio::Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>);

impl Serial {
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self(vm_superio::Serial::new(EventFdTrigger::new(irq), out))
    }

    /// Feeds host input to the guest. Returns how many bytes fit in the receive FIFO.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        match self.0.enqueue_raw_bytes(input) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("serial input dropped: {e:?}");
                0
            }
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = self.0.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&value) = data.first() {
            if let Err(e) = self.0.write(offset as u8, value) {
                log::warn!("serial output failed: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmits_to_the_writer_and_receives_input() {
        let sink = Sink::default();
        let mut serial = Serial::new(EventFd::new(0).unwrap(), Box::new(sink.clone()));
        for b in b"hi" {
            serial.write(0, &[*b]);
        }
        assert_eq!(sink.0.lock().unwrap().as_slice(), b"hi");
        assert_eq!(serial.enqueue_input(b"x"), 1);
        let mut data = [0u8];
        serial.read(0, &mut data);
        assert_eq!(data, [b'x']);
    }
}
