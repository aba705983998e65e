use super::*;
use crate::config::Cli;
use clap::Parser;

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
    load(args).unwrap_err().to_string()
}

const TWO: [&str; 4] = [
    "--device",
    "path=00:03.0,id=gpu0",
    "--device",
    "path=00:04.0,id=nic0",
];

fn with_two(extra: &[&str]) -> Vec<&'static str> {
    let mut v: Vec<&str> = TWO.to_vec();
    v.extend(
        extra
            .iter()
            .map(|s| -> &'static str { Box::leak(s.to_string().into_boxed_str()) }),
    );
    v
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
        }
    );
    let g = parse_flag("name=g1").unwrap();
    assert!(g.devices.is_empty());
    assert_eq!((g.mode, g.topology), (P2pMode::Auto, GroupTopology::Switch));
    assert_eq!(
        parse_flag("name=g0,mode=sideways").unwrap_err(),
        r#"unknown mode "sideways" (use auto, dmabuf, legacy or off)"#
    );
    assert_eq!(
        parse_flag("name=g0,slots=2").unwrap_err(),
        r#"unknown key "slots" (use name, devices, mode, topology)"#
    );
    assert!(parse_flag("devices=a")
        .unwrap_err()
        .contains("missing key name"));
}

#[test]
fn members_get_the_group_topology_unless_they_name_their_own() {
    let vm = load(&[
        "--device",
        "path=00:03.0,id=gpu0",
        "--device",
        "path=00:04.0,id=nic0,placement=root",
        "--device",
        "path=00:05.0,id=other",
        "--p2p-group",
        "name=g0,devices=gpu0:nic0",
    ])
    .unwrap();
    let placement = |i: usize| vm.devices[i].placement.clone();
    assert_eq!(placement(0), Placement::Switch("g0".into()));
    assert_eq!(placement(1), Placement::Root);
    assert_eq!(placement(2), Placement::RootPort);
    let vm = load(&with_two(&[
        "--p2p-group",
        "name=g0,devices=gpu0:nic0,topology=flat",
    ]))
    .unwrap();
    assert_eq!(vm.devices[0].placement, Placement::Root);
}

#[test]
fn domains_are_groups_then_ungrouped_devices() {
    let vm = load(&[
        "--device",
        "path=00:03.0,id=a,backend=legacy",
        "--device",
        "path=00:04.0,id=b",
        "--device",
        "path=00:05.0,id=c",
        "--p2p-group",
        "name=g0,devices=a:b",
    ])
    .unwrap();
    let domains = vm.domains();
    assert_eq!(domains.len(), 2);
    assert_eq!(domains[0].name, "g0");
    assert_eq!(domains[0].backend, Some(IommuBackendKind::Legacy));
    assert!(domains[0].grouped);
    assert_eq!(domains[1].devices, ["c"]);
    assert!(!domains[1].grouped);
    assert_eq!(domains[1].mode, P2pMode::Off);
}

#[test]
fn validation_errors_name_the_group_and_value() {
    assert_eq!(
        err(&with_two(&["--p2p-group", "name=g0,devices=gpu0:nosuch"])),
        r#"p2p_group g0: devices = "nosuch": no such device (give it with --device ...,id=ID)"#
    );
    assert_eq!(
        err(&with_two(&["--p2p-group", "name=g0,devices=gpu0:gpu0"])),
        r#"p2p_group g0: devices = "gpu0": listed twice"#
    );
    assert!(err(&with_two(&[
        "--p2p-group",
        "name=g0,devices=gpu0",
        "--p2p-group",
        "name=g1,devices=nic0:gpu0"
    ]))
    .contains("p2p_group g1: devices = \"gpu0\": already in group g0"));
    assert!(err(&with_two(&[
        "--p2p-group",
        "name=g0",
        "--p2p-group",
        "name=g0"
    ]))
    .contains("another group has it"));
    let mixed = err(&[
        "--device",
        "path=00:03.0,id=a,backend=legacy",
        "--device",
        "path=00:04.0,id=b",
        "--p2p-group",
        "name=g0,devices=a:b,mode=dmabuf",
    ]);
    assert!(
        mixed.starts_with(r#"p2p_group g0: mode = "dmabuf": needs the iommufd backend"#),
        "{mixed}"
    );
    let split = err(&[
        "--device",
        "path=00:03.0,id=a,backend=legacy",
        "--device",
        "path=00:04.0,id=b,backend=iommufd",
        "--p2p-group",
        "name=g0,devices=a:b",
    ]);
    assert!(split.contains("different backend"), "{split}");
    let outsider = err(&[
        "--device",
        "path=00:03.0,id=a",
        "--device",
        "path=00:04.0,id=b,switch=g0",
        "--p2p-group",
        "name=g0,devices=a",
    ]);
    assert!(outsider.contains("device b (not a member)"), "{outsider}");
    assert!(err(&["--device", "path=00:03.0,id=a,clique=16"]).contains("clique 16 is out of range"));
}

#[test]
fn ungrouped_devices_of_one_host_iommu_group_are_refused() {
    let dir = std::env::temp_dir().join(format!("p2pvmm-iommu-groups-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let group = dir.join("kernel/iommu_groups/7");
    std::fs::create_dir_all(&group).unwrap();
    let mut args = vec![];
    for (id, bdf) in [("a", "0000:00:03.0"), ("b", "0000:00:04.0")] {
        let d = dir.join(bdf);
        std::fs::create_dir_all(&d).unwrap();
        std::os::unix::fs::symlink(&group, d.join("iommu_group")).unwrap();
        args.push("--device".to_string());
        args.push(format!("path={},id={id}", d.display()));
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let split = load(&[&argv[..], &["--p2p-group", "name=g0,devices=a"]].concat()).unwrap();
    let e = check_group_host(&split, &dir).unwrap_err().to_string();
    assert!(
        e.contains("b") && e.contains("group 7") && e.contains("a (group g0)"),
        "{e}"
    );
    let together = load(&[&argv[..], &["--p2p-group", "name=g0,devices=a:b"]].concat()).unwrap();
    assert!(check_group_host(&together, &dir).is_ok());
    let dmabuf = load(
        &[
            &argv[..],
            &["--p2p-group", "name=g0,devices=a:b,mode=dmabuf"],
        ]
        .concat(),
    )
    .unwrap();
    let e = check_group_host(&dmabuf, &dir).unwrap_err().to_string();
    assert!(e.contains("needs iommufd"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn cliques_default_to_the_group_index_for_nvidia_only() {
    let vm = load(&[
        "--device",
        "path=00:03.0,id=a",
        "--device",
        "path=00:04.0,id=b,clique=9",
        "--device",
        "path=00:05.0,id=c",
        "--p2p-group",
        "name=g0,devices=c",
        "--p2p-group",
        "name=g1,devices=a:b",
    ])
    .unwrap();
    assert_eq!(vm.clique_of("a", Some(NVIDIA)).unwrap(), Some(1));
    assert_eq!(vm.clique_of("a", Some(0x1234)).unwrap(), None);
    assert_eq!(vm.clique_of("b", Some(0x1234)).unwrap(), Some(9));
    assert_eq!(vm.clique_of("c", Some(NVIDIA)).unwrap(), Some(0));
}

#[test]
fn two_devices_without_a_group_are_warned_about() {
    let vm = load(&TWO).unwrap();
    assert!(vm.ungrouped_warning().unwrap().contains("--p2p-group"));
    let vm = load(&with_two(&["--p2p-group", "name=g0,devices=gpu0:nic0"])).unwrap();
    assert_eq!(vm.ungrouped_warning(), None);
}

#[test]
fn groups_come_from_the_file_too() {
    let vm: VmConfig = toml::from_str(
        r#"
        kernel = "/k"
        [[p2p_group]]
        name = "g0"
        devices = ["a"]
        topology = "root-ports"
        "#,
    )
    .unwrap();
    assert_eq!(vm.p2p_groups[0].topology, GroupTopology::RootPorts);
    let text = toml::to_string(&vm).unwrap();
    assert!(
        text.contains("[[p2p_group]]") && text.contains("root-ports"),
        "{text}"
    );
}
