use std::os::fd::{AsRawFd, RawFd};
use std::sync::Mutex;

use super::*;
use crate::interrupt::MsiVector;
use crate::pci::MsiMessage;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HostEvent {
    Enable(RawFd),
    Resample(RawFd),
    Disable,
    StatusRead,
}

/// A host function that records the VFIO calls and refuses to enable while `refuse` is set.
#[derive(Default)]
struct FakeHost {
    events: Mutex<Vec<HostEvent>>,
    status: Mutex<u16>,
    refuse: Mutex<bool>,
}

impl FakeHost {
    fn events(&self) -> Vec<HostEvent> {
        std::mem::take(&mut *self.events.lock().unwrap())
    }

    fn record(&self, event: HostEvent) {
        self.events.lock().unwrap().push(event);
    }
}

impl IntxHost for FakeHost {
    fn label(&self) -> String {
        "fake".into()
    }

    fn intx_enable(&self, trigger: &EventFd) -> Result<(), DeviceError> {
        if *self.refuse.lock().unwrap() {
            return Err(DeviceError::NoSuchIrq {
                bdf: "0000:00:03.0".parse().unwrap(),
                index: 0,
            });
        }
        self.record(HostEvent::Enable(trigger.as_raw_fd()));
        Ok(())
    }

    fn intx_resample(&self, resample: &EventFd) -> Result<(), DeviceError> {
        self.record(HostEvent::Resample(resample.as_raw_fd()));
        Ok(())
    }

    fn intx_disable(&self) -> Result<(), DeviceError> {
        self.record(HostEvent::Disable);
        Ok(())
    }

    fn status(&self) -> Result<u16, DeviceError> {
        self.record(HostEvent::StatusRead);
        Ok(*self.status.lock().unwrap())
    }
}

/// Hands out INTx lines and remembers their fds; panics on a disconnect of an unknown line.
#[derive(Default)]
struct FakeController {
    /// Connected lines: (GSI, trigger fd, resample fd).
    lines: Mutex<Vec<(u32, RawFd, RawFd)>>,
}

impl InterruptController for FakeController {
    fn allocate_msi(&self) -> Result<MsiVector, InterruptError> {
        panic!("the INTx tests must not touch MSI vectors")
    }

    fn route_msi(&self, _: &MsiVector, _: Option<MsiMessage>) -> Result<(), InterruptError> {
        panic!("the INTx tests must not touch MSI vectors")
    }

    fn free_msi(&self, _: MsiVector) {
        panic!("the INTx tests must not touch MSI vectors")
    }

    fn connect_intx(&self, gsi: u32) -> Result<IntxLine, InterruptError> {
        let line = IntxLine {
            gsi,
            trigger: EventFd::new(0).unwrap(),
            resample: EventFd::new(0).unwrap(),
        };
        let fds = (gsi, line.trigger.as_raw_fd(), line.resample.as_raw_fd());
        self.lines.lock().unwrap().push(fds);
        Ok(line)
    }

    fn disconnect_intx(&self, line: IntxLine) {
        let mut lines = self.lines.lock().unwrap();
        let at = lines
            .iter()
            .position(|l| {
                *l == (
                    line.gsi,
                    line.trigger.as_raw_fd(),
                    line.resample.as_raw_fd(),
                )
            })
            .expect("disconnecting a line that is not connected");
        lines.remove(at);
    }
}

struct Setup {
    host: Arc<FakeHost>,
    controller: Arc<FakeController>,
    intx: VfioIntx,
}

fn setup() -> Setup {
    let host = Arc::new(FakeHost::default());
    let controller = Arc::new(FakeController::default());
    let intx = VfioIntx::new(host.clone(), controller.clone());
    Setup {
        host,
        controller,
        intx,
    }
}

impl Setup {
    fn line(&self) -> (u32, RawFd, RawFd) {
        self.controller.lines.lock().unwrap()[0]
    }
}

#[test]
fn connecting_enables_the_line_then_its_unmask_on_eoi() {
    let mut s = setup();

    s.intx.connect(18).unwrap();

    let (gsi, trigger, resample) = s.line();
    assert_eq!(gsi, 18);
    assert_eq!(s.intx.gsi(), Some(18));
    assert_eq!(
        s.host.events(),
        [HostEvent::Enable(trigger), HostEvent::Resample(resample)]
    );
}

#[test]
fn nothing_reaches_vfio_before_the_line_is_connected() {
    let mut s = setup();

    s.intx.set_wanted(false);
    s.intx.set_wanted(true);

    assert!(s.host.events().is_empty());
    assert_eq!(s.intx.gsi(), None);
}

#[test]
fn msi_takes_over_and_gives_back() {
    let mut s = setup();
    s.intx.connect(20).unwrap();
    let (_, trigger, resample) = s.line();
    s.host.events();

    s.intx.set_wanted(false);
    let off = s.host.events();
    s.intx.set_wanted(true);
    let on = s.host.events();

    assert_eq!(off, [HostEvent::Disable]);
    // The unmask eventfd goes with INTx in VFIO, so it is set again.
    assert_eq!(
        on,
        [HostEvent::Enable(trigger), HostEvent::Resample(resample)]
    );
}

#[test]
fn a_line_connected_while_msi_is_on_waits_for_msi_to_go_off() {
    let mut s = setup();
    s.intx.set_wanted(false);

    s.intx.connect(21).unwrap();
    let while_msi = s.host.events();
    s.intx.set_wanted(true);

    assert!(while_msi.is_empty());
    assert_eq!(s.host.events().len(), 2);
}

#[test]
fn repeated_reports_do_not_touch_vfio() {
    let mut s = setup();
    s.intx.connect(17).unwrap();
    s.host.events();

    s.intx.set_wanted(true);
    s.intx.set_wanted(true);

    assert!(s.host.events().is_empty());
}

#[test]
fn a_refused_enable_is_retried_at_the_next_transition_only() {
    let mut s = setup();
    *s.host.refuse.lock().unwrap() = true;
    s.intx.connect(17).unwrap();
    s.intx.set_wanted(true);
    *s.host.refuse.lock().unwrap() = false;
    assert!(s.host.events().is_empty(), "no resample without INTx");

    s.intx.set_wanted(false);
    let off = s.host.events();
    s.intx.set_wanted(true);

    assert!(off.is_empty(), "nothing to disable");
    assert_eq!(s.host.events().len(), 2);
}

#[test]
fn dropping_disables_and_disconnects() {
    let s = setup();
    let Setup {
        host,
        controller,
        mut intx,
    } = s;
    intx.connect(19).unwrap();
    host.events();

    drop(intx);

    assert_eq!(host.events(), [HostEvent::Disable]);
    assert!(controller.lines.lock().unwrap().is_empty());
}

#[test]
fn reconnecting_replaces_the_line() {
    let mut s = setup();
    s.intx.connect(19).unwrap();
    s.host.events();

    s.intx.connect(22).unwrap();

    let (gsi, trigger, resample) = s.line();
    assert_eq!(s.controller.lines.lock().unwrap().len(), 1);
    assert_eq!(gsi, 22);
    assert_eq!(
        s.host.events(),
        [
            HostEvent::Disable,
            HostEvent::Enable(trigger),
            HostEvent::Resample(resample)
        ]
    );
}

#[test]
fn status_reads_show_the_hosts_interrupt_status() {
    let s = setup();
    *s.host.status.lock().unwrap() = 0x0018; // capability list + interrupt status
    let mut dword = [0x06, 0x04, 0x10, 0x00]; // command 0x0406, status: capability list only
    let mut byte = [0x00];

    s.intx.merge_status(0x04, &mut dword);
    s.intx.merge_status(0x06, &mut byte);

    assert_eq!(dword, [0x06, 0x04, 0x18, 0x00]);
    assert_eq!(byte, [0x08]);
}

#[test]
fn a_cleared_host_bit_clears_the_guests() {
    let s = setup();
    let mut word = [0x18, 0x00];

    s.intx.merge_status(0x06, &mut word);

    assert_eq!(word, [0x10, 0x00]);
}

#[test]
fn reads_elsewhere_do_not_touch_the_host() {
    let s = setup();
    let mut command = [0u8; 2];
    let mut high = [0u8; 1];

    s.intx.merge_status(0x04, &mut command);
    s.intx.merge_status(0x07, &mut high);

    assert!(s.host.events().is_empty());
}
