//! The P2P table as the user sees it: one row per (device, BAR area) with its group, guest
//! range, mechanism and state, for the log, the demo and (later) the API.

use std::fmt;

use serde::Serialize;

use crate::bdf::Bdf;
use crate::iommu::BackendKind;
use crate::p2p::{BarPlacement, Failure, P2pTable};

/// Why an area whose BAR decodes where a bridge above it does not forward is not mapped.
pub(crate) const NOT_FORWARDED: &str = "outside its bridge's windows";

/// How peers reach the area.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum P2pMechanism {
    /// A VFIO dmabuf mapped with `IOMMU_IOAS_MAP_FILE` (iommufd).
    Dmabuf,
    /// An mmap of the BAR mapped by address (type1 container).
    Legacy,
}

/// Whether peers reach the area now, and if not, why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "state", content = "why")]
pub enum P2pAreaState {
    Mapped,
    Unplaced,
    DecodeOff,
    /// VFIO revoked the area: its device is out of D0 (D3hot), or a map failed with ENODEV
    /// (device reset or not decoding).
    Revoked,
    Failed(String),
}

impl fmt::Display for P2pAreaState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            P2pAreaState::Mapped => f.write_str("mapped"),
            P2pAreaState::Unplaced => f.write_str("unplaced"),
            P2pAreaState::DecodeOff => f.write_str("decode off"),
            P2pAreaState::Revoked => f.write_str("revoked"),
            P2pAreaState::Failed(why) => write!(f, "failed: {why}"),
        }
    }
}

/// One (device, BAR area) of a P2P domain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct P2pRow {
    /// The P2P group (domain) name.
    pub domain: String,
    pub device_id: String,
    pub host_bdf: Bdf,
    pub bar: u32,
    pub area_offset: u64,
    pub size: u64,
    /// `[start, end]` the area occupies in the guest, when the BAR is placed.
    pub guest: Option<(u64, u64)>,
    pub mechanism: P2pMechanism,
    pub state: P2pAreaState,
}

impl P2pTable {
    /// Every area of the table, in key order.
    pub fn rows(&self) -> Vec<P2pRow> {
        let mechanism = match self.mechanism() {
            BackendKind::Iommufd => P2pMechanism::Dmabuf,
            BackendKind::Type1 => P2pMechanism::Legacy,
        };
        let inner = self.lock();
        inner
            .entries
            .iter()
            // Every entry has its device (`insert` checks); `?` rather than a panic all the same.
            .filter_map(|(key, e)| {
                let device = inner.devices.get(&key.bar.device)?;
                let guest = match e.placement {
                    BarPlacement::Placed(base) | BarPlacement::Unforwarded(base) => base
                        .checked_add(key.area_offset)
                        .map(|start| (start, start.saturating_add(e.size - 1))),
                    _ => None,
                };
                let state = match (&e.failure, e.mapped_at, e.placement) {
                    (_, Some(_), _) => P2pAreaState::Mapped,
                    // VFIO revoked it with the device's move out of D0.
                    (_, None, BarPlacement::Placed(_))
                        if device.low_power && e.backing.is_some() =>
                    {
                        P2pAreaState::Revoked
                    }
                    (Some((_, Failure::Revoked)), _, _) => P2pAreaState::Revoked,
                    (Some((_, f)), _, BarPlacement::Placed(_)) => {
                        P2pAreaState::Failed(f.to_string())
                    }
                    // No backing: failed whatever the placement.
                    (Some((_, f)), _, _) if e.backing.is_none() => {
                        P2pAreaState::Failed(f.to_string())
                    }
                    (_, None, BarPlacement::Unforwarded(_)) => {
                        P2pAreaState::Failed(NOT_FORWARDED.to_string())
                    }
                    (_, None, BarPlacement::DecodeOff) => P2pAreaState::DecodeOff,
                    (_, None, _) => P2pAreaState::Unplaced,
                };
                Some(P2pRow {
                    domain: self.domain.clone(),
                    device_id: device.id.clone(),
                    host_bdf: device.bdf,
                    bar: key.bar.region,
                    area_offset: key.area_offset,
                    size: e.size,
                    guest,
                    mechanism,
                    state,
                })
            })
            .collect()
    }
}
