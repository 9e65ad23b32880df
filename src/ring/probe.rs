//! The startup probe: every io_uring feature ringlb relies on, exercised once
//! on a throwaway ring and a loopback connection before any shard starts.
//!
//! Checking opcodes is not enough: a kernel can know `RECV` and
//! `ASYNC_CANCEL` yet reject the multishot flag or cancel-by-fd, and then
//! every connection fails instead of the start. So the probe does what a
//! shard does, in the order a connection does it, and names the first
//! feature that fails and the kernel that has it.
//!
//! Minimum kernel: Linux 6.0, for multishot recv. Everything else is older:
//! provided-buffer rings, multishot accept and cancel-by-fd are 5.19,
//! `IORING_SETUP_SUBMIT_ALL` (set on every ring) is 5.18. The cheaper
//! `SINGLE_ISSUER | DEFER_TASKRUN` mode (6.1) is optional: `Uring::new` falls
//! back to `COOP_TASKRUN` (5.19), then to plain.

use std::io;
use std::mem::ManuallyDrop;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use io_uring::opcode;
use socket2::{Domain, SockAddr, Socket, Type};

use super::{adopt_fd, BufRing, Cqe, Uring};

/// Opcodes ringlb submits; checked by `IORING_REGISTER_PROBE` before the
/// features are exercised. The file ops (READ, OPENAT2, SPLICE) serve static
/// routes and are not exercised: they have no variants the probe could miss.
pub const REQUIRED_OPS: &[(u8, &str)] = &[
    (opcode::AcceptMulti::CODE, "ACCEPT"),
    (opcode::RecvMulti::CODE, "RECV"),
    (opcode::Send::CODE, "SEND"),
    (opcode::Connect::CODE, "CONNECT"),
    (opcode::AsyncCancel2::CODE, "ASYNC_CANCEL"),
    (opcode::Read::CODE, "READ"),
    (opcode::OpenAt2::CODE, "OPENAT2"),
    (opcode::PollAdd::CODE, "POLL_ADD"),
    (opcode::Splice::CODE, "SPLICE"),
];

/// What the probe exercises, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    Setup,
    Opcodes,
    ExtArg,
    BufRing,
    AcceptMulti,
    Connect,
    RecvMulti,
    Send,
    PollAdd,
    CancelFd,
}

impl Feature {
    // Every feature, for the tests that check each one's message.
    #[cfg(test)]
    pub const ALL: [Feature; 10] = [
        Feature::Setup,
        Feature::Opcodes,
        Feature::ExtArg,
        Feature::BufRing,
        Feature::AcceptMulti,
        Feature::Connect,
        Feature::RecvMulti,
        Feature::Send,
        Feature::PollAdd,
        Feature::CancelFd,
    ];

    /// What it is, as an operator would look it up.
    pub fn what(self) -> &'static str {
        match self {
            Feature::Setup => "io_uring_setup with IORING_SETUP_SUBMIT_ALL and CQSIZE",
            Feature::Opcodes => "the io_uring opcode probe (IORING_REGISTER_PROBE)",
            Feature::ExtArg => "wait timeouts (IORING_FEAT_EXT_ARG)",
            Feature::BufRing => "provided-buffer rings (IORING_REGISTER_PBUF_RING)",
            Feature::AcceptMulti => "multishot accept (IORING_ACCEPT_MULTISHOT)",
            Feature::Connect => "connect (IORING_OP_CONNECT)",
            Feature::RecvMulti => "multishot recv with buffer select (IORING_RECV_MULTISHOT)",
            Feature::Send => "send (IORING_OP_SEND)",
            Feature::PollAdd => "poll (IORING_OP_POLL_ADD)",
            Feature::CancelFd => "cancel by fd (IORING_ASYNC_CANCEL_FD | ASYNC_CANCEL_ALL)",
        }
    }

    /// The first kernel that has it.
    pub fn since(self) -> &'static str {
        match self {
            Feature::Setup => "5.18",
            Feature::Opcodes => "5.6",
            Feature::ExtArg => "5.11",
            Feature::BufRing | Feature::AcceptMulti | Feature::CancelFd => "5.19",
            Feature::Connect => "5.5",
            Feature::RecvMulti => "6.0",
            Feature::Send => "5.6",
            Feature::PollAdd => "5.1",
        }
    }

    /// The system call that carries it, which is what a seccomp filter sees.
    pub fn syscall(self) -> &'static str {
        match self {
            Feature::Setup | Feature::ExtArg => "io_uring_setup",
            Feature::Opcodes | Feature::BufRing => "io_uring_register",
            _ => "io_uring_enter",
        }
    }

    /// Its name in `RINGLB_TEST_FAULT=probe-missing-<key>` (debug builds).
    #[cfg(debug_assertions)]
    pub fn key(self) -> &'static str {
        match self {
            Feature::Setup => "setup",
            Feature::Opcodes => "opcodes",
            Feature::ExtArg => "ext-arg",
            Feature::BufRing => "buf-ring",
            Feature::AcceptMulti => "accept-multi",
            Feature::Connect => "connect",
            Feature::RecvMulti => "recv-multi",
            Feature::Send => "send",
            Feature::PollAdd => "poll-add",
            Feature::CancelFd => "cancel-fd",
        }
    }
}

/// The step that failed and how.
#[derive(Debug)]
pub struct Failure {
    pub feature: Feature,
    /// The errno the kernel returned, if it returned one.
    pub errno: Option<i32>,
    /// What went wrong, for the message ("no completion within 1s").
    pub detail: String,
}

impl Failure {
    fn os(feature: Feature, e: &io::Error) -> Failure {
        Failure {
            feature,
            errno: e.raw_os_error(),
            detail: e.to_string(),
        }
    }

    fn errno(feature: Feature, errno: i32) -> Failure {
        Failure::os(feature, &io::Error::from_raw_os_error(errno))
    }

    fn other(feature: Feature, detail: impl Into<String>) -> Failure {
        Failure {
            feature,
            errno: None,
            detail: detail.into(),
        }
    }
}

/// What the host says about io_uring, read once when the probe fails.
#[derive(Debug, Clone, Copy, Default)]
pub struct Host {
    /// A seccomp filter is active (`Seccomp: 2` in /proc/self/status).
    pub seccomp_filter: bool,
    /// `kernel.io_uring_disabled` (0 when absent: kernels before 6.6).
    pub io_uring_disabled: u8,
}

impl Host {
    fn read() -> Host {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let seccomp_filter = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .is_some_and(|v| v.trim() == "2");
        let io_uring_disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        Host {
            seccomp_filter,
            io_uring_disabled,
        }
    }
}

/// The message for a failed probe: what is missing and what to do.
pub fn explain(f: &Failure, host: Host) -> String {
    let what = f.feature.what();
    let detail = &f.detail;
    let refused = matches!(f.errno, Some(libc::EPERM | libc::ENOSYS | libc::EACCES));
    if refused && host.seccomp_filter {
        // A filter makes any errno it likes; whatever it is, the kernel's
        // age has nothing to do with it.
        return format!(
            "io_uring is blocked by a seccomp filter: {} failed ({detail}) while checking \
             {what}. A container's seccomp profile that does not allow io_uring does this \
             (Docker 25+'s default profile does). Allow io_uring_setup, io_uring_enter and \
             io_uring_register: with Docker, run with \
             --security-opt seccomp=config/docker-seccomp.json \
             (Docker's default profile plus those three calls); under systemd, keep them in \
             SystemCallFilter (group @aio).",
            f.feature.syscall()
        );
    }
    if f.feature == Feature::Setup {
        return match f.errno {
            Some(libc::EPERM) if host.io_uring_disabled == 2 => format!(
                "io_uring is disabled on this host ({detail}): sysctl kernel.io_uring_disabled \
                 is 2; set it to 0."
            ),
            Some(libc::EPERM) if host.io_uring_disabled == 1 => format!(
                "io_uring is restricted on this host ({detail}): sysctl \
                 kernel.io_uring_disabled is 1 and this user is not in kernel.io_uring_group; \
                 set it to 0 or add the user's group."
            ),
            Some(libc::EPERM | libc::EACCES) => format!(
                "io_uring_setup was refused ({detail}) with no seccomp filter active; check \
                 sysctl kernel.io_uring_disabled (must be 0) and any LSM policy (SELinux, \
                 AppArmor) for this process."
            ),
            Some(libc::ENOSYS) => format!(
                "this kernel has no io_uring ({detail}): it was built without CONFIG_IO_URING. \
                 ringlb needs Linux 6.0 or newer with io_uring."
            ),
            Some(libc::ENOMEM) => format!(
                "io_uring_setup failed ({detail}); raise RLIMIT_MEMLOCK for this user (ulimit \
                 -l, systemd LimitMEMLOCK=, docker --ulimit memlock=)."
            ),
            _ => format!(
                "{what} failed ({detail}); it needs Linux {} or newer, and ringlb needs Linux \
                 6.0 or newer.",
                f.feature.since()
            ),
        };
    }
    format!(
        "io_uring lacks {what}: {detail}. It came in Linux {}; ringlb needs Linux 6.0 or newer.",
        f.feature.since()
    )
}

/// Checks that io_uring works here and has what ringlb needs. `Ok` is a
/// summary to log; the error says what is missing and what to do about it.
pub fn probe() -> Result<String, String> {
    exercise().map_err(|f| explain(&f, Host::read()))
}

const UD_ACCEPT: u64 = 1;
const UD_CONNECT: u64 = 2;
const UD_RECV: u64 = 3;
const UD_SEND: u64 = 4;
const UD_POLL: u64 = 5;
const UD_CANCEL_CONN: u64 = 6;
const UD_CANCEL_LISTENER: u64 = 7;
const UD_CANCEL_ALL: u64 = 8;

/// What the kernel may read or write while the probe's ops are in flight.
/// A step that fails can leave ops pending; dropping the rig cancels them
/// and reaps their completions before the buffers and the address are
/// freed (and leaks both if the kernel does not let go in time).
struct Rig {
    uring: Uring,
    bufs: ManuallyDrop<BufRing>,
    /// Read by the connect op.
    peer: ManuallyDrop<Box<SockAddr>>,
    /// Completions read but not yet asked for.
    seen: Vec<Cqe>,
}

/// Sent by the probe's send op; static, so it outlives any op.
static PING: &[u8] = b"ringlb probe";

/// A step's wait for its completion.
const STEP_TIMEOUT: Duration = Duration::from_secs(1);

fn exercise() -> Result<String, Failure> {
    simulated(Feature::Setup)?;
    let uring = Uring::new(16).map_err(|e| Failure::os(Feature::Setup, &e))?;
    let mode = uring.mode;

    simulated(Feature::Opcodes)?;
    let mut p = io_uring::Probe::new();
    uring
        .ring
        .submitter()
        .register_probe(&mut p)
        .map_err(|e| Failure::os(Feature::Opcodes, &e))?;
    let missing: Vec<&str> = REQUIRED_OPS
        .iter()
        .filter(|(code, _)| !p.is_supported(*code))
        .map(|(_, n)| *n)
        .collect();
    if !missing.is_empty() {
        return Err(Failure::other(
            Feature::Opcodes,
            format!("opcodes missing: {}", missing.join(", ")),
        ));
    }

    simulated(Feature::ExtArg)?;
    if !uring.ring.params().is_feature_ext_arg() {
        return Err(Failure::other(Feature::ExtArg, "feature flag not set"));
    }

    simulated(Feature::BufRing)?;
    // SAFETY: the BufRing goes into the rig below before any op selects
    // from it, and the rig drops it only once no op is in flight
    // (`Drop for Rig`). If building the rig fails first, no op exists.
    let bufs =
        unsafe { uring.buf_ring(0, 4, 64) }.map_err(|e| Failure::os(Feature::BufRing, &e))?;

    let listener = loopback_listener().map_err(|e| {
        Failure::other(
            Feature::AcceptMulti,
            format!("no loopback listener to probe with: {e}"),
        )
    })?;
    let addr = listener
        .local_addr()
        .map_err(|e| Failure::os(Feature::AcceptMulti, &e))?;
    let client = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        None,
    )
    .map_err(|e| Failure::os(Feature::Connect, &e))?;
    // Declared after the listener and the client socket, so it drops (and
    // reaps every op on them) before they close.
    let mut rig = Rig {
        uring,
        bufs: ManuallyDrop::new(bufs),
        peer: ManuallyDrop::new(Box::new(addr.into())),
        seen: Vec::new(),
    };

    simulated(Feature::AcceptMulti)?;
    // SAFETY: `listener` outlives `rig`, whose drop reaps the accept.
    unsafe { rig.uring.accept_multi(listener.as_raw_fd(), UD_ACCEPT) };
    simulated(Feature::Connect)?;
    // SAFETY: the address is boxed in the rig and freed only after every op
    // is reaped; `client` outlives the rig.
    unsafe { rig.uring.connect(client.as_raw_fd(), &rig.peer, UD_CONNECT) };
    let accepted = rig.wait(UD_ACCEPT, Feature::AcceptMulti)?;
    if accepted.result < 0 {
        return Err(Failure::errno(Feature::AcceptMulti, -accepted.result));
    }
    // SAFETY: the accept just created this descriptor; it is adopted once.
    let conn: OwnedFd = unsafe { adopt_fd(accepted.result) };
    if !accepted.more() {
        return Err(Failure::other(
            Feature::AcceptMulti,
            "the accept ended after one connection (no IORING_CQE_F_MORE)",
        ));
    }
    let connected = rig.wait(UD_CONNECT, Feature::Connect)?;
    if connected.result < 0 {
        return Err(Failure::errno(Feature::Connect, -connected.result));
    }

    simulated(Feature::RecvMulti)?;
    // SAFETY: the buffer ring lives in the rig until every op is reaped.
    // `conn` is declared after the rig and so closes before it: an early
    // close is only a descriptor the kernel still references until the
    // rig's cancel, never memory, and on success the recv is cancelled
    // (below) before `conn` goes.
    unsafe {
        rig.uring
            .recv_multi(conn.as_raw_fd(), rig.bufs.bgid, UD_RECV)
    };
    simulated(Feature::Send)?;
    // SAFETY: PING is static, so it outlives the op whatever happens to the
    // probe; `client` outlives the rig.
    unsafe {
        rig.uring
            .send(client.as_raw_fd(), PING.as_ptr(), PING.len(), UD_SEND)
    };
    let sent = rig.wait(UD_SEND, Feature::Send)?;
    if sent.result != PING.len() as i32 {
        return Err(send_failure(sent.result));
    }
    let got = rig.wait(UD_RECV, Feature::RecvMulti)?;
    if got.result < 0 {
        return Err(Failure::errno(Feature::RecvMulti, -got.result));
    }
    let Some(bid) = got.buffer() else {
        return Err(Failure::other(
            Feature::RecvMulti,
            "data arrived without a provided buffer",
        ));
    };
    rig.bufs.taken(bid);
    let data_ok = rig.bufs.data(bid, got.result as usize) == PING;
    // SAFETY: no op reads the buffer: its bytes were only compared above.
    unsafe { rig.bufs.release(bid) };
    rig.bufs.commit();
    if !data_ok {
        return Err(Failure::other(
            Feature::RecvMulti,
            "the provided buffer does not hold the bytes sent",
        ));
    }
    if !got.more() {
        return Err(Failure::other(
            Feature::RecvMulti,
            "the recv ended after one completion (no IORING_CQE_F_MORE)",
        ));
    }

    simulated(Feature::PollAdd)?;
    // SAFETY: as for the recv on `conn` above.
    unsafe {
        rig.uring
            .poll(conn.as_raw_fd(), libc::POLLOUT as u32, UD_POLL)
    };
    let polled = rig.wait(UD_POLL, Feature::PollAdd)?;
    if polled.result < 0 {
        return Err(Failure::errno(Feature::PollAdd, -polled.result));
    }
    if polled.result & libc::POLLOUT as i32 == 0 {
        return Err(Failure::other(
            Feature::PollAdd,
            format!("a writable socket polled as {:#x}", polled.result),
        ));
    }

    // Cancel by fd ends the multishot recv and accept: afterwards no op is
    // left in flight.
    simulated(Feature::CancelFd)?;
    rig.uring.cancel_fd(conn.as_raw_fd(), UD_CANCEL_CONN);
    let cancelled = rig.wait(UD_CANCEL_CONN, Feature::CancelFd)?;
    if cancelled.result < 0 {
        return Err(Failure::errno(Feature::CancelFd, -cancelled.result));
    }
    let ended = rig.wait(UD_RECV, Feature::CancelFd)?;
    if ended.result != -libc::ECANCELED || ended.more() {
        return Err(Failure::other(
            Feature::CancelFd,
            format!(
                "the recv was not cancelled (result {}, more {})",
                ended.result,
                ended.more()
            ),
        ));
    }
    rig.uring
        .cancel_fd(listener.as_raw_fd(), UD_CANCEL_LISTENER);
    rig.wait(UD_CANCEL_LISTENER, Feature::CancelFd)?;
    let ended = rig.wait(UD_ACCEPT, Feature::CancelFd)?;
    if ended.more() {
        return Err(Failure::other(
            Feature::CancelFd,
            "the accept was not cancelled",
        ));
    }

    Ok(format!(
        "io_uring ok (mode {mode:?}): exercised provided-buffer ring, multishot accept, \
         connect, multishot recv, send, poll, cancel by fd; opcodes {}",
        REQUIRED_OPS
            .iter()
            .map(|(_, n)| *n)
            .collect::<Vec<_>>()
            .join(" ")
    ))
}

fn send_failure(result: i32) -> Failure {
    if result < 0 {
        Failure::errno(Feature::Send, -result)
    } else {
        Failure::other(
            Feature::Send,
            format!("sent {result} of {} bytes", PING.len()),
        )
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let reaped = self.uring.quiesce(UD_CANCEL_ALL, STEP_TIMEOUT, |c| {
            // A connection accepted after the step that failed.
            if c.user_data == UD_ACCEPT && c.result >= 0 {
                // SAFETY: the accept created it; nothing else saw it.
                drop(unsafe { adopt_fd(c.result) });
            }
        });
        if reaped {
            // SAFETY: each field is dropped once, here, and never used
            // again; no op is in flight, so the kernel holds neither.
            unsafe {
                ManuallyDrop::drop(&mut self.bufs);
                ManuallyDrop::drop(&mut self.peer);
            }
        } else {
            log::warn!(
                "io_uring probe: {} ops still in flight after cancelling; leaking their memory",
                self.uring.in_flight()
            );
        }
    }
}

impl Rig {
    /// Waits for the next completion of `ud`.
    fn wait(&mut self, ud: u64, feature: Feature) -> Result<Cqe, Failure> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        let mut batch = Vec::with_capacity(16);
        loop {
            if let Some(i) = self.seen.iter().position(|c| c.user_data == ud) {
                return Ok(self.seen.remove(i));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Failure::other(
                    feature,
                    format!("no completion within {STEP_TIMEOUT:?}"),
                ));
            }
            self.uring
                .submit_and_wait(Some(left))
                .map_err(|e| Failure::os(feature, &e))?;
            self.uring.completions(&mut batch);
            self.seen.append(&mut batch);
        }
    }
}

fn loopback_listener() -> io::Result<TcpListener> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .or_else(|_| TcpListener::bind(SocketAddr::from((Ipv6Addr::LOCALHOST, 0))))
}

/// Test builds only: `RINGLB_TEST_FAULT=probe-missing-<key>` makes the
/// probe report that feature as missing, as an old kernel would (EINVAL).
fn simulated(feature: Feature) -> Result<(), Failure> {
    #[cfg(debug_assertions)]
    if crate::server::test_fault(&format!("probe-missing-{}", feature.key())) {
        return Err(Failure::errno(feature, libc::EINVAL));
    }
    let _ = feature;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_passes_here() {
        let summary = probe().unwrap_or_else(|e| panic!("{e}"));
        assert!(summary.contains("multishot recv"), "{summary}");
    }

    #[test]
    fn a_missing_feature_is_named_with_its_kernel() {
        let host = Host::default();
        for feature in Feature::ALL {
            let msg = explain(&Failure::errno(feature, libc::EINVAL), host);
            assert!(msg.contains(feature.what()), "{msg}");
            assert!(msg.contains(&format!("Linux {}", feature.since())), "{msg}");
            assert!(msg.contains("ringlb needs Linux 6.0"), "{msg}");
            assert!(!msg.contains("seccomp"), "{msg}");
        }
        let msg = explain(&Failure::errno(Feature::RecvMulti, libc::EINVAL), host);
        assert!(
            msg.starts_with("io_uring lacks multishot recv with buffer select"),
            "{msg}"
        );
    }

    #[test]
    fn under_seccomp_a_refusal_blames_the_filter_not_the_kernel() {
        let host = Host {
            seccomp_filter: true,
            io_uring_disabled: 0,
        };
        for errno in [libc::EPERM, libc::ENOSYS, libc::EACCES] {
            for feature in [Feature::Setup, Feature::Opcodes, Feature::RecvMulti] {
                let msg = explain(&Failure::errno(feature, errno), host);
                assert!(msg.contains("seccomp filter"), "{msg}");
                assert!(
                    msg.contains("--security-opt seccomp=config/docker-seccomp.json"),
                    "{msg}"
                );
                assert!(msg.contains(feature.syscall()), "{msg}");
                assert!(!msg.contains("Linux 6.0"), "{msg}");
            }
        }
        // Under a filter, a feature the kernel lacks is still the kernel's.
        let msg = explain(&Failure::errno(Feature::RecvMulti, libc::EINVAL), host);
        assert!(
            msg.contains("Linux 6.0") && !msg.contains("seccomp"),
            "{msg}"
        );
    }

    #[test]
    fn without_seccomp_setup_errors_point_at_the_host() {
        let host = Host::default();
        let enosys = explain(&Failure::errno(Feature::Setup, libc::ENOSYS), host);
        assert!(enosys.contains("CONFIG_IO_URING"), "{enosys}");
        let eperm = explain(&Failure::errno(Feature::Setup, libc::EPERM), host);
        assert!(eperm.contains("kernel.io_uring_disabled"), "{eperm}");
        let disabled = Host {
            seccomp_filter: false,
            io_uring_disabled: 2,
        };
        let msg = explain(&Failure::errno(Feature::Setup, libc::EPERM), disabled);
        assert!(msg.contains("is 2; set it to 0"), "{msg}");
        let enomem = explain(&Failure::errno(Feature::Setup, libc::ENOMEM), host);
        assert!(enomem.contains("RLIMIT_MEMLOCK"), "{enomem}");
    }
}
