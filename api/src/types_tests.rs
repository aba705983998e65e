use super::*;

fn config(json: &str) -> VmConfig {
    serde_json::from_str(json).unwrap()
}

fn invalid(result: Result<(), ApiError>) -> String {
    result.unwrap_err().to_string()
}

fn device(json: &str) -> DeviceConfig {
    serde_json::from_str(json).unwrap()
}

#[test]
fn minimal_ch_body_is_valid() {
    let vm = config(r#"{"payload":{"kernel":"/bzImage","cmdline":"console=ttyS0"}}"#);

    assert_eq!(vm.validate().unwrap(), ());
    assert_eq!(vm.payload.cmdline.as_deref(), Some("console=ttyS0"));
}

#[test]
fn firmware_key_parses_but_a_value_is_refused() {
    let null = config(r#"{"payload":{"kernel":"/k","firmware":null}}"#);
    let set = config(r#"{"payload":{"firmware":"/OVMF.fd"}}"#);

    assert_eq!(null.validate().unwrap(), ());
    assert!(invalid(set.validate()).starts_with("payload.firmware: "));
}

#[test]
fn kernel_is_required() {
    let vm = config(r#"{"payload":{}}"#);

    assert_eq!(invalid(vm.validate()), "payload.kernel: required");
}

#[test]
fn max_vcpus_must_repeat_boot_vcpus() {
    let same = config(r#"{"payload":{"kernel":"k"},"cpus":{"boot_vcpus":2,"max_vcpus":2}}"#);
    let more = config(r#"{"payload":{"kernel":"k"},"cpus":{"boot_vcpus":2,"max_vcpus":4}}"#);
    let zero = config(r#"{"payload":{"kernel":"k"},"cpus":{"boot_vcpus":0}}"#);

    assert_eq!(same.validate().unwrap(), ());
    assert!(invalid(more.validate()).starts_with("cpus.max_vcpus: 4 differs"));
    assert!(invalid(zero.validate()).starts_with("cpus.boot_vcpus: "));
}

#[test]
fn memory_accepts_ch_defaults_and_huge_pages_and_names_a_non_default() {
    let defaults = r#"{"payload":{"kernel":"k"},"memory":{"size":1073741824,"mergeable":false,
        "hotplug_method":"Acpi","hotplug_size":null,"hotplugged_size":null,"shared":false,
        "hugepages":false,"hugepage_size":null,"prefault":false,"reserve":false,"thp":true,
        "zones":null}}"#;
    let no_thp = config(r#"{"payload":{"kernel":"k"},"memory":{"size":1,"thp":false}}"#);
    let huge = config(r#"{"payload":{"kernel":"k"},"memory":{"size":1,"hugepages":true}}"#);
    let prefault = config(r#"{"payload":{"kernel":"k"},"memory":{"size":1,"prefault":true}}"#);
    let hotplug =
        config(r#"{"payload":{"kernel":"k"},"memory":{"size":1,"hotplug_method":"VirtioMem"}}"#);

    assert_eq!(config(defaults).validate().unwrap(), ());
    assert_eq!(
        config(defaults).memory.unwrap(),
        MemoryConfig::of_size(1 << 30)
    );
    assert_eq!(
        invalid(no_thp.validate()),
        "memory.thp: not supported by p2pvmm"
    );
    // Huge pages are p2pvmm's too (checked against the host when the VM is built).
    assert_eq!(huge.validate().unwrap(), ());
    assert_eq!(
        invalid(prefault.validate()),
        "memory.prefault: not supported by p2pvmm"
    );
    assert!(invalid(hotplug.validate()).starts_with("memory.hotplug_method: "));
}

#[test]
fn unknown_fields_are_refused_by_name() {
    let top = serde_json::from_str::<VmConfig>(r#"{"payload":{"kernel":"k"},"disks":[]}"#);
    let nested = serde_json::from_str::<VmConfig>(r#"{"payload":{"kernel":"k","igvm":"x"}}"#);

    assert!(top
        .unwrap_err()
        .to_string()
        .contains("unknown field `disks`"));
    assert!(nested
        .unwrap_err()
        .to_string()
        .contains("unknown field `igvm`"));
}

#[test]
fn device_rules_each_name_their_field() {
    let cases = [
        (
            r#"{"path":"p","iommu":true}"#,
            "iommu: p2pvmm does not expose a virtual IOMMU",
        ),
        (r#"{"path":"p","pci_segment":1}"#, "pci_segment: "),
        (
            r#"{"path":"p","x_nv_gpudirect_clique":16}"#,
            "x_nv_gpudirect_clique: ",
        ),
        (
            r#"{"path":"p","x_exclude_mmap_bars":[0]}"#,
            "x_exclude_mmap_bars: not supported",
        ),
        (r#"{"path":"p","pci_device_id":0}"#, "pci_device_id: "),
        (r#"{"path":"p","pci_device_id":32}"#, "pci_device_id: "),
        (r#"{"path":"p","placement":"attic"}"#, "placement: "),
        (
            r#"{"path":"p","placement":"root","switch":"sw0"}"#,
            "switch: ",
        ),
        (r#"{"path":""}"#, "path: "),
        (r#"{"path":"p","id":""}"#, "id: "),
    ];

    for (json, expected) in cases {
        let message = invalid(device(json).validate());
        assert!(message.starts_with(expected), "{json}: {message}");
    }
}

#[test]
fn device_as_ch_remote_sends_it_is_valid() {
    let ch = device(
        r#"{"path":"/sys/bus/pci/devices/0000:00:03.0","iommu":false,"id":null,
            "pci_segment":0,"x_nv_gpudirect_clique":15,"x_exclude_mmap_bars":[]}"#,
    );
    let ours = device(
        r#"{"path":"0000:00:03.0","p2p_group":"g0","placement":"switch","switch":"sw0","pci_device_id":31}"#,
    );

    assert_eq!(ch.validate().unwrap(), ());
    assert_eq!(ours.validate().unwrap(), ());
}

#[test]
fn devices_in_a_vm_are_named_by_index_and_ids_unique() {
    let bad =
        config(r#"{"payload":{"kernel":"k"},"devices":[{"path":"a"},{"path":"b","iommu":true}]}"#);
    let dup = config(
        r#"{"payload":{"kernel":"k"},"devices":[{"path":"a","id":"x"},{"path":"b","id":"x"}]}"#,
    );

    assert!(invalid(bad.validate()).starts_with("devices[1].iommu: "));
    assert!(invalid(dup.validate()).starts_with("devices[1].id: "));
}

#[test]
fn groups_check_mode_topology_and_members() {
    let group = |json: &str| serde_json::from_str::<P2pGroupConfig>(json).unwrap();

    assert_eq!(
        group(r#"{"name":"g","devices":["a","b"],"mode":"auto","topology":"flat","slots":2}"#)
            .validate()
            .unwrap(),
        ()
    );
    assert!(invalid(group(r#"{"name":"g","mode":"fast"}"#).validate()).starts_with("mode: "));
    assert!(
        invalid(group(r#"{"name":"g","topology":"ring"}"#).validate()).starts_with("topology: ")
    );
    assert!(
        invalid(group(r#"{"name":"g","devices":["a","a"]}"#).validate())
            .starts_with("devices[1]: ")
    );
    assert!(invalid(group(r#"{"name":""}"#).validate()).starts_with("name: "));
    let twice = config(r#"{"payload":{"kernel":"k"},"p2p_groups":[{"name":"g"},{"name":"g"}]}"#);
    assert!(invalid(twice.validate()).starts_with("p2p_groups[1].name: "));
}

#[test]
fn console_modes_follow_ch_and_p2pvmm_has_only_serial() {
    let file = config(r#"{"payload":{"kernel":"k"},"serial":{"mode":"File","file":"/tmp/s"}}"#);
    let no_file = config(r#"{"payload":{"kernel":"k"},"serial":{"mode":"File"}}"#);
    let tty_console = config(r#"{"payload":{"kernel":"k"},"console":{"mode":"Tty"}}"#);
    let pty =
        serde_json::from_str::<VmConfig>(r#"{"payload":{"kernel":"k"},"serial":{"mode":"Pty"}}"#);

    assert_eq!(file.validate().unwrap(), ());
    assert_eq!(
        invalid(no_file.validate()),
        "serial.file: required by mode File"
    );
    assert!(invalid(tty_console.validate()).starts_with("console.mode: "));
    assert!(pty
        .unwrap_err()
        .to_string()
        .contains("unknown variant `Pty`"));
}

#[test]
fn states_serialize_as_ch_spells_them() {
    let states = [
        VmState::Created,
        VmState::Running,
        VmState::Paused,
        VmState::Shutdown,
    ];

    let json = serde_json::to_string(&states).unwrap();

    assert_eq!(json, r#"["Created","Running","Paused","Shutdown"]"#);
}

#[test]
fn a_config_survives_a_round_trip() {
    let vm = config(
        r#"{"payload":{"kernel":"k"},"cpus":{"boot_vcpus":2},"memory":{"size":4096},
            "devices":[{"path":"p","id":"gpu0","p2p_group":"g0"}],
            "p2p_groups":[{"name":"g0","devices":["gpu0"]}],"serial":{"mode":"Tty"}}"#,
    );

    let again: VmConfig = serde_json::from_str(&serde_json::to_string(&vm).unwrap()).unwrap();

    assert_eq!(again, vm);
}
