//! MSI capability emulation, for device models that deliver interrupts through KVM routes.
//!
//! The registers live in the device's [`ConfigSpace`] (declared here with the right masks), so
//! reads need nothing special. After any config write that touches the capability the device
//! calls [`MsiCap::update`], which compares the effective message of every vector with what it
//! last reported and tells the [`MsiSink`] about the difference. The VMM turns that into KVM GSI
//! routes and irqfds, and reports interrupts that arrive while a vector is masked back through
//! [`MsiCap::signal_masked`], which sets the pending bit so the message is sent on unmask.

use std::ops::Range;

use super::config::{ConfigError, ConfigRegs, ConfigSpace};
use super::regs::CAP_ID_MSI;

/// A message a function writes to raise an interrupt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// Where MSI and MSI-X state changes go; the VMM implements it once per device.
///
/// Ordering: when a capability is enabled the vectors are reported first, then
/// `enable_changed(true)`, so routes exist before the device may fire. When it is disabled,
/// `enable_changed(false)` comes first, then the vectors are withdrawn.
///
/// Calls come from inside the device's config or BAR write, with the device lock held: an
/// implementation must not lock the device (it can hold what it needs, e.g. the VFIO device fd).
pub trait MsiSink: Send + Sync {
    /// `vector` now sends `message`; `None` means it is masked or disabled and the VMM should
    /// stop delivering it (and report interrupts through `signal_masked` instead).
    fn vector_changed(&self, vector: u16, message: Option<MsiMessage>);
    /// The capability's enable bit changed (for VFIO: enable or disable MSI/MSI-X on the host).
    fn enable_changed(&self, enabled: bool);
    /// Deliver `message` once now: it was pending while `vector` was masked and has just been
    /// unmasked. The route for `vector` has already been reported.
    fn inject(&self, vector: u16, message: MsiMessage);
    /// Whether `vector`, which the VMM was told is masked, has an interrupt waiting that the
    /// device raised meanwhile and that is held outside the model (a passthrough vector's
    /// eventfd, unread while it has no route). The guest sees it as the vector's pending bit;
    /// it is delivered when the vector is routed again. Models whose interrupts arrive through
    /// `signal_masked` keep the default.
    fn held(&self, _vector: u16) -> bool {
        false
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MsiError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("MSI supports 1, 2, 4, 8, 16 or 32 vectors, not {0}")]
    Vectors(u8),
}

/// How the capability is declared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiConfig {
    /// Vectors the function can use (the "multiple message capable" field).
    pub vectors: u8,
    /// 64-bit message address (needed for interrupt remapping above 4 GiB; x86 LAPIC
    /// messages fit in 32 bits).
    pub is_64bit: bool,
    /// Per-vector mask and pending bits.
    pub per_vector_mask: bool,
}

const CONTROL: u16 = 0x02;
const ADDRESS_LO: u16 = 0x04;
const CTRL_ENABLE: u16 = 1 << 0;
const CTRL_MME_SHIFT: u16 = 4;
const CTRL_64BIT: u16 = 1 << 7;
const CTRL_PVM: u16 = 1 << 8;
const MAX_VECTORS: usize = 32;

/// The MSI capability of one function.
pub struct MsiCap {
    offset: u16,
    config: MsiConfig,
    enabled: bool,
    /// What the sink was last told, per vector.
    routes: [Option<MsiMessage>; MAX_VECTORS],
}

impl MsiCap {
    /// Adds the capability to `config` and declares its registers.
    pub fn add<const N: usize>(
        config: &mut ConfigSpace<N>,
        msi: MsiConfig,
    ) -> Result<Self, MsiError> {
        if !msi.vectors.is_power_of_two() || usize::from(msi.vectors) > MAX_VECTORS {
            return Err(MsiError::Vectors(msi.vectors));
        }
        let len = Self::len_of(&msi);
        let offset = config.add_capability(CAP_ID_MSI, len)?;
        let cap = Self {
            offset,
            config: msi,
            enabled: false,
            routes: [None; MAX_VECTORS],
        };
        let mmc = msi.vectors.trailing_zeros() as u16;
        let mut control = mmc << 1;
        if msi.is_64bit {
            control |= CTRL_64BIT;
        }
        if msi.per_vector_mask {
            control |= CTRL_PVM;
        }
        let regs = config.regs_mut();
        regs.init_u16(offset + CONTROL, control);
        regs.set_writable_u16(offset + CONTROL, CTRL_ENABLE | (0x7 << CTRL_MME_SHIFT));
        regs.set_writable_u32(offset + ADDRESS_LO, !0x3);
        if msi.is_64bit {
            regs.set_writable_u32(offset + ADDRESS_LO + 4, u32::MAX);
        }
        // Without extended message data only the low 16 bits of the data register exist.
        regs.set_writable_u16(cap.data_offset(), u16::MAX);
        if msi.per_vector_mask {
            regs.set_writable_u32(cap.mask_offset(), vector_bits(msi.vectors.into()));
        }
        Ok(cap)
    }

    fn len_of(msi: &MsiConfig) -> u16 {
        match (msi.is_64bit, msi.per_vector_mask) {
            (false, false) => 0x0a,
            (true, false) => 0x0e,
            (false, true) => 0x14,
            (true, true) => 0x18,
        }
    }

    fn data_offset(&self) -> u16 {
        self.offset + if self.config.is_64bit { 0x0c } else { 0x08 }
    }

    fn mask_offset(&self) -> u16 {
        self.offset + if self.config.is_64bit { 0x10 } else { 0x0c }
    }

    fn pending_offset(&self) -> u16 {
        self.mask_offset() + 4
    }

    /// Config offsets the capability occupies: writes overlapping them need an `update`.
    pub fn range(&self) -> Range<u16> {
        self.offset..self.offset + Self::len_of(&self.config)
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Vectors the guest enabled (multiple message enable, capped at what the function offers).
    fn enabled_vectors(&self, regs: &ConfigRegs) -> u32 {
        let mme = (regs.read_u16(self.offset + CONTROL) >> CTRL_MME_SHIFT) & 0x7;
        (1u32 << mme).min(self.config.vectors.into())
    }

    /// The message `vector` sends now, or `None` if it is disabled or masked.
    pub fn message(&self, regs: &ConfigRegs, vector: u16) -> Option<MsiMessage> {
        let control = regs.read_u16(self.offset + CONTROL);
        let count = self.enabled_vectors(regs);
        if control & CTRL_ENABLE == 0 || u32::from(vector) >= count || self.masked(regs, vector) {
            return None;
        }
        let mut address = u64::from(regs.read_u32(self.offset + ADDRESS_LO));
        if self.config.is_64bit {
            address |= u64::from(regs.read_u32(self.offset + ADDRESS_LO + 4)) << 32;
        }
        // With multiple messages the function puts the vector number in the low data bits.
        let data = u32::from(regs.read_u16(self.data_offset()));
        Some(MsiMessage {
            address,
            data: (data & !(count - 1)) | u32::from(vector),
        })
    }

    /// Completes a guest read of config space at `offset`: where it covers the pending bits,
    /// masked vectors whose interrupt the sink holds (a passthrough vector's unread eventfd) read
    /// as pending, as they do in the MSI-X PBA.
    pub fn merge_held(&self, regs: &ConfigRegs, offset: u16, data: &mut [u8], sink: &dyn MsiSink) {
        if !self.config.per_vector_mask || !self.enabled {
            return;
        }
        let held = (0..self.enabled_vectors(regs) as u16)
            .filter(|&v| self.routes[usize::from(v)].is_none() && sink.held(v))
            .fold(0u32, |bits, v| bits | (1 << v));
        let pending = self.pending_offset();
        for (i, byte) in data.iter_mut().enumerate() {
            let at = usize::from(offset) + i;
            if let Some(shift) = at.checked_sub(usize::from(pending)).filter(|&b| b < 4) {
                *byte |= (held >> (8 * shift)) as u8;
            }
        }
    }

    fn masked(&self, regs: &ConfigRegs, vector: u16) -> bool {
        self.config.per_vector_mask && regs.read_u32(self.mask_offset()) & (1 << vector) != 0
    }

    /// Re-reads the capability after a config write (or reset) and reports what changed.
    pub fn update(&mut self, regs: &mut ConfigRegs, sink: &dyn MsiSink) {
        let enabled = regs.read_u16(self.offset + CONTROL) & CTRL_ENABLE != 0;
        if self.enabled && !enabled {
            sink.enable_changed(false);
        }
        for vector in 0..MAX_VECTORS as u16 {
            let message = self.message(regs, vector);
            if message != self.routes[usize::from(vector)] {
                self.routes[usize::from(vector)] = message;
                sink.vector_changed(vector, message);
            }
        }
        if !self.enabled && enabled {
            sink.enable_changed(true);
        }
        self.enabled = enabled;
        self.deliver_unmasked_pending(regs, sink);
    }

    /// The device raised `vector` while the VMM had it masked. Sets the pending bit; if the
    /// vector has been unmasked in the meantime, delivers it instead. Ignored while disabled.
    pub fn signal_masked(&mut self, regs: &mut ConfigRegs, vector: u16, sink: &dyn MsiSink) {
        if !self.enabled || u32::from(vector) >= self.enabled_vectors(regs) {
            log::debug!("MSI vector {vector} raised while disabled: dropped");
            return;
        }
        if let Some(message) = self.message(regs, vector) {
            sink.inject(vector, message);
        } else if self.config.per_vector_mask {
            let pending = regs.read_u32(self.pending_offset());
            regs.set_u32(self.pending_offset(), pending | (1 << vector));
        }
    }

    fn deliver_unmasked_pending(&mut self, regs: &mut ConfigRegs, sink: &dyn MsiSink) {
        if !self.config.per_vector_mask {
            return;
        }
        let pending = regs.read_u32(self.pending_offset());
        let mut still_pending = pending;
        for vector in (0..MAX_VECTORS as u16).filter(|v| pending & (1 << v) != 0) {
            if let Some(message) = self.routes[usize::from(vector)] {
                still_pending &= !(1 << vector);
                sink.inject(vector, message);
            }
        }
        regs.set_u32(self.pending_offset(), still_pending);
    }
}

fn vector_bits(vectors: u32) -> u32 {
    if vectors >= 32 {
        u32::MAX
    } else {
        (1 << vectors) - 1
    }
}

#[cfg(test)]
#[path = "msi_tests.rs"]
mod tests;
