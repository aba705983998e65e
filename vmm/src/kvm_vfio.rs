//! The KVM-VFIO pseudo device: tells KVM which VFIO files (group fds or device cdevs) belong to the
//! VM, so KVM can handle coherency (no-snoop DMA) and pass the IOMMU state to the device.

use std::os::fd::{AsRawFd, RawFd};

use kvm_bindings::{
    kvm_create_device, kvm_device_attr, kvm_device_type_KVM_DEV_TYPE_VFIO, KVM_DEV_VFIO_FILE,
    KVM_DEV_VFIO_FILE_ADD, KVM_DEV_VFIO_FILE_DEL,
};
use kvm_ioctls::{DeviceFd, VmFd};

#[derive(Debug, thiserror::Error)]
pub enum KvmVfioError {
    #[error("creating the KVM-VFIO device: {0}")]
    Create(#[source] kvm_ioctls::Error),
    #[error("{op} VFIO file {fd} on the KVM-VFIO device: {source}")]
    Attr {
        op: &'static str,
        fd: RawFd,
        #[source]
        source: kvm_ioctls::Error,
    },
}

pub struct KvmVfio {
    device: DeviceFd,
}

impl KvmVfio {
    pub fn new(vm: &VmFd) -> Result<Self, KvmVfioError> {
        let mut create = kvm_create_device {
            type_: kvm_device_type_KVM_DEV_TYPE_VFIO,
            fd: 0,
            flags: 0,
        };
        let device = vm
            .create_device(&mut create)
            .map_err(KvmVfioError::Create)?;
        Ok(Self { device })
    }

    fn file_attr(
        &self,
        op: &'static str,
        attr: u32,
        file: &impl AsRawFd,
    ) -> Result<(), KvmVfioError> {
        let fd: i32 = file.as_raw_fd();
        let attr = kvm_device_attr {
            flags: 0,
            group: KVM_DEV_VFIO_FILE,
            attr: u64::from(attr),
            addr: &fd as *const i32 as u64,
        };
        self.device
            .set_device_attr(&attr)
            .map_err(|source| KvmVfioError::Attr { op, fd, source })
    }

    /// Adds a VFIO group fd or device cdev fd.
    pub fn add(&self, file: &impl AsRawFd) -> Result<(), KvmVfioError> {
        self.file_attr("adding", KVM_DEV_VFIO_FILE_ADD, file)
    }

    /// Removes a file added with [`KvmVfio::add`] (hot-unplug).
    pub fn remove(&self, file: &impl AsRawFd) -> Result<(), KvmVfioError> {
        self.file_attr("removing", KVM_DEV_VFIO_FILE_DEL, file)
    }
}
