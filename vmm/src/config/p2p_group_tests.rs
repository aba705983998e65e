//! Tests of P2P groups that need no host: flags and tables in, `VmConfig`, domains, cliques
//! or one-line errors out. The host checks are tested in `device_check.rs`.

use super::*;
use crate::config::Cli;
use clap::Parser;

/// Loads `--kernel /k` plus `args` and applies the group rules.
fn load(args: &[&str]) -> Result<VmConfig, ConfigError> {
    let mut argv = vec!["p2pvmm", "--kernel", "/k"];
    argv.extend_from_slice(args);
    let vm = Cli::try_parse_from(argv)
        .map_err(ConfigError::Usage)?
        .into_config()?
        .vm;
    check_group_rules(&vm)?;
    Ok(vm)
}

fn err(args: &[&str]) -> String {
    match load(args) {
        Ok(vm) => panic!("expected an error for {args:?}, got {vm:?}"),
        Err(e) => e.to_string(),
    }
}

/// Devices gpu0 and nic0 followed by `extra`.
fn with_two<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "--device",
        "path=00:03.0,id=gpu0",
        "--device",
        "path=00:04.0,id=nic0",
    ];
    v.extend_from_slice(extra);
    v
}

/// A vendor source for [`VmConfig::clique_of`]: NVIDIA for `ids`, another vendor otherwise.
fn nvidia<'a>(ids: &'a [&'a str]) -> impl Fn(&DeviceConfig) -> Option<u16> + 'a {
    move |d| {
        Some(if ids.contains(&d.id.as_str()) {
            NVIDIA_VENDOR
        } else {
            0x1af4
        })
    }
}

#[test]
fn the_flag_takes_every_key() {
    let g = parse_flag("name=g0,devices=gpu0:nic0,mode=dmabuf,topology=root-ports").unwrap();
    assert_eq!(
        g,
        P2pGroupConfig {
            name: "g0".into(),
            devices: vec!["gpu0".into(), "nic0".into()],
            mode: P2pMode::Dmabuf,
            topology: GroupTopology::RootPorts,
            slots: 0,
        }
    );
    for spec in ["name=g1", "name=g1,devices="] {
        let g = parse_flag(spec).unwrap();
        assert!(g.devices.is_empty(), "{spec}");
        assert_eq!((g.mode, g.topology), (P2pMode::Auto, GroupTopology::Switch));
    }
    for (mode, want) in [
        ("auto", P2pMode::Auto),
        ("legacy", P2pMode::Legacy),
        ("off", P2pMode::Off),
    ] {
        let g = parse_flag(&format!("name=g,mode={mode},topology=flat")).unwrap();
        assert_eq!((g.mode, g.topology), (want, GroupTopology::Flat));
    }
}

#[test]
fn bad_flags_name_the_key() {
    let e = |spec: &str| parse_flag(spec).unwrap_err();
    assert_eq!(
        e("name=g0,mode=sideways"),
        r#"unknown mode "sideways" (use auto, dmabuf, legacy or off)"#
    );
    assert_eq!(
        e("name=g0,topology=ring"),
        r#"unknown topology "ring" (use switch, root-ports or flat)"#
    );
    assert_eq!(
        e("name=g0,ports=2"),
        r#"unknown key "ports" (use name, devices, mode, topology, slots)"#
    );
    assert_eq!(e("name=g0,slots=17"), r#"slots "17": expected 0 to 16"#);
    assert_eq!(e("name=g0,slots=-1"), r#"slots "-1": expected 0 to 16"#);
    assert_eq!(parse_flag("name=g,devices=edu0,slots=2").unwrap().slots, 2);
    assert_eq!(e("devices=a"), "missing key name (e.g. name=g0)");
    assert_eq!(e("name=g0,name=g1"), "key name given twice");
    assert_eq!(e("name="), "empty value for key name");
    assert_eq!(e("name=g0,mode="), "empty value for key mode");
    assert_eq!(
        e("name=g0,devices=a::b"),
        r#"devices "a::b" has an empty id (separate ids with one ':')"#
    );
    assert_eq!(
        e("name=g0,gpu0"),
        r#""gpu0" is not KEY=VALUE (keys: name, devices, mode, topology, slots)"#
    );
    // Through the command line, the flag and its value lead.
    assert_eq!(
        err(&["--p2p-group", "name=g0,ports=2"]),
        r#"invalid --p2p-group "name=g0,ports=2": unknown key "ports" (use name, devices, mode, topology, slots)"#
    );
}

#[test]
fn members_get_the_group_topology_unless_they_name_their_own() {
    let vm = load(&[
        "--device",
        "path=00:03.0,id=gpu0",
        "--device",
        "path=00:04.0,id=nic0,placement=root",
        "--device",
        "path=00:05.0,id=nvme0,switch=sw9",
        "--device",
        "path=00:06.0,id=other",
        "--p2p-group",
        "name=g0,devices=gpu0:nic0:nvme0",
    ])
    .unwrap();
    let placements: Vec<_> = vm.devices.iter().map(|d| d.placement.clone()).collect();
    assert_eq!(
        placements,
        [
            Placement::Switch("g0".into()),
            Placement::Root,
            Placement::Switch("sw9".into()),
            // In no group: today's default.
            Placement::RootPort,
        ]
    );
    for (topology, want) in [
        ("switch", Placement::Switch("g0".into())),
        ("root-ports", Placement::RootPort),
        ("flat", Placement::Root),
    ] {
        let vm = load(&with_two(&[
            "--p2p-group",
            &format!("name=g0,devices=gpu0:nic0,topology={topology}"),
        ]))
        .unwrap();
        assert_eq!(vm.devices[0].placement, want, "{topology}");
        assert_eq!(vm.devices[1].placement, want, "{topology}");
    }
}

#[test]
fn groups_come_from_the_file_first_then_the_flags() {
    let vm: VmConfig = toml::from_str(
        r#"
        kernel = "/k"
        [[device]]
        id = "a"
        path = "00:03.0"
        [[device]]
        id = "b"
        path = "00:04.0"
        placement = "root"
        [[p2p_group]]
        name = "g0"
        devices = ["a", "b"]
        [[p2p_group]]
        name = "empty"
        devices = []
        mode = "off"
        topology = "root-ports"
        "#,
    )
    .unwrap();
    assert_eq!(vm.p2p_groups[1].topology, GroupTopology::RootPorts);
    assert!(vm.p2p_groups[1].devices.is_empty());
    // Read directly, a VmConfig still gets its members' placements from the group.
    assert_eq!(vm.devices[0].placement, Placement::Switch("g0".into()));
    assert_eq!(vm.devices[1].placement, Placement::Root);

    let dir = std::env::temp_dir().join(format!("p2pvmm-cfg-groups-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("vm.toml");
    std::fs::write(
        &file,
        "kernel = \"/k\"\n[[device]]\nid = \"a\"\npath = \"00:03.0\"\n\
         [[p2p_group]]\nname = \"file\"\ndevices = [\"a\"]\n",
    )
    .unwrap();
    let vm = load(&[
        "--config",
        file.to_str().unwrap(),
        "--device",
        "path=00:04.0,id=b",
        "--p2p-group",
        "name=flag,devices=b",
    ]);
    std::fs::remove_dir_all(&dir).unwrap();
    let names: Vec<_> = vm.unwrap().p2p_groups.into_iter().map(|g| g.name).collect();
    assert_eq!(names, ["file", "flag"]);
}

#[test]
fn bad_tables_are_one_line_errors() {
    let e = |table: &str| {
        toml::from_str::<VmConfig>(&format!("kernel = \"/k\"\n[[p2p_group]]\n{table}"))
            .unwrap_err()
            .message()
            .to_string()
    };
    assert!(
        e("name = \"g0\"\nports = 2\n").starts_with(
            "unknown field `ports`, expected one of `name`, `devices`, `mode`, `topology`, `slots`"
        ),
        "{}",
        e("name = \"g0\"\nports = 2\n")
    );
    assert!(e("name = \"g0\"\nslots = 40\n").contains("slots \"40\": expected 0 to 16"));
    assert_eq!(e("devices = []\n"), "missing field `name`");
    assert!(e("name = \"g0\"\nmode = \"x\"\n").starts_with("unknown variant `x`"));
    assert!(e("name = \"g0\"\ntopology = \"ring\"\n").starts_with("unknown variant `ring`"));
}

#[test]
fn domains_are_groups_then_ungrouped_devices() {
    let vm = load(&[
        "--device",
        "path=00:03.0,id=a,backend=legacy",
        "--device",
        "path=00:04.0,id=b",
        "--device",
        "path=00:05.0,id=c,backend=iommufd",
        "--device",
        "path=00:06.0,id=d",
        "--device",
        "path=00:07.0,id=e",
        "--p2p-group",
        "name=g0,devices=b:a",
        "--p2p-group",
        "name=g1,devices=d,mode=dmabuf",
        "--p2p-group",
        "name=g2,mode=legacy",
    ])
    .unwrap();
    let plan = |name: &str, devices: &[&str], mode, grouped, backend| DomainPlan {
        name: name.into(),
        devices: devices.iter().map(|d| d.to_string()).collect(),
        mode,
        grouped,
        backend,
    };
    use IommuBackendKind::{Iommufd, Legacy};
    assert_eq!(
        vm.domains(),
        [
            // Auto: the members' explicit backend.
            plan("g0", &["b", "a"], P2pMode::Auto, true, Some(Legacy)),
            plan("g1", &["d"], P2pMode::Dmabuf, true, Some(Iommufd)),
            plan("g2", &[], P2pMode::Legacy, true, Some(Legacy)),
            plan("c", &["c"], P2pMode::Off, false, Some(Iommufd)),
            plan("e", &["e"], P2pMode::Off, false, None),
        ]
    );
    // The VM default: the first explicit choice of any device.
    assert_eq!(vm.iommu_backend(), Some(Legacy));
    assert_eq!(load(&with_two(&[])).unwrap().iommu_backend(), None);
}

#[test]
fn backends_are_a_rule_per_domain() {
    // Different domains may use different backends.
    let vm = load(&[
        "--device",
        "path=00:03.0,id=a,backend=legacy",
        "--device",
        "path=00:04.0,id=b,backend=iommufd",
        "--device",
        "path=00:05.0,id=c,backend=legacy",
        "--device",
        "path=00:06.0,id=d,backend=iommufd",
        "--p2p-group",
        "name=g0,devices=c",
        "--p2p-group",
        "name=g1,devices=d,mode=dmabuf",
    ]);
    assert!(vm.is_ok(), "{vm:?}");
    // One domain, two backends: both devices named.
    assert_eq!(
        err(&[
            "--device",
            "path=00:03.0,id=a,backend=legacy",
            "--device",
            "path=00:04.0,id=b",
            "--device",
            "path=00:05.0,id=c,backend=iommufd",
            "--p2p-group",
            "name=g0,devices=a:b:c",
        ]),
        r#"p2p_group g0: devices = "c": backend=iommufd conflicts with backend=legacy of device a (a group is one IOMMU address space, in one backend)"#
    );
}

#[test]
fn modes_the_backend_cannot_do_are_refused() {
    assert_eq!(
        err(&[
            "--device",
            "path=00:03.0,id=a",
            "--device",
            "path=00:04.0,id=b,backend=legacy",
            "--p2p-group",
            "name=g0,devices=a:b,mode=dmabuf",
        ]),
        r#"p2p_group g0: mode = "dmabuf": needs the iommufd backend, but device b has backend=legacy"#
    );
    assert_eq!(
        err(&[
            "--device",
            "path=00:03.0,id=a,backend=iommufd",
            "--p2p-group",
            "name=g0,devices=a,mode=legacy",
        ]),
        r#"p2p_group g0: mode = "legacy": needs the legacy backend, but device a has backend=iommufd"#
    );
    assert!(matches!(
        load(&[
            "--device",
            "path=00:03.0,id=a,backend=iommufd",
            "--p2p-group",
            "name=g0,devices=a,mode=legacy",
        ]),
        Err(ConfigError::GroupModeBackend {
            mode: P2pMode::Legacy,
            needs: IommuBackendKind::Legacy,
            ..
        })
    ));
    // Auto and off take whatever the members ask for.
    for mode in ["auto", "off"] {
        let vm = load(&[
            "--device",
            "path=00:03.0,id=a,backend=legacy",
            "--p2p-group",
            &format!("name=g0,devices=a,mode={mode}"),
        ]);
        assert!(vm.is_ok(), "{mode}: {vm:?}");
    }
}

#[test]
fn membership_errors_name_the_group_and_value() {
    assert_eq!(
        err(&with_two(&["--p2p-group", "name=g0,devices=gpu0:nosuch"])),
        r#"p2p_group g0: devices = "nosuch": no such device (give it with --device ...,id=nosuch)"#
    );
    assert_eq!(
        err(&with_two(&[
            "--p2p-group",
            "name=g0,devices=gpu0:nic0:gpu0"
        ])),
        r#"p2p_group g0: devices = "gpu0": listed twice"#
    );
    assert_eq!(
        err(&with_two(&[
            "--p2p-group",
            "name=g0,devices=gpu0",
            "--p2p-group",
            "name=g1,devices=nic0:gpu0"
        ])),
        r#"p2p_group g1: devices = "gpu0": already in group g0 (a device is in at most one group)"#
    );
    assert_eq!(
        err(&with_two(&[
            "--p2p-group",
            "name=g0",
            "--p2p-group",
            "name=g0"
        ])),
        r#"p2p_group g0: name = "g0": another group has this name"#
    );
    assert_eq!(
        err(&["--p2p-group", "name=g.0"]),
        r#"p2p_group g.0: name = "g.0": '.' is not allowed (use letters, digits, '_' and '-')"#
    );
    assert!(matches!(
        load(&with_two(&["--p2p-group", "name=g0,devices=nic0:nic0"])),
        Err(ConfigError::GroupRepeatedDevice { group, device }) if group == "g0" && device == "nic0"
    ));
}

#[test]
fn a_group_name_used_as_an_outsiders_switch_is_refused() {
    let clash = [
        "--device",
        "path=00:03.0,id=a",
        "--device",
        "path=00:04.0,id=b,switch=g0",
    ];
    assert_eq!(
        err(&[&clash[..], &["--p2p-group", "name=g0,devices=a"]].concat()),
        "p2p_group g0: name = \"g0\": device b is not a member but has switch=g0, which would \
         put it behind the group's switch (rename the group or that switch)"
    );
    // Even with a topology that makes no switch, one name for two things is a trap.
    assert!(matches!(
        load(
            &[
                &clash[..],
                &["--p2p-group", "name=g0,devices=a,topology=flat"]
            ]
            .concat()
        ),
        Err(ConfigError::GroupSwitchClash { .. })
    ));
    // A member behind its group's switch by its own say-so is fine.
    assert!(load(&[&clash[..], &["--p2p-group", "name=g0,devices=a:b"]].concat()).is_ok());
}

#[test]
fn cliques_default_to_the_group_number_for_nvidia_only() {
    let vm = load(&[
        "--device",
        "path=00:03.0,id=a",
        "--device",
        "path=00:04.0,id=b,clique=9",
        "--device",
        "path=00:05.0,id=c",
        "--device",
        "path=00:06.0,id=d",
        "--device",
        "path=00:07.0,id=e",
        "--device",
        "path=00:08.0,id=f",
        "--p2p-group",
        "name=nics,devices=e",
        "--p2p-group",
        "name=g0,devices=c",
        "--p2p-group",
        "name=dark,devices=f,mode=off",
        "--p2p-group",
        "name=g1,devices=a:b",
    ])
    .unwrap();
    let all = nvidia(&["a", "b", "c", "d", "f"]);
    // Groups with NVIDIA members and P2P on are numbered from 0: g0 is 0, g1 is 1.
    assert_eq!(vm.clique_of("c", &all).unwrap(), Some(0));
    assert_eq!(vm.clique_of("a", &all).unwrap(), Some(1));
    // An explicit value wins, on any vendor (with a warning on others).
    assert_eq!(vm.clique_of("b", &all).unwrap(), Some(9));
    assert_eq!(vm.clique_of("b", nvidia(&[])).unwrap(), Some(9));
    // Not NVIDIA, in no group, a group with P2P off, or no such device: no capability.
    assert_eq!(vm.clique_of("e", &all).unwrap(), None);
    assert_eq!(vm.clique_of("a", nvidia(&["b"])).unwrap(), None);
    assert_eq!(vm.clique_of("d", &all).unwrap(), None);
    assert_eq!(vm.clique_of("f", &all).unwrap(), None);
    assert_eq!(vm.clique_of("zz", &all).unwrap(), None);
    assert_eq!(vm.clique_of("c", |_: &DeviceConfig| None).unwrap(), None);
}

#[test]
fn seventeen_nvidia_groups_are_one_too_many() {
    let mut args = Vec::new();
    for i in 0..18 {
        args.push("--device".to_string());
        args.push(format!("path=00:{:02x}.0,id=gpu{i}", i + 1));
        args.push("--p2p-group".to_string());
        args.push(format!("name=g{i},devices=gpu{i}"));
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let vm = load(&argv).unwrap();
    let sixteen: Vec<String> = (0..16).map(|i| format!("gpu{i}")).collect();
    let sixteen: Vec<&str> = sixteen.iter().map(String::as_str).collect();
    // 16 NVIDIA groups (0-15) fit, whatever the other groups are.
    assert_eq!(vm.clique_of("gpu15", nvidia(&sixteen)).unwrap(), Some(15));
    let all: Vec<String> = (0..18).map(|i| format!("gpu{i}")).collect();
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    let e = vm.clique_of("gpu0", nvidia(&all)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "p2p_group g16: clique = 16: beyond 15, this is group number 16 (from 0) with NVIDIA \
         members; give its NVIDIA devices clique=N"
    );
    // A device with its own clique needs no group id.
    let mut explicit = vm.clone();
    explicit.devices[0].clique = Some(3);
    assert_eq!(explicit.clique_of("gpu0", nvidia(&all)).unwrap(), Some(3));
}

#[test]
fn clique_values_are_checked_naming_the_device() {
    assert_eq!(
        err(&["--device", "path=00:03.0,id=a,clique=16"]),
        r#"invalid --device "path=00:03.0,id=a,clique=16": device a: clique = 16: out of range (use 0 to 15)"#
    );
    assert_eq!(
        err(&["--device", "path=00:03.0,clique=-1"]),
        r#"invalid --device "path=00:03.0,clique=-1": clique = -1: out of range (use 0 to 15)"#
    );
    assert_eq!(
        err(&["--device", "path=00:03.0,id=a,clique=x"]),
        r#"invalid --device "path=00:03.0,id=a,clique=x": clique "x" is not a number (use 0 to 15)"#
    );
    let vm = load(&["--device", "path=00:03.0,id=a,clique=15"]).unwrap();
    assert_eq!(vm.devices[0].clique, Some(15));
    let table = toml::from_str::<VmConfig>(
        "kernel = \"/k\"\n[[device]]\nid = \"gpu0\"\npath = \"00:03.0\"\nclique = 300\n",
    )
    .unwrap_err();
    assert_eq!(
        table.message(),
        "device gpu0: clique = 300: out of range (use 0 to 15)"
    );
}

#[test]
fn two_devices_without_a_group_are_warned_about() {
    assert_eq!(
        load(&with_two(&[])).unwrap().ungrouped_warning().as_deref(),
        Some(
            "2 devices and no --p2p-group: devices cannot DMA to each other's BARs (secure \
             default); add --p2p-group name=NAME,devices=ID:ID to allow it"
        )
    );
    let vm = load(&with_two(&["--p2p-group", "name=g0,devices=gpu0:nic0"])).unwrap();
    assert_eq!(vm.ungrouped_warning(), None);
    // Any group means P2P was thought about; one device has no peer to miss.
    let vm = load(&with_two(&["--p2p-group", "name=g0"])).unwrap();
    assert_eq!(vm.ungrouped_warning(), None);
    let one = load(&["--device", "path=00:03.0,id=a"]).unwrap();
    assert_eq!(one.ungrouped_warning(), None);
}

#[test]
fn groups_serialize_as_the_file_spells_them() {
    let vm = load(&with_two(&[
        "--p2p-group",
        "name=g0,devices=gpu0:nic0,mode=dmabuf,topology=root-ports",
    ]))
    .unwrap();
    let text = toml::to_string(&vm).unwrap();
    for line in [
        "[[p2p_group]]",
        r#"name = "g0""#,
        r#"devices = ["gpu0", "nic0"]"#,
        r#"mode = "dmabuf""#,
        r#"topology = "root-ports""#,
    ] {
        assert!(text.contains(line), "{line} missing from:\n{text}");
    }
    assert_eq!(toml::from_str::<VmConfig>(&text).unwrap(), vm);
    assert_eq!(P2pMode::Legacy.to_string(), "legacy");
    assert_eq!(GroupTopology::RootPorts.to_string(), "root-ports");
}

#[test]
fn slots_need_ports() {
    let vm = load(&["--p2p-group", "name=g,slots=2"]).unwrap();
    assert_eq!(vm.p2p_groups[0].slots, 2);
    assert_eq!(
        err(&["--p2p-group", "name=g,slots=1,topology=flat"]),
        r#"p2p_group g: slots = "1": hotplug slots are switch downstream ports or root ports; topology "flat" has neither"#
    );
}
