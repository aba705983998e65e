//! The P2P table as the user sees it: one row per (device, BAR area) with its group, guest
//! range, mechanism and state, for the log, the demo and (later) the API.

use std::fmt::{self, Write as _};

use serde::Serialize;

use crate::bdf::Bdf;
use crate::iommu::BackendKind;
use crate::p2p::{BarPlacement, Failure, P2pTable};

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
    /// The map failed with ENODEV: VFIO revoked the dmabuf (device reset or not decoding).
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
                    BarPlacement::Placed(base) => base
                        .checked_add(key.area_offset)
                        .map(|start| (start, start.saturating_add(e.size - 1))),
                    _ => None,
                };
                let state = match (&e.failure, e.mapped_at, e.placement) {
                    (_, Some(_), _) => P2pAreaState::Mapped,
                    (Some((_, Failure::Revoked)), _, _) => P2pAreaState::Revoked,
                    (Some((_, f)), _, BarPlacement::Placed(_)) => {
                        P2pAreaState::Failed(f.to_string())
                    }
                    // No backing: failed whatever the placement.
                    (Some((_, f)), _, _) if e.backing.is_none() => {
                        P2pAreaState::Failed(f.to_string())
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

/// `64M`, `16G`, `4K`: sizes as people write them.
fn human_size(size: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1 << 40, "T"),
        (1 << 30, "G"),
        (1 << 20, "M"),
        (1 << 10, "K"),
    ];
    UNITS
        .iter()
        .find(|(unit, _)| size >= *unit && size.is_multiple_of(*unit))
        .map_or(size.to_string(), |(unit, name)| {
            format!("{}{name}", size / unit)
        })
}

/// The rows as an aligned text table with a header line.
pub fn format_p2p_table(rows: &[P2pRow]) -> String {
    let header = [
        "GROUP", "DEVICE", "HOST", "BAR", "SIZE", "GUEST", "MECH", "STATE",
    ];
    let cells: Vec<[String; 8]> = rows
        .iter()
        .map(|r| {
            let bar = match r.area_offset {
                0 => r.bar.to_string(),
                off => format!("{}+{off:#x}", r.bar),
            };
            [
                r.domain.clone(),
                r.device_id.clone(),
                r.host_bdf.to_string(),
                bar,
                human_size(r.size),
                r.guest
                    .map_or("-".into(), |(s, e)| format!("{s:#x}-{e:#x}")),
                match r.mechanism {
                    P2pMechanism::Dmabuf => "dmabuf".into(),
                    P2pMechanism::Legacy => "legacy".into(),
                },
                r.state.to_string(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &cells {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut text = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                let _ = write!(text, "{cell:<w$}  ");
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&header);
    for row in &cells {
        line(&row.each_ref().map(String::as_str));
    }
    if rows.is_empty() {
        line(&["(no P2P areas)"]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(state: P2pAreaState, guest: Option<(u64, u64)>) -> P2pRow {
        P2pRow {
            domain: "g0".into(),
            device_id: "shm".into(),
            host_bdf: "0000:00:02.0".parse().unwrap(),
            bar: 2,
            area_offset: 0,
            size: 64 << 20,
            guest,
            mechanism: P2pMechanism::Dmabuf,
            state,
        }
    }

    #[test]
    fn the_table_has_a_header_and_one_aligned_line_per_area() {
        let text = format_p2p_table(&[
            row(P2pAreaState::Mapped, Some((0xc000_0000, 0xc3ff_ffff))),
            row(P2pAreaState::Failed("dmabuf export disabled".into()), None),
        ]);
        let lines: Vec<&str> = text.lines().collect();

        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("GROUP  DEVICE  HOST"), "{text}");
        assert!(
            lines[1].contains("0xc0000000-0xc3ffffff  dmabuf  mapped"),
            "{text}"
        );
        assert!(
            lines[2].ends_with("failed: dmabuf export disabled"),
            "{text}"
        );
        assert!(lines[1].contains(" 64M "), "{text}");
        assert_eq!(lines[1].find("0000:00:02.0"), lines[0].find("HOST"));
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human_size(16 << 30), "16G");
        assert_eq!(human_size(4096), "4K");
        assert_eq!(human_size(4097), "4097");
    }
}
