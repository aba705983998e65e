//! uevent-stamp: prints when the kernel adds or removes a PCI device, for the hotplug
//! benchmark's L2 (resources/bench-hotplug.sh). Runs in a lab guest, statically linked:
//!   `uevent-stamp VENDOR:DEVICE COUNT`   (e.g. `1af4:1110 10`)
//!   `uevent-stamp now`                   (just the time, for the L1 side)
//! prints `UEVENT-STAMP ready <realtime>` once listening, then
//! `UEVENT-STAMP <add|remove> <realtime>` for each event of a matching device, and exits after
//! COUNT of them. The kernel sends the uevent from `device_add`/`device_del`, the moment the
//! device appears in or leaves sysfs, and the netlink socket wakes this program at once: no
//! polling delay between the guest seeing the device and the stamp. Times are CLOCK_REALTIME
//! in seconds, which L2 takes from kvmclock and so shares with L1 (the benchmark checks the
//! offset).

use p2pvmm_tests::clock::realtime_stamp;
use std::process::ExitCode;

/// The action of a uevent (`ACTION=`) when it is about the PCI device `pci_id`
/// (`PCI_ID=1AF4:1110`, upper case as the kernel writes it).
fn matching_action<'a>(message: &'a [u8], pci_id: &str) -> Option<&'a str> {
    let mut action = None;
    let mut pci = false;
    let mut matches = false;
    for field in message.split(|&b| b == 0) {
        let Ok(field) = std::str::from_utf8(field) else {
            continue;
        };
        if let Some(a) = field.strip_prefix("ACTION=") {
            action = Some(a);
        } else if field == "SUBSYSTEM=pci" {
            pci = true;
        } else if let Some(id) = field.strip_prefix("PCI_ID=") {
            matches = id.eq_ignore_ascii_case(pci_id);
        }
    }
    action.filter(|a| pci && matches && (*a == "add" || *a == "remove"))
}

/// A netlink socket subscribed to the kernel's uevents.
fn uevent_socket() -> std::io::Result<i32> {
    // SAFETY: plain socket creation; the descriptor is checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_KOBJECT_UEVENT,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: sockaddr_nl is plain data; all-zero is a valid value to fill in.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    addr.nl_groups = 1; // the kernel's own uevents (no udev in the lab guests)
                        // SAFETY: addr is a valid sockaddr_nl of the size passed.
    let rc = unsafe {
        libc::bind(
            fd,
            (&addr as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args == ["now"] {
        println!("{}", realtime_stamp());
        return ExitCode::SUCCESS;
    }
    let [id, count] = args.as_slice() else {
        eprintln!("usage: uevent-stamp VENDOR:DEVICE COUNT | uevent-stamp now");
        return ExitCode::from(2);
    };
    let Ok(count) = count.parse::<u32>() else {
        eprintln!("uevent-stamp: COUNT must be a number, got {count:?}");
        return ExitCode::from(2);
    };
    let fd = match uevent_socket() {
        Ok(fd) => fd,
        Err(e) => {
            eprintln!("uevent-stamp: netlink socket: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("UEVENT-STAMP ready {}", realtime_stamp());
    let mut buf = vec![0u8; 16 * 1024];
    let mut seen = 0;
    while seen < count {
        // SAFETY: buf is valid for writes of its length.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            eprintln!("uevent-stamp: recv: {e}");
            return ExitCode::FAILURE;
        }
        let stamp = realtime_stamp();
        if let Some(action) = matching_action(&buf[..n as usize], id) {
            println!("UEVENT-STAMP {action} {stamp}");
            seen += 1;
        }
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::matching_action;

    #[test]
    fn picks_the_pci_device_by_id() {
        let add = b"add@/devices/pci0000:00/0000:00:01.0/0000:01:00.0\0ACTION=add\0\
            DEVPATH=/devices/pci0000:00/0000:00:01.0/0000:01:00.0\0SUBSYSTEM=pci\0\
            PCI_ID=1AF4:1110\0SEQNUM=1234\0";
        assert_eq!(matching_action(add, "1af4:1110"), Some("add"));
        assert_eq!(matching_action(add, "1234:11e8"), None);
        let bind = b"bind@/devices/x\0ACTION=bind\0SUBSYSTEM=pci\0PCI_ID=1AF4:1110\0";
        assert_eq!(matching_action(bind, "1af4:1110"), None);
        let other = b"add@/devices/x\0ACTION=add\0SUBSYSTEM=block\0";
        assert_eq!(matching_action(other, "1af4:1110"), None);
    }
}
