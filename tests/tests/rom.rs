//! Expansion ROMs of passthrough functions in the nested lab: L1's edu gets an option ROM (QEMU's
//! `romfile`, generated here), p2pvmm shows it to L2 as edu's ROM BAR, and inside L2 Linux
//! enables it and reads it through sysfs. The bytes must be the file's, on both IOMMU backends,
//! and the ROM must be mapped only while L2 has it enabled.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use p2pvmm_tests::option_rom::{edu_option_rom, EDU_DEVICE, EDU_VENDOR, ROM_LEN};
use p2pvmm_tests::{repo_root, run_retrying_lab_failure, Console, L1Run, Scenario, L2_CMDLINE};

const L2: &str = "--kernel /l2/bzImage --initramfs /l2/initramfs.cpio.gz --memory 512M --cpus 1";

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
    std::fs::write(&file, edu_option_rom()).map_err(|e| format!("writing {file:?}: {e}"))?;
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
    let rom = edu_option_rom();
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
