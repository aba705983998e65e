//! What each thread kind may call. Lists are by system call; `ioctl` is also limited by its
//! request's type byte (KVM, VFIO and iommufd, the terminal), so a thread cannot reach a
//! driver p2pvmm does not use.

use std::collections::BTreeMap;
use std::fmt;

use seccompiler::{BackendError, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

/// The kinds of thread p2pvmm runs, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The main thread: builds VMs (again on a reboot through the API), runs the event loop,
    /// hotplug and the API's requests.
    Vmm,
    /// A vCPU: `KVM_RUN` and the device emulation its exits reach (config space, BAR moves and
    /// their IOMMU and KVM slot updates, MSI-X routes, resets).
    Vcpu,
    /// The HTTP server: accepts, reads and parses requests and hands them to the VMM thread.
    Api,
    /// Writes a guest console line that stayed partial (`console_output`).
    Console,
    /// Logs the P2P table once BAR changes settle (`p2p_report`).
    P2pReport,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 5] = [
        ThreadKind::Vmm,
        ThreadKind::Vcpu,
        ThreadKind::Api,
        ThreadKind::Console,
        ThreadKind::P2pReport,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Api => "api",
            ThreadKind::Console => "console",
            ThreadKind::P2pReport => "p2p-report",
        }
    }

    /// The system calls this kind may make, with conditions on their arguments where the
    /// call alone would allow too much.
    pub(super) fn rules(self) -> Result<BTreeMap<i64, Vec<SeccompRule>>, BackendError> {
        let mut rules = BTreeMap::new();
        let mut allow = |calls: &[libc::c_long]| {
            for &call in calls {
                rules.insert(call, Vec::new());
            }
        };
        allow(EVERY_THREAD);
        match self {
            ThreadKind::Vmm => {
                allow(DEVICE_EMULATION);
                allow(SOCKETS);
                allow(THREADS);
                allow(VM_BUILD);
            }
            ThreadKind::Vcpu => allow(DEVICE_EMULATION),
            ThreadKind::Api => {
                allow(SOCKETS);
                allow(THREADS);
            }
            ThreadKind::Console | ThreadKind::P2pReport => {}
        }
        // The terminal's type everywhere: the panic hook gives a raw terminal its line mode
        // back from whichever thread panics (and the API's sockets take FIONBIO and FIOCLEX).
        let ioctl_types: &[u8] = match self {
            ThreadKind::Vmm | ThreadKind::Vcpu => &[KVMIO, VFIO_TYPE, TTY_TYPE],
            ThreadKind::Api | ThreadKind::Console | ThreadKind::P2pReport => &[TTY_TYPE],
        };
        let by_type = ioctl_types
            .iter()
            .map(|&t| ioctl_type_is(t))
            .collect::<Result<Vec<_>, _>>()?;
        rules.insert(libc::SYS_ioctl, by_type);
        Ok(rules)
    }
}

impl fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `ioctl` type bytes: KVM's, VFIO's (which iommufd's `IOMMUFD_TYPE` shares) and the
/// terminal's (`TCGETS`, `TCSETS`, `TIOCGWINSZ`, `FIONBIO`, `FIOCLEX`).
const KVMIO: u8 = 0xae;
const VFIO_TYPE: u8 = b';';
const TTY_TYPE: u8 = b'T';

/// An `ioctl` whose request (argument 1) has type byte `ty` (bits 8-15).
fn ioctl_type_is(ty: u8) -> Result<SeccompRule, BackendError> {
    SeccompRule::new(vec![SeccompCondition::new(
        1,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(0xff00),
        u64::from(ty) << 8,
    )?])
}

/// Memory, locks, time, logging and the thread's own lifecycle: what any Rust thread does.
const EVERY_THREAD: &[libc::c_long] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_lseek,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fcntl,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_getrandom,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettimeofday,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_tgkill,
    libc::SYS_rseq,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// A vCPU's exits: VFIO region reads and writes, eventfds for MSI-X vectors and for telling
/// the VMM thread (guest exit, eject).
const DEVICE_EMULATION: &[libc::c_long] = &[
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_eventfd2,
    libc::SYS_dup,
];

/// The API socket: accept, peer credentials, timeouts, replies.
const SOCKETS: &[libc::c_long] = &[
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_shutdown,
    libc::SYS_getuid,
    libc::SYS_geteuid,
];

/// Starting threads (vCPUs, an API connection, the console and P2P report threads), which
/// then install their own filter (only ever narrowing what they inherit).
const THREADS: &[libc::c_long] = &[
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_prctl,
    libc::SYS_seccomp,
];

/// Building a VM and hotplugging into it: guest memory, KVM, device files and sysfs, the event
/// loop, signals, the terminal, the API's socket and lock files at exit.
const VM_BUILD: &[libc::c_long] = &[
    libc::SYS_open,
    libc::SYS_openat,
    libc::SYS_stat,
    libc::SYS_lstat,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_getdents64,
    libc::SYS_getcwd,
    libc::SYS_statfs,
    libc::SYS_fstatfs,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    // The kernel cache (arch/kernel_cache.rs): its directory, and an entry renamed into place.
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_flock,
    libc::SYS_memfd_create,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_mlock,
    libc::SYS_munlock,
    libc::SYS_dup2,
    libc::SYS_dup3,
    libc::SYS_pipe2,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_signalfd4,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_rt_sigaction,
    libc::SYS_kill,
    libc::SYS_uname,
    libc::SYS_sysinfo,
    libc::SYS_getrlimit,
    libc::SYS_prlimit64,
    libc::SYS_sched_getparam,
    libc::SYS_sched_setaffinity,
];
