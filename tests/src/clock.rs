//! The wall-clock stamp the lab's static programs print (api-probe, qmp-probe, uevent-stamp), so
//! resources/bench-hotplug.sh reads one format from all of them.

use std::time::{SystemTime, UNIX_EPOCH};

/// CLOCK_REALTIME now, in seconds with microseconds: `1796186129.804907`.
pub fn realtime_stamp() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}.{:06}", now.as_secs(), now.subsec_micros())
}
