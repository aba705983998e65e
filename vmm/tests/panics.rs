//! A panic in any p2pvmm thread ends the process at once with SIGABRT (exit status 134) and one
//! line naming the thread, never a hang. Runs on this machine's `/dev/kvm` (which cannot boot
//! Linux but runs a tiny guest): a 64-bit ELF "kernel" of a few instructions that writes `P!` to
//! COM1 and halts, so the boot vCPU exits to p2pvmm (two port writes), the console sees a
//! partial line, and the VM then stays up until something stops it.
//!
//! Each thread kind gets `P2PVMM_X_PANIC=THREAD`; without it the same VM keeps running until
//! SIGTERM (exit 143), so a knob that did nothing fails on the deadline.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long p2pvmm may take to end after its guest started; it takes 10-40 ms here.
const DEADLINE: Duration = Duration::from_secs(10);
/// Where the tiny guest is loaded and entered.
const LOAD_ADDR: u64 = 0x100_0000;

/// `mov $0x3f8,%dx; mov $'P',%al; out %al,%dx; mov $'!',%al; out %al,%dx; 1: hlt; jmp 1b`
const GUEST_CODE: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, 0xb0, b'P', 0xee, 0xb0, b'!', 0xee, 0xf4, 0xeb, 0xfd,
];

/// A minimal ELF64 executable: the header, one PT_LOAD program header, the code.
fn tiny_elf() -> Vec<u8> {
    const EHDR: u16 = 64;
    const PHDR: u16 = 56;
    let code_off = u64::from(EHDR + PHDR);
    let mut elf = Vec::new();
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // e_entry
    elf.extend_from_slice(&u64::from(EHDR).to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for half in [EHDR, PHDR, 1, 64, 0, 0] {
        // e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
        elf.extend_from_slice(&half.to_le_bytes());
    }
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // R + X
    elf.extend_from_slice(&code_off.to_le_bytes()); // p_offset
    elf.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // p_vaddr
    elf.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // p_paddr
    let len = GUEST_CODE.len() as u64;
    elf.extend_from_slice(&len.to_le_bytes()); // p_filesz
    elf.extend_from_slice(&len.to_le_bytes()); // p_memsz
    elf.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
    elf.extend_from_slice(GUEST_CODE);
    elf
}

/// A scratch directory with the tiny guest in it, removed afterwards.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("p2pvmm-panic-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("guest.elf"), tiny_elf()).unwrap();
        Scratch(dir)
    }

    fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn start(scratch: &Scratch, panic: Option<&str>, cpus: u8, api: Option<&Path>) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_p2pvmm"));
    command
        .arg("--kernel")
        .arg(scratch.path("guest.elf"))
        .args(["--cpus", &cpus.to_string(), "--memory", "128M"])
        .args(["--cmdline", "console=ttyS0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(socket) = api {
        command.arg("--api-socket").arg(socket);
    }
    match panic {
        Some(thread) => command.env("P2PVMM_X_PANIC", thread),
        None => command.env_remove("P2PVMM_X_PANIC"),
    };
    command.spawn().expect("starting p2pvmm")
}

/// Waits for `child` until `deadline` after `since`; kills it if it is still running then.
fn wait_until(child: &mut Child, since: Instant) -> Option<ExitStatus> {
    while since.elapsed() < DEADLINE {
        if let Some(status) = child.try_wait().expect("waiting for p2pvmm") {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

fn output(child: &mut Child) -> (String, String) {
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_string(&mut out);
    }
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_string(&mut err);
    }
    (out, err)
}

/// Runs the tiny VM with `P2PVMM_X_PANIC=knob` (after `poke`, if any) and checks it aborts
/// within the deadline, naming `thread` (quoted as in the line).
fn panics_and_aborts(knob: &str, thread: &str, cpus: u8, poke: Option<fn(&Path)>) {
    let scratch = Scratch::new(knob);
    let socket = scratch.path("api.sock");
    let started = Instant::now();
    let mut child = start(&scratch, Some(knob), cpus, poke.map(|_| socket.as_path()));
    if let Some(poke) = poke {
        poke(&socket);
    }
    let status = wait_until(&mut child, started);
    let elapsed = started.elapsed();
    let (out, err) = output(&mut child);
    let report = format!("stdout: {out:?}\nstderr:\n{err}");
    let status = status.unwrap_or_else(|| panic!("p2pvmm still ran after {DEADLINE:?}\n{report}"));
    assert_eq!(
        status.signal(),
        Some(libc::SIGABRT),
        "p2pvmm ended with {status}, not SIGABRT\n{report}"
    );
    let line = format!("p2pvmm: error: thread {thread} panicked at ");
    assert!(
        err.lines()
            .any(|l| l.starts_with(&line) && l.contains("injected panic")),
        "no line starting {line:?} with the panic message\n{report}"
    );
    eprintln!("P2PVMM_X_PANIC={knob}: {status} after {elapsed:?}");
}

/// Connects to the API socket once it exists and sends one request.
fn send_ping(socket: &Path) {
    let since = Instant::now();
    while since.elapsed() < DEADLINE {
        if let Ok(mut stream) = UnixStream::connect(socket) {
            let _ = stream.write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\n\r\n");
            let _ = stream.read(&mut [0u8; 256]);
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn without_the_knob_the_tiny_vm_runs_until_sigterm() {
    let scratch = Scratch::new("none");
    let mut child = start(&scratch, None, 2, None);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "p2pvmm ended on its own: {:?}",
        output(&mut child)
    );
    // SAFETY: kill only sends a signal to the child we started.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = wait_until(&mut child, Instant::now());
    let (out, err) = output(&mut child);
    assert_eq!(status.and_then(|s| s.code()), Some(143), "{out:?}\n{err}");
    assert_eq!(out, "P!", "the guest's console output\nstderr:\n{err}");
}

#[test]
fn a_vcpu_panic_aborts_naming_the_vcpu() {
    panics_and_aborts("vcpu", "'vcpu0'", 2, None);
}

#[test]
fn a_vmm_thread_panic_aborts_naming_the_vmm_thread() {
    panics_and_aborts("vmm", "'main' (the VMM thread)", 2, None);
}

#[test]
fn a_console_flusher_panic_aborts_naming_it() {
    panics_and_aborts("console", "'console-out'", 2, None);
}

#[test]
fn an_api_accept_thread_panic_aborts_naming_it() {
    panics_and_aborts("api", "'p2pvmm-api'", 1, Some(send_ping));
}

#[test]
fn an_api_connection_thread_panic_aborts_naming_it() {
    panics_and_aborts("api-conn", "'p2pvmm-api-conn'", 1, Some(send_ping));
}

/// A pseudo-terminal: p2pvmm gets the slave as stdin, the test reads its mode from the master.
struct Pty {
    master: std::fs::File,
    slave: std::fs::File,
}

impl Pty {
    fn open() -> Pty {
        use std::os::fd::FromRawFd;
        let (mut master, mut slave) = (-1, -1);
        // SAFETY: openpty writes two descriptors into the given ints; the other arguments may be
        // null.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: both descriptors were just opened and are owned by nothing else.
        unsafe {
            Pty {
                master: std::fs::File::from_raw_fd(master),
                slave: std::fs::File::from_raw_fd(slave),
            }
        }
    }

    /// Whether the terminal is in line mode (ICANON), as p2pvmm's raw mode clears it.
    fn canonical(&self) -> bool {
        use std::os::fd::AsRawFd;
        // SAFETY: termios is plain data that tcgetattr fills.
        let mut termios: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: a valid descriptor and a writable termios.
        let rc = unsafe { libc::tcgetattr(self.master.as_raw_fd(), &mut termios) };
        assert_eq!(rc, 0, "tcgetattr: {}", std::io::Error::last_os_error());
        termios.c_lflag & libc::ICANON != 0
    }

    /// Runs the tiny VM on this terminal with `knob`, killing it after `kill_after` if given.
    fn run(&self, scratch: &Scratch, knob: Option<&str>, kill_after: Option<Duration>) -> bool {
        let mut command = Command::new(env!("CARGO_BIN_EXE_p2pvmm"));
        command
            .arg("--kernel")
            .arg(scratch.path("guest.elf"))
            .args(["--memory", "128M", "--cmdline", "console=ttyS0"])
            .stdin(self.slave.try_clone().unwrap())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .env_remove("P2PVMM_X_PANIC");
        if let Some(knob) = knob {
            command.env("P2PVMM_X_PANIC", knob);
        }
        let mut child = command.spawn().expect("starting p2pvmm");
        if let Some(after) = kill_after {
            std::thread::sleep(after);
            assert!(
                !self.canonical(),
                "p2pvmm did not put the terminal in raw mode"
            );
            let _ = child.kill();
        }
        let status = wait_until(&mut child, Instant::now());
        assert!(status.is_some(), "p2pvmm still ran after {DEADLINE:?}");
        self.canonical()
    }
}

#[test]
fn a_panic_gives_the_terminal_back_where_sigkill_does_not() {
    let scratch = Scratch::new("tty");
    let pty = Pty::open();
    assert!(pty.canonical());
    // The control: killed, p2pvmm leaves the terminal raw.
    assert!(!pty.run(&scratch, None, Some(Duration::from_millis(500))));
    for knob in ["vmm", "console"] {
        let pty = Pty::open();
        assert!(
            pty.run(&scratch, Some(knob), None),
            "{knob}: terminal left raw"
        );
    }
}
