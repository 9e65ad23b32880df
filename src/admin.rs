//! The admin listener: `GET /` (the dashboard, a self-contained page that
//! polls `/status`), `GET /metrics` (Prometheus text format 0.0.4),
//! `GET /status` (JSON), `GET /healthz` (`ok`: the process is up),
//! `GET /readyz` (`ready`, or 503 `draining` once it is stopping),
//! `POST /backends/{upstream}/{addr}/drain[?close_rate=N]|undrain`,
//! `POST /upstreams/{upstream}/rebalance`.
//!
//! Browsers must not be able to drive it: a web page can make its visitor's
//! browser send a form POST anywhere (so every request that is not GET or
//! HEAD needs the [`HEADER`] header, which a page can only add cross-origin
//! after a CORS preflight that ringlb never answers), and DNS rebinding can
//! point a page's own host name at the admin address (so `Host` must name
//! the admin listener itself, as an IP literal or `localhost`). An optional
//! bearer token (`admin.token_file`) guards every request but `/healthz`,
//! `/readyz` and the dashboard page itself (static, it holds no data; its script asks
//! for the token and sends it with every request it makes).
//!
//! Plain threads with blocking sockets, off the shards entirely: the admin
//! API is queried a few times a minute. One thread accepts; each connection
//! gets a thread of its own, at most [`MAX_CONNECTIONS`] at once, so one
//! slow client cannot hold the API for everyone. The request head must
//! arrive within [`REQUEST_DEADLINE`] in total (not per read: a client
//! trickling one byte a second would reset a per-read timeout for ever),
//! and the answer must be taken within [`RESPONSE_DEADLINE`]. Every request
//! gets one response and `Connection: close`.

use std::fmt::Write as _;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::AdminToken;
use crate::server::Control;
use crate::stats::{BUCKETS, RESULTS};

/// The header every request other than GET or HEAD must carry (any value;
/// the docs say `X-Ringlb-Admin: 1`).
pub const HEADER: &str = "X-Ringlb-Admin";

/// The dashboard served at `GET /`: inline script and style, no request
/// leaves the admin listener ([`DASHBOARD_CSP`] enforces it).
pub const DASHBOARD: &str = include_str!("dashboard.html");

/// Sent with the dashboard: scripts, styles and fetches only from the page
/// itself and this listener, and no framing (a page that framed it could
/// trick a click onto a drain button).
pub const DASHBOARD_CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Admin connections served at once; the next one gets a quick 503.
pub const MAX_CONNECTIONS: usize = 16;
/// From accept until the whole request head is in.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// From the request being complete until the whole answer is written.
pub const RESPONSE_DEADLINE: Duration = Duration::from_secs(5);

/// Serves the admin API on `listener` (bound here, or inherited from the
/// previous process on an upgrade).
pub fn spawn(listener: TcpListener, control: Arc<Control>) -> std::io::Result<SocketAddr> {
    let local = listener.local_addr()?;
    listener.set_nonblocking(false)?;
    // accept(2) honours SO_RCVTIMEO: the thread looks at `admin_paused`
    // this often. While a hand-off runs, the new process accepts on the
    // same socket and this one must not take its requests.
    socket2::SockRef::from(&listener).set_read_timeout(Some(ADMIN_PAUSE_CHECK))?;
    let busy = control.admin_busy.clone();
    std::thread::Builder::new()
        .name("ringlb-admin".into())
        .spawn(move || loop {
            if control.admin_paused.load(Ordering::Relaxed) {
                std::thread::sleep(ADMIN_PAUSE_CHECK);
                continue;
            }
            match listener.accept() {
                Ok((s, _)) => {
                    let _ = s.set_nonblocking(false);
                    accept(s, local, &busy, &control)
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("admin accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        })?;
    Ok(local)
}

/// How often a paused admin thread looks again.
const ADMIN_PAUSE_CHECK: Duration = Duration::from_millis(100);

/// Holds one of the [`MAX_CONNECTIONS`] slots until dropped.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn accept(s: TcpStream, local: SocketAddr, busy: &Arc<AtomicUsize>, control: &Arc<Control>) {
    if busy.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
        busy.fetch_sub(1, Ordering::AcqRel);
        refuse_busy(s);
        return;
    }
    let slot = Slot(busy.clone());
    let control = control.clone();
    // If the thread cannot be spawned the closure is dropped, and the slot
    // and the socket with it.
    let spawned = std::thread::Builder::new()
        .name("ringlb-admin-conn".into())
        .spawn(move || {
            let _slot = slot;
            if let Err(e) = serve(s, local, &control) {
                log::debug!("admin request failed: {e}");
            }
        });
    if let Err(e) = spawned {
        log::warn!("admin: cannot start a thread for a connection: {e}");
    }
}

/// Answers 503 without ever blocking the accept thread: the socket is
/// nonblocking and a fresh connection's send buffer is empty.
fn refuse_busy(mut s: TcpStream) {
    let body = "admin API busy, try again\n";
    let _ = s.set_nonblocking(true);
    let _ = write!(
        s,
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    // Read what already arrived, so closing sends FIN and not RST (which
    // could make the client lose the 503); bounded, so a client that keeps
    // sending cannot keep the accept thread here.
    let mut sink = [0u8; 4096];
    for _ in 0..4 {
        if !matches!(s.read(&mut sink), Ok(n) if n > 0) {
            break;
        }
    }
    let _ = s.shutdown(std::net::Shutdown::Write);
}

/// Time left until `deadline`; `None` once it passed.
fn left(deadline: Instant) -> Option<Duration> {
    Some(deadline.saturating_duration_since(Instant::now())).filter(|d| !d.is_zero())
}

/// What the admin API looks at in a request.
struct Request {
    method: String,
    path: String,
    /// `None` if absent; a repeated Host is refused while parsing.
    host: Option<String>,
    admin_header: bool,
    authorization: Option<String>,
}

impl Request {
    fn parse(req: &httparse::Request<'_, '_>) -> Result<Request, &'static str> {
        let mut out = Request {
            method: req.method.unwrap_or("").to_string(),
            path: req.path.unwrap_or("").to_string(),
            host: None,
            admin_header: false,
            authorization: None,
        };
        for h in req.headers.iter() {
            let value = || String::from_utf8_lossy(h.value).trim().to_string();
            if h.name.eq_ignore_ascii_case("host") {
                if out.host.is_some() {
                    return Err("more than one Host header\n");
                }
                out.host = Some(value());
            } else if h.name.eq_ignore_ascii_case(HEADER) {
                out.admin_header = true;
            } else if h.name.eq_ignore_ascii_case("authorization") {
                out.authorization = Some(value());
            }
        }
        Ok(out)
    }
}

fn serve(mut s: TcpStream, local: SocketAddr, control: &Control) -> std::io::Result<()> {
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let req = loop {
        let Some(t) = left(deadline) else {
            return respond(
                &mut s,
                408,
                "text/plain",
                "",
                "request head took too long\n",
            );
        };
        s.set_read_timeout(Some(t))?;
        let n = match s.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => match Request::parse(&req) {
                Ok(r) => break r,
                Err(why) => return respond(&mut s, 400, "text/plain", "", why),
            },
            Ok(httparse::Status::Partial) if buf.len() < 8192 => continue,
            _ => return respond(&mut s, 400, "text/plain", "", "bad request\n"),
        }
    };
    let token = control
        .snapshot()
        .config
        .admin
        .as_ref()
        .and_then(|a| a.token.clone());
    if let Some((status, extra, body)) = refusal(&req, local, token.as_ref()) {
        return respond(&mut s, status, "text/plain", extra, body);
    }
    if req.method == "GET" && req.path.split('?').next() == Some("/") {
        let csp = format!(
            "Content-Security-Policy: {DASHBOARD_CSP}\r\nX-Frame-Options: DENY\r\nCache-Control: no-cache\r\n"
        );
        return respond(&mut s, 200, "text/html; charset=utf-8", &csp, DASHBOARD);
    }
    let (status, ctype, body) = handle(&req.method, &req.path, control);
    respond(&mut s, status, ctype, "", &body)
}

/// Why a request is refused before it is routed, if it is: (status, extra
/// header lines, body).
fn refusal(
    req: &Request,
    local: SocketAddr,
    token: Option<&AdminToken>,
) -> Option<(u16, &'static str, &'static str)> {
    let Some(host) = &req.host else {
        return Some((400, "", "a Host header is required\n"));
    };
    if !host_allowed(host, local) {
        return Some((
            403,
            "",
            "Host does not name this admin listener (its IP:port, or localhost:port on loopback)\n",
        ));
    }
    let path = req.path.split('?').next().unwrap_or("");
    if let Some(token) = token {
        let presented = req.authorization.as_deref().and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        });
        // The dashboard page is exempt: a browser cannot attach a bearer
        // token to a navigation, and the page holds no data; every request
        // its script makes carries the token the user entered.
        let open = matches!(path, "/healthz" | "/readyz") || (path == "/" && req.method == "GET");
        if !open && !presented.is_some_and(|p| token.matches(p)) {
            return Some((
                401,
                "WWW-Authenticate: Bearer realm=\"ringlb admin\"\r\n",
                "send Authorization: Bearer <the token in admin.token_file>\n",
            ));
        }
    }
    if !matches!(req.method.as_str(), "GET" | "HEAD") && !req.admin_header {
        return Some((
            403,
            "",
            "requests that change state need the header X-Ringlb-Admin: 1 (a guard against cross-site requests), e.g. curl -X POST -H 'X-Ringlb-Admin: 1' ...\n",
        ));
    }
    None
}

/// True if `host` (a Host header value) names the listener bound at
/// `local`. DNS rebinding makes a browser send the attacker's host name, so
/// only IP literals are taken, plus `localhost` (which browsers never let a
/// site rebind) when the listener takes loopback traffic. On an unspecified
/// address (0.0.0.0) any IP literal with the right port is accepted: the
/// listener answers on all of them, and none can be rebound.
pub fn host_allowed(host: &str, local: SocketAddr) -> bool {
    let (name, port) = match host.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((name, "")) => (name, None),
            Some((name, port)) => match port.strip_prefix(':') {
                Some(p) => (name, Some(p)),
                None => return false,
            },
            None => return false,
        },
        None => match host.split_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (host, None),
        },
    };
    let port = match port {
        None => 80,
        Some(p) => match p.parse::<u16>() {
            Ok(p) => p,
            Err(_) => return false,
        },
    };
    if port != local.port() {
        return false;
    }
    let bound = local.ip();
    if name.eq_ignore_ascii_case("localhost") {
        return bound.is_loopback() || bound.is_unspecified();
    }
    match name.parse::<std::net::IpAddr>() {
        Ok(ip) => bound.is_unspecified() || ip == bound,
        Err(_) => false,
    }
}

/// Routes one admin request; pure apart from the drain flag it may set.
pub fn handle(method: &str, path: &str, control: &Control) -> (u16, &'static str, String) {
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    match (method, path) {
        ("GET", "/metrics") => (200, "text/plain; version=0.0.4", metrics(control)),
        ("GET", "/status") => (200, "application/json", status(control)),
        ("GET", "/healthz") => (200, "text/plain", "ok\n".into()),
        ("GET", "/readyz") if control.stopping.load(Ordering::Relaxed) => {
            (503, "text/plain", "draining\n".into())
        }
        ("GET", "/readyz") => (200, "text/plain", "ready\n".into()),
        ("POST", p) if p.starts_with("/backends/") => backend_action(p, query, control),
        ("POST", p) if p.starts_with("/upstreams/") => upstream_action(p, control),
        (_, "/" | "/metrics" | "/status" | "/healthz" | "/readyz") => {
            (405, "text/plain", "method not allowed\n".into())
        }
        _ => (404, "text/plain", "not found\n".into()),
    }
}

/// `POST /upstreams/{upstream}/rebalance`: starts a rebalance now.
fn upstream_action(path: &str, control: &Control) -> (u16, &'static str, String) {
    let parts: Vec<&str> = path.trim_start_matches("/upstreams/").split('/').collect();
    let [upstream, "rebalance"] = parts[..] else {
        return (
            404,
            "text/plain",
            "use POST /upstreams/{upstream}/rebalance\n".into(),
        );
    };
    let snap = control.snapshot();
    let Some(u) = snap.upstreams.iter().find(|u| u.name == upstream) else {
        return (404, "text/plain", format!("no upstream {upstream}\n"));
    };
    if u.rebalance.is_none() {
        return (
            409,
            "text/plain",
            format!("upstream {upstream} has no rebalance configured (set rebalance = {{ threshold = 0.25, rate = 20 }} in [upstream.{upstream}])\n"),
        );
    }
    u.state.trigger(u, "asked for by the admin API");
    (
        200,
        "application/json",
        format!("{{\"upstream\":\"{upstream}\",\"rebalancing\":true}}\n"),
    )
}

/// `close_rate=N` from a drain's query; `Ok(None)` without one.
fn close_rate(query: &str) -> Result<Option<u32>, String> {
    let mut rate = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("close_rate", v)) => match v.parse::<u32>() {
                Ok(n) if (1..=1_000_000).contains(&n) => rate = Some(n),
                _ => {
                    return Err(format!(
                        "close_rate must be a whole number of sessions per second, 1 to 1000000 (got {v:?})\n"
                    ))
                }
            },
            _ => return Err(format!("unknown parameter {pair:?}; only close_rate=N\n")),
        }
    }
    Ok(rate)
}

fn backend_action(path: &str, query: &str, control: &Control) -> (u16, &'static str, String) {
    let parts: Vec<&str> = path.trim_start_matches("/backends/").split('/').collect();
    let [upstream, addr, action] = parts[..] else {
        return (
            404,
            "text/plain",
            "use POST /backends/{upstream}/{addr}/drain or /undrain\n".into(),
        );
    };
    let drain = match action {
        "drain" => true,
        "undrain" => false,
        _ => {
            return (
                404,
                "text/plain",
                "action must be drain or undrain\n".into(),
            )
        }
    };
    let rate = match close_rate(query) {
        Ok(r) if drain || r.is_none() => r,
        Ok(_) => {
            return (
                400,
                "text/plain",
                "close_rate goes with drain only\n".into(),
            )
        }
        Err(why) => return (400, "text/plain", why),
    };
    let snap = control.snapshot();
    let Some(u) = snap.upstreams.iter().find(|u| u.name == upstream) else {
        return (404, "text/plain", format!("no upstream {upstream}\n"));
    };
    let Some(b) = u.backends.iter().find(|b| b.addr.to_string() == addr) else {
        return (
            404,
            "text/plain",
            format!("no backend {addr} in upstream {upstream}\n"),
        );
    };
    b.state.draining.store(drain, Ordering::Relaxed);
    // Undrain (or a plain drain) stops a paced drain's closes at once;
    // sessions already told to close finish their clean close.
    b.state
        .close_rate
        .store(rate.unwrap_or(0), Ordering::Relaxed);
    match rate {
        Some(n) => log::info!(
            "backend {addr} of upstream {upstream} draining: closing its {} sessions at {n}/s",
            b.active()
        ),
        None => log::info!(
            "backend {addr} of upstream {upstream} {}",
            if drain { "draining" } else { "undrained" }
        ),
    }
    if !drain {
        u.state.trigger(u, &format!("backend {addr} undrained"));
    }
    (
        200,
        "application/json",
        format!(
            "{{\"upstream\":\"{upstream}\",\"backend\":\"{addr}\",\"draining\":{drain},\"close_rate\":{}}}\n",
            rate.unwrap_or(0)
        ),
    )
}

fn respond(
    s: &mut TcpStream,
    status: u16,
    ctype: &str,
    extra: &str,
    body: &str,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        409 => "Conflict",
        408 => "Request Timeout",
        _ => "Method Not Allowed",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nX-Content-Type-Options: nosniff\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    write_by(s, &out, Instant::now() + RESPONSE_DEADLINE)
}

/// `write_all` under one deadline for the whole buffer: a client reading a
/// byte at a time cannot keep a per-write timeout from ever firing.
fn write_by(s: &mut TcpStream, mut bytes: &[u8], deadline: Instant) -> std::io::Result<()> {
    while !bytes.is_empty() {
        let Some(t) = left(deadline) else {
            return Err(ErrorKind::TimedOut.into());
        };
        s.set_write_timeout(Some(t))?;
        match s.write(bytes) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Escapes a Prometheus label value.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub fn metrics(control: &Control) -> String {
    let snap = control.snapshot();
    let mut out = String::with_capacity(4096);
    let mut family = |name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        name.to_string()
    };
    let _ = family(
        "ringlb_backend_active_connections",
        "gauge",
        "Live connections per backend, including those mid-handshake.",
    );
    let mut body = String::new();
    for u in &snap.upstreams {
        for b in &u.backends {
            let _ = writeln!(
                body,
                "ringlb_backend_active_connections{{upstream=\"{}\",backend=\"{}\"}} {}",
                label(&u.name),
                b.addr,
                b.active()
            );
        }
    }
    out.push_str(&body);
    type Get = fn(&crate::upstream::Backend) -> u64;
    let per_backend: [(&str, &str, &str, Get); 3] = [
        (
            "ringlb_backend_connections_total",
            "counter",
            "Connections given to each backend.",
            |b| b.state.connections_total.load(Ordering::Relaxed),
        ),
        (
            "ringlb_backend_connect_failures_total",
            "counter",
            "Failed connects to each backend.",
            |b| b.state.connect_failures.load(Ordering::Relaxed),
        ),
        (
            "ringlb_backend_up",
            "gauge",
            "1 if the backend takes new connections (up and not draining).",
            |b| u64::from(b.is_up() && !b.is_draining()),
        ),
    ];
    for (name, kind, help, get) in per_backend {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for u in &snap.upstreams {
            for b in &u.backends {
                let _ = writeln!(
                    out,
                    "{name}{{upstream=\"{}\",backend=\"{}\"}} {}",
                    label(&u.name),
                    b.addr,
                    get(b)
                );
            }
        }
    }

    // The previous processes' counters (a binary upgrade) count too.
    let sum = |f: &dyn Fn(&crate::stats::ShardStats) -> u64| {
        control.shards.iter().map(|s| f(s)).sum::<u64>() + f(&control.inherited)
    };
    let _ = writeln!(out, "# HELP ringlb_handshakes_total Requests answered (WebSocket handshakes, proxied and static HTTP) by result: the HTTP status, \"closed\" when the client left first.\n# TYPE ringlb_handshakes_total counter");
    for (i, r) in RESULTS.iter().enumerate() {
        let _ = writeln!(
            out,
            "ringlb_handshakes_total{{result=\"{r}\"}} {}",
            sum(&|s| s.handshakes[i].get())
        );
    }
    let _ = writeln!(
        out,
        "# HELP ringlb_bytes_total Bytes relayed.\n# TYPE ringlb_bytes_total counter"
    );
    let _ = writeln!(
        out,
        "ringlb_bytes_total{{direction=\"client_to_backend\"}} {}",
        sum(&|s| s.bytes_to_backend.get())
    );
    let _ = writeln!(
        out,
        "ringlb_bytes_total{{direction=\"backend_to_client\"}} {}",
        sum(&|s| s.bytes_to_client.get())
    );
    let _ = writeln!(
        out,
        "# HELP ringlb_bytes_spliced_total Relayed bytes (both directions) moved by splice(2), not through buffers.\n# TYPE ringlb_bytes_spliced_total counter\nringlb_bytes_spliced_total {}",
        sum(&|s| s.bytes_spliced.get())
    );
    let _ = writeln!(
        out,
        "# HELP ringlb_sessions_parked_total Relaying sessions parked after server.park_idle_after of silence (armed recvs swapped for readiness polls).\n# TYPE ringlb_sessions_parked_total counter\nringlb_sessions_parked_total {}",
        sum(&|s| s.parked.get())
    );

    let _ = writeln!(out, "# HELP ringlb_handshake_duration_seconds From accept to the answer (ringlb's or the backend's).\n# TYPE ringlb_handshake_duration_seconds histogram");
    let mut cumulative = 0;
    for (i, b) in BUCKETS.iter().enumerate() {
        cumulative += sum(&|s| s.latency[i].get());
        let _ = writeln!(
            out,
            "ringlb_handshake_duration_seconds_bucket{{le=\"{b}\"}} {cumulative}"
        );
    }
    cumulative += sum(&|s| s.latency[BUCKETS.len()].get());
    let _ = writeln!(
        out,
        "ringlb_handshake_duration_seconds_bucket{{le=\"+Inf\"}} {cumulative}"
    );
    let _ = writeln!(
        out,
        "ringlb_handshake_duration_seconds_sum {}",
        sum(&|s| s.latency_sum_us.get()) as f64 / 1e6
    );
    let _ = writeln!(out, "ringlb_handshake_duration_seconds_count {cumulative}");

    let _ = writeln!(out, "# HELP ringlb_recv_buffer_exhausted_total Receives that found the shard's provided-buffer ring empty (the connection waits for buffers).\n# TYPE ringlb_recv_buffer_exhausted_total counter");
    let _ = writeln!(
        out,
        "ringlb_recv_buffer_exhausted_total {}",
        sum(&|s| s.recv_starved.get())
    );
    let _ = writeln!(out, "# HELP ringlb_sessions_closed_total WebSocket sessions ended, by backend and by who closed them or why ringlb did (drain: a backend drained at a rate; rebalance: moved off a backend over its share; shutdown: ringlb shutting down; stalled_peer: the peer took nothing for server.stalled_peer_timeout while bytes waited). upstream=\"\",backend=\"\" holds sessions of backends no longer configured.\n# TYPE ringlb_sessions_closed_total counter");
    let snap = control.snapshot();
    for (i, reason) in crate::stats::CLOSE_REASONS.iter().enumerate() {
        let mut listed = 0;
        for u in &snap.upstreams {
            for b in &u.backends {
                let n = b.state.closed[i].load(Ordering::Relaxed);
                listed += n;
                let _ = writeln!(
                    out,
                    "ringlb_sessions_closed_total{{upstream=\"{}\",backend=\"{}\",reason=\"{reason}\"}} {n}",
                    label(&u.name),
                    b.addr
                );
            }
        }
        let _ = writeln!(
            out,
            "ringlb_sessions_closed_total{{upstream=\"\",backend=\"\",reason=\"{reason}\"}} {}",
            sum(&|s| s.closed[i].get()).saturating_sub(listed)
        );
    }
    let _ = writeln!(out, "# HELP ringlb_clean_close_fallbacks_total Clean closes ringlb started (drain, rebalance, shutdown) that could not close between messages: frame (Close at a frame boundary inside a fragmented message, after server.close_boundary_timeout), fin (no boundary at all, or a half-closed session: FIN).\n# TYPE ringlb_clean_close_fallbacks_total counter");
    for (i, kind) in crate::stats::FALLBACK_KINDS.iter().enumerate() {
        let _ = writeln!(
            out,
            "ringlb_clean_close_fallbacks_total{{kind=\"{kind}\"}} {}",
            sum(&|s| s.clean_close_fallbacks[i].get())
        );
    }
    let _ = writeln!(out, "# HELP ringlb_backend_close_rate Sessions per second a paced drain closes on this backend (POST .../drain?close_rate=N); 0: none.\n# TYPE ringlb_backend_close_rate gauge");
    for u in &snap.upstreams {
        for b in &u.backends {
            let _ = writeln!(
                out,
                "ringlb_backend_close_rate{{upstream=\"{}\",backend=\"{}\"}} {}",
                label(&u.name),
                b.addr,
                crate::pacing::close_rate(&b.state)
            );
        }
    }
    let _ = writeln!(out, "# HELP ringlb_upstream_rebalancing 1 while the upstream sheds sessions from backends over their share (rebalance).\n# TYPE ringlb_upstream_rebalancing gauge");
    for u in &snap.upstreams {
        let _ = writeln!(
            out,
            "ringlb_upstream_rebalancing{{upstream=\"{}\"}} {}",
            label(&u.name),
            u64::from(u.state.rebalancing.load(Ordering::Relaxed))
        );
    }
    let _ = writeln!(
        out,
        "# HELP ringlb_admission_rejected_total Connections refused by admission control: rate (an upgrade over server.max_handshakes_per_second, answered 503 with Retry-After), per_ip (over server.max_connections_per_ip, answered 429).\n# TYPE ringlb_admission_rejected_total counter\nringlb_admission_rejected_total{{reason=\"rate\"}} {}\nringlb_admission_rejected_total{{reason=\"per_ip\"}} {}",
        snap.admission.rejected_rate.load(Ordering::Relaxed),
        snap.admission.rejected_per_ip.load(Ordering::Relaxed)
    );
    let _ = writeln!(out, "# HELP ringlb_proxy_protocol_refused_total Connections closed for their PROXY header: untrusted (a header from a source not in server.trusted_proxies), missing (none from a trusted source), malformed.\n# TYPE ringlb_proxy_protocol_refused_total counter");
    for (i, reason) in crate::admission::PROXY_REFUSALS.iter().enumerate() {
        let _ = writeln!(
            out,
            "ringlb_proxy_protocol_refused_total{{reason=\"{reason}\"}} {}",
            snap.admission.proxy_refused[i].load(Ordering::Relaxed)
        );
    }
    crate::tls::STATS.render(&mut out);
    if let Some(tls) = &control.snapshot().config.tls {
        let _ = writeln!(out, "# HELP ringlb_tls_certificate_expiry_timestamp_seconds When each loaded [tls] certificate expires (notAfter, Unix time); alert well before it.\n# TYPE ringlb_tls_certificate_expiry_timestamp_seconds gauge");
        for c in &tls.certificates {
            let at = c
                .not_after
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let file = c
                .cert
                .display()
                .to_string()
                .replace('\\', "\\\\")
                .replace('"', "\\\"");
            let _ = writeln!(
                out,
                "ringlb_tls_certificate_expiry_timestamp_seconds{{cert=\"{file}\"}} {at}"
            );
        }
    }
    let _ = writeln!(out, "# HELP ringlb_sends_unpinned_total Sends moved out of the shared buffer pool because their reader took nothing while the pool ran low.\n# TYPE ringlb_sends_unpinned_total counter\nringlb_sends_unpinned_total {}", sum(&|s| s.unpinned.get()));
    let _ = writeln!(out, "# HELP ringlb_stale_completions_total io_uring completions for a connection slot that was gone or reused: never delivered, their buffers returned. Anything but 0 is a bug.\n# TYPE ringlb_stale_completions_total counter\nringlb_stale_completions_total {}", sum(&|s| s.stale_completions.get()));
    let _ = writeln!(out, "# HELP ringlb_ops_in_flight io_uring operations submitted and not yet completed, per shard.\n# TYPE ringlb_ops_in_flight gauge");
    for (i, s) in control.shards.iter().enumerate() {
        let _ = writeln!(
            out,
            "ringlb_ops_in_flight{{shard=\"{i}\"}} {}",
            s.ops_in_flight.get()
        );
    }
    let _ = writeln!(out, "# HELP ringlb_buffers_free Provided buffers free in each shard's pool.\n# TYPE ringlb_buffers_free gauge");
    for (i, s) in control.shards.iter().enumerate() {
        let _ = writeln!(
            out,
            "ringlb_buffers_free{{shard=\"{i}\"}} {}",
            s.buffers_free.get()
        );
    }
    let _ = writeln!(out, "# HELP ringlb_connections_active Client connections open, per shard.\n# TYPE ringlb_connections_active gauge");
    for (i, s) in control.shards.iter().enumerate() {
        let _ = writeln!(
            out,
            "ringlb_connections_active{{shard=\"{i}\"}} {}",
            s.active.get()
        );
    }
    let _ = writeln!(out, "# HELP ringlb_sessions_handed_off_total Relaying WebSocket sessions taken out of this process for a binary upgrade (exported), and taken in (imported: from the previous process, or back after a failed hand-off); counters carried over from earlier processes included.\n# TYPE ringlb_sessions_handed_off_total counter");
    let _ = writeln!(
        out,
        "ringlb_sessions_handed_off_total{{direction=\"exported\"}} {}\nringlb_sessions_handed_off_total{{direction=\"imported\"}} {}",
        sum(&|s| s.exported.get()),
        sum(&|s| s.imported.get())
    );
    let _ = writeln!(out, "# HELP ringlb_upgrades_total Binary upgrades this process started, by outcome: ok, refused (the new process refused before taking anything: bad config, failed start), rolled_back (it died or stopped answering mid-transfer; un-acknowledged sessions stayed here).\n# TYPE ringlb_upgrades_total counter");
    for (i, r) in ["ok", "refused", "rolled_back"].iter().enumerate() {
        let _ = writeln!(
            out,
            "ringlb_upgrades_total{{result=\"{r}\"}} {}",
            control.upgrades[i].load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(out, "# HELP ringlb_heap_trims_total Times the free pages inside the heap were handed back to the kernel (server.heap_trim_interval).\n# TYPE ringlb_heap_trims_total counter\nringlb_heap_trims_total {}", crate::server::HEAP_TRIMS.load(Ordering::Relaxed));
    let _ = writeln!(out, "# HELP ringlb_heap_trim_seconds_total Time spent in those trims; each holds a malloc arena's lock while it walks it.\n# TYPE ringlb_heap_trim_seconds_total counter\nringlb_heap_trim_seconds_total {}", crate::server::HEAP_TRIM_MICROS.load(Ordering::Relaxed) as f64 / 1e6);
    let _ = writeln!(out, "# HELP ringlb_config_reloads_total Configuration reloads by result.\n# TYPE ringlb_config_reloads_total counter");
    let _ = writeln!(
        out,
        "ringlb_config_reloads_total{{result=\"ok\"}} {}",
        control.reloads_ok.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "ringlb_config_reloads_total{{result=\"error\"}} {}",
        control.reloads_failed.load(Ordering::Relaxed)
    );
    crate::resolver::write_metrics(&control.dns, &mut out);
    out
}

/// DNS discovery's part of an upstream in `/status`: its names (what each
/// resolved to, when, the last error) and the addresses that left the pick
/// while sessions still use them.
fn dns_status(
    v: &mut serde_json::Value,
    control: &Control,
    snap: &crate::snapshot::Snapshot,
    upstream: &str,
) {
    let Some(cfg) = snap.config.upstreams.iter().find(|c| c.name == upstream) else {
        return;
    };
    if !cfg.named.is_empty() {
        v["names"] = crate::resolver::status_json(&control.dns, &cfg.named);
    }
    let retired = snap.retired_in(upstream);
    if !retired.is_empty() {
        v["retired"] = retired
            .iter()
            .map(|(a, n)| serde_json::json!({ "addr": a.to_string(), "active": n }))
            .collect();
    }
}

pub fn status(control: &Control) -> String {
    let snap = control.snapshot();
    let upstreams: Vec<serde_json::Value> = snap
        .upstreams
        .iter()
        .map(|u| {
            let backends: Vec<serde_json::Value> = u
                .backends
                .iter()
                .map(|b| {
                    let state = if b.is_draining() {
                        "draining"
                    } else if b.is_up() {
                        "up"
                    } else {
                        "down"
                    };
                    serde_json::json!({
                        "addr": b.addr.to_string(),
                        "weight": b.weight,
                        "max_connections": b.max_connections,
                        "active": b.active(),
                        "state": state,
                        "connections_total": b.state.connections_total.load(Ordering::Relaxed),
                        "connect_failures": b.state.connect_failures.load(Ordering::Relaxed),
                        "close_rate": crate::pacing::close_rate(&b.state),
                        "sessions_closed": crate::stats::CLOSE_REASONS
                            .iter()
                            .enumerate()
                            .map(|(i, r)| (r.to_string(), b.state.closed[i].load(Ordering::Relaxed).into()))
                            .collect::<serde_json::Map<String, serde_json::Value>>(),
                    })
                })
                .collect();
            let mut v = serde_json::json!({
                "name": u.name,
                "backends": backends,
                "rebalancing": u.state.rebalancing.load(Ordering::Relaxed),
                "rebalance": u.rebalance.map(|r| serde_json::json!({ "threshold": r.threshold, "rate": r.rate.get() })),
            });
            dns_status(&mut v, control, &snap, &u.name);
            v
        })
        .collect();
    let shards: Vec<serde_json::Value> = control
        .shards
        .iter()
        .enumerate()
        .map(|(i, s)| serde_json::json!({ "id": i, "active": s.active.get(), "accepted": s.accepted.get() }))
        .collect();
    // The same sums /metrics exports, so the dashboard needs one request a
    // second and no Prometheus parser.
    // The previous processes' counters (a binary upgrade) count too.
    let sum = |f: &dyn Fn(&crate::stats::ShardStats) -> u64| {
        control.shards.iter().map(|s| f(s)).sum::<u64>() + f(&control.inherited)
    };
    let handshakes: serde_json::Map<String, serde_json::Value> = RESULTS
        .iter()
        .enumerate()
        .map(|(i, r)| (r.to_string(), sum(&|s| s.handshakes[i].get()).into()))
        .collect();
    let closed: serde_json::Map<String, serde_json::Value> = crate::stats::CLOSE_REASONS
        .iter()
        .enumerate()
        .map(|(i, r)| (r.to_string(), sum(&|s| s.closed[i].get()).into()))
        .collect();
    let loaded = *control.loaded_at.lock().unwrap_or_else(|e| e.into_inner());
    let started = control
        .started_at
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let v = serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "pid": control.pid,
        "started_at": started,
        "inherited_sessions": control.inherited_sessions.load(Ordering::Relaxed),
        "uptime_seconds": control.started.elapsed().as_secs_f64(),
        "config_file": snap.config.source.as_ref().map(|p| p.display().to_string()),
        "config_loaded_at": humantime::format_rfc3339_seconds(loaded).to_string(),
        "connections": control.shared.clients.load(Ordering::Relaxed),
        "upstreams": upstreams,
        "shards": shards,
        "handshakes": handshakes,
        "sessions_closed": closed,
        "clean_close_fallbacks": {
            "frame": sum(&|s| s.clean_close_fallbacks[0].get()),
            "fin": sum(&|s| s.clean_close_fallbacks[1].get()),
        },
        "bytes": {
            "client_to_backend": sum(&|s| s.bytes_to_backend.get()),
            "backend_to_client": sum(&|s| s.bytes_to_client.get()),
        },
    });
    let mut text = serde_json::to_string_pretty(&v).unwrap_or_default();
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::host_allowed;

    #[test]
    fn host_must_name_the_listener() {
        let lo = "127.0.0.1:9090".parse().unwrap();
        for ok in ["127.0.0.1:9090", "localhost:9090", "LocalHost:9090"] {
            assert!(host_allowed(ok, lo), "{ok}");
        }
        for bad in [
            "evil.example:9090",
            "127.0.0.1:9091",
            "127.0.0.1",
            "127.0.0.2:9090",
            "[::1]:9090",
            "127.0.0.1:9090x",
            "localhost.evil.example:9090",
            "",
        ] {
            assert!(!host_allowed(bad, lo), "{bad}");
        }
        let any = "0.0.0.0:9090".parse().unwrap();
        for ok in ["10.1.2.3:9090", "localhost:9090", "[fd00::1]:9090"] {
            assert!(host_allowed(ok, any), "{ok}");
        }
        for bad in ["pod.example:9090", "10.1.2.3:80", "10.1.2.3"] {
            assert!(!host_allowed(bad, any), "{bad}");
        }
        let public = "10.0.0.5:80".parse().unwrap();
        assert!(host_allowed("10.0.0.5", public));
        assert!(host_allowed("10.0.0.5:80", public));
        assert!(!host_allowed("localhost:80", public));
        let v6 = "[::1]:9090".parse().unwrap();
        assert!(host_allowed("[::1]:9090", v6));
        assert!(host_allowed("localhost:9090", v6));
        assert!(!host_allowed("::1:9090", v6));
    }
}
