//! From a parsed request head to the backend's answer: routing, the
//! backend pick and retries, what of the client's bytes may reach the
//! backend connection ([`Upload`]), the response and upload timers, and
//! ringlb's own answers.
//!
//! ```text
//! try_head ─► connect_next ─► Connecting(n) ─on_connect─► AwaitingResponse ─try_response─► Relaying
//!    │            ▲  failed connect: next backend │ backend failed before answering,
//!    │            └──── Retrying(n) ◄─────────────┘ idempotent: resend the replay copy
//!    └─► respond (4xx/5xx) ─► Responding ─► linger ─► Closing
//! ```
//!
//! A backend connection carries exactly one head that ringlb wrote, that
//! request's declared body (`body.rs` finds its end), and after a 101 the
//! client's frames; bytes behind an upgrade head wait for the 101.

use super::*;

impl Conn {
    /// Client bytes while its request is with the backend and no 101 has
    /// come: only the request's declared body goes on; bytes behind an
    /// upgrade head wait for the 101; anything else is dropped.
    pub(super) fn client_bytes(&mut self, bid: Option<u16>, data: &[u8], out: &mut Vec<Action>) {
        let tracker = match &mut self.upload {
            Upload::Body(t) => t,
            Upload::HeldFor101 => {
                // Arrived before the recv was stopped. Held in memory until
                // the 101, so bounded like a head: a client has no business
                // sending more than that before the backend has answered.
                release(bid, out);
                let Some(hs) = try_hs_mut(&mut self.state) else {
                    return;
                };
                if hs.early.len() + data.len() > hs.snap.config.server.max_request_head.get() {
                    return self.bad_body("too many bytes before the backend's 101", out);
                }
                hs.early.extend_from_slice(data);
                return;
            }
            Upload::Complete | Upload::Open => return release(bid, out),
        };
        let n = match tracker.feed(data) {
            Ok(n) => n,
            Err(why) => {
                release(bid, out);
                return self.bad_body(why, out);
            }
        };
        let done = tracker.done();
        if let Some(hs) = try_hs_mut(&mut self.state) {
            hs.uploaded += n as u64;
        }
        if n == 0 {
            release(bid, out);
        } else if matches!(self.stage(), Stage::Retrying { .. }) {
            // Held with the request until the next backend is connected.
            release(bid, out);
            if !self.keep_for_replay(&data[..n]) {
                return self.respond(Reject::BadGateway("backend failed before answering"), out);
            }
        } else {
            self.keep_for_replay(&data[..n]);
            self.relay(Side::Client, bid, &data[..n], out);
        }
        if done && self.stage() != Stage::Closing {
            self.upload_complete(out);
        }
    }

    /// The request's body has all arrived: stop reading the client (what it
    /// sends next stays in its socket, and is not this backend's) and give
    /// the backend its full `response_timeout` from now.
    pub(super) fn upload_complete(&mut self, out: &mut Vec<Action>) {
        self.upload = Upload::Complete;
        self.stop_client_recv(out);
        if self.stage() == Stage::AwaitingResponse {
            self.response_timer(out);
        }
    }

    pub(super) fn stop_client_recv(&mut self, out: &mut Vec<Action>) {
        if self.recv[Side::Client.idx()] == RecvState::Armed {
            self.recv[Side::Client.idx()] = RecvState::Cancelling;
            out.push(Action::CancelRecv(Side::Client));
        }
    }

    /// The request body's framing is broken, so where it ends is unknown:
    /// 400 if no answer has started, else the connection ends.
    pub(super) fn bad_body(&mut self, why: &'static str, out: &mut Vec<Action>) {
        log::debug!("{}: invalid request body: {why}", self.client_addr);
        match self.stage() {
            Stage::Connecting { .. } | Stage::AwaitingResponse => {
                self.abort_backend(out);
                self.respond(Reject::BadRequest(why), out);
            }
            Stage::Retrying { .. } => self.respond(Reject::BadRequest(why), out),
            _ => self.close(Closer::Error, out),
        }
    }

    pub(super) fn response_timer(&mut self, out: &mut Vec<Action>) {
        let hs = hs_mut(&mut self.state);
        hs.timer_seq += 1;
        out.push(Action::Timer(
            TimerKind::Response { seq: hs.timer_seq },
            hs.response_timeout,
        ));
    }

    pub(super) fn upload_timer(&mut self, out: &mut Vec<Action>) {
        let hs = hs_mut(&mut self.state);
        hs.timer_seq += 1;
        out.push(Action::Timer(
            TimerKind::Upload {
                seq: hs.timer_seq,
                mark: hs.uploaded,
            },
            hs.response_timeout,
        ));
    }

    pub fn on_connect(&mut self, res: Result<(), i32>, out: &mut Vec<Action>) {
        let Stage::Connecting { attempt } = self.stage() else {
            // Aborted meanwhile (e.g. handshake answered); nothing to do.
            return;
        };
        match res {
            Ok(()) => {
                if let Some(lease) = &self.lease {
                    lease.backend().state.record_success();
                }
                self.set_stage(Stage::AwaitingResponse);
                self.recv[Side::Backend.idx()] = RecvState::Armed;
                out.push(Action::ArmRecv(Side::Backend));
                if matches!(self.upload, Upload::Body(_)) {
                    // The backend cannot answer before it has the body; a
                    // slow upload that keeps moving is not a slow backend.
                    self.upload_timer(out);
                } else {
                    self.response_timer(out);
                }
                self.kick(Side::Backend, out);
                let to_backend = &mut self.flow[Side::Backend.idx()];
                if to_backend.src_eof && to_backend.queue.is_empty() && !to_backend.sending {
                    to_backend.shut = true;
                    out.push(Action::ShutdownWrite(Side::Backend));
                }
            }
            Err(errno) => {
                self.blame_backend(&format!(
                    "a failed connect ({})",
                    std::io::Error::from_raw_os_error(errno)
                ));
                out.push(Action::DropBackend);
                self.connect_next(attempt + 1, out);
            }
        }
    }

    pub(super) fn try_head(&mut self, out: &mut Vec<Action>) {
        let hs = hs_mut(&mut self.state);
        let server = &hs.snap.config.server;
        let parsed =
            http::parse_request(&hs.head, server.max_request_head.get(), server.max_headers);
        let mut req = match parsed {
            Ok(None) => return,
            Ok(Some(req)) => req,
            Err(reject) => return self.respond(reject, out),
        };
        match route::normalize_target(&req.target) {
            Ok(std::borrow::Cow::Borrowed(_)) => {}
            Ok(std::borrow::Cow::Owned(t)) => req.target = t,
            Err(why) => return self.respond(Reject::BadRequest(why), out),
        }
        self.path = Some(super::intern::intern(req.path()));
        let Some(route) = hs.snap.router.find(req.path()).cloned() else {
            return self.respond(Reject::NotFound, out);
        };
        if route.websocket_only && !req.is_upgrade() {
            return self.respond(Reject::UpgradeRequired, out);
        }
        if let Some(policy) = route.origins.as_deref().filter(|_| req.is_upgrade()) {
            if !route::origin_allowed(policy, req.header("origin")) {
                return self.respond(Reject::Forbidden("origin not allowed"), out);
            }
        }
        let server = &hs.snap.config.server;
        if let (Some(rate), true) = (server.max_handshakes_per_second, req.is_upgrade()) {
            let burst = server.handshake_burst.get();
            if let Err(wait) =
                hs.snap
                    .admission
                    .admit_upgrade(rate.get(), burst, crate::admission::now_us())
            {
                // Whole seconds, spread between what the budget needs and
                // retry_after_max, so refused clients do not return together.
                let max = server.retry_after_max.as_secs().max(1) as u32;
                let least = (wait.as_secs_f64().ceil() as u32).clamp(1, max);
                let retry_after = least + RNG.with(|r| r.borrow_mut().below(max - least + 1));
                return self.respond(Reject::Busy { retry_after }, out);
            }
        }
        let upstream = match &route.target {
            RouteTarget::Upstream(u) => *u,
            RouteTarget::Static(site) => {
                let site = site.clone();
                return self.serve_static(req, route, site, out);
            }
        };
        let target = route::rewrite_target(&route, &req.target);
        let ip = self.client_addr.ip();
        // Behind the head: the start of the body, frames sent eagerly after
        // an upgrade (held for the 101), or the client's next requests
        // (never forwarded on this backend connection).
        let extra = hs.head.split_off(req.head_len);
        let (body_part, upload) = if req.is_upgrade() {
            (0, Upload::HeldFor101)
        } else {
            let tracker = match req.body {
                http::ReqBody::None => None,
                http::ReqBody::Length(n) => Some(BodyTracker::length(n)),
                http::ReqBody::Chunked => Some(BodyTracker::chunked()),
            };
            match tracker {
                None => (0, Upload::Complete),
                Some(mut t) => match t.feed(&extra) {
                    Ok(n) if t.done() => (n, Upload::Complete),
                    Ok(n) => (n, Upload::Body(t)),
                    Err(why) => return self.respond(Reject::BadRequest(why), out),
                },
            }
        };
        let append_xff = hs.snap.config.server.forwarded_for == crate::config::ForwardedFor::Append;
        let https = self.transport[Side::Client.idx()].is_tls();
        let mut forwarded =
            http::forward_head_proto(&req, &target, ip, append_xff, &extra[..body_part], https);
        if let Some(v) = hs.snap.config.upstreams[upstream].send_proxy_protocol {
            // The backend learns the client's address from this header, in
            // front of the head (and of every resend of it).
            let dst = hs.local_addr.unwrap_or(self.client_addr);
            let mut h = match v {
                crate::config::ProxyVersion::V1 => {
                    crate::proxy_protocol::encode_v1(self.client_addr, dst)
                }
                crate::config::ProxyVersion::V2 => {
                    crate::proxy_protocol::encode_v2(self.client_addr, dst)
                }
            };
            h.extend_from_slice(&forwarded);
            forwarded = h;
        }
        if upload == Upload::HeldFor101 {
            hs.early = extra;
        }
        hs.uploaded = body_part as u64;
        hs.upstream = upstream;
        let up = &hs.snap.upstreams[upstream];
        hs.response_timeout = match route.response_timeout {
            // The route's timeout is for plain HTTP; an upgrade answers at once.
            Some(t) if !req.is_upgrade() => t,
            _ => up.response_timeout,
        };
        self.route = Some(route.path.clone());
        // Compress the answer if the route says so and the client takes it.
        hs.gzip = route.gzip.clone().filter(|_| {
            !req.is_upgrade()
                && crate::files::headers::accept_encoding(req.header("accept-encoding")).gzip
        });

        hs.head = Vec::new();
        // POST and PATCH are not idempotent: never sent twice (RFC 9110 §9.2.2).
        if !matches!(req.method.as_str(), "POST" | "PATCH" | "LOCK") {
            hs.replay = Some(forwarded.clone());
        }
        hs.request = Some(req);
        self.enqueue(Side::Backend, forwarded);
        self.upload = upload;
        if !matches!(self.upload, Upload::Body(_)) {
            self.stop_client_recv(out);
        }
        self.connect_next(0, out);
    }

    /// Picks a backend not tried yet and connects, or answers 502/504.
    pub(super) fn connect_next(&mut self, attempt: u32, out: &mut Vec<Action>) {
        let hs = hs_mut(&mut self.state);
        let upstream = &hs.snap.upstreams[hs.upstream];
        // Each backend once, at most.
        let picked = RNG.with(|rng| upstream.pick(&hs.tried, &mut rng.borrow_mut()));
        match picked {
            Some((i, lease)) => {
                hs.tried.push(i);
                hs.attempt = attempt;
                let addr = lease.backend().addr;
                self.backend = Some(addr);

                let timeout = upstream.connect_timeout;
                let tls = hs.snap.config.upstreams[hs.upstream].tls.clone();
                if let Some(t) = tls {
                    if !self.start_backend_tls(&t) {
                        return self.respond(Reject::BadGateway("cannot start TLS"), out);
                    }
                }
                self.lease = Some(lease);
                self.set_stage(Stage::Connecting { attempt });
                out.push(Action::Connect(addr));
                out.push(Action::Timer(TimerKind::Connect { attempt }, timeout));
            }
            None => {
                let reject = if attempt == 0 && hs.tried.is_empty() {
                    Reject::BadGateway("no backend available")
                } else if hs.last_timed_out {
                    Reject::GatewayTimeout
                } else {
                    Reject::BadGateway("no backend reachable")
                };
                self.respond(reject, out);
            }
        }
    }

    pub(super) fn try_response(&mut self, out: &mut Vec<Action>) {
        let hs = hs_mut(&mut self.state);
        let req = hs.request.as_ref().expect("request parsed");
        let max = hs.snap.upstreams[hs.upstream].max_response_head;
        let parsed =
            http::parse_response(&hs.resp, max, req.ws_key.as_deref(), req.method == "HEAD");
        let resp = match parsed {
            Ok(None) => return,
            Ok(Some(r)) => r,
            Err(reject) => {
                self.abort_backend(out);
                return self.respond(reject, out);
            }
        };
        let data = std::mem::take(&mut hs.resp);
        let early = std::mem::take(&mut hs.early);
        let early_eof = hs.early_eof;
        let extra = (data.len() - resp.head_len) as u64;
        let zip = match (&hs.gzip, resp.body) {
            (Some(g), Body::Length(_) | Body::UntilClose) => http::gzip_head(
                &data[..resp.head_len],
                &g.types,
                g.min_length,
                req.minor >= 1,
            ),
            _ => None,
        };
        let chunked_out = req.minor >= 1;
        if resp.body != Body::Upgraded {
            let send_timeout = hs.snap.config.server.send_timeout;
            self.send_timer(send_timeout, out);
        }
        self.status = Some(resp.status);
        self.set_stage(Stage::Relaying);
        if let Some((head, framing)) = zip {
            // Compressed as it streams: the relay finds the body's end.
            let mut g = Box::new(super::gzip::GzipRelay::new(framing, chunked_out));
            let mut first = head;
            match g.feed(&data[resp.head_len..]) {
                Ok(bytes) => first.extend(bytes),
                Err(_) => return self.close(Closer::Error, out),
            }
            let done = g.done;
            self.state = State::Relaying(Relay::Response { gzip: Some(g) });
            if done {
                self.flow[Side::Client.idx()].limit = Some(0);
            }
            self.enqueue(Side::Client, first);
            self.kick(Side::Client, out);
            if self.upload == Upload::HeldFor101 {
                self.upload = Upload::Complete;
            }
            return;
        }
        if resp.body != Body::Upgraded {
            self.state = State::Relaying(Relay::Response { gzip: None });
        }
        let to_client = &mut self.flow[Side::Client.idx()];
        match resp.body {
            Body::Upgraded => to_client.frames.feed(&data[resp.head_len..]),
            Body::UntilClose => {}
            Body::None | Body::Length(_) => {
                let want = if let Body::Length(n) = resp.body {
                    n
                } else {
                    0
                };
                to_client.limit = Some(want.saturating_sub(extra));
            }
        }
        let mut data = data;
        if let Body::Length(n) = resp.body {
            data.truncate(resp.head_len + n.min(extra) as usize);
        } else if resp.body == Body::None {
            data.truncate(resp.head_len);
        }
        self.enqueue(Side::Client, data);
        self.kick(Side::Client, out);
        if resp.body == Body::Upgraded {
            self.release_early(early, early_eof, out);
        } else if self.upload == Upload::HeldFor101 {
            // Declined: what the client sent behind its upgrade is dropped
            // with the connection, which closes after this answer.
            self.upload = Upload::Complete;
        }
    }

    /// The 101 is in: the client's bytes held behind its upgrade head go to
    /// the backend first, then the client is read again.
    pub(super) fn release_early(&mut self, early: Vec<u8>, early_eof: bool, out: &mut Vec<Action>) {
        self.upload = Upload::Open;
        if !early.is_empty() {
            self.flow[Side::Backend.idx()].frames.feed(&early);
            self.enqueue(Side::Backend, early);
            self.kick(Side::Backend, out);
        }
        if early_eof {
            let to_backend = &mut self.flow[Side::Backend.idx()];
            to_backend.src_eof = true;
            self.closer.get_or_insert(Closer::Client);
            if to_backend.queue.is_empty() && !to_backend.sending && !to_backend.shut {
                to_backend.shut = true;
                out.push(Action::ShutdownWrite(Side::Backend));
            }
        } else if self.wants_recv(Side::Client) {
            self.ensure_recv(Side::Client, out);
        }
    }

    /// Counts a failed connect against the current backend (passive
    /// health) and gives up its lease.
    pub(super) fn blame_backend(&mut self, what: &str) {
        if let Some(lease) = self.lease.take() {
            let hs = hs(&self.state);
            let upstream = &hs.snap.upstreams[hs.upstream];
            if lease.backend().state.record_failure(upstream.health) {
                log::warn!(
                    "backend {} of upstream {} marked down for {:?} after {what}",
                    lease.backend().addr,
                    upstream.name,
                    upstream.health.fail_timeout,
                );
            }
        }
    }

    /// Keeps client bytes that went (or will go) to the backend, so the
    /// request can be resent; false once that is no longer possible.
    pub(super) fn keep_for_replay(&mut self, data: &[u8]) -> bool {
        let Some(hs) = try_hs_mut(&mut self.state) else {
            return false;
        };
        match &mut hs.replay {
            Some(r) if r.len() + data.len() <= MAX_REPLAY => {
                r.extend_from_slice(data);
                true
            }
            _ => {
                hs.replay = None;
                false
            }
        }
    }

    /// The old backend's socket has no op left: send the request again,
    /// to a backend not tried yet.
    pub fn on_backend_released(&mut self, out: &mut Vec<Action>) {
        let Stage::Retrying { attempt } = self.stage() else {
            return;
        };
        let hs = hs_mut(&mut self.state);
        hs.resp.clear();
        let replay = hs.replay.clone().expect("retrying without a replay copy");
        let flow = &mut self.flow[Side::Backend.idx()];
        debug_assert!(!flow.sending);
        release_unsent(flow, out);
        let src_eof = flow.src_eof;
        let frames = std::mem::take(&mut flow.frames);
        *flow = Flow {
            frames,
            src_eof,
            ..Flow::default()
        };
        // The next backend gets its own TLS session (`connect_next`); the
        // replay is plaintext until then.
        self.transport[Side::Backend.idx()] = Transport::Plain;
        self.enqueue(Side::Backend, replay);
        self.recv[Side::Backend.idx()] = RecvState::Off;
        self.connect_next(attempt + 1, out);
    }

    /// ringlb could not even open a socket for the backend (its own fd or
    /// memory limit): answer 503 without blaming the backend.
    pub fn on_local_error(&mut self, out: &mut Vec<Action>) {
        if matches!(self.stage(), Stage::Connecting { .. }) {
            self.respond(Reject::ServiceUnavailable, out);
        }
    }

    /// The backend reset or failed before answering; nothing has reached
    /// the client yet, so it gets a proper 502 rather than a dropped socket.
    ///
    /// An idempotent request none of whose answer has arrived is sent again
    /// to the next backend (like nginx's `proxy_next_upstream error`), once
    /// the failed backend's socket has no op left.
    pub(super) fn backend_failed(&mut self, why: &'static str, out: &mut Vec<Action>) {
        let hs = hs(&self.state);
        let untried = hs.tried.len() < hs.snap.upstreams[hs.upstream].backends.len();
        if hs.replay.is_none() || !hs.resp.is_empty() || !untried {
            log::debug!(
                "{}: {why}; not retried (replayable: {}, answer bytes: {}, backends left: {untried})",
                self.backend.map_or_else(String::new, |b| b.to_string()),
                hs.replay.is_some(),
                hs.resp.len()
            );
            self.abort_backend(out);
            return self.respond(Reject::BadGateway(why), out);
        }
        let attempt = hs.attempt;
        log::debug!(
            "{}: {why}; sending the request again to another backend",
            self.backend.map_or_else(String::new, |b| b.to_string())
        );
        // Not counted against the backend's health: any client can make a
        // backend hang up (a request it rejects by closing), and counting it
        // would let a few requests mark every backend down for everyone.
        // Only connect failures, which no client can cause, count.
        self.lease = None;
        release_unsent(&mut self.flow[Side::Backend.idx()], out);
        self.set_stage(Stage::Retrying { attempt });
        out.push(Action::ReleaseBackend);
    }

    /// Every caller moves on to `Responding` at once, where nothing more
    /// is sent to the backend.
    pub(super) fn abort_backend(&mut self, out: &mut Vec<Action>) {
        out.push(Action::AbortBackend);
    }

    /// Answers the client with ringlb's own response, then closes.
    pub(super) fn respond(&mut self, reject: Reject, out: &mut Vec<Action>) {
        self.status = Some(reject.status());
        self.closer = Some(Closer::Proxy);
        self.lease = None;
        let linger = self.linger;
        self.set_stage(Stage::Responding);
        for flow in &mut self.flow {
            release_unsent(flow, out);
        }
        self.enqueue(Side::Client, reject.response());
        self.kick(Side::Client, out);
        self.queue_close_notify(Side::Client, out);
        out.push(Action::Timer(TimerKind::Linger, linger));
    }

    /// A non-101 answer is out, but the client may still be sending (a
    /// pipelined request ringlb does not serve, a body the backend did not
    /// wait for). Closing now with unread bytes would send a reset, which
    /// can destroy the answer before the client reads it; so our write half
    /// is shut, and what the client sends is discarded until it closes or
    /// `linger_timeout` passes.
    pub(super) fn linger_close(&mut self, out: &mut Vec<Action>) {
        self.abort_backend(out);
        self.lease = None;
        self.set_stage(Stage::Responding);
        release_unsent(&mut self.flow[Side::Backend.idx()], out);
        // TLS: close_notify first; the shutdown follows once it is sent.
        let notify =
            !self.flow[Side::Client.idx()].shut && self.queue_close_notify(Side::Client, out);
        let to_client = &mut self.flow[Side::Client.idx()];
        if !to_client.shut && !notify {
            to_client.shut = true;
            out.push(Action::ShutdownWrite(Side::Client));
        }
        self.ensure_recv(Side::Client, out);
        out.push(Action::Timer(TimerKind::Linger, self.linger));
    }
}

/// What may still go from the client to the backend connection. A backend
/// connection carries one head that ringlb wrote plus that request's body,
/// and, only after a 101, the client's frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Upload {
    /// An upgrade is sent: the client's next bytes wait for the backend's
    /// 101 (in the kernel: the client recv is stopped). Another answer
    /// discards them.
    HeldFor101,
    /// A request body is still arriving, framed by the tracker.
    Body(BodyTracker),
    /// The request is complete; whatever the client sends now is not for
    /// this backend connection (a pipelined request is dropped, and the
    /// connection closes after the answer).
    Complete,
    /// Upgraded: bytes flow both ways.
    Open,
}

/// PROXY protocol on the client side of a connection not yet read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ProxyIn {
    Off,
    /// From a trusted L4 tier: a header must come first.
    Required,
    /// From anyone else: a header is refused.
    Refused,
}

/// State only needed until the session is relaying; dropped after.
#[derive(Debug)]
pub(super) struct Handshake {
    pub(super) snap: Arc<Snapshot>,
    pub(super) head: Vec<u8>,
    pub(super) request: Option<Request>,
    pub(super) upstream: usize,
    pub(super) tried: Vec<usize>,
    pub(super) last_timed_out: bool,
    pub(super) resp: Vec<u8>,
    /// For the request being proxied: how long the backend may take to answer.
    pub(super) response_timeout: Duration,
    /// Every byte sent to the backend so far, while the request may still
    /// be sent again to another backend: idempotent, and short. `None`: it
    /// may not.
    pub(super) replay: Option<Vec<u8>>,
    /// The connect attempt in progress.
    pub(super) attempt: u32,
    /// Bytes the client sent behind its upgrade head, held until the 101.
    pub(super) early: Vec<u8>,
    /// The client half-closed behind its upgrade head; passed on after the 101.
    pub(super) early_eof: bool,
    /// Arming count of the response and upload timers.
    pub(super) timer_seq: u32,
    /// Request body bytes received so far (for the upload timer).
    pub(super) uploaded: u64,
    /// The route compresses answers and the client takes gzip.
    pub(super) gzip: Option<Arc<crate::config::ProxyGzip>>,
    /// A PROXY header is still to be read (or refused) before the head.
    pub(super) proxy_in: ProxyIn,
    /// The address the client connected to (for a PROXY header to backends).
    pub(super) local_addr: Option<SocketAddr>,
    /// A send timer is pending for this connection. One serves every
    /// static answer on a kept-alive connection, so the shard's timer heap
    /// holds one per connection, not one per request.
    pub(super) send_timer: bool,
}

/// Bytes of a request ringlb keeps to resend it after a backend failure.
pub(super) const MAX_REPLAY: usize = 64 * 1024;
