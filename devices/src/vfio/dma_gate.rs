//! Bus mastering held back until guest RAM is in the IOMMU.
//!
//! The VMM maps guest RAM into the host IOMMU while the vCPUs already run: a guest enables bus
//! mastering on a device seconds into its boot, and until it does the device cannot DMA. The
//! guest's write that sets a passthrough function's Bus Master Enable waits here until the
//! mapping is complete, so the earliest DMA the guest can start lands in mapped RAM. If the
//! mapping failed, bus mastering stays off (and the VMM stops the VM).

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Where the guest RAM mapping stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DmaGateState {
    Mapping,
    Mapped,
    /// The mapping failed, for this reason.
    Failed(String),
}

/// Shared between the thread mapping guest RAM and every passthrough device model.
#[derive(Debug)]
pub struct DmaGate {
    state: Mutex<DmaGateState>,
    changed: Condvar,
}

impl DmaGate {
    /// A gate for a mapping still to be done.
    pub fn mapping() -> Self {
        Self::with(DmaGateState::Mapping)
    }

    /// A gate for RAM that is already mapped: bus mastering is never held.
    pub fn mapped() -> Self {
        Self::with(DmaGateState::Mapped)
    }

    fn with(state: DmaGateState) -> Self {
        Self {
            state: Mutex::new(state),
            changed: Condvar::new(),
        }
    }

    /// The mapping is complete: releases every waiting device.
    pub fn open(&self) {
        self.set(DmaGateState::Mapped);
    }

    /// The mapping failed: waiting devices give up their bus mastering.
    pub fn fail(&self, why: String) {
        self.set(DmaGateState::Failed(why));
    }

    fn set(&self, state: DmaGateState) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = state;
        self.changed.notify_all();
    }

    pub fn state(&self) -> DmaGateState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Blocks while the mapping runs; returns how long it waited, or why the mapping failed.
    pub fn wait(&self) -> Result<Duration, String> {
        let started = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while *state == DmaGateState::Mapping {
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        match &*state {
            DmaGateState::Failed(why) => Err(why.clone()),
            _ => Ok(started.elapsed()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn a_waiter_is_released_when_the_mapping_completes_and_not_before() {
        let gate = Arc::new(DmaGate::mapping());
        let waiter = {
            let gate = gate.clone();
            std::thread::spawn(move || gate.wait())
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished(), "released while still mapping");
        gate.open();
        let waited = waiter.join().unwrap().unwrap();
        assert!(waited >= Duration::from_millis(50), "{waited:?}");
        assert_eq!(gate.state(), DmaGateState::Mapped);
        assert!(gate.wait().unwrap() < Duration::from_millis(50));
    }

    #[test]
    fn a_failed_mapping_tells_every_waiter_why() {
        let gate = Arc::new(DmaGate::mapping());
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let gate = gate.clone();
                std::thread::spawn(move || gate.wait())
            })
            .collect();
        gate.fail("ENOMEM".into());
        for w in waiters {
            assert_eq!(w.join().unwrap(), Err("ENOMEM".into()));
        }
        assert_eq!(DmaGate::mapped().wait().map(|_| ()), Ok(()));
    }
}
