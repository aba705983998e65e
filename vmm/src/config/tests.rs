//! End-to-end tests of the configuration layer: argument lists and files in,
//! `VmConfig` or one-line errors out.

use std::fs;
use std::path::{Path, PathBuf};

use super::*;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// A scratch directory removed on drop; unique per test so tests can run
/// in parallel.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("p2pvmm-cfg-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        fs::write(&path, contents).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn load_args(args: &[&str]) -> Result<LoadedConfig, ConfigError> {
    load(std::iter::once("p2pvmm").chain(args.iter().copied()))
}

fn err_text(args: &[&str]) -> String {
    match load_args(args) {
        Ok(cfg) => panic!("expected an error for {args:?}, got {cfg:?}"),
        Err(err) => err.to_string(),
    }
}

/// A host with plenty of room, so only the property under test can fail.
const BIG_HOST: HostLimits = HostLimits {
    memory_bytes: 64 * GIB,
    max_vcpus: 254,
};

/// A config whose kernel exists, for validation tests.
fn valid_config(scratch: &Scratch) -> VmConfig {
    VmConfig {
        kernel: scratch.write("bzImage", "kernel"),
        initramfs: None,
        cmdline: "console=ttyS0".into(),
        cpus: 2,
        memory: ByteSize(512 * MIB),
        serial: SerialConfig::Stdout,
    }
}

#[test]
fn defaults_apply_when_only_kernel_is_given() {
    let loaded = load_args(&["--kernel", "/boot/vmlinuz"]).unwrap();
    assert_eq!(
        loaded.vm,
        VmConfig {
            kernel: "/boot/vmlinuz".into(),
            initramfs: None,
            cmdline: String::new(),
            cpus: 1,
            memory: ByteSize(512 * MIB),
            serial: SerialConfig::Stdout,
        }
    );
    assert_eq!(loaded.verbosity, 0);
    assert_eq!(loaded.log_level(), log::LevelFilter::Warn);
}

#[test]
fn all_flags_are_applied() {
    let loaded = load_args(&[
        "--kernel",
        "/k",
        "--initramfs",
        "/i",
        "--cmdline",
        "console=ttyS0 panic=1",
        "--cpus",
        "8",
        "--memory",
        "3584M",
        "--serial",
        "off",
        "-vv",
    ])
    .unwrap();
    assert_eq!(loaded.vm.initramfs.as_deref(), Some(Path::new("/i")));
    assert_eq!(loaded.vm.cmdline, "console=ttyS0 panic=1");
    assert_eq!(loaded.vm.cpus, 8);
    assert_eq!(loaded.vm.memory, ByteSize(3584 * MIB));
    assert_eq!(loaded.vm.serial, SerialConfig::Off);
    assert_eq!(loaded.log_level(), log::LevelFilter::Debug);
}

#[test]
fn cli_overrides_file_field_by_field() {
    let scratch = Scratch::new("override");
    let file = scratch.write(
        "vm.toml",
        r#"
            kernel = "/file/bzImage"
            cmdline = "from-file"
            cpus = 2
            memory = "1G"
            serial = "off"
        "#,
    );
    let file = file.to_str().unwrap();

    let from_file = load_args(&["--config", file]).unwrap().vm;
    assert_eq!(from_file.kernel, PathBuf::from("/file/bzImage"));
    assert_eq!(from_file.cpus, 2);
    assert_eq!(from_file.memory, ByteSize(GIB));

    let overridden = load_args(&["--config", file, "--cpus", "4", "--kernel", "/cli/k"])
        .unwrap()
        .vm;
    assert_eq!(overridden.kernel, PathBuf::from("/cli/k"));
    assert_eq!(overridden.cpus, 4);
    // Fields not given on the command line keep the file's values.
    assert_eq!(overridden.cmdline, "from-file");
    assert_eq!(overridden.memory, ByteSize(GIB));
    assert_eq!(overridden.serial, SerialConfig::Off);
    // Fields in neither source get defaults.
    assert_eq!(overridden.initramfs, None);
}

#[test]
fn kernel_is_required_from_somewhere() {
    assert_eq!(
        err_text(&["--cpus", "2"]),
        r#"--kernel is required (or set kernel = "PATH" in the --config file)"#
    );
    let scratch = Scratch::new("nokernel");
    let file = scratch.write("vm.toml", "cpus = 2\n");
    assert!(matches!(
        load_args(&["--config", file.to_str().unwrap()]),
        Err(ConfigError::MissingKernel)
    ));
    assert!(load_args(&["--config", file.to_str().unwrap(), "--kernel", "/k"]).is_ok());
}

#[test]
fn unknown_key_in_file_is_rejected() {
    let scratch = Scratch::new("unknown");
    let file = scratch.write("vm.toml", "kernel = \"/k\"\ncpu = 4\n");
    let path = file.to_str().unwrap();
    let msg = err_text(&["--config", path]);
    assert_eq!(
        msg,
        format!(
            "config file {file:?}, line 2: unknown field `cpu`, expected one of \
             `kernel`, `initramfs`, `cmdline`, `cpus`, `memory`, `serial`"
        )
    );
}

#[test]
fn malformed_size_is_reported_with_the_flag() {
    assert_eq!(
        err_text(&["--kernel", "/k", "--memory", "12Q"]),
        r#"invalid --memory "12Q": unknown size suffix "Q" (use K, M, G or T)"#
    );
    assert_eq!(
        err_text(&["--kernel", "/k", "--memory", "1.5G"]),
        r#"invalid --memory "1.5G": fractional sizes are not supported; use a smaller unit (e.g. 1536M, not 1.5G)"#
    );
}

#[test]
fn usage_errors_are_passed_through_for_clap_to_print() {
    match load_args(&["--kernal", "/k"]) {
        Err(ConfigError::Usage(err)) => {
            assert_eq!(err.kind(), clap::error::ErrorKind::UnknownArgument);
        }
        other => panic!("expected a usage error, got {other:?}"),
    }
    let msg = err_text(&["--kernal", "/k"]);
    assert_eq!(msg, "unexpected argument '--kernal' found");
    match load_args(&["--help"]) {
        Err(ConfigError::Usage(err)) => {
            assert_eq!(err.kind(), clap::error::ErrorKind::DisplayHelp);
        }
        other => panic!("expected help, got {other:?}"),
    }
}

#[test]
fn valid_config_passes() {
    let scratch = Scratch::new("valid");
    let mut cfg = valid_config(&scratch);
    cfg.initramfs = Some(scratch.write("initrd", "ramdisk"));
    assert!(
        cfg.validate(&BIG_HOST).is_ok(),
        "{:?}",
        cfg.validate(&BIG_HOST)
    );
}

#[test]
fn zero_and_too_many_cpus_are_rejected() {
    let scratch = Scratch::new("cpus");
    let mut cfg = valid_config(&scratch);
    cfg.cpus = 0;
    assert_eq!(
        cfg.validate(&BIG_HOST).unwrap_err().to_string(),
        "cpus = 0: at least one vCPU is required"
    );
    cfg.cpus = 9;
    let small_host = HostLimits {
        max_vcpus: 8,
        ..BIG_HOST
    };
    assert_eq!(
        cfg.validate(&small_host).unwrap_err().to_string(),
        "cpus = 9: exceeds the host's KVM limit of 8 vCPUs"
    );
    cfg.cpus = 8;
    assert!(cfg.validate(&small_host).is_ok());
}

#[test]
fn memory_too_small_or_too_large_is_rejected() {
    let scratch = Scratch::new("memory");
    let mut cfg = valid_config(&scratch);
    cfg.memory = ByteSize(32 * MIB);
    assert_eq!(
        cfg.validate(&BIG_HOST).unwrap_err().to_string(),
        "memory = 32M: at least 64M is required"
    );
    cfg.memory = ByteSize(64 * MIB);
    assert!(cfg.validate(&BIG_HOST).is_ok());

    let host = HostLimits {
        memory_bytes: 25_126_117_376, // 23.4G
        ..BIG_HOST
    };
    cfg.memory = ByteSize(64 * GIB);
    assert_eq!(
        cfg.validate(&host).unwrap_err().to_string(),
        "memory = 64G: exceeds host memory 23.4G"
    );
}

#[test]
fn missing_or_unreadable_kernel_is_rejected() {
    let scratch = Scratch::new("kernel");
    let mut cfg = valid_config(&scratch);
    cfg.kernel = "/nope/bzImage".into();
    assert_eq!(
        cfg.validate(&BIG_HOST).unwrap_err().to_string(),
        r#"kernel "/nope/bzImage": No such file or directory (os error 2)"#
    );
    cfg.kernel = scratch.0.clone();
    assert!(matches!(
        cfg.validate(&BIG_HOST),
        Err(ConfigError::NotAFile {
            field: "kernel",
            ..
        })
    ));
}

#[test]
fn missing_initramfs_is_rejected() {
    let scratch = Scratch::new("initramfs");
    let mut cfg = valid_config(&scratch);
    let missing = scratch.0.join("initrd.img");
    cfg.initramfs = Some(missing.clone());
    assert_eq!(
        cfg.validate(&BIG_HOST).unwrap_err().to_string(),
        format!("initramfs {missing:?}: No such file or directory (os error 2)")
    );
}

#[test]
fn vm_config_round_trips_through_toml() {
    let cfg = VmConfig {
        kernel: "/boot/bzImage".into(),
        initramfs: Some("/boot/initrd".into()),
        cmdline: "console=ttyS0".into(),
        cpus: 4,
        memory: ByteSize(3 * GIB / 2),
        serial: SerialConfig::File("/tmp/guest.log".into()),
    };
    let text = toml::to_string(&cfg).unwrap();
    assert!(text.contains(r#"memory = "1536M""#), "{text}");
    assert!(text.contains(r#"serial = "file=/tmp/guest.log""#), "{text}");
    assert_eq!(toml::from_str::<VmConfig>(&text).unwrap(), cfg);

    let minimal: VmConfig = toml::from_str(r#"kernel = "/k""#).unwrap();
    assert_eq!(minimal.cpus, 1);
    assert_eq!(minimal.memory, ByteSize(512 * MIB));
    assert!(toml::from_str::<VmConfig>("kernel = \"/k\"\nmem = 1\n").is_err());
}
