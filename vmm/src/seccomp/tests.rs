use std::collections::BTreeSet;

use seccompiler::SeccompAction;

use super::*;

fn calls(kind: ThreadKind) -> BTreeSet<i64> {
    kind.rules()
        .map(|r| r.into_keys().collect())
        .unwrap_or_default()
}

#[test]
fn every_filter_compiles_in_both_modes() {
    for kind in ThreadKind::ALL {
        for action in [SeccompAction::Trap, SeccompAction::Log] {
            let program = compile(kind, action);
            assert!(program.is_ok_and(|p| !p.is_empty()), "{kind}");
        }
    }
}

/// Threads spawned by the VMM thread keep its filter, so theirs must not ask for more.
#[test]
fn every_list_is_within_the_vmm_threads_list() {
    let vmm = calls(ThreadKind::Vmm);
    for kind in ThreadKind::ALL {
        let extra: Vec<_> = calls(kind).difference(&vmm).copied().collect();
        assert!(
            extra.is_empty(),
            "{kind} allows calls the VMM thread does not: {extra:?}"
        );
    }
}

/// Runs `probe` on a new thread under `kind`'s filter with EPERM for anything else, so a
/// refused call shows as an error instead of ending the test process.
fn under_filter<T: Send + 'static>(kind: ThreadKind, probe: fn() -> T) -> T {
    let program = compile(kind, SeccompAction::Errno(libc::EPERM as u32));
    std::thread::spawn(move || {
        let program = program.map_err(|e| e.to_string())?;
        seccompiler::apply_filter(&program).map_err(|e| e.to_string())?;
        Ok::<T, String>(probe())
    })
    .join()
    .map_err(|_| "the probe thread panicked".to_owned())
    .and_then(|r| r)
    .unwrap_or_else(|e| panic!("{kind}: {e}"))
}

fn errno_of(ret: libc::c_long) -> i32 {
    if ret < 0 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    } else {
        0
    }
}

#[test]
fn a_vcpu_may_not_open_sockets_or_files_but_may_use_kvm_ioctls() {
    let (socket, open, kvm_ioctl, other_ioctl) = under_filter(ThreadKind::Vcpu, || {
        // SAFETY: plain system calls on no memory of ours (an invalid fd for the ioctls).
        unsafe {
            (
                errno_of(libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0).into()),
                errno_of(libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY).into()),
                // KVM_RUN on an fd that is not open: the filter passes it, the kernel says EBADF.
                errno_of(libc::ioctl(-1, 0xae80).into()),
                // A network ioctl (SIOCGIFFLAGS): the filter stops it.
                errno_of(libc::ioctl(-1, 0x8913).into()),
            )
        }
    });
    assert_eq!(socket, libc::EPERM);
    assert_eq!(open, libc::EPERM);
    assert_eq!(kvm_ioctl, libc::EBADF);
    assert_eq!(other_ioctl, libc::EPERM);
}

#[test]
fn the_api_thread_may_not_touch_kvm_or_vfio() {
    let (kvm_ioctl, vfio_ioctl, getsockopt) = under_filter(ThreadKind::Api, || {
        // SAFETY: as above; getsockopt on an invalid fd writes nothing.
        unsafe {
            (
                errno_of(libc::ioctl(-1, 0xae80).into()),
                errno_of(libc::ioctl(-1, 0x3b6e).into()),
                errno_of(
                    libc::getsockopt(-1, 0, 0, std::ptr::null_mut(), std::ptr::null_mut()).into(),
                ),
            )
        }
    });
    assert_eq!(kvm_ioctl, libc::EPERM);
    assert_eq!(vfio_ioctl, libc::EPERM);
    assert_eq!(getsockopt, libc::EBADF);
}

#[test]
fn report_threads_may_log_but_not_start_threads() {
    let (write, clone) = under_filter(ThreadKind::P2pReport, || {
        // SAFETY: a zero-length write to stderr, and a clone with invalid flags that the
        // kernel would refuse with EINVAL if the filter let it through.
        unsafe {
            (
                errno_of(libc::write(2, std::ptr::null(), 0) as libc::c_long),
                errno_of(libc::syscall(libc::SYS_clone, !0u64, 0, 0, 0, 0)),
            )
        }
    });
    assert_eq!(write, 0);
    assert_eq!(clone, libc::EPERM);
}

/// The panic hook restores a raw terminal (TCGETS, TCSETS) from whichever thread panicked.
#[test]
fn every_thread_may_restore_the_terminal_but_no_thread_may_use_network_ioctls() {
    for kind in ThreadKind::ALL {
        let (tcgets, siocgifflags) = under_filter(kind, || {
            // SAFETY: ioctls on an invalid fd; the kernel writes nothing.
            unsafe {
                (
                    errno_of(libc::ioctl(-1, libc::TCGETS).into()),
                    errno_of(libc::ioctl(-1, 0x8913).into()),
                )
            }
        });
        assert_eq!(tcgets, libc::EBADF, "{kind}: TCGETS");
        assert_eq!(siocgifflags, libc::EPERM, "{kind}: SIOCGIFFLAGS");
    }
}

#[test]
fn modes_are_spelled_as_the_flag_takes_them() {
    use clap::ValueEnum;
    let names: Vec<_> = SeccompMode::value_variants()
        .iter()
        .filter_map(|m| m.to_possible_value().map(|v| v.get_name().to_owned()))
        .collect();
    assert_eq!(names, ["true", "false", "log"]);
}
