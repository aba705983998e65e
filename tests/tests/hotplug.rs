//! The REST API and VFIO hotplug in the nested lab, driven from L1 through the API socket the way
//! a user (or Cloud Hypervisor's `ch-remote`) would.
//!
//! - `hotplug` (per backend): L2 starts with edu in group g, which has one free slot. ivshmem is
//!   added through `vm.add-device`: L2 sees it appear, edu DMAs into its BAR and the bytes are
//!   there; `vm.p2p` lists its BAR. `vm.remove-device`: L2 lets go of it (the API's device tree
//!   keeps it until then), edu's DMA to the old address no longer lands, DMA to RAM still works.
//!   Added again: works again. `vm.pause` stops L2 (its once-a-second heartbeat stops) and
//!   `vm.resume` restarts it. Bad requests, each a 4xx naming the problem and the VM still
//!   running afterwards (heartbeat, `vm.info` Running): malformed JSON, an unknown field, an
//!   unknown route, remove of an absent device, a duplicate id, a device not bound to vfio-pci,
//!   two concurrent adds (one answered 200, the other 409, nothing half-applied), a 5 MiB body.
//!   Every answer's wire form is checked as CH's client reads it (`api-probe`).
//! - `api-boot`: p2pvmm started with only `--api-socket`; `vm.create` + `vm.boot` boot L2, and
//!   `vm.power-button` raises L2's GED interrupt.

use std::sync::OnceLock;

use p2pvmm_tests::{
    api_probe_static, edu_dma_static, expect_scenario, run_retrying_lab_failure, Console, L1Run,
    Scenario, BIND_EDU_AND_IVSHMEM, L2_CMDLINE,
};

/// The L1 driver of the hotplug scenario: `sh /tmp/hp.sh BACKEND EDU SHM CMDLINE`.
const HOTPLUG_DRIVER: &str = r#"
cat > /tmp/hp.sh <<'EOF'
backend=$1 edu=$2 shm=$3 cmdline=$4
sock=/tmp/hp-$backend.sock out=/tmp/hp-$backend.out
rm -f $out
R() { p2pvmm remote --api-socket $sock "$@"; }
P() { api-probe $sock "$@"; }
now() { cut -d' ' -f1 /proc/uptime; }
# Waits (up to $2 s) until the VM's output has a line with $1.
wait_for() {
    n=0
    while ! grep -q "$1" $out; do
        kill -0 $vmm 2>/dev/null || { echo "L1: p2pvmm exited while waiting for $1"; return 1; }
        sleep 0.05; n=$((n + 1))
        if [ $n -gt $(($2 * 20)) ]; then
            echo "L1: timed out waiting for $1"; stuck_report hotplug; return 1
        fi
    done
}
# The VM's output streams to the console as it comes (the scenario's record, and L2's heartbeat
# keeps the L1 console from looking frozen while requests wait).
touch $out
tail -n +1 -f $out &
tailer=$!
finish() { sleep 1; kill $tailer; }
P2PVMM_X_HOTPLUG_FAIL=model,plug,notify \
p2pvmm -v --api-socket $sock --kernel /l2/bzImage --initramfs /l2/initramfs.cpio.gz \
    --memory 512M --cmdline "$cmdline lab.mode=hotplug" \
    --device path=$edu,id=edu,backend=$backend \
    --p2p-group name=g,devices=edu,slots=1 >> $out 2>&1 &
vmm=$!
wait_for HP-READY 240 || { finish; kill $vmm; exit 1; }
echo "HP-INFO-BEFORE $(R info | tr '\n' ' ')"
# The first three adds fail on purpose, each at a step that already holds something (the device
# open in the domain and KVM-VFIO; its BARs mmapped and in the P2P table; the slot): after each,
# p2pvmm's fds, its VFIO mappings, the P2P table and the device list are as before.
state() {
    sleep 0.5
    echo "fds=$(ls /proc/$vmm/fd | wc -l) vfio-maps=$(grep -c vfio /proc/$vmm/maps)" \
        "p2p-shm=$(R --json p2p | grep -c '"shm"') info-shm=$(R info | grep -c '^shm ')"
}
echo "HP-STATE before-faults $(state)"
for step in model plug notify; do
    P PUT vm.add-device '{"path":"'$shm'","id":"shm","p2p_group":"g"}' | sed "s/^/HP-FAULT $step /"
    echo "HP-STATE after-$step $(state)"
done
t0=$(now)
echo "HP-ADD-1 $(R add-device path=$shm,id=shm,p2p_group=g 2>&1)"
wait_for HP-PLUGGED-1 60; t1=$(now)
echo "HP-LATENCY plug $t0 $t1"
wait_for HP-DONE-1 120
echo "HP-P2P-TABLE"; R p2p
echo "HP-INFO-PLUGGED $(R info | tr '\n' ' ')"
t0=$(now)
echo "HP-REMOVE $(P PUT vm.remove-device '{"id":"shm"}')"
wait_for HP-GONE-1 60; t1=$(now)
echo "HP-LATENCY unplug $t0 $t1"
sleep 1
echo "HP-INFO-REMOVED $(R info | tr '\n' ' ')"
echo "HP-P2P-REMOVED $(R --json p2p)"
wait_for HP-DONE-2 120
echo "HP-ADD-2 $(R add-device path=$shm,id=shm,p2p_group=g 2>&1)"
wait_for HP-PLUGGED-2 60
wait_for HP-DONE-3 120
# Pause: the heartbeat stops; resume: it goes on.
R pause; sleep 1
a=$(grep -c HP-ALIVE $out); sleep 4; b=$(grep -c HP-ALIVE $out)
echo "HP-PAUSED-STATE $(R info | head -n 1)"
echo "HP-PAUSED-BEATS $a $b"
R resume; sleep 4; c=$(grep -c HP-ALIVE $out)
echo "HP-RESUMED-BEATS $b $c"
# Bad requests: each answered, none stops the VM.
fds() { ls /proc/$vmm/fd | wc -l; }
echo "HP-FDS before-bad $(fds)"
echo "HP-BAD-BEGIN"
P PUT vm.add-device '{"path": '
P PUT vm.add-device '{"path":"'$shm'","id":"x","colour":"red"}'
P GET vm.nosuch
P PUT vm.remove-device '{"id":"nosuch"}'
P PUT vm.add-device '{"path":"'$edu'","id":"edu"}'
P PUT vm.add-device --size 5242880
P PUT vm.remove-device '{"id":"shm"}'
wait_for HP-GONE-2 60
# With the slot free again, so the device's own checks are what refuse it.
P PUT vm.add-device '{"path":"0000:00:00.0","id":"notvfio","p2p_group":"g"}'
P PUT vm.add-device '{"path":"'$shm'","id":"shm","p2p_group":"g"}' > /tmp/c1 &
c1=$!
P PUT vm.add-device '{"path":"'$shm'","id":"shm","p2p_group":"g"}' > /tmp/c2 &
wait $c1 $!
sed 's/^API-PROBE/API-PROBE-CONCURRENT/' /tmp/c1 /tmp/c2
# The same state as before the bad requests (shm plugged): nothing of theirs is left open.
sleep 1
echo "HP-FDS after-bad $(fds)"
P GET vmm.ping
P GET openapi.json > /tmp/openapi.line
echo "HP-OPENAPI-BYTES $(wc -c < /tmp/openapi.line)"
echo "HP-BAD-DONE"
n=$(grep -c HP-ALIVE $out); sleep 3
echo "HP-ALIVE-AFTER $n $(grep -c HP-ALIVE $out)"
echo "HP-FINAL-STATE $(R info | head -n 1)"
echo "HP-INFO-JSON"; P GET vm.info
echo "HP-DEVICES $(R info | tr '\n' ' ')"
R shutdown-vmm
wait $vmm
rc=$?
finish
exit $rc
EOF
"#;

/// The L1 driver of a guest that never lets go (no acpiphp): `sh /tmp/hold.sh EDU SHM CMDLINE`.
const HOLD_DRIVER: &str = r#"
cat > /tmp/hold.sh <<'EOF'
edu=$1 shm=$2 cmdline=$3
sock=/tmp/hold.sock out=/tmp/hold.out
R() { p2pvmm remote --api-socket $sock "$@"; }
now() { cut -d' ' -f1 /proc/uptime; }
p2pvmm -v --api-socket $sock --kernel /l2/bzImage --initramfs /l2/initramfs.cpio.gz \
    --memory 512M --cmdline "$cmdline acpiphp.disable=1 lab.mode=hold" \
    --device path=$edu,id=edu --p2p-group name=g,devices=edu,slots=1 >> $out 2>&1 &
vmm=$!
n=0
while ! grep -q L2-HOLDING $out && kill -0 $vmm 2>/dev/null && [ $n -lt 2400 ]; do
    sleep 0.1; n=$((n + 1))
done
echo "HOLD-ADD $(R add-device path=$shm,id=shm,p2p_group=g 2>&1)"
t0=$(now)
R remove-device shm
sleep 5
echo "HOLD-INFO-5S $(R info | tr '\n' ' ')"
n=0; while R info | grep -q '^shm ' && [ $n -lt 600 ]; do sleep 0.1; n=$((n + 1)); done
echo "HOLD-FORCED $t0 $(now)"
echo "HOLD-INFO-AFTER $(R info | tr '\n' ' ')"
R shutdown-vmm
wait $vmm
rc=$?
cat $out
exit $rc
EOF
"#;

/// The L1 driver of the API-created VM: `sh /tmp/api-boot.sh CMDLINE`.
const API_BOOT_DRIVER: &str = r#"
cat > /tmp/api-boot.sh <<'EOF'
sock=/tmp/boot.sock out=/tmp/boot.out
p2pvmm -v --api-socket $sock >> $out 2>&1 &
vmm=$!
n=0; while [ ! -S $sock ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
api-probe $sock GET vm.info
cat > /tmp/vm.json <<JSON
{"payload": {"kernel": "/l2/bzImage", "initramfs": "/l2/initramfs.cpio.gz",
 "cmdline": "$1 lab.mode=button"}, "cpus": {"boot_vcpus": 1}, "memory": {"size": 536870912}}
JSON
api-probe $sock PUT vm.create "$(cat /tmp/vm.json)"
api-probe $sock GET vm.info
api-probe $sock GET openapi.json
api-probe $sock PUT vm.boot
# The ACPI power button, once L2 watches for it.
n=0
while ! grep -q L2-BUTTON-READY $out && kill -0 $vmm 2>/dev/null && [ $n -lt 1200 ]; do
    sleep 0.1; n=$((n + 1))
done
api-probe $sock PUT vm.power-button | sed 's/^API-PROBE/API-PROBE-BUTTON/'
wait $vmm
rc=$?
cat $out
exit $rc
EOF
"#;

/// L2: in hotplug mode, waits for ivshmem to come and go and checks edu's DMA each time.
const L2_SCRIPT: &str = r#"
mode=$(sed -n 's/.*lab\.mode=\([a-z]*\).*/\1/p' /proc/cmdline)
if [ "$mode" = hotplug ]; then
    # The kernel's hotplug messages would land in the middle of this script's lines (its console
    # writes go straight to the UART); the script reads what it needs from sysfs.
    dmesg -n 1
    # Waits until ivshmem is there ($1 = yes) or gone ($1 = no), up to 120 s.
    wait_shm() {
        n=0
        while :; do
            s=$(find_dev 0x1af4:0x1110)
            [ "$1" = yes ] && [ -n "$s" ] && return 0
            [ "$1" = no ] && [ -z "$s" ] && return 0
            sleep 0.05; n=$((n + 1)); [ $n -gt 2400 ] && return 1
        done
    }
    step() { echo "HP-STEP $1"; shift; /usr/bin/edu-dma --len 2048 "$@" 2>&1; }
    edu=$(find_dev 0x1234:0x11e8)
    echo "HP-READY edu=$edu"
    wait_shm yes && shm=$(find_dev 0x1af4:0x1110)
    echo "HP-PLUGGED-1 $shm $(readlink -f /sys/bus/pci/devices/$shm)"
    old=$(sed -n 3p /sys/bus/pci/devices/$shm/resource | cut -d' ' -f1)
    echo "HP-BAR $old"
    step plugged-1 $edu --peer-bar "$shm:2" --peer-check "$shm:2"
    echo "HP-DONE-1"
    wait_shm no
    echo "HP-GONE-1"
    step old-address $edu --peer-dst "$old"
    step ram-after-remove $edu
    echo "HP-DONE-2"
    wait_shm yes && shm=$(find_dev 0x1af4:0x1110)
    echo "HP-PLUGGED-2 $shm"
    step plugged-2 $edu --peer-bar "$shm:2" --peer-check "$shm:2"
    echo "HP-DONE-3"
    ( wait_shm no; echo "HP-GONE-2" ) &
    while :; do echo "HP-ALIVE $(cut -d' ' -f1 /proc/uptime)"; sleep 1; done
elif [ "$mode" = button ]; then
    # The GED's interrupt count: vm.power-button raises it, the AML then notifies PWRB.
    ged() {
        grep 'ACPI:Ged' /proc/interrupts |
            awk '{ s = 0; for (i = 2; i <= NF; i++) if ($i ~ /^[0-9]+$/) s += $i; print s }'
    }
    before=$(ged)
    echo "L2-BUTTON-READY ged=$before"
    n=0; while [ "$(ged)" = "$before" ] && [ $n -lt 1200 ]; do sleep 0.05; n=$((n + 1)); done
    echo "L2-BUTTON ged before=$before after=$(ged)"
elif [ "$mode" = hold ]; then
    echo "L2-HOLDING"; sleep 600
fi
"#;

fn run_lab() -> Result<Console, String> {
    let hotplug = |backend: &str| format!("sh /tmp/hp.sh {backend} $EDU $SHM '{L2_CMDLINE}'");
    L1Run::new("hotplug")
        .prelude(BIND_EDU_AND_IVSHMEM)
        .prelude(HOTPLUG_DRIVER)
        .prelude(API_BOOT_DRIVER)
        .prelude(HOLD_DRIVER)
        .file(api_probe_static()?, "/usr/bin/api-probe")
        .l2_file(edu_dma_static()?, "/usr/bin/edu-dma")
        .l2_script(L2_SCRIPT)
        .scenario("iommufd-hotplug", 600, &hotplug("iommufd"))
        .scenario("legacy-hotplug", 600, &hotplug("legacy"))
        .scenario(
            "no-release",
            300,
            &format!("sh /tmp/hold.sh $EDU $SHM '{L2_CMDLINE}'"),
        )
        .scenario(
            "api-boot",
            300,
            &format!("sh /tmp/api-boot.sh '{L2_CMDLINE}'"),
        )
        .run()
}

fn lab() -> &'static Result<Console, String> {
    static LAB: OnceLock<Result<Console, String>> = OnceLock::new();
    LAB.get_or_init(|| {
        run_retrying_lab_failure(
            &[
                "iommufd-hotplug",
                "legacy-hotplug",
                "no-release",
                "api-boot",
            ],
            run_lab,
        )
    })
}

fn scenario(name: &str) -> (Scenario, &'static Console) {
    expect_scenario(lab(), name)
}

/// The `api-probe` line for `METHOD endpoint` whose status is wanted, after `marker`.
fn probe<'a>(s: &'a Scenario, console: &Console, marker: &str, request: &str) -> &'a str {
    s.expect_result(
        console,
        marker,
        &format!("API-PROBE {request} "),
        "api-probe",
    )
}

fn status(line: &str) -> &str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("status="))
        .unwrap_or("-")
}

fn assert_hotplug(name: &str) {
    let (s, console) = scenario(name);
    let fact = |prefix: &str| s.expect_result(console, "", prefix, "the L1 driver");
    // Failed adds leave nothing behind, whichever step failed.
    let before = fact("HP-STATE before-faults ");
    assert!(
        before.contains("vfio-maps=")
            && before.contains("p2p-shm=0")
            && before.contains("info-shm=0"),
        "{name}: state before the failed adds: {before}; console:\n{console}"
    );
    for step in ["model", "plug", "notify"] {
        let answer = fact(&format!("HP-FAULT {step} "));
        assert!(
            matches!(status(answer), "400" | "500") && answer.contains(&format!("step {step}")),
            "{name}: injected failure at {step}: {answer}; console:\n{console}"
        );
        assert_eq!(
            fact(&format!("HP-STATE after-{step} ")),
            before,
            "{name}: a failed add at {step} left something behind; console:\n{console}"
        );
    }
    assert!(
        fact("HP-ADD-1 ").starts_with("id shm at 0000:"),
        "{name}: first add; console:\n{console}"
    );
    for (step, works) in [
        ("plugged-1", true),
        ("old-address", false),
        ("ram-after-remove", true),
        ("plugged-2", true),
    ] {
        assert_eq!(
            s.edu_dma_works(console, &format!("HP-STEP {step}")),
            works,
            "{name}: step {step} should {}work; console:\n{console}",
            if works { "" } else { "not " }
        );
    }
    assert!(
        s.peer_bytes_present(console, "HP-STEP plugged-1"),
        "{name}: bytes absent after the first plug; console:\n{console}"
    );
    assert!(
        s.peer_bytes_present(console, "HP-STEP plugged-2"),
        "{name}: bytes absent after the replug; console:\n{console}"
    );
    // The P2P table shows the hotplugged BAR, and after the removal nothing of it.
    // `p2pvmm remote p2p` prints between the two L1 markers (VM output may interleave).
    let start = s.output.find("HP-P2P-TABLE").unwrap_or(0);
    let end = s.output[start..]
        .find("HP-INFO-PLUGGED")
        .map_or(s.output.len(), |e| start + e);
    assert!(
        s.output[start..end]
            .lines()
            .any(|l| l.starts_with("g ") && l.contains("shm") && l.contains("mapped")),
        "{name}: vm.p2p lacks shm's mapped BAR; console:\n{console}"
    );
    assert!(
        !fact("HP-P2P-REMOVED ").contains("\"shm\""),
        "{name}: shm still in the P2P table after removal; console:\n{console}"
    );
    assert!(
        fact("HP-INFO-PLUGGED ").contains("shm"),
        "{name}: vm.info before removal"
    );
    assert!(
        !fact("HP-INFO-REMOVED ").contains("shm"),
        "{name}: vm.info still shows shm after the guest let go; console:\n{console}"
    );
    assert_eq!(
        status(probe(&s, console, "", "PUT vm.remove-device")),
        "204"
    );
    // Pause and resume.
    assert!(
        fact("HP-PAUSED-STATE ").contains("Paused"),
        "{name}: state while paused; console:\n{console}"
    );
    let beats = |prefix: &str| -> Vec<u32> {
        fact(prefix)
            .split_whitespace()
            .filter_map(|n| n.parse().ok())
            .collect()
    };
    let paused = beats("HP-PAUSED-BEATS ");
    assert!(
        paused.len() == 2 && paused[0] == paused[1],
        "{name}: L2 ran while paused: {paused:?}; console:\n{console}"
    );
    let resumed = beats("HP-RESUMED-BEATS ");
    assert!(
        resumed.len() == 2 && resumed[1] > resumed[0],
        "{name}: L2 did not resume: {resumed:?}; console:\n{console}"
    );
    // Bad requests: the status and what the message must name.
    let bad = "HP-BAD-BEGIN";
    let lines: Vec<&str> = s.output[s.output.find(bad).unwrap_or(0)..]
        .lines()
        .filter(|l| l.starts_with("API-PROBE "))
        .collect();
    let expect: [(&str, &str); 8] = [
        ("400", "JSON"),
        ("400", "colour"),
        ("404", "vm.nosuch"),
        ("404", "nosuch"),
        ("409", "edu"),
        ("413", ""),
        ("204", ""),
        ("400", "0000:00:00.0"),
    ];
    assert!(
        lines.len() >= expect.len(),
        "{name}: bad requests unanswered: {lines:?}; console:\n{console}"
    );
    for (line, (want, names)) in lines.iter().zip(expect) {
        assert_eq!(status(line), want, "{name}: {line}; console:\n{console}");
        assert!(line.contains("wire=ok"), "{name}: malformed answer {line}");
        assert!(
            line.contains(names),
            "{name}: {line} does not name {names:?}"
        );
    }
    // Two concurrent adds of one device: exactly one wins, the other is refused.
    let mut concurrent: Vec<&str> = s
        .output
        .lines()
        .filter(|l| l.starts_with("API-PROBE-CONCURRENT "))
        .map(status)
        .collect();
    concurrent.sort();
    assert_eq!(
        concurrent,
        ["200", "409"],
        "{name}: concurrent adds; console:\n{console}"
    );
    assert!(
        s.output.contains("HP-GONE-2"),
        "{name}: second removal; console:\n{console}"
    );
    let alive = beats("HP-ALIVE-AFTER ");
    assert!(
        alive.len() == 2 && alive[1] > alive[0],
        "{name}: L2 stopped after the bad requests; console:\n{console}"
    );
    assert_eq!(
        fact("HP-FDS before-bad "),
        fact("HP-FDS after-bad "),
        "{name}: open fds differ after the failed and concurrent adds; console:\n{console}"
    );
    assert!(
        fact("HP-FINAL-STATE ").contains("Running"),
        "{name}: final state; console:\n{console}"
    );
    assert_eq!(status(probe(&s, console, "", "GET vmm.ping")), "200");
    s.assert_exit(console, 0);
}

#[test]
fn hotplug_into_a_group_keeps_p2p_on_iommufd() {
    assert_hotplug("iommufd-hotplug");
}

#[test]
fn hotplug_into_a_group_keeps_p2p_on_legacy() {
    assert_hotplug("legacy-hotplug");
}

#[test]
fn api_creates_and_boots_a_vm() {
    let (s, console) = scenario("api-boot");
    let lines: Vec<&str> = s
        .output
        .lines()
        .filter(|l| l.starts_with("API-PROBE "))
        .collect();
    let statuses: Vec<&str> = lines.iter().map(|l| status(l)).collect();
    assert_eq!(
        statuses,
        ["404", "204", "200", "200", "204"],
        "api-boot: info before create, create, info, openapi.json, boot: {lines:?}; console:\n{console}"
    );
    assert!(
        lines[2].contains("\"state\":\"Created\""),
        "api-boot: {}",
        lines[2]
    );
    assert!(
        s.l2_report().is_some(),
        "api-boot: L2 never reported; console:\n{console}"
    );
    // vm.power-button reaches the guest as a GED interrupt.
    let button = s.expect_result(console, "", "API-PROBE-BUTTON ", "api-probe");
    assert_eq!(status(button), "204", "api-boot: vm.power-button: {button}");
    let counts: Vec<u64> = s
        .expect_result(console, "", "L2-BUTTON ged ", "the L2 script")
        .split_whitespace()
        .filter_map(|kv| kv.split_once('=')?.1.parse().ok())
        .collect();
    assert!(
        counts.len() == 2 && counts[1] > counts[0],
        "api-boot: the power button raised no GED interrupt in L2: {counts:?}; console:\n{console}"
    );
    s.assert_exit(console, 0);
}

/// The body of the first `api-probe` answer to `request` after `marker`.
fn probe_body<'a>(s: &'a Scenario, console: &Console, marker: &str, request: &str) -> &'a str {
    let line = probe(s, console, marker, request);
    line.split_once("body=").map_or("", |(_, body)| body)
}

/// The served OpenAPI document passes a standard validator (openapi-spec-validator, installed
/// by .ci/run), and live answers of both VMs validate against the schemas it gives them.
#[test]
fn openapi_document_and_live_answers_validate() {
    let (boot, console) = scenario("api-boot");
    let (hot, _) = scenario("iommufd-hotplug");
    let dir = std::env::temp_dir().join(format!("p2pvmm-openapi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut args = vec![dir.join("openapi.json").display().to_string()];
    std::fs::write(&args[0], probe_body(&boot, console, "", "GET openapi.json")).unwrap();
    let concurrent_ok = hot
        .output
        .lines()
        .filter(|l| l.starts_with("API-PROBE-CONCURRENT ") && status(l) == "200")
        .find_map(|l| l.split_once("body="))
        .map_or("", |(_, b)| b);
    let bodies = [
        (
            "VmInfoResponse",
            probe_body(&boot, console, "", "GET vm.info status=200"),
        ),
        (
            "VmInfoResponse",
            probe_body(&hot, console, "HP-INFO-JSON", "GET vm.info"),
        ),
        (
            "VmmPingResponse",
            probe_body(&hot, console, "", "GET vmm.ping"),
        ),
        (
            "P2pTable",
            hot.expect_result(console, "", "HP-P2P-REMOVED ", "the L1 driver"),
        ),
        ("PciDeviceInfo", concurrent_ok),
        (
            "ErrorBody",
            probe_body(&hot, console, "HP-BAD-BEGIN", "GET vm.nosuch"),
        ),
    ];
    for (i, (schema, body)) in bodies.iter().enumerate() {
        assert!(
            !body.is_empty(),
            "no live {schema} answer; console:\n{console}"
        );
        let path = dir.join(format!("{i}-{schema}.json"));
        std::fs::write(&path, body).unwrap();
        args.push(format!("{schema}={}", path.display()));
    }
    let out = std::process::Command::new("python3")
        .arg(p2pvmm_tests::repo_root().join("resources/check-openapi.py"))
        .args(&args)
        .output()
        .expect("running python3 (resources/setup.sh installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "OpenAPI check failed (pip install openapi-spec-validator if it is missing):\n{text}"
    );
    assert_eq!(text.matches("OPENAPI-BODY").count(), bodies.len(), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A guest that never runs `_EJ0` (acpiphp disabled) loses the device once the eject deadline
/// passes; until then `vm.info` still shows it.
#[test]
fn a_guest_that_never_lets_go_loses_the_device_after_the_deadline() {
    let (s, console) = scenario("no-release");
    let fact = |prefix: &str| s.expect_result(console, "", prefix, "the L1 driver");
    assert!(
        fact("HOLD-ADD ").starts_with("id shm at "),
        "no-release: add; console:\n{console}"
    );
    assert!(
        fact("HOLD-INFO-5S ").contains("shm"),
        "no-release: gone too early; console:\n{console}"
    );
    assert!(
        !fact("HOLD-INFO-AFTER ").contains("shm"),
        "no-release: never removed; console:\n{console}"
    );
    let times: Vec<f64> = fact("HOLD-FORCED ")
        .split_whitespace()
        .filter_map(|t| t.parse().ok())
        .collect();
    let waited = times.get(1).zip(times.first()).map(|(b, a)| b - a);
    assert!(
        waited.is_some_and(|w| (29.0..60.0).contains(&w)),
        "no-release: forced after {waited:?} s, not at the 30 s deadline; console:\n{console}"
    );
    assert!(
        s.output.contains("did not release it within 30s"),
        "no-release: no warning; console:\n{console}"
    );
    s.assert_exit(console, 0);
}
