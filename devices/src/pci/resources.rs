//! Address space bookkeeping for the topology builder: which window a BAR comes from, how big a
//! bridge window must be to hold its children, and the allocators that hand out addresses.
//!
//! Window sizes are computed by packing the children in the same order the allocator later
//! places them (largest alignment first), starting at an address aligned to the largest child
//! alignment. That order leaves no gap a later, less aligned child could not use, so the
//! computed size is always enough and the allocation inside a window cannot fail.
//!
//! Port windows get headroom beyond what they hold ([`Headroom`]), so the guest can move a BAR
//! inside its port's window (Linux resource reassignment, resizable BAR) without resizing every
//! bridge above it. Headroom only makes windows larger than their packed children, so the
//! argument above still holds.

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
    let packed = pack(children)?;
    Some(Request {
        size: packed.size.next_multiple_of(kind.granularity()),
        align: packed.align.max(kind.granularity()),
    })
}

/// The bytes `children` take packed in placement order from a base aligned for all of them,
/// with no bridge granularity: what a port holds, as [`Headroom`] measures it (doubling a
/// 1 MiB granule for a 4 KiB BAR would only waste the 32-bit window).
pub fn pack(children: &[Request]) -> Option<Request> {
    let mut ordered: Vec<_> = children.iter().map(|r| (*r, 0)).collect();
    sort(&mut ordered);
    let align = ordered.first()?.0.align;
    let size = ordered
        .iter()
        .fold(0u64, |end, (r, _)| end.next_multiple_of(r.align) + r.size);
    Some(Request { size, align })
}

/// How much room a port window gets beyond what it holds, tried in the order
/// [`Headroom::Pow2Double`], [`Headroom::Double`], [`Headroom::None`]: the topology builder
/// steps a window kind down one level when its host window cannot hold the whole tree (a
/// 128 GiB BAR in a 256 GiB window cannot have twice its size), so headroom never makes a
/// layout that fits without it fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Headroom {
    /// At least twice what the port holds, rounded up to a power of two.
    Pow2Double,
    /// At least twice what the port holds.
    Double,
    /// Exactly what the port holds.
    None,
}

impl Headroom {
    /// The next level down, if any.
    pub fn less(self) -> Option<Self> {
        match self {
            Headroom::Pow2Double => Some(Headroom::Double),
            Headroom::Double => Some(Headroom::None),
            Headroom::None => None,
        }
    }

    /// The window for a port whose children pack into `children` (their own windows with
    /// headroom included) and which holds `held` (the same subtree packed without any
    /// headroom): at least both, grown as this level asks. The alignment stays the children's,
    /// so a window never needs more alignment than what it holds.
    pub fn apply(self, kind: WindowKind, children: Request, held: Request) -> Request {
        let twice = held.size.saturating_mul(2).max(children.size);
        let size = match self {
            Headroom::Pow2Double => twice.checked_next_power_of_two().unwrap_or(twice),
            Headroom::Double => twice,
            Headroom::None => children.size,
        };
        Request {
            size: size.next_multiple_of(kind.granularity()),
            align: children.align,
        }
    }
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
    fn headroom_doubles_what_a_port_holds_at_each_level() {
        // A 64 MiB BAR and a 4 KiB one: a 65 MiB window holding 64 MiB + 4 KiB.
        let held = pack(&[req(64 * MIB, 64 * MIB), req(4096, 4096)]).unwrap();
        assert_eq!(held, req(64 * MIB + 4096, 64 * MIB));
        let children = window_request(WindowKind::Pref64, &[held]).unwrap();
        let kind = WindowKind::Pref64;
        assert_eq!(
            Headroom::Pow2Double.apply(kind, children, held),
            req(256 * MIB, 64 * MIB)
        );
        assert_eq!(
            Headroom::Double.apply(kind, children, held),
            req(129 * MIB, 64 * MIB)
        );
        assert_eq!(
            Headroom::None.apply(kind, children, held),
            req(65 * MIB, 64 * MIB)
        );
        // Small BARs double within their granule.
        let tiny = req(20 << 10, 16 << 10);
        let granule = window_request(WindowKind::Mem32, &[tiny]).unwrap();
        assert_eq!(
            Headroom::Pow2Double.apply(WindowKind::Mem32, granule, tiny),
            req(MIB, MIB)
        );
    }

    #[test]
    fn headroom_never_shrinks_below_the_children() {
        // Children that already have headroom can need more than twice the bare BARs.
        let children = req(384 * MIB, 128 * MIB);
        let held = req(96 * MIB, 32 * MIB);
        let kind = WindowKind::Mem32;
        assert_eq!(
            Headroom::Pow2Double.apply(kind, children, held),
            req(512 * MIB, 128 * MIB)
        );
        assert_eq!(Headroom::Double.apply(kind, children, held), children);
        assert_eq!(Headroom::None.apply(kind, children, held), children);
    }

    #[test]
    fn headroom_steps_down_to_none() {
        assert_eq!(Headroom::Pow2Double.less(), Some(Headroom::Double));
        assert_eq!(Headroom::Double.less(), Some(Headroom::None));
        assert_eq!(Headroom::None.less(), None);
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
