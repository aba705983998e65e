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
        memory: MemoryConfig::of_size(ByteSize(512 * MIB)),
        serial: SerialConfig::Stdout,
        mmio64_size: None,
        kernel_decompress: KernelDecompress::Host,
        slot_zap: SlotZap::All,
        devices: Vec::new(),
        p2p_groups: Vec::new(),
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
            memory: MemoryConfig::of_size(ByteSize(512 * MIB)),
            serial: SerialConfig::Stdout,
            mmio64_size: None,
            kernel_decompress: KernelDecompress::Host,
            slot_zap: SlotZap::All,
            devices: Vec::new(),
            p2p_groups: Vec::new(),
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
    assert_eq!(loaded.vm.memory.size, ByteSize(3584 * MIB));
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
    assert_eq!(from_file.memory.size, ByteSize(GIB));

    let overridden = load_args(&["--config", file, "--cpus", "4", "--kernel", "/cli/k"])
        .unwrap()
        .vm;
    assert_eq!(overridden.kernel, PathBuf::from("/cli/k"));
    assert_eq!(overridden.cpus, 4);
    // Fields not given on the command line keep the file's values.
    assert_eq!(overridden.cmdline, "from-file");
    assert_eq!(overridden.memory.size, ByteSize(GIB));
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
             `kernel`, `initramfs`, `cmdline`, `cpus`, `memory`, `serial`, `mmio64_size`, \
             `kernel_decompress`, `slot_zap`, `device`, `p2p_group`"
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
    cfg.memory.size = ByteSize(32 * MIB);
    assert_eq!(
        cfg.validate(&BIG_HOST).unwrap_err().to_string(),
        "memory = 32M: at least 64M is required"
    );
    cfg.memory.size = ByteSize(64 * MIB);
    assert!(cfg.validate(&BIG_HOST).is_ok());

    let host = HostLimits {
        memory_bytes: 25_126_117_376, // 23.4G
        ..BIG_HOST
    };
    cfg.memory.size = ByteSize(64 * GIB);
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
        memory: MemoryConfig::of_size(ByteSize(3 * GIB / 2)),
        serial: SerialConfig::File("/tmp/guest.log".into()),
        mmio64_size: None,
        kernel_decompress: KernelDecompress::Host,
        slot_zap: SlotZap::All,
        devices: Vec::new(),
        p2p_groups: Vec::new(),
    };
    let text = toml::to_string(&cfg).unwrap();
    assert!(text.contains(r#"memory = "1536M""#), "{text}");
    assert!(text.contains(r#"serial = "file=/tmp/guest.log""#), "{text}");
    assert_eq!(toml::from_str::<VmConfig>(&text).unwrap(), cfg);

    let minimal: VmConfig = toml::from_str(r#"kernel = "/k""#).unwrap();
    assert_eq!(minimal.cpus, 1);
    assert_eq!(minimal.memory.size, ByteSize(512 * MIB));
    assert!(toml::from_str::<VmConfig>("kernel = \"/k\"\nmem = 1\n").is_err());
}

/// A device directory in a fake sysfs under `scratch`, with the attribute
/// files validation looks for.
fn fake_pci_device(scratch: &Scratch, bdf: &str) -> PathBuf {
    let dir = scratch.0.join("sys/bus/pci/devices").join(bdf);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("vendor"), "0x1af4\n").unwrap();
    fs::write(dir.join("device"), "0x1041\n").unwrap();
    dir
}

fn device(id: &str, path: PathBuf, backend: Option<IommuBackendKind>) -> DeviceConfig {
    DeviceConfig {
        id: id.into(),
        path,
        backend,
        placement: Placement::RootPort,
        clique: None,
    }
}

fn sysfs(bdf: &str) -> PathBuf {
    Path::new("/sys/bus/pci/devices").join(bdf)
}

#[test]
fn device_flags_are_added_after_file_devices() {
    let scratch = Scratch::new("devices");
    let file = scratch.write(
        "vm.toml",
        r#"
            kernel = "/k"

            [[device]]
            id = "gpu0"
            path = "0000:00:03.0"

            [[device]]
            path = "00:04.0"
            switch = "sw0"
        "#,
    );
    let file = file.to_str().unwrap();

    let from_file = load_args(&["--config", file]).unwrap().vm.devices;
    assert_eq!(
        from_file,
        [
            device("gpu0", sysfs("0000:00:03.0"), None),
            DeviceConfig {
                placement: Placement::Switch("sw0".into()),
                ..device("dev1", sysfs("0000:00:04.0"), None)
            },
        ]
    );

    let merged = load_args(&[
        "--config",
        file,
        "--device",
        "path=00:05.0",
        "--device",
        "id=gpu0,path=/sys/bus/pci/devices/0000:00:06.0,backend=legacy,placement=root",
    ])
    .unwrap()
    .vm;
    assert_eq!(
        merged.devices,
        [
            // Same id as a file device: replaces it in place.
            DeviceConfig {
                placement: Placement::Root,
                ..device(
                    "gpu0",
                    sysfs("0000:00:06.0"),
                    Some(IommuBackendKind::Legacy)
                )
            },
            from_file[1].clone(),
            // New devices come after the file's and are named by position.
            device("dev2", sysfs("0000:00:05.0"), None),
        ]
    );

    let cli_only = load_args(&["--kernel", "/k", "--device", "path=00:03.0"])
        .unwrap()
        .vm;
    assert_eq!(
        cli_only.devices,
        [device("dev0", sysfs("0000:00:03.0"), None)]
    );
}

#[test]
fn bad_device_flags_are_one_line_errors() {
    assert_eq!(
        err_text(&["--kernel", "/k", "--device", "path=00:03.0,bus=1"]),
        r#"invalid --device "path=00:03.0,bus=1": unknown key "bus" (use path, id, backend, placement or switch, clique)"#
    );
    assert_eq!(
        err_text(&["--kernel", "/k", "--device", "id=gpu0"]),
        r#"invalid --device "id=gpu0": missing key path (e.g. path=/sys/bus/pci/devices/0000:00:03.0)"#
    );
    assert_eq!(
        err_text(&["--kernel", "/k", "--device", "path=00:03.0,switch="]),
        r#"invalid --device "path=00:03.0,switch=": empty value for key switch"#
    );
    assert_eq!(
        err_text(&["--kernel", "/k", "--device", "path=00:03.0,backend=vfio"]),
        r#"invalid --device "path=00:03.0,backend=vfio": unknown IOMMU backend "vfio" (use iommufd or legacy)"#
    );
    assert_eq!(
        err_text(&[
            "--kernel",
            "/k",
            "--device",
            "path=00:03.0,placement=root-port,switch=sw0"
        ]),
        r#"invalid --device "path=00:03.0,placement=root-port,switch=sw0": placement "root-port" conflicts with switch "sw0": give only one (switch alone puts the device behind that switch)"#
    );
    assert_eq!(
        err_text(&["--kernel", "/k", "--device", "path=3.0"]),
        r#"invalid --device "path=3.0": path "3.0" is neither a sysfs directory (/sys/bus/pci/devices/0000:00:03.0) nor a PCI address (0000:00:03.0 or 00:03.0)"#
    );
}

#[test]
fn device_help_lists_every_key() {
    use clap::CommandFactory;
    let mut cli = Cli::command();
    let help = cli.render_long_help().to_string();
    for key in [
        "--device <KEY=VALUE,...>",
        "path=",
        "id=",
        "backend=iommufd|legacy",
        "placement=root-port|root",
        "switch=",
        "clique=0-15",
    ] {
        assert!(help.contains(key), "{key} missing from:\n{help}");
    }
}

#[test]
fn p2p_group_help_lists_every_key() {
    use clap::CommandFactory;
    let help = Cli::command().render_long_help().to_string();
    for key in [
        "--p2p-group <KEY=VALUE,...>",
        "name=NAME,devices=ID:ID[,mode=auto|dmabuf|legacy|off][,topology=switch|root-ports|flat]",
        "devices=ID:ID",
        "mode=auto",
        "topology=switch",
        "root-ports",
        "flat",
        "[[p2p_group]]",
    ] {
        assert!(help.contains(key), "{key} missing from:\n{help}");
    }
}

/// The example of the brief: a file with devices and groups, read as `--config`, then
/// written back out: every effective setting survives, spelled as the file spells it.
#[test]
fn p2p_config_round_trips_from_file() {
    let scratch = Scratch::new("p2p-round-trip");
    let file = scratch.write(
        "vm.toml",
        r#"
            kernel = "/boot/bzImage"
            cpus = 2
            memory = "4G"

            [[device]]
            id = "gpu0"
            path = "0000:00:03.0"
            clique = 2

            [[device]]
            id = "nic0"
            path = "00:04.0"
            placement = "root"

            [[device]]
            id = "gpu1"
            path = "00:05.0"
            backend = "legacy"

            [[device]]
            id = "lone"
            path = "00:06.0"

            [[p2p_group]]
            name = "g0"
            devices = ["gpu0", "nic0"]
            mode = "dmabuf"

            [[p2p_group]]
            name = "g1"
            devices = ["gpu1"]
            topology = "root-ports"

            [[p2p_group]]
            name = "spare"
            devices = []
            mode = "off"
            topology = "flat"
        "#,
    );
    let vm = load_args(&[
        "--config",
        file.to_str().unwrap(),
        "--p2p-group",
        "name=cli,devices=lone,topology=flat",
    ])
    .unwrap()
    .vm;
    let summary: Vec<_> = vm
        .devices
        .iter()
        .map(|d| (d.id.as_str(), d.placement.clone(), d.clique))
        .collect();
    assert_eq!(
        summary,
        [
            ("gpu0", Placement::Switch("g0".into()), Some(2)),
            ("nic0", Placement::Root, None),
            ("gpu1", Placement::RootPort, None),
            ("lone", Placement::Root, None),
        ]
    );
    let groups: Vec<_> = vm.p2p_groups.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(groups, ["g0", "g1", "spare", "cli"]);
    assert_eq!(vm.p2p_groups[2].topology, GroupTopology::Flat);

    let text = toml::to_string(&vm).unwrap();
    for line in [
        "[[p2p_group]]",
        r#"devices = ["gpu0", "nic0"]"#,
        r#"mode = "dmabuf""#,
        r#"topology = "root-ports""#,
        "devices = []",
        r#"switch = "g0""#,
        "clique = 2",
    ] {
        assert!(text.contains(line), "{line} missing from:\n{text}");
    }
    assert_eq!(toml::from_str::<VmConfig>(&text).unwrap(), vm);
    // And the text is a config file p2pvmm reads to the same VM.
    let again = scratch.write("again.toml", &text);
    let reread = load_args(&["--config", again.to_str().unwrap()])
        .unwrap()
        .vm;
    assert_eq!(reread, vm);
}

#[test]
fn devices_are_validated() {
    let scratch = Scratch::new("validate-devices");
    let mut cfg = valid_config(&scratch);
    let gpu = fake_pci_device(&scratch, "0000:00:03.0");
    let nic = fake_pci_device(&scratch, "0000:00:04.0");
    cfg.devices = vec![
        device("gpu0", gpu.clone(), Some(IommuBackendKind::Iommufd)),
        device("nic0", nic.clone(), None),
    ];
    assert!(
        cfg.validate(&BIG_HOST).is_ok(),
        "{:?}",
        cfg.validate(&BIG_HOST)
    );

    let mut mixed = cfg.clone();
    mixed.devices[1].backend = Some(IommuBackendKind::Legacy);
    mixed.p2p_groups = vec![crate::config::P2pGroupConfig {
        name: "g0".into(),
        devices: vec!["gpu0".into(), "nic0".into()],
        mode: crate::config::P2pMode::Auto,
        topology: Default::default(),
        slots: 0,
    }];
    assert_eq!(
        mixed.validate(&BIG_HOST).unwrap_err().to_string(),
        r#"p2p_group g0: devices = "nic0": backend=legacy conflicts with backend=iommufd of device gpu0 (a group is one IOMMU address space, in one backend)"#
    );

    let mut duplicate = cfg.clone();
    duplicate.devices[1].id = "gpu0".into();
    assert_eq!(
        duplicate.validate(&BIG_HOST).unwrap_err().to_string(),
        r#"device[1]: id = "gpu0": already used by device[0]"#
    );

    let mut missing = cfg.clone();
    let absent = scratch.0.join("sys/bus/pci/devices/0000:00:05.0");
    missing.devices[1].path = absent.clone();
    assert_eq!(
        missing.validate(&BIG_HOST).unwrap_err().to_string(),
        format!(
            "device nic0: path = {absent:?}: no such device (lspci -D lists the host's PCI addresses)"
        )
    );

    let mut not_pci = cfg;
    not_pci.devices[1].path = scratch.0.join("sys/bus/pci/devices");
    let msg = not_pci.validate(&BIG_HOST).unwrap_err().to_string();
    assert!(
        msg.ends_with("not a PCI device directory (it has no vendor file)"),
        "{msg}"
    );
}

#[test]
fn devices_round_trip_through_toml() {
    let mut cfg: VmConfig = toml::from_str(r#"kernel = "/k""#).unwrap();
    assert!(cfg.devices.is_empty());
    assert!(!toml::to_string(&cfg).unwrap().contains("device"));
    cfg.devices = vec![
        device(
            "gpu0",
            sysfs("0000:00:03.0"),
            Some(IommuBackendKind::Iommufd),
        ),
        DeviceConfig {
            placement: Placement::Switch("sw0".into()),
            ..device("nvme0", sysfs("0000:00:04.0"), None)
        },
        DeviceConfig {
            placement: Placement::Root,
            ..device("nic0", sysfs("0000:00:05.0"), None)
        },
    ];
    let text = toml::to_string(&cfg).unwrap();
    assert!(text.contains("[[device]]"), "{text}");
    assert!(text.contains(r#"switch = "sw0""#), "{text}");
    assert_eq!(toml::from_str::<VmConfig>(&text).unwrap(), cfg);

    // Reading a VmConfig directly applies the file's defaults too.
    let direct: VmConfig =
        toml::from_str("kernel = \"/k\"\n[[device]]\npath = \"00:03.0\"\n").unwrap();
    assert_eq!(
        direct.devices,
        [device("dev0", sysfs("0000:00:03.0"), None)]
    );
}

#[test]
fn the_64_bit_window_size_comes_from_the_flag_or_the_file_and_must_be_a_multiple_of_256g() {
    let loaded = load_args(&["--kernel", "/k", "--mmio64-size", "512G"]).unwrap();
    assert_eq!(loaded.vm.mmio64_size, Some(ByteSize(512 << 30)));
    let file = parse_file_text(
        "kernel = \"/k\"\nmmio64_size = \"768G\"\n",
        Path::new("vm.toml"),
    )
    .unwrap();
    assert_eq!(file.mmio64_size, Some(ByteSize(768 << 30)));
    let err = load_args(&["--kernel", "/k", "--mmio64-size", "lots"]).unwrap_err();
    assert!(err.to_string().contains("--mmio64-size"), "{err}");

    let scratch = Scratch::new("mmio64");
    let mut cfg = valid_config(&scratch);
    cfg.mmio64_size = Some(ByteSize(300 << 30));
    let err = cfg.validate(&BIG_HOST).unwrap_err().to_string();
    assert!(
        err.starts_with("mmio64_size = ") && err.contains("multiple of 256"),
        "{err}"
    );
    assert!(!err.contains('\n'));
    cfg.mmio64_size = Some(ByteSize(0));
    assert!(cfg.validate(&BIG_HOST).is_err());
    cfg.mmio64_size = Some(ByteSize(512 << 30));
    assert!(cfg.validate(&BIG_HOST).is_ok());
}

#[test]
fn slot_zap_comes_from_the_file_and_the_flag_wins() {
    let scratch = Scratch::new("slot-zap");
    let file = scratch.write("vm.toml", "kernel = \"/k\"\nslot_zap = \"slot\"\n");
    let path = file.to_str().unwrap();
    let loaded = load_args(&["--config", path]).unwrap();
    assert_eq!(loaded.vm.slot_zap, SlotZap::Slot);
    let loaded = load_args(&["--config", path, "--slot-zap", "all"]).unwrap();
    assert_eq!(loaded.vm.slot_zap, SlotZap::All);
    assert_eq!(
        load_args(&["--kernel", "/k"]).unwrap().vm.slot_zap,
        SlotZap::All
    );
    let msg = err_text(&["--kernel", "/k", "--slot-zap", "some"]);
    assert!(
        msg.contains("--slot-zap") && msg.contains("use all or slot"),
        "{msg}"
    );
}

#[test]
fn kernel_decompress_comes_from_the_file_and_the_flag_wins() {
    let scratch = Scratch::new("kernel-decompress");
    let file = scratch.write(
        "vm.toml",
        "kernel = \"/k\"\nkernel_decompress = \"guest\"\n",
    );
    let path = file.to_str().unwrap();
    let loaded = load_args(&["--config", path]).unwrap();
    assert_eq!(loaded.vm.kernel_decompress, KernelDecompress::Guest);
    let loaded = load_args(&["--config", path, "--kernel-decompress", "host"]).unwrap();
    assert_eq!(loaded.vm.kernel_decompress, KernelDecompress::Host);
    let msg = err_text(&["--kernel", "/k", "--kernel-decompress", "later"]);
    assert!(
        msg.contains("--kernel-decompress") && msg.contains("use host or guest"),
        "{msg}"
    );
}
