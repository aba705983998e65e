//! Where p2pvmm's start goes: each phase's wall time, logged at `-v` as
//! `start phase NAME: N ms`, so `resources/bench-boot.sh` can take medians and a slow start
//! names its phase.
//!
//! Times count from the process start (the first call in `main`), so the config phase covers
//! argument and file parsing and the host probe.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

static PROCESS_START: OnceLock<Instant> = OnceLock::new();

/// Marks the process start; later calls do nothing.
pub fn mark_process_start() {
    PROCESS_START.get_or_init(Instant::now);
}

/// Time since the process start (since the first call here when `main` did not mark it).
pub fn since_start() -> Duration {
    PROCESS_START.get_or_init(Instant::now).elapsed()
}

/// The phases of one VM build, timed back to back.
pub struct StartPhases {
    last: Duration,
}

impl StartPhases {
    /// Starts timing; everything since the process start counts as the `config` phase.
    pub fn begin() -> Self {
        let mut phases = Self {
            last: Duration::ZERO,
        };
        phases.end("config");
        phases
    }

    /// Ends phase `name`: logs the time since the previous phase ended.
    pub fn end(&mut self, name: &str) {
        let now = since_start();
        log::info!("start phase {name}: {} ms", millis(now - self.last));
        self.last = now;
    }
}

/// Logs the first guest entry of the boot vCPU (once per process).
pub fn first_guest_entry() {
    static LOGGED: OnceLock<()> = OnceLock::new();
    LOGGED.get_or_init(|| {
        log::info!(
            "start phase first vCPU entry: {} ms since start",
            millis(since_start())
        );
    });
}

fn millis(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_consecutive_and_never_negative() {
        mark_process_start();
        let mut phases = StartPhases::begin();
        let before = phases.last;
        std::thread::sleep(Duration::from_millis(2));
        phases.end("sleep");
        assert!(phases.last >= before + Duration::from_millis(2));
        assert_eq!(millis(Duration::from_micros(1500)), "1.5");
    }
}
