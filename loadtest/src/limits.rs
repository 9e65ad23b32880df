//! File-descriptor and source-port budgeting, so that a run that cannot fit is
//! refused up front with an explanation instead of failing mysteriously.

use std::net::{IpAddr, Ipv4Addr};

/// Descriptors kept free for listeners, stdio, the runtime and timers.
pub const FD_RESERVE: u64 = 64;

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns (soft, hard).
pub fn raise_nofile() -> (u64, u64) {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    rlimit::Resource::NOFILE.get().unwrap_or((1024, 1024))
}

/// Checks that `per_proc` sockets fit one process; the error explains the fix.
pub fn check_fit(
    what: &str,
    per_proc: u64,
    procs: usize,
    total: u64,
    soft: u64,
    hard: u64,
) -> Result<(), String> {
    let need = per_proc + FD_RESERVE;
    if need <= soft {
        return Ok(());
    }
    let usable = hard.saturating_sub(FD_RESERVE).max(1);
    let suggest = total.div_ceil(usable).max(procs as u64 + 1);
    Err(format!(
        "{total} {what} over {procs} process(es) means {per_proc} sockets per process, which needs about {need} file descriptors, \
         but RLIMIT_NOFILE allows {soft} (hard limit {hard}, which this process cannot raise). \
         Split the work over more processes, each with its own limit: --procs {suggest}"
    ))
}

/// Usable ephemeral ports per (source address, destination) pair.
pub fn ephemeral_ports() -> u64 {
    let range =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let mut it = range
        .split_whitespace()
        .filter_map(|v| v.parse::<u64>().ok());
    match (it.next(), it.next()) {
        (Some(lo), Some(hi)) if hi > lo => hi - lo + 1,
        _ => 28_232,
    }
}

/// Source addresses for `total` concurrent connections to `dest`. `requested`
/// 0 means automatic: none (kernel's choice) while one address has ports to
/// spare, otherwise enough 127.0.0.x addresses, which only works for loopback.
pub fn source_ips(dest: IpAddr, total: u64, requested: usize) -> Result<Vec<IpAddr>, String> {
    // Leave headroom for ports in TIME_WAIT and other users of the range.
    let per_ip = ephemeral_ports() * 9 / 10;
    let needed = if requested > 0 {
        requested as u64
    } else if total <= per_ip {
        return Ok(Vec::new());
    } else {
        total.div_ceil(per_ip)
    };
    if !dest.is_loopback() || !dest.is_ipv4() {
        if requested > 0 {
            return Err("--source-ips needs an IPv4 loopback target (127.0.0.0/8)".into());
        }
        return Err(format!(
            "{total} connections to {dest} need more than the {per_ip} ephemeral ports one source address has; \
             spreading over 127.0.0.x source addresses only works for loopback targets"
        ));
    }
    if needed > 250 {
        return Err(format!(
            "{needed} source addresses needed; at most 250 are supported"
        ));
    }
    Ok((0..needed as u8)
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + i)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_message_suggests_procs() {
        assert!(check_fit("connections", 1000, 1, 1000, 20000, 20000).is_ok());
        let e = check_fit("connections", 30000, 1, 30000, 20000, 20000).unwrap_err();
        assert!(e.contains("--procs 2"), "{e}");
        assert!(e.contains("20000"), "{e}");
    }

    #[test]
    fn source_ips_only_when_ports_run_short() {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(source_ips(lo, 1000, 0).unwrap().is_empty());
        let ips = source_ips(lo, 100_000, 0).unwrap();
        assert!(ips.len() >= 4);
        assert_eq!(ips[1], "127.0.0.2".parse::<IpAddr>().unwrap());
        assert!(source_ips("10.0.0.1".parse().unwrap(), 100_000, 0).is_err());
    }
}
