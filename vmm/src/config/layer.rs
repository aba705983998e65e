//! A partial configuration: what one source (the TOML file or the command
//! line) says, with `None` for "not mentioned".
//!
//! Keeping "not set" distinct from "set to the default" is what lets a CLI
//! flag override the file only when it was actually given, and lets
//! `--kernel` be optional when the file supplies it.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::device::{self, DeviceEntry};
use super::p2p_group::P2pGroupConfig;
use super::{
    ByteSize, ConfigError, KernelDecompress, MemoryConfig, SerialConfig, SlotZap, VmConfig,
};

/// One layer of settings; field meanings are those of [`VmConfig`].
///
/// This is also the schema of the `--config` TOML file, hence
/// `deny_unknown_fields`: a misspelt key (`cpu = 4`) must be an error, not a
/// silently ignored setting.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PartialConfig {
    /// See [`VmConfig::kernel`].
    pub kernel: Option<PathBuf>,
    /// See [`VmConfig::initramfs`].
    pub initramfs: Option<PathBuf>,
    /// See [`VmConfig::cmdline`].
    pub cmdline: Option<String>,
    /// See [`VmConfig::cpus`].
    pub cpus: Option<u8>,
    /// See [`VmConfig::memory`].
    pub memory: Option<MemoryConfig>,
    /// See [`VmConfig::serial`].
    pub serial: Option<SerialConfig>,
    /// See [`VmConfig::mmio64_size`].
    pub mmio64_size: Option<ByteSize>,
    /// See [`VmConfig::kernel_decompress`].
    pub kernel_decompress: Option<KernelDecompress>,
    /// See [`VmConfig::slot_zap`].
    pub slot_zap: Option<SlotZap>,
    /// See [`VmConfig::devices`]; a list rather than an option, since
    /// layers add devices instead of replacing the whole list.
    #[serde(rename = "device", default)]
    pub devices: Vec<DeviceEntry>,
    /// See [`VmConfig::p2p_groups`]; layers add groups.
    #[serde(rename = "p2p_group", default)]
    pub p2p_groups: Vec<P2pGroupConfig>,
}

impl PartialConfig {
    /// Settings from `top` win; anything `top` leaves unset falls through to
    /// `self`. Devices are the exception: `top`'s are added to `self`'s, see
    /// [`device::merge`].
    pub fn overlay(self, top: PartialConfig) -> PartialConfig {
        PartialConfig {
            kernel: top.kernel.or(self.kernel),
            initramfs: top.initramfs.or(self.initramfs),
            cmdline: top.cmdline.or(self.cmdline),
            cpus: top.cpus.or(self.cpus),
            memory: top.memory.or(self.memory),
            serial: top.serial.or(self.serial),
            mmio64_size: top.mmio64_size.or(self.mmio64_size),
            kernel_decompress: top.kernel_decompress.or(self.kernel_decompress),
            slot_zap: top.slot_zap.or(self.slot_zap),
            devices: device::merge(self.devices, top.devices),
            p2p_groups: self.p2p_groups.into_iter().chain(top.p2p_groups).collect(),
        }
    }

    /// Makes relative paths relative to `base` (the config file's
    /// directory), so a config file keeps working wherever `p2pvmm` is
    /// started from. Absolute paths are left untouched by `join`.
    pub fn resolve_paths(self, base: &Path) -> PartialConfig {
        PartialConfig {
            kernel: self.kernel.map(|p| base.join(p)),
            initramfs: self.initramfs.map(|p| base.join(p)),
            serial: self.serial.map(|s| match s {
                SerialConfig::File(p) => SerialConfig::File(base.join(p)),
                other => other,
            }),
            devices: self
                .devices
                .into_iter()
                .map(|d| DeviceEntry {
                    path: base.join(d.path),
                    ..d
                })
                .collect(),
            ..self
        }
    }

    /// Fills in defaults (device ids, and placements from the devices' P2P
    /// groups, included); only the kernel has none.
    pub fn finish(self) -> Result<VmConfig, ConfigError> {
        Ok(VmConfig {
            kernel: self.kernel.ok_or(ConfigError::MissingKernel)?,
            initramfs: self.initramfs,
            cmdline: self.cmdline.unwrap_or_default(),
            cpus: self.cpus.unwrap_or_else(super::default_cpus),
            memory: self.memory.unwrap_or_else(super::default_memory),
            serial: self.serial.unwrap_or_default(),
            mmio64_size: self.mmio64_size,
            kernel_decompress: self.kernel_decompress.unwrap_or_default(),
            slot_zap: self.slot_zap.unwrap_or_default(),
            devices: device::finish(self.devices, &self.p2p_groups),
            p2p_groups: self.p2p_groups,
        })
    }
}
