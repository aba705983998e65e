//! qmp-probe: sends QMP commands to a QEMU monitor socket and prints each answer, for the
//! hotplug benchmark's QEMU side (resources/bench-hotplug.sh). Runs in the lab's L1, statically
//! linked:
//!   `qmp-probe SOCKET '{"execute": "device_add", "arguments": {...}}' ...`
//! prints `QMP-PROBE-SENT <time>` as each command is written (CLOCK_REALTIME in seconds) and
//! `QMP-PROBE <answer line>` per command (after the capabilities handshake), and with
//! `--wait-event NAME` waits for that event (e.g. DEVICE_DELETED) and prints it as well.
//! Exits 0 when every command returned `"return"`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::Duration;

use p2pvmm_tests::clock::realtime_stamp;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(socket) = args.next() else {
        eprintln!("usage: qmp-probe SOCKET COMMAND_JSON... [--wait-event NAME]");
        return ExitCode::from(2);
    };
    let mut commands = Vec::new();
    let mut event = None;
    while let Some(arg) = args.next() {
        if arg == "--wait-event" {
            event = args.next();
        } else {
            commands.push(arg);
        }
    }
    match run(&socket, &commands, event.as_deref()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            println!("QMP-PROBE error {socket}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(socket: &str, commands: &[String], event: Option<&str>) -> std::io::Result<bool> {
    let stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut writer = stream.try_clone()?;
    let mut lines = BufReader::new(stream).lines();
    let mut next = || lines.next().unwrap_or_else(|| Ok(String::new()));
    next()?; // the greeting
    writer.write_all(b"{\"execute\": \"qmp_capabilities\"}\n")?;
    next()?;
    let mut ok = true;
    for command in commands {
        println!("QMP-PROBE-SENT {}", realtime_stamp());
        writer.write_all(command.as_bytes())?;
        writer.write_all(b"\n")?;
        // Events may come before the answer; the answer has "return" or "error".
        loop {
            let line = next()?;
            if line.is_empty() {
                return Ok(false);
            }
            if line.contains("\"return\"") || line.contains("\"error\"") {
                ok &= line.contains("\"return\"");
                println!("QMP-PROBE {line}");
                break;
            }
            if event.is_some_and(|e| line.contains(e)) {
                println!("QMP-PROBE {line}");
                return Ok(ok);
            }
        }
    }
    if let Some(event) = event {
        loop {
            let line = next()?;
            if line.is_empty() {
                return Ok(false);
            }
            if line.contains(event) {
                println!("QMP-PROBE {line}");
                break;
            }
        }
    }
    Ok(ok)
}
