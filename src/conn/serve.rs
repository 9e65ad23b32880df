//! Glue between the connection and a static answer (`files::Serve`, a
//! sans-IO machine of its own): carrying out its steps (open, read, send,
//! file → pipe → client splice), the send timer, keep-alive and the next
//! pipelined request.

use super::*;

impl Conn {
    /// Starts answering `req` from a static route.
    pub(super) fn serve_static(
        &mut self,
        req: Request,
        route: crate::config::RouteConfig,
        site: Arc<crate::config::StaticConfig>,
        out: &mut Vec<Action>,
    ) {
        let hs = hs_mut(&mut self.state);
        let server = &hs.snap.config.server;
        let path = if route.strip_prefix {
            route::rewrite_target(&route, req.path())
        } else {
            req.path().to_string()
        };
        let keep_alive = req.keep_alive()
            && !req.has_body()
            && !self.no_keepalive
            && !self.peer_eof[Side::Client.idx()]
            && self.requests + 1 < server.keepalive_requests.get();
        let h = |name: &str| req.header(name).map(<[u8]>::to_vec);
        let ask = files::Ask {
            method: req.method.clone(),
            path,
            target: req.target.clone(),
            minor: req.minor,
            keep_alive,
            accept_encoding: h("accept-encoding"),
            if_none_match: h("if-none-match"),
            if_modified_since: h("if-modified-since"),
            if_match: h("if-match"),
            if_unmodified_since: h("if-unmodified-since"),
            range: h("range"),
            if_range: h("if-range"),
        };
        let gzip_cache = server.gzip_cache_size;
        // What follows the head is the next request (pipelined), or a body
        // this answer ignores (then the connection is not kept).
        hs.head.drain(..req.head_len);
        self.route = Some(route.path.clone());
        let (serve, next) = files::Serve::start(site, ask, gzip_cache);
        let send_timeout = server.send_timeout;
        let armed = std::mem::replace(&mut hs.send_timer, true);
        self.set_stage(Stage::Serving);
        if let State::Serving { serve: slot, .. } = &mut self.state {
            *slot = Some(Box::new(serve));
        }
        if !armed {
            self.send_timer(send_timeout, out);
        }
        self.follow(next, out);
    }

    /// Watches an HTTP answer for a client that stops taking it.
    pub(super) fn send_timer(&self, period: Duration, out: &mut Vec<Action>) {
        out.push(Action::Timer(
            TimerKind::Send {
                period_ms: period.as_millis().min(u128::from(u32::MAX)) as u32,
                mark: self.flow[Side::Client.idx()].bytes,
            },
            period,
        ));
    }

    /// Carries out the static answer's next step.
    pub(super) fn follow(&mut self, next: files::Next, out: &mut Vec<Action>) {
        match next {
            files::Next::Open(req) => out.push(Action::OpenFile(req)),
            files::Next::Read { at, len, offset } => out.push(Action::ReadFile { at, len, offset }),
            files::Next::Send { start, len } => {
                self.status = Some(self.serve().status);
                if self.transport[Side::Client.idx()].in_place() {
                    self.flow[Side::Client.idx()]
                        .queue
                        .push_back(Payload::File {
                            start: start as u32,
                            len: len as u32,
                        });
                } else {
                    let bytes = self.serve().buf[start..start + len].to_vec();
                    self.enqueue(Side::Client, bytes);
                }
                self.kick(Side::Client, out);
            }
            files::Next::Splice { offset, len } => {
                let serve = serve_mut(&mut self.state);
                serve.spliced = files::Spliced {
                    offset,
                    left: len,
                    in_pipe: 0,
                };
                self.fill_pipe(out);
            }
            files::Next::Done => self.request_done(out),
            files::Next::Abort => self.close(Closer::Error, out),
        }
    }

    /// Static body by splice: the pipe is empty, fill it from the file.
    pub(super) fn fill_pipe(&mut self, out: &mut Vec<Action>) {
        let sp = self.serve().spliced;
        out.push(Action::FileToPipe {
            offset: sp.offset,
            len: sp.left.min(SPLICE_CHUNK as u64) as u32,
        });
    }

    /// A file → pipe splice of the static body moved `res` bytes.
    pub fn on_file_spliced(&mut self, res: Result<usize, i32>, out: &mut Vec<Action>) {
        if self.stage() != Stage::Serving {
            return;
        }
        let serve = serve_mut(&mut self.state);
        match res {
            Ok(n) if n > 0 => {
                let sp = &mut serve.spliced;
                sp.offset += n as u64;
                sp.left = sp.left.saturating_sub(n as u64);
                sp.in_pipe += n;
                out.push(Action::PipeToClient {
                    pending: sp.in_pipe,
                });
            }
            // EOF: the file shrank after its length was promised.
            _ => {
                if let Err(e) = res {
                    log::warn!(
                        "static: splice from the file failed: {}",
                        std::io::Error::from_raw_os_error(e)
                    );
                }
                let next = serve.on_spliced(false);
                self.follow(next, out);
            }
        }
    }

    /// A pipe → client splice of the static body moved `res` bytes.
    pub fn on_pipe_drained(&mut self, res: Result<usize, i32>, out: &mut Vec<Action>) {
        if self.stage() != Stage::Serving {
            return;
        }
        let serve = serve_mut(&mut self.state);
        match res {
            Ok(m) => {
                self.flow[Side::Client.idx()].bytes += m as u64;
                let sp = &mut serve.spliced;
                sp.in_pipe -= m;
                if sp.in_pipe > 0 {
                    out.push(Action::PollOut(Side::Client));
                } else if sp.left > 0 {
                    self.fill_pipe(out);
                } else {
                    out.push(Action::LeaveSplice {
                        dst: Side::Client,
                        reusable: true,
                    });
                    let next = serve.on_spliced(true);
                    self.follow(next, out);
                }
            }
            Err(libc::EAGAIN) => out.push(Action::PollOut(Side::Client)),
            Err(_) => {
                // The client is gone; what is in the pipe goes with it.
                out.push(Action::LeaveSplice {
                    dst: Side::Client,
                    reusable: false,
                });
                let next = serve.on_spliced(false);
                self.follow(next, out);
            }
        }
    }

    /// The file opened for the static answer (its `fstat`), or an errno.
    pub fn on_file_open(&mut self, res: Result<files::Meta, i32>, out: &mut Vec<Action>) {
        if self.stage() != Stage::Serving {
            return;
        }
        let (adopt, next) = serve_mut(&mut self.state).on_open(res);
        if adopt {
            out.push(Action::AdoptFile);
        }
        self.follow(next, out);
    }

    pub fn on_file_read(&mut self, res: Result<usize, i32>, out: &mut Vec<Action>) {
        if self.stage() != Stage::Serving {
            return;
        }
        let next = serve_mut(&mut self.state).on_read(res);
        self.follow(next, out);
    }

    /// A static answer is sent: wait for the next request, or close.
    pub(super) fn request_done(&mut self, out: &mut Vec<Action>) {
        let State::Serving { serve, .. } = &mut self.state else {
            unreachable!("request_done outside Serving");
        };
        let serve = serve.take().expect("serving");
        let keep = serve.keep_alive() && !self.no_keepalive && !self.peer_eof[0];
        out.push(Action::RequestDone(Box::new(Done {
            status: serve.status,
            route: self.route.take(),
            path: self.path.take(),
            bytes_from_client: self.bytes_to(Side::Backend),
            bytes_to_client: self.bytes_to(Side::Client),
        })));
        drop(serve);
        self.requests += 1;
        self.status = None;
        self.bytes_base = [self.flow[0].bytes, self.flow[1].bytes];
        if !keep {
            self.closer = Some(Closer::Proxy);
            self.set_stage(Stage::Responding);
            self.flow[Side::Client.idx()].shut = true;
            out.push(Action::ShutdownWrite(Side::Client));
            self.ensure_recv(Side::Client, out);
            out.push(Action::Timer(TimerKind::Linger, self.linger));
            return;
        }
        self.set_stage(Stage::ReadingHead);
        let req = self.requests;
        let hs = hs_mut(&mut self.state);
        hs.request = None;
        let server = &hs.snap.config.server;
        if hs.head.is_empty() {
            out.push(Action::Timer(
                TimerKind::KeepAlive { req },
                server.keepalive_timeout,
            ));
        } else {
            out.push(Action::Timer(
                TimerKind::Handshake { req },
                server.handshake_timeout,
            ));
        }
        if self.recv[Side::Client.idx()] == RecvState::Off {
            self.ensure_recv(Side::Client, out);
        }
        if !super::hs(&self.state).head.is_empty() {
            self.try_head(out);
        }
    }

    /// Draining: a kept-alive connection between requests closes now; one
    /// mid-request closes after its answer.
    pub fn drain_idle(&mut self, out: &mut Vec<Action>) {
        self.no_keepalive = true;
        if self.requests > 0 && self.between_requests() {
            self.close(Closer::Shutdown, out);
        }
    }
}
