//! A test knob that makes hotplug attempts fail at a chosen step, so the lab can check that a
//! failed add leaves nothing behind at each point where the add already holds something (an
//! open VFIO device in the IOMMU domain and KVM-VFIO, BAR mmaps and P2P rows, a slot).
//!
//! `P2PVMM_X_HOTPLUG_FAIL=model,plug,notify`: the first hotplug attempt fails at `model`, the
//! second at `plug`, the third at `notify`, later ones are not touched (`none` skips an attempt).
//! Not configuration: like `P2PVMM_X_NO_DMABUF`, read from the environment.

use std::collections::VecDeque;
use std::sync::Mutex;

pub const HOTPLUG_FAIL_ENV: &str = "P2PVMM_X_HOTPLUG_FAIL";

/// Where an injected failure strikes in an add.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HotplugStep {
    /// Building the device model, with the device open in its domain and in KVM-VFIO.
    Model,
    /// Plugging the model into the slot, with BARs mmapped and the device in the P2P table.
    Plug,
    /// Telling the guest, with the device in its slot.
    Notify,
}

impl HotplugStep {
    fn parse(word: &str) -> Result<Option<Self>, String> {
        match word.trim() {
            "model" => Ok(Some(Self::Model)),
            "plug" => Ok(Some(Self::Plug)),
            "notify" => Ok(Some(Self::Notify)),
            "none" | "" => Ok(None),
            other => Err(format!(
                "{HOTPLUG_FAIL_ENV}: unknown step {other:?} (use model, plug, notify or none)"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Model => "model",
            Self::Plug => "plug",
            Self::Notify => "notify",
        }
    }
}

/// The steps still to fail, one per hotplug attempt.
pub struct HotplugFaults(Mutex<VecDeque<Option<HotplugStep>>>);

impl HotplugFaults {
    /// From the environment; an unparsable value injects nothing and says why.
    pub fn from_env() -> Self {
        let steps = std::env::var(HOTPLUG_FAIL_ENV)
            .map_or_else(|_| Ok(VecDeque::new()), |value| Self::parse_list(&value));
        match steps {
            Ok(steps) => {
                if !steps.is_empty() {
                    log::warn!("{HOTPLUG_FAIL_ENV} is set: hotplug attempts fail on purpose");
                }
                Self(Mutex::new(steps))
            }
            Err(e) => {
                log::warn!("{e}; no hotplug failure injected");
                Self(Mutex::new(VecDeque::new()))
            }
        }
    }

    fn parse_list(value: &str) -> Result<VecDeque<Option<HotplugStep>>, String> {
        value.split(',').map(HotplugStep::parse).collect()
    }

    /// The step this attempt fails at, if any (each attempt takes one entry).
    pub fn next_attempt(&self) -> Option<HotplugStep> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
            .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_attempt_takes_the_next_step() {
        let faults = HotplugFaults(Mutex::new(
            HotplugFaults::parse_list("model,none,notify").unwrap(),
        ));
        assert_eq!(faults.next_attempt(), Some(HotplugStep::Model));
        assert_eq!(faults.next_attempt(), None);
        assert_eq!(faults.next_attempt(), Some(HotplugStep::Notify));
        assert_eq!(faults.next_attempt(), None);
    }

    #[test]
    fn an_unknown_step_is_named() {
        let e = HotplugFaults::parse_list("model,open").unwrap_err();
        assert!(e.contains("\"open\""), "{e}");
    }
}
