//! x86_64 specifics: CPUID, boot register state, kernel loading and ACPI tables.

pub mod acpi;
pub mod boot;
pub mod cpuid;
mod kernel_cache;
mod kernel_payload;
pub mod regs;
