//! P2P domains: one IOMMU address space per P2P group (and per ungrouped device). All iommufd
//! domains of a VM are IOASes on one `/dev/iommu`, so guest RAM mapped into the first can be
//! copied into the others with its pages pinned once ([`VfioBackend::copy_mapping_from`]); each
//! type1 domain is a container of its own.

use std::sync::{Arc, Mutex, PoisonError};

use iommufd_ioctls::IommuFd;

use crate::iommu::{BackendKind, IommuError, VfioBackend};
use crate::iommufd::{open_iommufd, Iommufd};
use crate::type1::Type1;

/// Opens the domains of one VM.
#[derive(Default)]
pub struct DomainOpener {
    /// The VM's `/dev/iommu`, opened with its first iommufd domain.
    iommufd: Mutex<Option<Arc<IommuFd>>>,
}

impl DomainOpener {
    pub fn new() -> Self {
        Self::default()
    }

    /// A new, empty address space of `kind`.
    pub fn open(&self, kind: BackendKind) -> Result<VfioBackend, IommuError> {
        Ok(match kind {
            BackendKind::Iommufd => {
                let mut shared = self.iommufd.lock().unwrap_or_else(PoisonError::into_inner);
                let fd = match &*shared {
                    Some(fd) => fd.clone(),
                    None => shared.insert(open_iommufd()?).clone(),
                };
                VfioBackend::Iommufd(Arc::new(Iommufd::open_on(fd)?))
            }
            BackendKind::Type1 => VfioBackend::Type1(Arc::new(Type1::open()?)),
        })
    }
}
