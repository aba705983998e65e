//! Per-vCPU CPUID: KVM's supported set, with a topology the guest can trust, an XSAVE leaf
//! that agrees with the XCR0 features it announces, and no hardware virtualisation (VMX, SVM):
//! p2pvmm does not run nested guests, and a guest kernel with KVM built in spends seconds of
//! its boot setting up SVM when it sees it (measured under nested KVM).

use kvm_bindings::{
    kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_MAX_CPUID_ENTRIES,
};

const LEAF_VENDOR: u32 = 0x0;
const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE: u32 = 0x4;
const LEAF_EXT_FEATURES: u32 = 0x7;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_XSAVE: u32 = 0xd;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_AMD_FEATURES: u32 = 0x8000_0001;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_SVM: u32 = 0x8000_000a;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;
const LEAF_AMD_EXT_TOPOLOGY: u32 = 0x8000_0026;

/// Legacy x87/SSE area plus the XSAVE header: the size of an XSAVE image with XCR0 = x87|SSE.
const XSAVE_LEGACY_SIZE: u32 = 576;
const XCR0_X87_SSE: u64 = 0x3;

#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    #[error("building the CPUID table: {0}")]
    Fam(#[from] vmm_sys_util::fam::Error),
}

/// What each vCPU needs to know about the machine to describe it.
#[derive(Clone, Copy, Debug)]
pub struct Topology {
    pub cpus: u8,
}

fn is_amd(entries: &[kvm_cpuid_entry2]) -> bool {
    entries
        .iter()
        .find(|e| e.function == LEAF_VENDOR)
        .is_some_and(|e| (e.ebx, e.edx, e.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163))
}

/// Number of bits needed to hold an id below `count`.
fn id_bits(count: u32) -> u32 {
    count.next_power_of_two().trailing_zeros()
}

/// Returns the CPUID table for vCPU `index` (its APIC ID) derived from KVM's supported table.
pub fn vcpu_cpuid(supported: &CpuId, index: u8, topo: Topology) -> Result<CpuId, CpuidError> {
    let mut entries: Vec<kvm_cpuid_entry2> = supported
        .as_slice()
        .iter()
        .filter(|e| {
            !matches!(
                e.function,
                LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY | LEAF_AMD_EXT_TOPOLOGY | LEAF_AMD_SVM
            )
        })
        .copied()
        .collect();
    let amd = is_amd(&entries);
    let cpus = u32::from(topo.cpus.max(1));
    let apic_id = u32::from(index);
    let restrict_xsave = !xsave_sizes_consistent(&entries);
    if restrict_xsave {
        log::warn!(
            "KVM's XSAVE sizes disagree with its per-component layout (nested KVM?): \
             exposing only x87/SSE state to the guest"
        );
    }

    for e in entries.iter_mut() {
        match e.function {
            LEAF_VENDOR => e.eax = e.eax.max(LEAF_EXT_TOPOLOGY),
            LEAF_FEATURES => {
                e.ebx = (apic_id << 24) | (cpus << 16) | (8 << 8) | (e.ebx & 0xff);
                e.ecx |= 1 << 31; // running under a hypervisor
                e.ecx &= !(1 << 5); // no VMX
                if cpus > 1 {
                    e.edx |= 1 << 28; // HTT: EBX[23:16] is valid
                } else {
                    e.edx &= !(1 << 28);
                }
            }
            LEAF_CACHE => {
                // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing this cache - 1.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { cpus - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((sharing & 0xfff) << 14) | ((cpus - 1) << 26);
            }
            LEAF_AMD_FEATURES => {
                e.ecx &= !(1 << 2); // no SVM
                                    // CmpLegacy: more than one core.
                if amd && cpus > 1 {
                    e.ecx |= 1 << 1;
                } else if amd {
                    e.ecx &= !(1 << 1);
                }
            }
            LEAF_AMD_SIZES if amd => {
                e.ecx = (id_bits(cpus) << 12) | (cpus - 1);
            }
            LEAF_AMD_TOPOLOGY => {
                e.eax = apic_id;
                e.ebx = apic_id & 0xff; // core id; one thread per core
                e.ecx = 0; // node 0, one node
            }
            _ => {}
        }
        if restrict_xsave {
            restrict_to_legacy_xsave(e);
        }
    }
    if restrict_xsave {
        entries.retain(|e| !(e.function == LEAF_XSAVE && e.index >= 2));
    }
    entries.extend(extended_topology(apic_id, cpus));
    entries.truncate(KVM_MAX_CPUID_ENTRIES);
    Ok(CpuId::from_entries(&entries)?)
}

/// The XCR0 value that enables every state component the table announces (0xD.0 EDX:EAX), or
/// `None` when it announces no XSAVE support.
pub fn full_xcr0(cpuid: &CpuId) -> Option<u64> {
    let entries = cpuid.as_slice();
    let xsave = entries
        .iter()
        .find(|e| e.function == LEAF_FEATURES)
        .is_some_and(|e| e.ecx & (1 << 26) != 0);
    let main = entries
        .iter()
        .find(|e| e.function == LEAF_XSAVE && e.index == 0)?;
    xsave.then(|| u64::from(main.eax) | (u64::from(main.edx) << 32))
}

/// Leaf 0xB: one thread per core, `cpus` cores in one package.
fn extended_topology(apic_id: u32, cpus: u32) -> [kvm_cpuid_entry2; 3] {
    let level = |index: u32, shift: u32, count: u32, kind: u32| kvm_cpuid_entry2 {
        function: LEAF_EXT_TOPOLOGY,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax: shift,
        ebx: count,
        ecx: (kind << 8) | index,
        edx: apic_id,
        ..Default::default()
    };
    [
        level(0, 0, 1, 1),                // SMT
        level(1, id_bits(cpus), cpus, 2), // core
        level(2, 0, 0, 0),                // invalid: end of the list
    ]
}

/// KVM reports the XSAVE image size for all features (0xD.0 ECX) and each component's offset and
/// size (0xD.i). Both should describe the same layout; under nested SVM on TCG they do not, and a
/// guest that sees the mismatch disables its FPU state handling and crashes.
fn xsave_sizes_consistent(entries: &[kvm_cpuid_entry2]) -> bool {
    let find = |index| {
        entries
            .iter()
            .find(|e| e.function == LEAF_XSAVE && e.index == index)
    };
    let Some(main) = find(0) else { return true };
    let xcr0 = u64::from(main.eax) | (u64::from(main.edx) << 32);
    let mut end = XSAVE_LEGACY_SIZE;
    for component in 2..64 {
        if xcr0 & (1 << component) == 0 {
            continue;
        }
        match find(component) {
            Some(c) if c.eax != 0 => end = end.max(c.ebx + c.eax),
            _ => return false,
        }
    }
    end == main.ecx
}

/// Hides every feature whose state lives beyond the legacy XSAVE area (AVX, AVX-512, PKU, AMX)
/// and the compacted formats, so that XCR0 = x87|SSE and all sizes are 576.
fn restrict_to_legacy_xsave(e: &mut kvm_cpuid_entry2) {
    const FMA: u32 = 1 << 12;
    const AVX: u32 = 1 << 28;
    const F16C: u32 = 1 << 29;
    // Leaf 7.0 EBX: AVX2, AVX512F/DQ/IFMA/PF/ER/CD/BW/VL.
    const L7_EBX: u32 = (1 << 5)
        | (1 << 16)
        | (1 << 17)
        | (1 << 21)
        | (1 << 26)
        | (1 << 27)
        | (1 << 28)
        | (1 << 30)
        | (1 << 31);
    // Leaf 7.0 ECX: AVX512VBMI, PKU, OSPKE, VBMI2, VAES, VPCLMULQDQ, VNNI, BITALG, VPOPCNTDQ.
    const L7_ECX: u32 = (1 << 1)
        | (1 << 3)
        | (1 << 4)
        | (1 << 6)
        | (1 << 9)
        | (1 << 10)
        | (1 << 11)
        | (1 << 12)
        | (1 << 14);
    // Leaf 7.0 EDX: 4VNNIW, 4FMAPS, VP2INTERSECT, AMX-BF16, AVX512-FP16, AMX-TILE, AMX-INT8.
    const L7_EDX: u32 =
        (1 << 2) | (1 << 3) | (1 << 8) | (1 << 22) | (1 << 23) | (1 << 24) | (1 << 25);
    // Leaf 7.1 EAX: AVX-VNNI, AVX512-BF16, AVX-IFMA.
    const L71_EAX: u32 = (1 << 4) | (1 << 5) | (1 << 23);
    // Leaf 0x8000_0001 ECX: XOP, FMA4.
    const AMD_ECX: u32 = (1 << 11) | (1 << 16);
    // Leaf 0xD.1 EAX: XSAVEC, XSAVES.
    const XSAVE_COMPACTED: u32 = (1 << 1) | (1 << 3);

    match (e.function, e.index) {
        (LEAF_FEATURES, _) => e.ecx &= !(FMA | AVX | F16C),
        (LEAF_EXT_FEATURES, 0) => {
            e.ebx &= !L7_EBX;
            e.ecx &= !L7_ECX;
            e.edx &= !L7_EDX;
        }
        (LEAF_EXT_FEATURES, 1) => e.eax &= !L71_EAX,
        (LEAF_AMD_FEATURES, _) => e.ecx &= !AMD_ECX,
        (LEAF_XSAVE, 0) => {
            e.eax &= XCR0_X87_SSE as u32;
            e.edx = 0;
            e.ebx = XSAVE_LEGACY_SIZE;
            e.ecx = XSAVE_LEGACY_SIZE;
        }
        (LEAF_XSAVE, 1) => {
            e.eax &= !XSAVE_COMPACTED;
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    fn find(c: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    fn host(xsave_ecx: u32) -> CpuId {
        CpuId::from_entries(&[
            entry(0, 0, [0xd, 0x6874_7541, 0x444d_4163, 0x6974_6e65]),
            entry(1, 0, [0, 0, AVX_BIT, 0]),
            entry(0xd, 0, [0x7, 576, xsave_ecx, 0]),
            entry(0xd, 1, [0xf, 0, 0, 0]),
            entry(0xd, 2, [256, 576, 0, 0]),
            entry(0x8000_0008, 0, [0x3030, 0, 0, 0]),
        ])
        .unwrap()
    }
    const AVX_BIT: u32 = 1 << 28;

    #[test]
    fn topology_names_each_vcpu() {
        let c = vcpu_cpuid(&host(832), 3, Topology { cpus: 4 }).unwrap();
        let leaf1 = find(&c, 1, 0);
        assert_eq!(leaf1.ebx >> 24, 3, "APIC ID");
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4, "logical processors");
        assert_ne!(leaf1.ecx & (1 << 31), 0, "hypervisor bit");
        assert_eq!(find(&c, 0xb, 1).ebx, 4);
        assert_eq!(find(&c, 0xb, 1).edx, 3);
        assert_eq!(find(&c, 0x8000_0008, 0).ecx & 0xff, 3, "AMD NC = cores - 1");
        assert_eq!(find(&c, 0, 0).eax, 0xd, "max basic leaf kept");
    }

    #[test]
    fn hardware_virtualisation_is_hidden() {
        let mut entries = host(832).as_slice().to_vec();
        entries[1].ecx |= 1 << 5; // VMX
        entries.push(entry(0x8000_0001, 0, [0, 0, 1 << 2, 0])); // SVM
        entries.push(entry(0x8000_000a, 0, [1, 0x8000, 0, 0xffff]));
        let c = vcpu_cpuid(
            &CpuId::from_entries(&entries).unwrap(),
            0,
            Topology { cpus: 2 },
        )
        .unwrap();
        assert_eq!(find(&c, 1, 0).ecx & (1 << 5), 0, "VMX");
        assert_eq!(find(&c, 0x8000_0001, 0).ecx & (1 << 2), 0, "SVM");
        assert_ne!(find(&c, 0x8000_0001, 0).ecx & (1 << 1), 0, "CmpLegacy kept");
        assert!(!c.as_slice().iter().any(|e| e.function == 0x8000_000a));
    }

    #[test]
    fn consistent_xsave_is_passed_through() {
        let c = vcpu_cpuid(&host(832), 0, Topology { cpus: 1 }).unwrap();
        assert_eq!(full_xcr0(&c), None, "leaf 1 does not announce XSAVE");
        assert_eq!(find(&c, 0xd, 0).eax, 0x7);
        assert_ne!(find(&c, 1, 0).ecx & AVX_BIT, 0);
        assert_eq!(find(&c, 0xd, 2).eax, 256);
    }

    #[test]
    fn inconsistent_xsave_is_cut_to_legacy_state() {
        // ECX claims 576 bytes although AVX (256 bytes at 576) is enabled: nested-KVM symptom.
        let c = vcpu_cpuid(&host(576), 0, Topology { cpus: 1 }).unwrap();
        let main = find(&c, 0xd, 0);
        assert_eq!((main.eax, main.ebx, main.ecx), (0x3, 576, 576));
        assert_eq!(find(&c, 1, 0).ecx & AVX_BIT, 0);
        assert_eq!(find(&c, 0xd, 1).eax & 0xa, 0, "no compacted formats");
        assert!(!c
            .as_slice()
            .iter()
            .any(|e| e.function == 0xd && e.index == 2));
    }
}
