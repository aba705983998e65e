//! Reading what L1 printed: scenario sections and the L2 guest's report line.

/// Everything the L1 serial console printed.
#[derive(Clone, Debug)]
pub struct Console {
    pub text: String,
}

/// One scenario's slice of the console, between `SCENARIO-BEGIN name` and
/// `SCENARIO-END name rc=N`, as printed by the L1 script (see [`crate::L1Run::scenario`]).
#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: String,
    pub output: String,
    /// p2pvmm's exit status, or `None` if the scenario never finished.
    pub rc: Option<i32>,
}

/// What the L2 initramfs reports about the booted guest (`P2PVMM-L2: cpus=N memtotal_kb=K`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L2Report {
    pub cpus: u32,
    pub memtotal_kb: u64,
}

/// Lines of the console a failure message shows: CI keeps only so much of a failed test's
/// output, so the scenario summary comes first and then the end of the console.
const TAIL_LINES: usize = 160;

/// A failure's view of the console: each scenario's exit status (`-` when it never ended), then
/// the last [`TAIL_LINES`] lines (the whole text is in `target/lab-work/*/l1-console.log`).
impl std::fmt::Display for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for s in self.scenarios() {
            let rc = s.rc.map_or("-".to_owned(), |rc| rc.to_string());
            writeln!(
                f,
                "[scenario {} rc={rc}, {} lines]",
                s.name,
                s.output.lines().count()
            )?;
        }
        let lines: Vec<&str> = self.text.lines().collect();
        let skip = lines.len().saturating_sub(TAIL_LINES);
        if skip > 0 {
            writeln!(f, "[... {skip} earlier lines ...]")?;
        }
        for line in &lines[skip..] {
            writeln!(f, "{line}")?;
        }
        Ok(())
    }
}

impl Console {
    /// Whether L1 ran its script to the end (`P2PVMM-L1: done`).
    pub fn l1_finished(&self) -> bool {
        self.text.contains("P2PVMM-L1: done rc=")
    }

    /// Every scenario that started, in order.
    pub fn scenarios(&self) -> Vec<Scenario> {
        self.text
            .lines()
            .filter_map(|l| l.strip_prefix("SCENARIO-BEGIN "))
            .filter_map(|name| self.scenario(name.trim()))
            .collect()
    }

    /// The section of scenario `name`, if it started.
    pub fn scenario(&self, name: &str) -> Option<Scenario> {
        let begin = format!("SCENARIO-BEGIN {name}\n");
        let start = self.text.find(&begin)? + begin.len();
        let rest = &self.text[start..];
        let end_tag = format!("SCENARIO-END {name} rc=");
        let (output, rc) = match rest.find(&end_tag) {
            Some(end) => {
                let rc = rest[end + end_tag.len()..]
                    .lines()
                    .next()
                    .and_then(|v| v.trim().parse().ok());
                (&rest[..end], rc)
            }
            None => (rest, None),
        };
        Some(Scenario {
            name: name.to_owned(),
            output: output.to_owned(),
            rc,
        })
    }
}

/// Runs the lab, and once more if the first run looks like a lab failure rather than a test
/// result: a scenario in `booting` shows no L2 kernel output at all, or an L2 oops (the lab's documented
/// hiccup, a nested guest that never starts), a scenario was killed by its time limit or
/// never finished (seen when the machine stalled for minutes), or L1 as a whole timed out. It
/// is run up to twice more; a third bad run is returned as it is, for the tests to fail on.
pub fn run_retrying_lab_failure(
    booting: &[&str],
    run: impl Fn() -> Result<Console, String>,
) -> Result<Console, String> {
    // A frozen L1 (killed by its silence watchdog) or what the lab's nested emulation produced
    // on its own (see l1.rs) says nothing about p2pvmm: a p2pvmm bug behind it would show again
    // in every run.
    let mut result = run();
    for rerun in 1..=MAX_LAB_RERUNS {
        let why = match &result {
            Ok(console) => match lab_failure(console, booting) {
                Some(why) => format!("{why}:\n{}", console.text),
                None => return result,
            },
            Err(e) if e.starts_with(crate::l1::L1_TIMED_OUT) => e.clone(),
            Err(_) => return result,
        };
        eprintln!("lab failure, rerun {rerun} of {MAX_LAB_RERUNS}: {why}");
        result = run();
    }
    result
}

/// How often a lab run that failed on its own is repeated.
const MAX_LAB_RERUNS: usize = 2;

/// What a crashed L2 (or L1's KVM under it) leaves in a scenario's output.
const L2_CRASH_SIGNS: [&str; 4] = [
    "Oops: ",
    "Kernel panic - not syncing",
    "triple fault",
    "KVM internal error",
];

/// Why a run's result says nothing about p2pvmm, if it does not: a scenario in `booting`
/// without L2 kernel output, an L2 oops, kernel panic or triple fault (seen at random points of
/// L2's boot, memory corruption under nested TCG), a KVM internal error (L1's KVM failing to
/// emulate, seen once as an L2 powered off), or a scenario killed by its time limit or never
/// finished (seen when the machine stalled for minutes).
fn lab_failure(console: &Console, booting: &[&str]) -> Option<&'static str> {
    let silent = booting.iter().any(|name| {
        console.scenario(name).is_none_or(|s| {
            !s.output.contains("Linux version")
                || L2_CRASH_SIGNS.iter().any(|sign| s.output.contains(sign))
        })
    });
    let timed_out = console.scenarios().iter().any(|s| {
        // 124: timeout(1) gave up; 143: it sent SIGTERM and p2pvmm stopped in order (busybox's
        // timeout passes that status on). A scenario may end with 143 on purpose (sigterm), so
        // 143 counts only when the scenario's stuck report (printed just before its limit) is
        // there.
        matches!(s.rc, None | Some(124))
            || (s.rc == Some(143) && s.output.contains("SCENARIO-STUCK"))
    });
    if silent {
        Some("silent or crashed L2")
    } else if timed_out {
        Some("a timed-out scenario")
    } else {
        None
    }
}

/// Scenario `name` of a shared lab run. Panics, with the L1 console attached, when the lab did
/// not run or the scenario never started: either is a test failure with its evidence.
pub fn expect_scenario<'a>(
    lab: &'a Result<Console, String>,
    name: &str,
) -> (Scenario, &'a Console) {
    let console = match lab {
        Ok(console) => console,
        Err(e) => panic!("the lab did not run: {e}"),
    };
    match console.scenario(name) {
        Some(s) => (s, console),
        None => panic!("scenario {name} never started; L1 console:\n{}", console),
    }
}

impl Scenario {
    /// What follows `prefix` (trimmed) on the first line holding it at or after the first
    /// `marker` (`""`: anywhere): a guest program's result line after a step's marker.
    pub fn result_after(&self, marker: &str, prefix: &str) -> Option<&str> {
        let start = self.output.find(marker)?;
        self.output[start..]
            .lines()
            .find_map(|l| l.split_once(prefix).map(|(_, r)| r.trim()))
    }

    /// Whether edu-dma's round trip after the step marker `marker` (e.g. `P2P-STEP moved`)
    /// succeeded byte for byte.
    pub fn edu_dma_works(&self, console: &Console, marker: &str) -> bool {
        let result = self.expect_result(console, &format!("{marker}\n"), "EDU-DMA: ", "edu-dma");
        result.starts_with("ok ") && result.contains("wrong=0")
    }

    /// What edu-dma's `--peer-check` saw after the step marker `marker`: whether the bytes
    /// landed in the peer's BAR.
    pub fn peer_bytes_present(&self, console: &Console, marker: &str) -> bool {
        let seen = self.expect_result(
            console,
            &format!("{marker}\n"),
            "EDU-DMA-PEER: ",
            "edu-dma --peer-check",
        );
        seen == "present"
    }

    /// [`result_after`](Self::result_after), failing the test with the L1 console attached
    /// when the line is missing (`what` names the program that should have printed it).
    pub fn expect_result(&self, console: &Console, marker: &str, prefix: &str, what: &str) -> &str {
        self.result_after(marker, prefix).unwrap_or_else(|| {
            panic!(
                "{}: {what} printed no result; console:\n{}",
                self.name, console
            )
        })
    }

    /// Fails the test, with the L1 console attached, unless p2pvmm exited with `status`.
    pub fn assert_exit(&self, console: &Console, status: i32) {
        assert_eq!(
            self.rc,
            Some(status),
            "{}: p2pvmm exit status; console:\n{}",
            self.name,
            console
        );
    }

    /// The L2 report line, if L2 got as far as its init.
    pub fn l2_report(&self) -> Option<L2Report> {
        let line = self
            .output
            .lines()
            .find_map(|l| l.split_once("P2PVMM-L2: ").map(|(_, r)| r))?;
        let field = |key: &str| {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        Some(L2Report {
            cpus: field("cpus")? as u32,
            memtotal_kb: field("memtotal_kb")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "noise\nSCENARIO-BEGIN two\n[ 0.1] booting\n\
        P2PVMM-L2: cpus=2 memtotal_kb=480000\nSCENARIO-END two rc=0\n\
        SCENARIO-BEGIN hung\nstuck\n";

    #[test]
    fn finds_scenarios_and_reports() {
        let console = Console {
            text: SAMPLE.to_owned(),
        };
        let two = console.scenario("two").unwrap();
        assert_eq!(two.rc, Some(0));
        assert_eq!(
            two.l2_report(),
            Some(L2Report {
                cpus: 2,
                memtotal_kb: 480_000
            })
        );
        let names: Vec<_> = console.scenarios().into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["two", "hung"]);
        assert_eq!(
            two.result_after("", "P2PVMM-L2: "),
            Some("cpus=2 memtotal_kb=480000")
        );
        assert_eq!(
            two.result_after("booting", "cpus="),
            Some("2 memtotal_kb=480000")
        );
        assert_eq!(
            two.result_after("P2PVMM-L2", "booting"),
            None,
            "only after the marker"
        );
        assert_eq!(two.result_after("absent", "cpus="), None);
        let hung = console.scenario("hung").unwrap();
        assert_eq!(hung.rc, None);
        assert_eq!(hung.l2_report(), None);
        assert!(console.scenario("absent").is_none());
        assert!(!console.l1_finished());
    }

    /// How many runs `run_retrying_lab_failure` makes for a first console `text`.
    fn runs_for(text: &str) -> usize {
        let calls = std::cell::Cell::new(0);
        let _ = run_retrying_lab_failure(&["s"], || {
            calls.set(calls.get() + 1);
            Ok(Console {
                text: text.to_owned(),
            })
        });
        calls.get()
    }

    #[test]
    fn a_good_rerun_ends_the_reruns() {
        let calls = std::cell::Cell::new(0);
        let result = run_retrying_lab_failure(&["s"], || {
            calls.set(calls.get() + 1);
            let end = if calls.get() == 1 {
                "Oops: 0002\nSCENARIO-END s rc=3"
            } else {
                "SCENARIO-END s rc=0"
            };
            Ok(Console {
                text: format!("SCENARIO-BEGIN s\nLinux version 7\n{end}\n"),
            })
        });
        assert_eq!(calls.get(), 2);
        assert_eq!(result.unwrap().scenario("s").unwrap().rc, Some(0));
    }

    #[test]
    fn a_sigterm_from_the_time_limit_reruns_but_a_scenarios_own_does_not() {
        let booted = "SCENARIO-BEGIN s\nLinux version 7\n";
        let stuck = format!("{booted}SCENARIO-STUCK s: vcpu0\nSCENARIO-END s rc=143\n");
        let own = format!("{booted}p2pvmm: stopped by SIGTERM\nSCENARIO-END s rc=143\n");
        assert_eq!(runs_for(&stuck), 3);
        assert_eq!(runs_for(&own), 1);
        assert_eq!(runs_for(&format!("{booted}SCENARIO-END s rc=0\n")), 1);
        assert_eq!(
            runs_for(&format!("{booted}Oops: 0002\nSCENARIO-END s rc=3\n")),
            3
        );
        assert_eq!(
            runs_for(&format!(
                "{booted}vcpu0: triple fault, resetting\nSCENARIO-END s rc=3\n"
            )),
            3
        );
        assert_eq!(
            runs_for(&format!(
                "{booted}Kernel panic - not syncing: Fatal exception\nSCENARIO-END s rc=3\n"
            )),
            3
        );
        assert_eq!(
            runs_for(&format!(
                "{booted}vcpu0: KVM internal error (suberror 1, data [])\nSCENARIO-END s rc=4\n"
            )),
            3
        );
    }
}
