//! `GET vm.p2p`: the VM's P2P table as data, one row per (device, BAR area), and the text form
//! `p2pvmm remote p2p` prints. The rows carry plain strings for mechanism and state so the API
//! does not depend on the VMM's internal enums; the VMM fills them from its own table.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One mappable area of a P2P group member's BAR.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct P2pTableRow {
    pub group: String,
    pub device: String,
    /// The host function, `0000:00:03.0`.
    pub host_bdf: String,
    pub bar: u8,
    /// Offset of the area inside the BAR (0 unless the BAR has several mappable areas).
    pub area_offset: u64,
    pub size: u64,
    /// Guest physical address of the area, when the guest has placed the BAR.
    #[serde(default)]
    pub guest_start: Option<u64>,
    /// `dmabuf` or `legacy`.
    pub mechanism: String,
    /// `mapped`, `unplaced`, `decode off`, `revoked` or `failed: <why>`.
    pub state: String,
}

/// `GET vm.p2p`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct P2pTable {
    pub rows: Vec<P2pTableRow>,
}

/// `size` in the largest binary unit that divides it (`64M`), else in bytes.
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
        .map_or_else(
            || size.to_string(),
            |(unit, name)| format!("{}{name}", size / unit),
        )
}

/// The table as aligned text: a header line, then one line per row; `(no P2P areas)` when empty.
pub fn format_table(table: &P2pTable) -> String {
    const HEADER: [&str; 8] = [
        "GROUP", "DEVICE", "HOST", "BAR", "SIZE", "GUEST", "MECH", "STATE",
    ];
    let cells: Vec<[String; 8]> = table
        .rows
        .iter()
        .map(|row| {
            let bar = match row.area_offset {
                0 => row.bar.to_string(),
                offset => format!("{}+{offset:#x}", row.bar),
            };
            let guest = row.guest_start.map_or_else(
                || "-".to_string(),
                |start| {
                    let end = start.saturating_add(row.size.saturating_sub(1));
                    format!("{start:#x}-{end:#x}")
                },
            );
            [
                row.group.clone(),
                row.device.clone(),
                row.host_bdf.clone(),
                bar,
                human_size(row.size),
                guest,
                row.mechanism.clone(),
                row.state.clone(),
            ]
        })
        .collect();
    let mut widths = HEADER.map(str::len);
    for line in &cells {
        for (width, cell) in widths.iter_mut().zip(line) {
            *width = (*width).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut push_line = |line: [&str; 8]| {
        let mut text = String::new();
        for (cell, width) in line.iter().zip(widths) {
            let _ = write!(text, "{cell:<width$}  ");
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    push_line(HEADER);
    for line in &cells {
        push_line(line.each_ref().map(String::as_str));
    }
    if table.rows.is_empty() {
        out.push_str("(no P2P areas)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(device: &str, guest_start: Option<u64>, state: &str) -> P2pTableRow {
        P2pTableRow {
            group: "g0".into(),
            device: device.into(),
            host_bdf: "0000:00:04.0".into(),
            bar: 2,
            area_offset: 0,
            size: 64 << 20,
            guest_start,
            mechanism: "dmabuf".into(),
            state: state.into(),
        }
    }

    #[test]
    fn table_aligns_columns_and_shows_guest_range() {
        let mut second = row("gpu-long-name", None, "unplaced");
        second.area_offset = 0x1000;
        second.size = 4096;
        let table = P2pTable {
            rows: vec![row("shm", Some(0xe000_0000), "mapped"), second],
        };

        let text = format_table(&table);

        let expected = "\
GROUP  DEVICE         HOST          BAR       SIZE  GUEST                  MECH    STATE
g0     shm            0000:00:04.0  2         64M   0xe0000000-0xe3ffffff  dmabuf  mapped
g0     gpu-long-name  0000:00:04.0  2+0x1000  4K    -                      dmabuf  unplaced
";
        assert_eq!(text, expected);
    }

    #[test]
    fn empty_table_says_so() {
        let text = format_table(&P2pTable::default());

        assert_eq!(
            text,
            "GROUP  DEVICE  HOST  BAR  SIZE  GUEST  MECH  STATE\n(no P2P areas)\n"
        );
    }

    #[test]
    fn sizes_use_the_largest_dividing_unit() {
        assert_eq!(human_size(1 << 30), "1G");
        assert_eq!(human_size(3 << 20), "3M");
        assert_eq!(human_size(4097), "4097");
        assert_eq!(human_size(0), "0");
    }
}
