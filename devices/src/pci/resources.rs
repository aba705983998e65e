//! Address space bookkeeping for the topology builder: which window a BAR comes from, how big a
//! bridge window must be to hold its children, and the allocators that hand out addresses.
//!
//! Window sizes are computed by packing the children in the same order the allocator later
//! places them (largest alignment first), starting at an address aligned to the largest child
//! alignment. That order leaves no gap a later, less aligned child could not use, so the
//! computed size is always enough and the allocation inside a window cannot fail.

use vm_allocator::{AddressAllocator, AllocPolicy};

use super::bar::{BarInfo, BarKind};
use crate::bus::BusRange;

/// The three kinds of bridge window, and the host windows BARs come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum WindowKind {
    /// Port I/O, 4 KiB bridge granularity.
    Io,
    /// Below 4 GiB, non-prefetchable: 32-bit BARs and 64-bit non-prefetchable BARs (a bridge's
    /// non-prefetchable window is 32-bit only).
    Mem32,
    /// The 64-bit prefetchable window: 64-bit prefetchable BARs.
    Pref64,
}

impl WindowKind {
    pub const ALL: [WindowKind; 3] = [WindowKind::Io, WindowKind::Mem32, WindowKind::Pref64];

    /// Bridge window granularity: base and limit registers hold bits above this.
    pub fn granularity(self) -> u64 {
        match self {
            WindowKind::Io => 4 << 10,
            WindowKind::Mem32 | WindowKind::Pref64 => 1 << 20,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A request for `size` bytes aligned to `align` (both powers of two for BARs; window sizes
/// are multiples of their granularity).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub size: u64,
    pub align: u64,
}

/// The VMM maps memory BARs as whole pages, so a smaller BAR still takes a page of its own.
const PAGE_SIZE: u64 = 4096;

/// The window a BAR is allocated from and what it needs there.
pub fn bar_request(bar: &BarInfo) -> (WindowKind, Request) {
    let kind = match (bar.kind, bar.prefetchable) {
        (BarKind::Io, _) => WindowKind::Io,
        (BarKind::Mem64, true) => WindowKind::Pref64,
        _ => WindowKind::Mem32,
    };
    let size = match kind {
        WindowKind::Io => bar.size,
        _ => bar.size.max(PAGE_SIZE),
    };
    (kind, Request { size, align: size })
}

/// A hotplug reserve of `size` bytes, aligned as strictly as its size allows so one device
/// using all of it has a naturally aligned place.
pub fn reserve_request(kind: WindowKind, size: u64) -> Option<Request> {
    let size = size.next_multiple_of(kind.granularity());
    (size > 0).then(|| Request {
        size,
        align: 1 << (63 - size.leading_zeros()),
    })
}

/// Placement order: largest alignment first, then largest size; stable otherwise.
pub fn sort(requests: &mut [(Request, usize)]) {
    requests.sort_by_key(|(r, _)| std::cmp::Reverse((r.align, r.size)));
}

/// The window holding `children`, or `None` if there are none.
pub fn window_request(kind: WindowKind, children: &[Request]) -> Option<Request> {
    let mut ordered: Vec<_> = children.iter().map(|r| (*r, 0)).collect();
    sort(&mut ordered);
    let align = ordered.first()?.0.align.max(kind.granularity());
    let size = ordered
        .iter()
        .fold(0u64, |end, (r, _)| end.next_multiple_of(r.align) + r.size);
    Some(Request {
        size: size.next_multiple_of(kind.granularity()),
        align,
    })
}

/// One allocator per window kind, over the host windows or over a bridge's windows.
pub struct Allocators {
    windows: [Option<AddressAllocator>; 3],
}

impl Allocators {
    /// Allocators over the given ranges, indexed like [`WindowKind::ALL`]; empty ranges get none.
    pub fn new(ranges: [Option<BusRange>; 3]) -> Self {
        Self {
            windows: ranges.map(|r| r.and_then(|r| AddressAllocator::new(r.base, r.len).ok())),
        }
    }

    /// First fit, so children sorted by [`sort`] pack as [`window_request`] assumed.
    pub fn allocate(&mut self, kind: WindowKind, request: Request) -> Option<u64> {
        let allocator = self.windows[kind.index()].as_mut()?;
        allocator
            .allocate(request.size, request.align, AllocPolicy::FirstMatch)
            .ok()
            .map(|r| r.start())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn req(size: u64, align: u64) -> Request {
        Request { size, align }
    }

    #[test]
    fn small_memory_bars_take_a_page_and_io_bars_do_not() {
        let mem = BarInfo {
            kind: BarKind::Mem32,
            prefetchable: false,
            size: 16,
            address: 0,
            sizing: [false; 2],
        };
        assert_eq!(bar_request(&mem), (WindowKind::Mem32, req(4096, 4096)));
        let io = BarInfo {
            kind: BarKind::Io,
            ..mem
        };
        assert_eq!(bar_request(&io), (WindowKind::Io, req(16, 16)));
    }

    #[test]
    fn only_64bit_prefetchable_bars_use_the_64bit_window() {
        let bar = |kind, prefetchable| BarInfo {
            kind,
            prefetchable,
            size: 1 << 30,
            address: 0,
            sizing: [false; 2],
        };
        assert_eq!(
            bar_request(&bar(BarKind::Mem64, true)).0,
            WindowKind::Pref64
        );
        assert_eq!(
            bar_request(&bar(BarKind::Mem64, false)).0,
            WindowKind::Mem32
        );
        assert_eq!(bar_request(&bar(BarKind::Mem32, true)).0, WindowKind::Mem32);
    }

    #[test]
    fn window_is_rounded_to_granularity_and_aligned_to_the_largest_child() {
        let w = window_request(WindowKind::Mem32, &[req(4096, 4096), req(2 * MIB, 2 * MIB)]);
        assert_eq!(w, Some(req(3 * MIB, 2 * MIB)));
        assert_eq!(
            window_request(WindowKind::Io, &[req(32, 32)]),
            Some(req(4096, 4096))
        );
        assert_eq!(window_request(WindowKind::Mem32, &[]), None);
    }

    #[test]
    fn window_size_accounts_for_alignment_gaps() {
        // Two child windows of 3 MiB aligned to 2 MiB: the second starts at 4 MiB.
        let w = window_request(
            WindowKind::Mem32,
            &[req(3 * MIB, 2 * MIB), req(3 * MIB, 2 * MIB)],
        );
        assert_eq!(w, Some(req(7 * MIB, 2 * MIB)));
    }

    #[test]
    fn children_fit_the_window_computed_for_them() {
        let children = [
            req(3 * MIB, 2 * MIB),
            req(MIB, MIB),
            req(3 * MIB, 2 * MIB),
            req(4096, 4096),
        ];
        let window = window_request(WindowKind::Mem32, &children).unwrap();
        let base = 0xc000_0000 + window.align;
        let mut alloc = Allocators::new([None, Some(BusRange::new(base, window.size)), None]);
        let mut ordered: Vec<_> = children.iter().map(|r| (*r, 0)).collect();
        sort(&mut ordered);
        for (r, _) in ordered {
            let at = alloc.allocate(WindowKind::Mem32, r).expect("child fits");
            assert_eq!(at % r.align, 0);
        }
    }

    #[test]
    fn reserves_are_aligned_to_their_largest_power_of_two() {
        assert_eq!(
            reserve_request(WindowKind::Pref64, 768 * MIB),
            Some(req(768 * MIB, 512 * MIB))
        );
        assert_eq!(reserve_request(WindowKind::Mem32, 1), Some(req(MIB, MIB)));
        assert_eq!(reserve_request(WindowKind::Mem32, 0), None);
    }
}
