//! vCPU register state for the Linux 64-bit boot protocol: flat GDT, identity-mapped first GiB,
//! long mode on, `rsi` pointing at the zero page. Plus the MSR, FPU and LAPIC defaults every vCPU
//! starts with.

use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, kvm_xcrs, Msrs,
};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{
    BOOT_STACK_TOP, GDT_START, IDT_START, PDE_START, PDPTE_START, PML4_START, ZERO_PAGE,
};

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("writing boot page tables or GDT to guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    #[error("{what}: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM accepted only {set} of {total} boot MSRs")]
    Msrs { set: usize, total: usize },
    #[error("building the MSR list: {0}")]
    Fam(#[from] vmm_sys_util::fam::Error),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { what, source }
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// GDT entries: null, 64-bit code, data, TSS.
const GDT: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];
const CODE_INDEX: u16 = 1;
const DATA_INDEX: u16 = 2;
const TSS_INDEX: u16 = 3;

const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// Decodes a GDT entry into the segment KVM wants, as the CPU would when loading `index`.
fn segment(entry: u64, index: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    kvm_segment {
        base,
        limit,
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Writes the GDT, an empty IDT and page tables identity-mapping the first GiB with 2 MiB pages.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    for (i, entry) in GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_START + (i as u64) * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_START))?;
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))?;
    mem.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START))?;
    for i in 0..512u64 {
        // Present, writable, 2 MiB page.
        mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_START + i * 8))?;
    }
    Ok(())
}

/// Puts the boot vCPU in long mode at `entry` with the zero page in `rsi`.
pub fn setup_boot_vcpu(vcpu: &VcpuFd, entry: GuestAddress) -> Result<(), RegsError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let code = segment(GDT[usize::from(CODE_INDEX)], CODE_INDEX);
    let data = segment(GDT[usize::from(DATA_INDEX)], DATA_INDEX);
    let tss = segment(GDT[usize::from(TSS_INDEX)], TSS_INDEX);
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&GDT) - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = (std::mem::size_of::<u64>() - 1) as u16;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;

    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry.0,
        rsp: BOOT_STACK_TOP,
        rbp: BOOT_STACK_TOP,
        rsi: ZERO_PAGE,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))
}

/// Starts the vCPU with XCR0 enabling all of `xcr0`. The guest sets XCR0 itself, but where
/// XSETBV is not intercepted (nested SVM under QEMU TCG) KVM never sees the guest's value and
/// would size XSAVE areas (CPUID 0xD.0 EBX) for the reset value, x87 only, which the guest
/// rejects as inconsistent. Starting from the full value keeps KVM and the guest in agreement.
pub fn setup_xcr0(vcpu: &VcpuFd, xcr0: u64) -> Result<(), RegsError> {
    let mut xcrs = kvm_xcrs {
        nr_xcrs: 1,
        ..Default::default()
    };
    xcrs.xcrs[0].xcr = 0;
    xcrs.xcrs[0].value = xcr0;
    vcpu.set_xcrs(&xcrs).map_err(kvm("KVM_SET_XCRS"))
}

/// x87 control word and MXCSR at their reset values.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))
}

/// MSRs a fresh x86 CPU would have cleared, plus fast strings and write-back MTRR default.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    let msrs = Msrs::from_entries(&entries)?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if set != entries.len() {
        return Err(RegsError::Msrs {
            set,
            total: entries.len(),
        });
    }
    Ok(())
}

/// Routes LINT0 to ExtINT (the PIC) and LINT1 to NMI, as firmware does on a PC.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), RegsError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const APIC_MODE_NMI: u32 = 0x4;
    const APIC_MODE_EXTINT: u32 = 0x7;

    let mut lapic: kvm_lapic_state = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    let set_mode = |lapic: &mut kvm_lapic_state, reg: usize, mode: u32| {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
        let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as _;
        }
    };
    set_mode(&mut lapic, APIC_LVT0, APIC_MODE_EXTINT);
    set_mode(&mut lapic, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_long_mode_segments() {
        let code = segment(GDT[1], CODE_INDEX);
        assert_eq!((code.l, code.db, code.present, code.s), (1, 0, 1, 1));
        assert_eq!((code.base, code.limit, code.selector), (0, 0xffff_ffff, 8));
        assert_eq!(code.type_, 0xb);
        let data = segment(GDT[2], DATA_INDEX);
        assert_eq!((data.l, data.db, data.type_, data.selector), (0, 1, 3, 16));
    }

    #[test]
    fn page_tables_identity_map_the_first_gib() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        write_boot_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPTE_START);
        let last: u64 = mem.read_obj(GuestAddress(PDE_START + 511 * 8)).unwrap();
        assert_eq!(last & !0xfff, 511 << 21);
        assert_eq!(last & 0x80, 0x80, "2 MiB page");
    }
}
