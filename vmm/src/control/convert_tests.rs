use super::*;

fn body(json: &str) -> api::VmConfig {
    serde_json::from_str(json).unwrap()
}

#[test]
fn a_ch_body_becomes_the_config_a_file_would_give() {
    let config = vm_config(&body(
        r#"{"payload": {"kernel": "/k", "cmdline": "console=ttyS0"},
            "cpus": {"boot_vcpus": 2, "max_vcpus": 2}, "memory": {"size": 1073741824},
            "devices": [{"path": "0000:00:03.0", "id": "gpu0", "p2p_group": "g0"},
                        {"path": "0000:00:04.0", "pci_segment": 0, "x_exclude_mmap_bars": []}],
            "p2p_groups": [{"name": "g0", "slots": 2}],
            "serial": {"mode": "File", "file": "/tmp/s.log"}}"#,
    ))
    .unwrap();
    assert_eq!(config.kernel, std::path::Path::new("/k"));
    assert_eq!((config.cpus, config.memory.size.0), (2, 1 << 30));
    assert_eq!(config.serial, SerialConfig::File("/tmp/s.log".into()));
    let ids: Vec<_> = config.devices.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["gpu0", "dev1"]);
    assert_eq!(
        config.devices[0].path,
        std::path::Path::new("/sys/bus/pci/devices/0000:00:03.0")
    );
    assert_eq!(config.p2p_groups[0].devices, ["gpu0"]);
    assert_eq!(config.p2p_groups[0].slots, 2);
    // The group's topology placed its member behind the group's switch.
    assert_eq!(config.devices[0].placement, Placement::Switch("g0".into()));
}

#[test]
fn what_p2pvmm_cannot_honour_is_named() {
    let err = |json: &str| vm_config(&body(json)).unwrap_err();
    assert!(err(r#"{"payload": {}}"#).contains("payload.kernel"));
    assert!(err(
        r#"{"payload": {"kernel": "/k"}, "devices": [{"path": "0000:00:03.0", "iommu": true}]}"#
    )
    .contains("iommu"));
    assert!(err(r#"{"payload": {"kernel": "/k"}, "devices": [{"path": "0000:00:03.0", "p2p_group": "nope"}]}"#)
        .contains("nope"));
    assert!(
        err(r#"{"payload": {"kernel": "/k"}, "devices": [{"path": "0000:00:03.0", "placement": "switch"}]}"#)
            .contains("switch")
    );
    assert!(
        err(r#"{"payload": {"kernel": "/k"}, "p2p_groups": [{"name": "g", "slots": 99}]}"#)
            .contains("slots")
    );
}

#[test]
fn vm_info_shows_the_config_back_in_chs_shape() {
    let config = vm_config(&body(
        r#"{"payload": {"kernel": "/k"}, "memory": {"size": 536870912},
            "devices": [{"path": "0000:00:03.0", "id": "gpu0", "p2p_group": "g0",
                         "x_nv_gpudirect_clique": 3}],
            "p2p_groups": [{"name": "g0", "topology": "root-ports"}]}"#,
    ))
    .unwrap();
    let shown = api_vm_config(&config);
    assert_eq!(shown.memory.as_ref().map(|m| m.size), Some(512 << 20));
    let device = &shown.devices.as_ref().unwrap()[0];
    assert_eq!(device.id.as_deref(), Some("gpu0"));
    assert_eq!(device.p2p_group.as_deref(), Some("g0"));
    assert_eq!(device.x_nv_gpudirect_clique, Some(3));
    assert_eq!(device.placement.as_deref(), Some("root-port"));
    // And it converts back to the same configuration.
    assert_eq!(vm_config(&shown).unwrap(), config);
}

#[test]
fn ch_huge_pages_become_the_memory_setting_and_show_back() {
    let config = |memory: &str| {
        vm_config(&body(&format!(
            r#"{{"payload": {{"kernel": "/k"}}, "memory": {memory}}}"#
        )))
    };
    let default_page = config(r#"{"size": 1073741824, "hugepages": true}"#).unwrap();
    assert_eq!(
        default_page.memory.hugepages,
        Some(crate::config::HugePageSize::Size2M)
    );
    let gig =
        config(r#"{"size": 2147483648, "hugepages": true, "hugepage_size": 1073741824}"#).unwrap();
    assert_eq!(
        gig.memory.hugepages,
        Some(crate::config::HugePageSize::Size1G)
    );
    let shown = api_vm_config(&gig).memory.unwrap();
    assert_eq!(
        (shown.size, shown.hugepages, shown.hugepage_size),
        (2 << 30, true, Some(1 << 30))
    );

    let odd = config(r#"{"size": 1073741824, "hugepages": true, "hugepage_size": 4194304}"#);
    assert!(odd
        .unwrap_err()
        .contains("memory.hugepage_size: 4194304 bytes"));
    let without = config(r#"{"size": 1073741824, "hugepage_size": 2097152}"#);
    assert!(without.unwrap_err().contains("needs memory.hugepages"));
}
