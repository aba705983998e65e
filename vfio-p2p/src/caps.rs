//! Parsing of VFIO "info capability chains" out of plain bytes.
//!
//! `VFIO_DEVICE_GET_REGION_INFO` and `VFIO_IOMMU_GET_INFO` append a linked list of capabilities
//! to their fixed struct: each starts with `vfio_info_cap_header { id: u16, version: u16,
//! next: u32 }`, `next` being an offset from the start of the whole buffer (0 ends the list).
//! vfio-ioctls walks that list with raw pointer casts; we copy the kernel's answer into a byte
//! buffer and walk it with bounds-checked reads instead, so this module needs no `unsafe` and
//! can be tested with hand-built buffers.

/// The capability header's size (`struct vfio_info_cap_header`).
const HEADER_LEN: usize = 8;

/// A malformed capability chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapError {
    #[error("capability at offset {offset:#x} lies outside the {len}-byte info buffer")]
    OutOfBounds { offset: usize, len: usize },
    #[error("capability chain loops back to offset {offset:#x}")]
    Loop { offset: usize },
    #[error("capability {id} is shorter than its declared contents")]
    Truncated { id: u16 },
}

/// One capability: its id and version, and every byte after its header up to the end of the
/// buffer (a capability's length is not recorded; its parser knows how much it needs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap<'a> {
    pub id: u16,
    pub version: u16,
    pub body: &'a [u8],
}

pub(crate) fn read_u32(buf: &[u8], at: usize) -> Option<u32> {
    let bytes = buf.get(at..at.checked_add(4)?)?;
    Some(u32::from_ne_bytes(bytes.try_into().ok()?))
}

pub(crate) fn read_u64(buf: &[u8], at: usize) -> Option<u64> {
    let bytes = buf.get(at..at.checked_add(8)?)?;
    Some(u64::from_ne_bytes(bytes.try_into().ok()?))
}

fn read_u16(buf: &[u8], at: usize) -> Option<u16> {
    let bytes = buf.get(at..at.checked_add(2)?)?;
    Some(u16::from_ne_bytes(bytes.try_into().ok()?))
}

/// Walks the chain starting at `first`. Offsets below `fixed_len` (inside the fixed struct) end
/// the chain, as the kernel uses 0 for "none".
pub fn cap_chain(buf: &[u8], first: u32, fixed_len: usize) -> Result<Vec<Cap<'_>>, CapError> {
    let mut caps = Vec::new();
    let mut seen = Vec::new();
    let mut offset = first as usize;
    while offset >= fixed_len && offset != 0 {
        if seen.contains(&offset) {
            return Err(CapError::Loop { offset });
        }
        seen.push(offset);
        let out_of_bounds = CapError::OutOfBounds {
            offset,
            len: buf.len(),
        };
        let (id, version, next) = match (
            read_u16(buf, offset),
            read_u16(buf, offset + 2),
            read_u32(buf, offset + 4),
        ) {
            (Some(id), Some(version), Some(next)) => (id, version, next),
            _ => return Err(out_of_bounds),
        };
        caps.push(Cap {
            id,
            version,
            body: &buf[offset + HEADER_LEN..],
        });
        offset = next as usize;
    }
    Ok(caps)
}

/// Reads the common "count, reserved, then `count` pairs of u64" layout shared by
/// `vfio_region_info_cap_sparse_mmap` (offset, size) and `vfio_iommu_type1_info_cap_iova_range`
/// (start, inclusive end).
pub fn u64_pairs(cap: &Cap<'_>) -> Result<Vec<(u64, u64)>, CapError> {
    let truncated = CapError::Truncated { id: cap.id };
    let count = read_u32(cap.body, 0).ok_or(truncated.clone())? as usize;
    (0..count)
        .map(|i| {
            let at = 8 + i * 16;
            match (read_u64(cap.body, at), read_u64(cap.body, at + 8)) {
                (Some(a), Some(b)) => Ok((a, b)),
                _ => Err(truncated.clone()),
            }
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod test_support {
    /// Builds a capability chain buffer: `fixed_len` zero bytes, then each `(id, payload)` with
    /// its header, linked in order. Returns the buffer and the first capability's offset.
    pub fn chain(fixed_len: usize, caps: &[(u16, Vec<u8>)]) -> (Vec<u8>, u32) {
        let mut buf = vec![0u8; fixed_len];
        let mut prev_next_at: Option<usize> = None;
        let mut first = 0;
        for (id, payload) in caps {
            let at = buf.len();
            match prev_next_at {
                Some(p) => buf[p..p + 4].copy_from_slice(&(at as u32).to_ne_bytes()),
                None => first = at as u32,
            }
            buf.extend_from_slice(&id.to_ne_bytes());
            buf.extend_from_slice(&1u16.to_ne_bytes());
            prev_next_at = Some(buf.len());
            buf.extend_from_slice(&0u32.to_ne_bytes());
            buf.extend_from_slice(payload);
        }
        (buf, first)
    }

    /// The payload of a sparse-mmap or IOVA-range capability.
    pub fn pairs(pairs: &[(u64, u64)]) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&(pairs.len() as u32).to_ne_bytes());
        p.extend_from_slice(&0u32.to_ne_bytes());
        for (a, b) in pairs {
            p.extend_from_slice(&a.to_ne_bytes());
            p.extend_from_slice(&b.to_ne_bytes());
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::{chain, pairs};
    use super::*;

    #[test]
    fn walks_every_capability_in_order() {
        let (buf, first) = chain(
            32,
            &[(3, vec![]), (1, pairs(&[(0, 0x1000), (0x3000, 0x1000)]))],
        );

        let caps = cap_chain(&buf, first, 32).unwrap();

        assert_eq!(caps.iter().map(|c| c.id).collect::<Vec<_>>(), vec![3, 1]);
        assert_eq!(
            u64_pairs(&caps[1]).unwrap(),
            vec![(0, 0x1000), (0x3000, 0x1000)]
        );
    }

    #[test]
    fn no_capabilities_when_first_offset_is_zero() {
        assert!(cap_chain(&[0u8; 32], 0, 32).unwrap().is_empty());
    }

    #[test]
    fn rejects_offsets_past_the_buffer() {
        let err = cap_chain(&[0u8; 40], 36, 32).unwrap_err();

        assert_eq!(
            err,
            CapError::OutOfBounds {
                offset: 36,
                len: 40
            }
        );
    }

    #[test]
    fn rejects_a_chain_that_loops() {
        let (mut buf, first) = chain(16, &[(1, vec![])]);
        // Point the only capability's `next` back at itself.
        buf[first as usize + 4..first as usize + 8].copy_from_slice(&first.to_ne_bytes());

        assert_eq!(
            cap_chain(&buf, first, 16).unwrap_err(),
            CapError::Loop { offset: 16 }
        );
    }

    #[test]
    fn rejects_pairs_that_run_past_the_buffer() {
        let mut payload = pairs(&[(1, 2)]);
        payload[..4].copy_from_slice(&2u32.to_ne_bytes()); // claims two pairs, carries one
        let (buf, first) = chain(16, &[(1, payload)]);
        let caps = cap_chain(&buf, first, 16).unwrap();

        assert_eq!(
            u64_pairs(&caps[0]).unwrap_err(),
            CapError::Truncated { id: 1 }
        );
    }
}
