//! Building the lab pieces and booting L1.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::console::Console;

/// The workspace root (tests/ is one level down).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

fn run_checked(cmd: &mut Command, what: &str) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("{what}: cannot start {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{what} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The lab bzImage (L1 and L2 kernel), built once and cached by `resources/lab-kernel.sh`.
/// `resources/setup.sh` runs first, so the test command works on a fresh machine too: it
/// installs the lab's missing Debian packages (seconds when nothing is missing).
pub fn lab_kernel() -> Result<PathBuf, String> {
    static KERNEL: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    KERNEL
        .get_or_init(|| {
            let setup = repo_root().join("resources/setup.sh");
            run_checked(&mut Command::new(setup), "setting up the lab")?;
            let script = repo_root().join("resources/lab-kernel.sh");
            let out = run_checked(&mut Command::new(script), "building the lab kernel")?;
            let path = out
                .lines()
                .last()
                .map(|l| PathBuf::from(l.trim()))
                .ok_or("lab-kernel.sh printed no path")?;
            path.is_file()
                .then_some(path.clone())
                .ok_or(format!("lab kernel {path:?} does not exist"))
        })
        .clone()
}

/// The lab kernel as an ELF `vmlinux`, for the ELF boot path: the XZ stream inside the bzImage,
/// decompressed (what the kernel's `scripts/extract-vmlinux` does). Written once per test process
/// to `target/lab/vmlinux`.
pub fn lab_vmlinux() -> Result<PathBuf, String> {
    static VMLINUX: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    VMLINUX
        .get_or_init(|| {
            let bzimage = lab_kernel()?;
            let image = std::fs::read(&bzimage).map_err(|e| format!("reading {bzimage:?}: {e}"))?;
            const XZ_MAGIC: &[u8] = b"\xfd7zXZ\x00";
            let at = image
                .windows(XZ_MAGIC.len())
                .position(|w| w == XZ_MAGIC)
                .ok_or(format!("{bzimage:?} holds no XZ stream (CONFIG_KERNEL_XZ)"))?;
            let mut xz = Command::new("xz")
                .args(["-dc", "--single-stream"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .map_err(|e| format!("starting xz: {e}"))?;
            let mut stdin = xz.stdin.take().ok_or("xz has no stdin")?;
            let payload = image[at..].to_vec();
            let feeder = std::thread::spawn(move || {
                use std::io::Write;
                // xz stops reading at the end of the stream; the rest of the image is not ours.
                let _ = stdin.write_all(&payload);
            });
            let out = xz.wait_with_output().map_err(|e| format!("xz: {e}"))?;
            let _ = feeder.join();
            if !out.stdout.starts_with(b"\x7fELF") {
                return Err(format!(
                    "the XZ stream of {bzimage:?} is not an ELF image ({})",
                    out.status
                ));
            }
            let dir = repo_root().join("target/lab");
            std::fs::create_dir_all(&dir).map_err(|e| format!("creating {dir:?}: {e}"))?;
            let path = dir.join("vmlinux");
            std::fs::write(&path, &out.stdout).map_err(|e| format!("writing {path:?}: {e}"))?;
            Ok(path)
        })
        .clone()
}

/// Builds `bin` of `package` statically linked (L1 and L2 initramfs images have no libraries),
/// in its own target directory so it does not wait on the outer `cargo test` lock.
fn static_binary(package: &str, bin: &str) -> Result<PathBuf, String> {
    let root = repo_root();
    let target_dir = root.join("target/lab");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run_checked(
        Command::new(cargo)
            .current_dir(&root)
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .args(["build", "--release", "-p", package, "--bin", bin])
            .args(["--target", "x86_64-unknown-linux-gnu", "--target-dir"])
            .arg(&target_dir),
        &format!("building the static {bin}"),
    )?;
    Ok(target_dir
        .join("x86_64-unknown-linux-gnu/release")
        .join(bin))
}

/// p2pvmm for L1, built once per test process.
pub fn p2pvmm_static() -> Result<PathBuf, String> {
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BINARY
        .get_or_init(|| static_binary("vmm", "p2pvmm"))
        .clone()
}

/// `edu-dma` (tests/src/bin) for the L2 initramfs, built once per test process.
pub fn edu_dma_static() -> Result<PathBuf, String> {
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BINARY
        .get_or_init(|| static_binary("p2pvmm-tests", "edu-dma"))
        .clone()
}

/// `bar-walk` (tests/src/bin) for the L2 initramfs, built once per test process.
pub fn bar_walk_static() -> Result<PathBuf, String> {
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BINARY
        .get_or_init(|| static_binary("p2pvmm-tests", "bar-walk"))
        .clone()
}

/// `bar-move-time` (tests/src/bin) for the L2 initramfs, built once per test process.
pub fn bar_move_time_static() -> Result<PathBuf, String> {
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BINARY
        .get_or_init(|| static_binary("p2pvmm-tests", "bar-move-time"))
        .clone()
}

/// `api-probe` (tests/src/bin) for the L1 initramfs, built once per test process.
pub fn api_probe_static() -> Result<PathBuf, String> {
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BINARY
        .get_or_init(|| static_binary("p2pvmm-tests", "api-probe"))
        .clone()
}

/// `msix-probe` (tests/src/bin) for the L2 initramfs, built once per test process.
pub fn msix_probe_static() -> Result<PathBuf, String> {
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BINARY
        .get_or_init(|| static_binary("p2pvmm-tests", "msix-probe"))
        .clone()
}

/// `vcpu-hammer` (tests/src/bin) for the L2 initramfs, built once per test process.
pub fn vcpu_hammer_static() -> Result<PathBuf, String> {
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BINARY
        .get_or_init(|| static_binary("p2pvmm-tests", "vcpu-hammer"))
        .clone()
}

/// The L2 initramfs (runs `/lab/l2.sh` if given, prints the `P2PVMM-L2:` report, then powers
/// off or reboots), with `files` added.
fn l2_initramfs(work: &Path, files: &[(PathBuf, String)]) -> Result<PathBuf, String> {
    let out = work.join("l2.cpio.gz");
    let mut mk = Command::new(repo_root().join("resources/mkinitramfs.sh"));
    mk.arg("l2").arg(&out);
    for (src, dest) in files {
        mk.arg("--add").arg(format!("{}:{dest}", src.display()));
    }
    run_checked(&mut mk, "building the L2 initramfs")?;
    Ok(out)
}

/// Shell functions every L1 script has: `scenario NAME LIMIT CMD...` runs a bounded command
/// between markers the harness parses (a few seconds before the limit, a command still running
/// gets `SCENARIO-STUCK` lines: what each p2pvmm thread waits on and L1's last kernel messages,
/// evidence for a hang seen only on another machine); `bind_vfio VENDOR DEVICE` binds the first
/// function with those IDs to vfio-pci (the Nth with `bind_vfio VENDOR DEVICE N`) and prints its
/// address (non-zero status when there is none).
const L1_PROLOGUE: &str = r#"
# L1's kernel messages stay in dmesg, off the console. Twice (CI and a local run) L1's console
# stopped for good in the middle of a 2-vCPU L2's boot log, right after L1's KVM printed to the
# console: nothing more came, not even the SCENARIO-STUCK report, until the silence watchdog.
# Kernel console writes racing the tty's interrupt-driven output are the suspect; failing
# scenarios print the dmesg tail instead (SCENARIO-DMESG).
dmesg -n 1
# No page migration under running L2s: twice an L2 with RAM above 4 GiB (3.5 GiB, 2 vCPUs) oopsed
# jumping into its own heap at a high address (cmos_init; once during PCI enumeration), as if it
# read stale memory. L1's khugepaged and compaction move the pages behind an L2, and the nested
# page tables that emulated SVM keeps must follow; the suspect is that path, not p2pvmm (the same
# L2 passes on most runs). Cheap to rule out: L1 keeps its pages where they are.
echo never > /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null
echo 0 > /proc/sys/vm/compaction_proactiveness 2>/dev/null
stuck_report() {
    for p in $(pidof p2pvmm); do
        for t in /proc/$p/task/*; do
            echo "SCENARIO-STUCK $1: p2pvmm[$p] $(cat $t/comm) state=$(cut -d' ' -f3 $t/stat) wchan=$(cat $t/wchan)"
        done
    done
    dmesg | tail -n 20 | sed "s/^/SCENARIO-STUCK $1: dmesg: /"
}
scenario() {
    name=$1; limit=$2; shift 2
    echo "SCENARIO-BEGIN $name"
    (sleep $((limit > 10 ? limit - 5 : limit - 1)); stuck_report "$name") &
    watchdog=$!
    timeout "$limit" "$@" 2>&1
    rc=$?
    kill $watchdog 2>/dev/null
    [ $rc -ne 0 ] && dmesg | tail -n 8 | sed "s/^/SCENARIO-DMESG $name: /"
    seccomp_report "$name"
    echo "SCENARIO-END $name rc=$rc"
}
# The kernel's audit records of system calls a `--seccomp log` filter let through (type 1326,
# with the thread's name and the call's number), new since the last scenario.
seccomp_seen=0
seccomp_report() {
    n=$(dmesg | grep -c 'type=1326')
    if [ "$n" -gt "$seccomp_seen" ]; then
        dmesg | grep 'type=1326' | tail -n $((n - seccomp_seen)) | sed "s/^/SCENARIO-SECCOMP $1: /"
        seccomp_seen=$n
    fi
}
# Audit records reach dmesg through printk's rate limit (10 per 5 s) unless it is lifted.
echo 0 > /proc/sys/kernel/printk_ratelimit 2>/dev/null
bind_vfio() {
    skip=$((${3:-1} - 1))
    for d in /sys/bus/pci/devices/*; do
        [ "$(cat "$d/vendor"):$(cat "$d/device")" = "0x$1:0x$2" ] || continue
        [ $skip -gt 0 ] && { skip=$((skip - 1)); continue; }
        bdf=${d##*/}
        echo vfio-pci > "$d/driver_override"
        [ -e "$d/driver" ] && echo "$bdf" > "$d/driver/unbind"
        echo "$bdf" > /sys/bus/pci/drivers_probe
        echo "$bdf"
        return 0
    done
    return 1
}
"#;

/// L1 prelude lines binding L1's first edu and first ivshmem to vfio-pci, as `$EDU` and `$SHM`.
pub const BIND_EDU_AND_IVSHMEM: &str = r#"
EDU=$(bind_vfio 1234 11e8 1)
SHM=$(bind_vfio 1af4 1110 1)
echo "L1: edu=$EDU ivshmem=$SHM"
"#;

/// Shell functions every L2 script can use: `find_dev VENDOR:DEVICE` (`0x1af4:0x1110`) prints
/// the BDF of the first such function in L2's sysfs.
pub const L2_HELPERS: &str = r#"
find_dev() {
    for d in /sys/bus/pci/devices/*; do
        [ "$(cat $d/vendor):$(cat $d/device)" = "$1" ] && { echo ${d##*/}; return; }
    done
}
"#;

/// The L2 kernel command line every lab test starts from. `lapic=notscdeadline`: with the
/// TSC-deadline timer, L2's timers stop firing when the machine running the lab is busy (measured:
/// with two CPU hogs on the host, L2 hung in a 10 ms `sleep` for minutes while L1 sat idle; with
/// the LAPIC one-shot timer ten such sleeps took 0.34 s). L1's KVM emulates the deadline timer in
/// software on top of QEMU TCG's emulated SVM; the one-shot timer takes a path that keeps working.
pub const L2_CMDLINE: &str = "console=ttyS0 panic=-1 lapic=notscdeadline";

/// How [`L1Run::run`]'s error starts when QEMU had to be killed: L1 itself stopped making
/// progress (seen once here with the machine loaded: one L1 vCPU spinning, L1's userspace
/// starved), a lab failure worth one retry.
pub const L1_TIMED_OUT: &str = "L1 timed out";

/// What L1 keeps besides its L2's RAM: its kernel, the initramfs (L2 kernel and images included,
/// in RAM), p2pvmm and page tables. Measured: an L2 of 3584 MiB in an L1 of 4096 MiB (3527080 kB
/// available) took 69 s to boot or froze; with 6144 MiB it booted in 23.6 s.
const L1_OVERHEAD_MIB: u32 = 2560;

/// The L1 RAM (MiB) a scenario command needs: its largest `--memory SIZE` (`512M`, `4G`) plus
/// [`L1_OVERHEAD_MIB`]; 0 when it names no size.
pub fn l1_mem_for(command: &str) -> u32 {
    let words: Vec<&str> = command.split_whitespace().collect();
    let sizes = words
        .windows(2)
        .filter(|w| w[0] == "--memory")
        .filter_map(|w| {
            let v = w[1].trim_matches(|c| c == '\'' || c == '"');
            let (num, unit) = v.split_at(v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len()));
            let n: u32 = num.parse().ok()?;
            match unit {
                "M" | "m" => Some(n),
                "G" | "g" => n.checked_mul(1024),
                _ => None,
            }
        });
    sizes.max().map_or(0, |m| m.saturating_add(L1_OVERHEAD_MIB))
}

/// One boot of L1 running a script of scenarios.
pub struct L1Run {
    name: String,
    script: String,
    files: Vec<(PathBuf, String)>,
    l2_files: Vec<(PathBuf, String)>,
    l2_script: Option<String>,
    mem_mib: u32,
    timeout_s: u32,
    qemu_args: Vec<String>,
    edu_romfile: Option<PathBuf>,
}

impl L1Run {
    /// A run whose L1 has p2pvmm at `/usr/bin/p2pvmm` and the L2 kernel and initramfs at
    /// `/l2/bzImage` and `/l2/initramfs.cpio.gz`.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            script: String::from(L1_PROLOGUE),
            files: Vec::new(),
            l2_files: Vec::new(),
            l2_script: None,
            mem_mib: 4096,
            timeout_s: 900,
            qemu_args: Vec::new(),
            edu_romfile: None,
        }
    }

    /// Adds shell lines that run in L1 before the scenarios (device binding, set-up).
    pub fn prelude(mut self, lines: &str) -> Self {
        self.script.push_str(lines);
        self.script.push('\n');
        self
    }

    /// Adds a file to the L2 initramfs.
    pub fn l2_file(mut self, src: impl Into<PathBuf>, dest: &str) -> Self {
        self.l2_files.push((src.into(), dest.to_owned()));
        self
    }

    /// Sets `/lab/l2.sh`, which the L2 init runs before its report line, after
    /// [`L2_HELPERS`].
    pub fn l2_script(mut self, script: &str) -> Self {
        self.l2_script = Some(format!("{L2_HELPERS}\n{script}"));
        self
    }

    /// Adds a scenario: `command` (a shell command line run in L1) bounded by `limit_s`. L1 grows
    /// to hold the largest L2 the scenarios ask for (`--memory`, see [`l1_mem_for`]).
    pub fn scenario(mut self, name: &str, limit_s: u32, command: &str) -> Self {
        let _ = writeln!(self.script, "scenario {name} {limit_s} {command}");
        self.mem_mib = self.mem_mib.max(l1_mem_for(command));
        self
    }

    /// Adds a file to L1's initramfs.
    pub fn file(mut self, src: impl Into<PathBuf>, dest: &str) -> Self {
        self.files.push((src.into(), dest.to_owned()));
        self
    }

    /// Adds arguments to L1's QEMU command line, e.g. `["-device", "e1000e"]` for another
    /// device to pass through (it appears after edu and ivshmem on L1's bus).
    pub fn qemu_args(mut self, args: &[&str]) -> Self {
        self.qemu_args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Gives L1's edu an expansion ROM holding `file` (an option ROM image: Linux reads only
    /// images with a valid 0x55AA header and PCIR structure, and VFIO reports no ROM otherwise).
    pub fn edu_romfile(mut self, file: impl Into<PathBuf>) -> Self {
        self.edu_romfile = Some(file.into());
        self
    }

    pub fn mem_mib(mut self, mem: u32) -> Self {
        self.mem_mib = mem;
        self
    }

    pub fn timeout_s(mut self, timeout: u32) -> Self {
        self.timeout_s = timeout;
        self
    }

    /// Builds everything, boots L1 and returns its console. Fails only when the lab itself
    /// could not be built or started; what the scenarios did is for the caller to judge.
    pub fn run(self) -> Result<Console, String> {
        let kernel = lab_kernel()?;
        let p2pvmm = p2pvmm_static()?;
        let work = repo_root().join("target/lab-work").join(format!(
            "{}-{}",
            self.name,
            std::process::id()
        ));
        std::fs::create_dir_all(&work).map_err(|e| format!("creating {work:?}: {e}"))?;
        let mut l2_files = self.l2_files.clone();
        if let Some(text) = &self.l2_script {
            let path = work.join("l2.sh");
            std::fs::write(&path, text).map_err(|e| format!("writing {path:?}: {e}"))?;
            l2_files.push((path, "/lab/l2.sh".to_owned()));
        }
        let l2 = l2_initramfs(&work, &l2_files)?;
        let script = work.join("run.sh");
        // Every p2pvmm in the lab runs with its seccomp filters (`--seccomp true`, the default);
        // P2PVMM_LAB_SECCOMP=log on the host makes them log instead (SCENARIO-SECCOMP lines).
        let text = match std::env::var("P2PVMM_LAB_SECCOMP") {
            Ok(mode) => format!("export P2PVMM_SECCOMP={mode}\n{}", self.script),
            Err(_) => self.script.clone(),
        };
        std::fs::write(&script, &text).map_err(|e| format!("writing {script:?}: {e}"))?;

        let l1 = work.join("l1.cpio.gz");
        let mut mk = Command::new(repo_root().join("resources/mkinitramfs.sh"));
        mk.arg("l1").arg(&l1);
        let mut add = |src: &Path, dest: &str| {
            mk.arg("--add").arg(format!("{}:{dest}", src.display()));
        };
        add(&p2pvmm, "/usr/bin/p2pvmm");
        add(&kernel, "/l2/bzImage");
        add(&l2, "/l2/initramfs.cpio.gz");
        add(&script, "/lab/run.sh");
        for (src, dest) in &self.files {
            add(src, dest);
        }
        run_checked(&mut mk, "building the L1 initramfs")?;

        let log = work.join("l1-console.log");
        // A retried run keeps the earlier console next to it (l1-console.1.log, ...).
        if log.exists() {
            let kept = (1..)
                .map(|n| work.join(format!("l1-console.{n}.log")))
                .find(|p| !p.exists());
            if let Some(kept) = kept {
                let _ = std::fs::rename(&log, kept);
            }
        }
        let mut qemu = Command::new(repo_root().join("resources/run-l1.sh"));
        for arg in &self.qemu_args {
            qemu.arg("--qemu-arg").arg(arg);
        }
        if let Some(rom) = &self.edu_romfile {
            let rom = std::path::absolute(rom).map_err(|e| format!("{rom:?}: {e}"))?;
            qemu.arg("--edu-romfile").arg(rom);
        }
        let out = qemu
            .arg("--kernel")
            .arg(&kernel)
            .arg("--initrd")
            .arg(&l1)
            .args(["--mem", &self.mem_mib.to_string()])
            .args(["--timeout", &self.timeout_s.to_string()])
            .arg("--log")
            .arg(&log)
            .output()
            .map_err(|e| format!("starting L1: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
        let console = Console { text };
        if out.status.code() == Some(124) {
            return Err(format!(
                "{L1_TIMED_OUT} (limit {} s; {}); console:\n{}",
                self.timeout_s,
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .filter(|l| l.contains("TIMEOUT"))
                    .collect::<Vec<_>>()
                    .join("; "),
                console
            ));
        }
        Ok(console)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn l1_grows_with_the_largest_l2() {
        assert_eq!(
            l1_mem_for("p2pvmm --memory 3584M --cpus 2"),
            3584 + L1_OVERHEAD_MIB
        );
        assert_eq!(l1_mem_for("p2pvmm --memory 2G"), 2048 + L1_OVERHEAD_MIB);
        assert_eq!(l1_mem_for("p2pvmm --cpus 1"), 0);
        let run = L1Run::new("x").scenario("big", 10, "p2pvmm --memory 3584M");
        assert_eq!(run.mem_mib, 3584 + L1_OVERHEAD_MIB);
        let run = L1Run::new("x").scenario("small", 10, "p2pvmm --memory 512M");
        assert_eq!(run.mem_mib, 4096);
    }
}
