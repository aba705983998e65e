//! Expansion ROMs of passthrough functions in the nested lab: L1's edu gets an option ROM (QEMU's
//! `romfile`, generated here), p2pvmm shows it to L2 as edu's ROM BAR, and inside L2 Linux
//! enables it and reads it through sysfs. The bytes must be the file's, on both IOMMU backends,
//! and the ROM must be mapped only while L2 has it enabled.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use p2pvmm_tests::{repo_root, run_retrying_lab_failure, Console, L1Run, Scenario, L2_CMDLINE};

const L2: &str = "--kernel /l2/bzImage --initramfs /l2/initramfs.cpio.gz --memory 512M --cpus 1";

/// The ROM file's size: a power of two, so QEMU's ROM BAR, VFIO's region 6 and p2pvmm's ROM BAR
/// are all exactly the file.
const ROM_LEN: usize = 64 << 10;
const EDU_VENDOR: u16 = 0x1234;
const EDU_DEVICE: u16 = 0x11e8;
/// Where the PCI data structure starts; Linux wants it 4-byte aligned.
const PCIR_AT: usize = 0x1c;
/// PCIR code type 1 (Open Firmware): the L1 SeaBIOS deploys and runs only x86 (type 0) images,
/// so it leaves this one alone, while Linux's sysfs reader does not look at the code type.
const CODE_TYPE: u8 = 1;

/// A minimal PCI option ROM image for edu, with a recognisable pattern after the headers:
/// the 0x55AA signature, the image length in 512-byte units, a far return where x86 firmware
/// would call an init entry, the pointer at 0x18 to a "PCIR" structure (edu's IDs, structure
/// length, class, image length, code type, last-image indicator), and a final byte that makes
/// the image sum to 0 (the legacy option ROM checksum). `drivers/pci/rom.c` checks the
/// signature, the PCIR signature, alignment and length, and sums the image lengths up to the
/// last image: that is how many bytes the sysfs `rom` file returns.
fn option_rom() -> Vec<u8> {
    let mut rom: Vec<u8> = (0..ROM_LEN)
        .map(|i| (i as u32).wrapping_mul(0x9e37_79b1).rotate_left(7) as u8)
        .collect();
    let blocks = (ROM_LEN / 512) as u16;
    rom[..4].copy_from_slice(&[0x55, 0xaa, blocks as u8, 0xcb]);
    rom[0x18..0x1a].copy_from_slice(&(PCIR_AT as u16).to_le_bytes());
    let mut pcir = Vec::new();
    pcir.extend_from_slice(b"PCIR");
    pcir.extend_from_slice(&EDU_VENDOR.to_le_bytes());
    pcir.extend_from_slice(&EDU_DEVICE.to_le_bytes());
    pcir.extend_from_slice(&0u16.to_le_bytes()); // no device list
    pcir.extend_from_slice(&0x18u16.to_le_bytes()); // structure length
    pcir.push(3); // structure revision (PCI 3.0)
    pcir.extend_from_slice(&[0x00, 0xff, 0x00]); // class code, as edu's
    pcir.extend_from_slice(&blocks.to_le_bytes()); // image length
    pcir.extend_from_slice(&1u16.to_le_bytes()); // code revision
    pcir.push(CODE_TYPE);
    pcir.push(0x80); // indicator: last image
    pcir.extend_from_slice(&0u16.to_le_bytes()); // max runtime image length
    rom[PCIR_AT..PCIR_AT + pcir.len()].copy_from_slice(&pcir);
    let marker = b"p2pvmm lab: edu expansion ROM";
    rom[0x40..0x40 + marker.len()].copy_from_slice(marker);
    rom[ROM_LEN - 1] = 0;
    let sum = rom.iter().fold(0u8, |s, b| s.wrapping_add(*b));
    rom[ROM_LEN - 1] = sum.wrapping_neg();
    rom
}

fn sha256(path: &Path) -> Result<String, String> {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .map_err(|e| format!("sha256sum {path:?}: {e}"))?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .filter(|h| out.status.success() && h.len() == 64)
        .map(str::to_owned)
        .ok_or(format!("sha256sum {path:?} failed: {out:?}"))
}

/// Binds edu to vfio-pci and prints its address and L1's view of its ROM resource.
const BIND: &str = r#"
EDU=$(bind_vfio 1234 11e8)
echo "L1: edu=$EDU rom resource: $(sed -n 7p /sys/bus/pci/devices/$EDU/resource)"
"#;

/// L2: finds edu, reads its ROM the way tools do (`echo 1 > rom; cat rom`), and prints what it
/// read: `ROM-SIZE`, `ROM-SHA256`, the first bytes.
const L2_SCRIPT: &str = r#"
edu=
for d in /sys/bus/pci/devices/*; do
    [ "$(cat "$d/vendor"):$(cat "$d/device")" = "0x1234:0x11e8" ] && edu=$d
done
echo "ROM-DEVICE ${edu##*/} resource: $(sed -n 7p "$edu/resource")"
echo 1 > "$edu/rom"
start=$(cut -d' ' -f1 /proc/uptime)
cat "$edu/rom" > /tmp/rom.bin
echo "ROM-READ rc=$? from uptime $start to $(cut -d' ' -f1 /proc/uptime)"
echo 0 > "$edu/rom"
echo "ROM-SIZE $(wc -c < /tmp/rom.bin)"
echo "ROM-SHA256 $(sha256sum /tmp/rom.bin | cut -d' ' -f1)"
od -A x -t x1 -N 32 /tmp/rom.bin | sed 's/^/ROM-HEAD /'
"#;

struct Lab {
    console: Console,
    /// sha256 of the ROM file L1's edu was given.
    expected: String,
}

fn run_lab() -> Result<Lab, String> {
    let dir: PathBuf = repo_root()
        .join("target/lab-work")
        .join(format!("rom-image-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {dir:?}: {e}"))?;
    let file = dir.join("edu-rom.bin");
    std::fs::write(&file, option_rom()).map_err(|e| format!("writing {file:?}: {e}"))?;
    let expected = sha256(&file)?;
    // -vv: p2pvmm logs every BAR change, the ROM's included.
    let vmm = |backend: &str, placement: &str| {
        format!(
            "p2pvmm -vv {L2} --cmdline '{L2_CMDLINE}' \
             --device path=$EDU,id=edu,backend={backend},placement={placement}"
        )
    };
    let console = run_retrying_lab_failure(&["iommufd", "legacy"], || {
        L1Run::new("rom")
            .edu_romfile(&file)
            .prelude(BIND)
            .l2_script(L2_SCRIPT)
            .scenario("iommufd", 150, &vmm("iommufd", "root-port"))
            .scenario("legacy", 150, &vmm("legacy", "root"))
            // Bounded tightly: L1 hung a few times while L2 read the ROM (README), and a hung
            // L1 costs this long before its one retry.
            .timeout_s(420)
            .run()
    })?;
    Ok(Lab { console, expected })
}

fn lab() -> &'static Result<Lab, String> {
    static LAB: OnceLock<Result<Lab, String>> = OnceLock::new();
    LAB.get_or_init(run_lab)
}

fn scenario(name: &str) -> (Scenario, &'static Lab) {
    let lab = match lab() {
        Ok(lab) => lab,
        Err(e) => panic!("the lab did not run: {e}"),
    };
    match lab.console.scenario(name) {
        Some(s) => (s, lab),
        None => panic!(
            "scenario {name} never started; L1 console:\n{}",
            lab.console
        ),
    }
}

/// The value after `key` on the first line of `s` that contains it.
fn field<'a>(s: &'a Scenario, key: &str) -> Option<&'a str> {
    s.output
        .lines()
        .find_map(|l| l.split_once(key).map(|(_, v)| v.trim()))
}

fn assert_rom_read(name: &str) {
    let (s, lab) = scenario(name);
    let console = &lab.console;
    assert_eq!(
        field(&s, "ROM-SIZE "),
        Some(ROM_LEN.to_string().as_str()),
        "{name}: bytes read from L2's sysfs rom; console:\n{console}"
    );
    assert_eq!(
        field(&s, "ROM-SHA256 "),
        Some(lab.expected.as_str()),
        "{name}: ROM contents differ from the file; console:\n{console}"
    );
    // Mapped as a trap region when L2 enabled it, unmapped when it disabled it again.
    let rom_changes: Vec<&str> = s
        .output
        .lines()
        .filter(|l| l.contains(" ROM (Mem32): "))
        .collect();
    assert!(
        rom_changes.iter().any(|l| l.contains(": none -> 0x")),
        "{name}: p2pvmm never mapped the ROM; console:\n{console}"
    );
    assert!(
        rom_changes.last().is_some_and(|l| l.ends_with("-> none")),
        "{name}: the ROM is still mapped after L2 disabled it: {rom_changes:?}"
    );
    assert!(
        s.l2_report().is_some(),
        "{name}: L2 did not finish; console:\n{console}"
    );
    assert_eq!(
        s.rc,
        Some(0),
        "{name}: p2pvmm exit status; console:\n{console}"
    );
}

#[test]
fn iommufd_l2_reads_the_edu_rom() {
    assert_rom_read("iommufd");
}

#[test]
fn legacy_l2_reads_the_edu_rom() {
    assert_rom_read("legacy");
}

#[test]
fn the_rom_image_passes_linux_checks() {
    let rom = option_rom();
    assert_eq!(rom.len(), ROM_LEN);
    assert_eq!(&rom[..2], &[0x55, 0xaa]);
    let pcir = usize::from(u16::from_le_bytes([rom[0x18], rom[0x19]]));
    assert_eq!(pcir % 4, 0);
    assert_eq!(&rom[pcir..pcir + 4], b"PCIR");
    let u16_at = |at: usize| u16::from_le_bytes([rom[at], rom[at + 1]]);
    assert_eq!(
        (u16_at(pcir + 4), u16_at(pcir + 6)),
        (EDU_VENDOR, EDU_DEVICE)
    );
    let len = u16_at(pcir + 0x0a);
    assert!(len != 0 && len != u16::MAX && pcir + usize::from(len) <= ROM_LEN);
    // One image covering the whole file: sysfs returns all of it.
    assert_eq!(usize::from(u16_at(pcir + 0x10)) * 512, ROM_LEN);
    assert_eq!(rom[pcir + 0x15] & 0x80, 0x80);
    assert_eq!(rom.iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
}
