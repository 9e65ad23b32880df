//! Live hand-off on a binary upgrade: every relaying WebSocket session
//! moves to a new ringlb process, sockets and all, without a byte lost.
//!
//! The old process starts the binary at the path it was itself started
//! from (captured at startup: `/proc/self/exe` reads "(deleted)" once the
//! file is replaced, and re-executing the path runs the new file), with
//! the same arguments, and one end of a `socketpair` inherited across exec
//! (its number in [`HANDOFF_ENV`]). Nothing is named in the filesystem or
//! the abstract namespace: only the two processes hold the socket.
//!
//! ```text
//!  old: SIGUSR2 ─► spawn new ─────────────► send listeners ─► (Ready) ─► pause accept ─► export ─► batches … ─► Done ─► exit
//!  new:            load+check config ─► Hello ─► start shards on them ─► Ready ─► import, Ack … ─► pid file, sd_notify, Current
//! ```
//!
//! - **Validation first.** The new process loads its configuration and
//!   says `Hello` (or `Refused` with the reason, and exits) before it is
//!   given anything; a failure to start its shards is `Refused` too. Either
//!   way the old process has changed nothing.
//! - **Listeners** travel first, the same sockets with their accept queues:
//!   the new process accepts as soon as its shards run, the old one pauses
//!   its accepts (keeping the sockets) only after `Ready`. A connection
//!   arriving at any moment is queued on a socket someone accepts on.
//! - **Sessions.** Each shard quiesces its relaying sessions (every op
//!   cancelled; see `conn/export.rs`), takes each out of its driver once the
//!   kernel holds nothing of it, and sends its two sockets and
//!   [`SessionRecord`] to the main thread, which sends them in batches of
//!   at most [`wire::BATCH`] (two descriptors each, within `SCM_MAX_FD`).
//!   The old process closes its copies of a batch's sockets only after the
//!   new process acknowledged it. Sessions still in their handshake, and
//!   HTTP requests, finish in the old process (kept-alive connections close
//!   between requests); one that starts relaying meanwhile is exported then.
//! - **Rollback.** If the new process dies, refuses, or does not answer
//!   within `server.upgrade_timeout`, the old one kills it (so it cannot
//!   also relay what it was sent), accepts again, and re-imports every
//!   session not acknowledged from its record: they relay on in the old
//!   process, and a later upgrade can take them. Acknowledged sessions
//!   belonged to the new process and ended with it. At every moment a
//!   session is owned by exactly one process: the old one until the ack.
//! - **After.** `Done` carries the old process's counters (metrics do not
//!   reset) and backend totals; the new one writes `server.pid_file`,
//!   tells systemd `MAINPID=` and `READY=1`, and answers `Current`; the old
//!   one exits.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

use crate::conn::SessionRecord;

pub mod new;
pub mod old;
pub mod wire;

/// Names the inherited hand-off socket in the new process's environment.
pub const HANDOFF_ENV: &str = "RINGLB_HANDOFF_FD";

/// A session on its way out of (or back into) a process.
#[derive(Debug)]
pub struct Moved {
    pub client: OwnedFd,
    pub backend: OwnedFd,
    pub rec: SessionRecord,
}

/// What a shard sends the main thread during a hand-off.
#[derive(Debug)]
pub enum Exported {
    Session {
        shard: usize,
        moved: Box<Moved>,
    },
    /// The shard holds no session that can move now: none at all, or
    /// only `staying` relaying sessions whose transport state cannot be
    /// taken (`Conn::stays_on_upgrade`), which stay in this process until
    /// they end.
    Empty {
        shard: usize,
        staying: usize,
    },
}

/// How this process was started, captured at startup, to start the next.
#[derive(Debug, Clone)]
pub struct Launch {
    pub exe: PathBuf,
    pub args: Vec<OsString>,
    /// Upgrades tried so far.
    pub attempts: u32,
}

impl Launch {
    pub fn capture() -> Launch {
        let mut args = std::env::args_os();
        let argv0 = args.next().unwrap_or_default();
        // /proc/self/exe, read now, before anyone replaces the file.
        let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from(argv0));
        Launch {
            exe,
            args: args.collect(),
            attempts: 0,
        }
    }
}

/// Tells the service manager `msg` (`READY=1`, `MAINPID=…`) if it asked
/// (`NOTIFY_SOCKET`); a datagram on a unix socket, as sd_notify(3) does.
pub fn sd_notify(msg: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let addr = match bytes.first() {
        Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..]),
        _ => SocketAddr::from_pathname(&path),
    };
    let res = addr.and_then(|a| {
        let sock = UnixDatagram::unbound()?;
        sock.send_to_addr(msg.as_bytes(), &a).map(|_| ())
    });
    if let Err(e) = res {
        log::warn!(
            "sd_notify to {}: {e}",
            std::path::Path::new(&path).display()
        );
    }
}

/// Writes `server.pid_file` (this process is current).
pub fn write_pid_file(path: &std::path::Path) {
    let tmp = path.with_extension("tmp");
    let res = std::fs::write(&tmp, format!("{}\n", std::process::id()))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = res {
        log::error!("cannot write pid file {}: {e}", path.display());
    }
}

/// The abstract socket name on which `ringlb upgrade` waits for the
/// outcome of the upgrade of `pid`.
pub fn report_name(pid: u32) -> String {
    format!("ringlb-upgrade-{pid}")
}

/// The hand-off socket this process was started with, if a running
/// ringlb started it to take over ([`HANDOFF_ENV`]).
pub fn inherited_socket() -> std::io::Result<Option<std::os::unix::net::UnixStream>> {
    Ok(crate::ring::take_inherited_fd(HANDOFF_ENV)?.map(std::os::unix::net::UnixStream::from))
}

/// Sends `sig` to `pid` (`ringlb upgrade`'s SIGUSR2).
pub fn signal(pid: u32, sig: i32) -> std::io::Result<()> {
    crate::ring::send_signal(pid, sig)
}
