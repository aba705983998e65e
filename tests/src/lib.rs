//! The nested lab harness: builds the lab kernel and images through `resources/`, boots an L1
//! guest under QEMU TCG (emulated IOMMU, DMA-capable devices, nested SVM), runs a script there
//! that drives p2pvmm, and hands back the L1 console for assertions.
//!
//! One L1 boot costs tens of seconds of TCG time and a host core, so tests share a boot per
//! group and read their own scenario out of its console ([`Console::scenario`]).
//!
//! [`guest`] holds what the static programs run inside the lab guests share (VFIO from
//! userspace in no-IOMMU mode).

pub mod clock;
mod console;
pub mod guest;
mod l1;
pub mod option_rom;

pub use console::{expect_scenario, run_retrying_lab_failure, Console, L2Report, Scenario};
pub use l1::{
    api_probe_static, bar_move_time_static, bar_walk_static, edu_dma_static, lab_kernel,
    lab_vmlinux, msix_probe_static, p2pvmm_static, repo_root, vcpu_hammer_static, L1Run,
    BIND_EDU_AND_IVSHMEM, L2_CMDLINE, L2_HELPERS,
};
