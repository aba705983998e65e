//! Seccomp in the lab: every p2pvmm thread runs under its filter, a forbidden system call from
//! a vCPU (and from the VMM and API threads) ends p2pvmm with status 159 and a line naming the
//! thread and the call, `--seccomp log` lets the call through with the kernel's audit record
//! naming the thread, and `--seccomp false` installs nothing. The forbidden call comes from
//! `P2PVMM_X_SECCOMP_PROBE=<thread kind>` (a test knob: that thread calls `socket` right after
//! installing its filter). Every other lab test runs with the filters on too (the default).

use std::sync::OnceLock;

use p2pvmm_tests::{
    expect_scenario, run_retrying_lab_failure, Console, L1Run, Scenario, BIND_EDU_AND_IVSHMEM,
    L2_CMDLINE,
};

const L2: &str = "--kernel /l2/bzImage --initramfs /l2/initramfs.cpio.gz --memory 256M";

/// L2 holds (instead of powering off) when its command line asks for it.
const L2_SCRIPT: &str = r#"
if grep -q 'p2pvmm\.l2=hold' /proc/cmdline; then echo "L2-HOLDING"; sleep 600; fi
"#;

/// `sh /tmp/threads.sh`: p2pvmm with the API, two vCPUs and edu + ivshmem in a P2P group (so
/// every thread kind runs); once L2 holds, one `THREAD <comm> <Seccomp:> <Seccomp_filters:>`
/// line per p2pvmm thread from /proc, then SIGTERM.
const THREADS: &str = r#"
cat > /tmp/threads.sh <<'EOF'
p2pvmm --api-socket /tmp/api.sock --kernel /l2/bzImage --initramfs /l2/initramfs.cpio.gz \
    --memory 256M --cpus 2 --cmdline "$1 p2pvmm.l2=hold" \
    --device path=$EDU,id=edu --device path=$SHM,id=shm --p2p-group name=g,devices=edu:shm \
    > /tmp/threads.out 2>&1 &
pid=$!
n=0
while kill -0 $pid 2>/dev/null && ! grep -q L2-HOLDING /tmp/threads.out && [ $n -lt 150 ]; do
    sleep 1; n=$((n + 1))
done
kill -0 $pid 2>/dev/null || { echo "p2pvmm exited early"; cat /tmp/threads.out; exit 1; }
p2pvmm remote --api-socket /tmp/api.sock ping > /dev/null
for t in /proc/$pid/task/*; do
    echo "THREAD $(cat $t/comm) $(grep '^Seccomp:' $t/status | tr -s ' \t' ' ') $(grep '^Seccomp_filters:' $t/status | tr -s ' \t' ' ')"
done
kill -TERM $pid
n=0
while kill -0 $pid 2>/dev/null && [ $n -lt 60 ]; do sleep 1; n=$((n + 1)); done
cat /tmp/threads.out
kill -0 $pid 2>/dev/null && { echo "p2pvmm still running"; kill -9 $pid; exit 1; }
exit 0
EOF
"#;

fn seccomp_lab() -> Result<Console, String> {
    let probe = |kind: &str, flags: &str| {
        format!("env P2PVMM_X_SECCOMP_PROBE={kind} p2pvmm {L2} {flags} --cmdline '{L2_CMDLINE}'")
    };
    L1Run::new("seccomp")
        .prelude(BIND_EDU_AND_IVSHMEM)
        .prelude("export EDU SHM")
        .prelude(THREADS)
        .l2_script(L2_SCRIPT)
        .scenario(
            "threads",
            240,
            &format!("sh /tmp/threads.sh '{L2_CMDLINE}'"),
        )
        .scenario("vcpu-trap", 120, &probe("vcpu", "--cpus 2"))
        .scenario("vmm-trap", 120, &probe("vmm", ""))
        .scenario(
            "api-trap",
            60,
            "env P2PVMM_X_SECCOMP_PROBE=api p2pvmm --api-socket /tmp/trap.sock",
        )
        .scenario("vcpu-log", 240, &probe("vcpu", "--seccomp log"))
        .scenario("vcpu-off", 240, &probe("vcpu", "--seccomp false"))
        .run()
}

fn lab() -> &'static Result<Console, String> {
    static LAB: OnceLock<Result<Console, String>> = OnceLock::new();
    LAB.get_or_init(|| run_retrying_lab_failure(&["threads", "vcpu-log", "vcpu-off"], seccomp_lab))
}

fn scenario(name: &str) -> (Scenario, &'static Console) {
    expect_scenario(lab(), name)
}

/// `(comm, seccomp mode, filters)` of each `THREAD` line.
fn threads(output: &str) -> Vec<(String, u32, u32)> {
    output
        .lines()
        .filter_map(|l| l.strip_prefix("THREAD "))
        .filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            match words.as_slice() {
                [comm, "Seccomp:", mode, "Seccomp_filters:", filters] => {
                    Some((comm.to_string(), mode.parse().ok()?, filters.parse().ok()?))
                }
                _ => None,
            }
        })
        .collect()
}

#[test]
fn every_p2pvmm_thread_runs_under_a_filter() {
    let (s, console) = scenario("threads");
    let threads = threads(&s.output);
    let names: Vec<&str> = threads.iter().map(|t| t.0.as_str()).collect();
    for expected in [
        "p2pvmm",
        "vcpu0",
        "vcpu1",
        "p2pvmm-api",
        "console-out",
        "p2p-report",
    ] {
        assert!(
            names.contains(&expected),
            "threads: no {expected} thread among {names:?}; console:\n{console}"
        );
    }
    for (comm, mode, filters) in &threads {
        // Mode 2 is SECCOMP_MODE_FILTER. Threads the VMM thread spawns keep its filter too;
        // the start's helper threads (kernel-read, ram-map) have only that one.
        let inherits = ["p2pvmm", "kernel-read", "ram-map"];
        let own = if inherits.contains(&comm.as_str()) || comm.starts_with("p2pvmm-api") {
            1
        } else {
            2
        };
        assert_eq!(
            *mode, 2,
            "threads: {comm} has no filter; console:\n{console}"
        );
        assert_eq!(
            *filters, own,
            "threads: {comm} has {filters} filters, expected {own}; console:\n{console}"
        );
    }
    assert!(
        s.output.contains("L2-HOLDING") && s.output.contains("p2pvmm: stopped by SIGTERM"),
        "threads: L2 did not hold, or p2pvmm did not stop in order under its filters; console:\n{console}"
    );
    s.assert_exit(console, 0);
}

/// The forbidden call ended p2pvmm with 159 and a line naming the thread and the call.
fn assert_trapped(name: &str, thread: &str) {
    let (s, console) = scenario(name);
    let line = format!(
        "p2pvmm: seccomp: the {thread} thread made a forbidden system call: socket (41); \
         exiting with status 159"
    );
    assert!(
        s.output.contains(&line),
        "{name}: no line naming the {thread} thread and socket; console:\n{console}"
    );
    s.assert_exit(console, 159);
}

#[test]
fn a_forbidden_call_from_a_vcpu_thread_is_trapped() {
    assert_trapped("vcpu-trap", "vcpu");
}

#[test]
fn a_forbidden_call_from_the_vmm_thread_is_trapped() {
    assert_trapped("vmm-trap", "vmm");
}

#[test]
fn a_forbidden_call_from_the_api_thread_is_trapped() {
    assert_trapped("api-trap", "api");
}

#[test]
fn seccomp_log_lets_the_call_through_and_the_kernel_names_the_thread() {
    let (s, console) = scenario("vcpu-log");
    assert!(
        s.l2_report().is_some(),
        "vcpu-log: L2 did not boot; console:\n{console}"
    );
    let records: Vec<&str> = s
        .output
        .lines()
        .filter(|l| l.starts_with("SCENARIO-SECCOMP vcpu-log:"))
        .collect();
    assert!(
        !records.is_empty()
            && records
                .iter()
                .all(|r| r.contains("comm=\"vcpu0\"") && r.contains("syscall=41 ")),
        "vcpu-log: expected the audit record of vcpu0's socket call and nothing else, got \
         {records:?}; console:\n{console}"
    );
    s.assert_exit(console, 0);
}

#[test]
fn seccomp_false_installs_no_filter() {
    let (s, console) = scenario("vcpu-off");
    assert!(
        s.l2_report().is_some(),
        "vcpu-off: L2 did not boot; console:\n{console}"
    );
    assert!(
        !s.output.contains("SCENARIO-SECCOMP") && !s.output.contains("forbidden system call"),
        "vcpu-off: a filter acted; console:\n{console}"
    );
    s.assert_exit(console, 0);
}

#[test]
fn thread_lines_parse() {
    let t = threads("THREAD vcpu0 Seccomp: 2 Seccomp_filters: 2\nTHREAD x Seccomp: q\n");
    assert_eq!(t, vec![("vcpu0".to_owned(), 2, 2)]);
}
