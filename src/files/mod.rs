//! Static files: one request on a `static` route, as a sans-IO machine.
//!
//! The connection (`conn/`) owns a [`Serve`] while it answers a request and
//! carries out what it returns ([`Next`]); the shard does the I/O on its ring
//! (`openat2`, `read`, `splice` of a large body: file → pipe on the ring,
//! pipe → socket inline; the connection drives that loop in
//! [`Serve::spliced`]) and reports back. Steps, like nginx's
//! `try_files $uri $uri/ <fallback>` plus `gzip_static`:
//!
//! ```text
//! Target ─ dir ─► Index ─┐                ┌─► Br ─► Gz ─┐ (each only if accepted
//!   │ missing      │ missing               │             │  and present)
//!   └──────────────┴─► Fallback ── file ───┴─────────────┴─► answer
//!                         │ missing                            │ 304 / 416 / HEAD: head only
//!                         └─► 404                              │ small: read, send head+body once
//!                                                              │ gzip on the fly: read, compress (cached)
//!                                                              └ large: send head, then splice the body
//! ```
//!
//! Containment is the kernel's: every open is `openat2` relative to the
//! root's descriptor with `RESOLVE_BENEATH` (unless `follow_symlinks`), so no
//! path, `..` or symlink can reach outside root; `path::clean` refuses `..`
//! and NUL before that, so those are 400s. A symlink that leaves root fails
//! with `EXDEV` and is a 404 — never the fallback, which would hide it.

pub mod gzip;
pub mod headers;
pub mod path;
pub mod zipping;

use std::ffi::CString;
use std::sync::Arc;
use std::time::SystemTime;

use crate::config::StaticConfig;
use headers::Range;

/// The largest body read and sent in one go together with its head; a
/// larger one is spliced from the file after the head.
pub const CHUNK: usize = 256 * 1024;

/// Where a body moving by splice stands: the next file offset to fill the
/// pipe from, the bytes not yet put in the pipe, and the bytes in it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Spliced {
    pub offset: u64,
    pub left: u64,
    pub in_pipe: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Other,
}

/// What `fstat` said about an opened file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub kind: Kind,
    pub size: u64,
    pub mtime: SystemTime,
    pub dev: u64,
    pub ino: u64,
}

/// An `openat2` for the shard: `path` relative to the route's root.
/// Compared by path and flags (the site is the route's, by construction).
#[derive(Debug)]
pub struct OpenReq {
    pub site: Arc<StaticConfig>,
    pub path: CString,
    /// `RESOLVE_*` flags.
    pub resolve: u64,
}

/// What the connection must do next for this request.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Open a file; answer with [`Serve::on_open`].
    Open(Box<OpenReq>),
    /// Read `len` bytes at file `offset` into the buffer at `at`; answer
    /// with [`Serve::on_read`].
    Read { at: usize, len: usize, offset: u64 },
    /// Send `buf[start..start + len]`; answer with [`Serve::on_sent`] once
    /// all of it is sent.
    Send { start: usize, len: usize },
    /// Move the body's remaining `len` bytes, from file `offset` on, to the
    /// client without copying them (file → pipe → socket); answer with
    /// [`Serve::on_spliced`] once all are out, or the move failed.
    Splice { offset: u64, len: u64 },
    /// The response is complete.
    Done,
    /// Something went wrong after the head was promised (the file shrank
    /// under us): close the connection.
    Abort,
}

impl PartialEq for OpenReq {
    fn eq(&self, other: &Self) -> bool {
        self.path == other.path && self.resolve == other.resolve
    }
}
impl Eq for OpenReq {}

/// The request fields a static answer depends on.
#[derive(Debug, Clone, Default)]
pub struct Ask {
    pub method: String,
    /// Path below the route (prefix already stripped if the route says so).
    pub path: String,
    /// The request-target as the client sent it (prefix and query kept):
    /// its slash decides file or directory, and a redirect to the slash
    /// form is built from it. Empty: judged from `path`.
    pub target: String,
    pub minor: u8,
    pub keep_alive: bool,
    pub accept_encoding: Option<Vec<u8>>,
    pub if_none_match: Option<Vec<u8>>,
    pub if_modified_since: Option<Vec<u8>>,
    pub if_match: Option<Vec<u8>>,
    pub if_unmodified_since: Option<Vec<u8>>,
    pub range: Option<Vec<u8>>,
    pub if_range: Option<Vec<u8>>,
    /// The client's socket does not carry the bytes as they are (TLS): a
    /// large body is read and sent in chunks, never spliced.
    pub no_splice: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Try {
    Target,
    Index,
    Fallback,
    Br,
    Gz,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Opening(Try),
    /// Gzip on the fly, a slice per step (`zipping`): reading a slice, or
    /// sending what it compressed to.
    Zipping,
    /// Reading body bytes into the buffer after `at`.
    ReadingBody,
    Sending,
    /// The body beyond the first chunk moves by splice.
    Splicing,
    Done,
}

#[derive(Debug)]
pub struct Serve {
    site: Arc<StaticConfig>,
    ask: Ask,
    accepts: headers::Accepts,
    phase: Phase,
    /// The path being served, relative to root (without a variant suffix).
    rel: Vec<u8>,
    /// The client's URL ends in `/`: it names a directory, never a file.
    slash: bool,
    /// The file found for `rel`.
    found: Option<Meta>,
    /// The precompressed file chosen instead, and its encoding.
    variant: Option<(Meta, &'static str)>,
    /// `Content-Type` of `rel`, once the file is found.
    mime: &'static str,
    pub status: u16,
    /// The answer's bytes: head, then body (or a chunk of it).
    pub buf: Vec<u8>,
    /// Body bytes not yet asked for, and the file offset they start at.
    left: u64,
    next_off: u64,
    /// The read in flight: where in `buf`, how much, from which file offset,
    /// and how much of it is in (reads may come back short).
    at: usize,
    want: usize,
    read_off: u64,
    got: usize,
    keep_alive: bool,
    gzip_cache: usize,
    /// Driven by the connection while `Phase::Splicing`.
    pub spliced: Spliced,
    /// The gzip stream while `Phase::Zipping`.
    zip: Option<Box<zipping::Zipping>>,
}

impl Serve {
    /// `gzip_cache`: the shard's bound for compressed results, in bytes.
    pub fn start(site: Arc<StaticConfig>, ask: Ask, gzip_cache: usize) -> (Serve, Next) {
        let accepts = headers::accept_encoding(ask.accept_encoding.as_deref());
        let keep_alive = ask.keep_alive;
        let mut s = Serve {
            site,
            ask,
            accepts,
            phase: Phase::Opening(Try::Target),
            rel: Vec::new(),
            slash: false,
            found: None,
            variant: None,
            mime: "application/octet-stream",
            status: 0,
            buf: Vec::new(),
            left: 0,
            next_off: 0,
            spliced: Spliced::default(),
            at: 0,
            want: 0,
            read_off: 0,
            got: 0,
            keep_alive,
            gzip_cache,
            zip: None,
        };
        if s.ask.method != "GET" && s.ask.method != "HEAD" {
            let next = s.error(405, "Method Not Allowed", "Allow: GET, HEAD\r\n");
            return (s, next);
        }
        match path::clean(&s.ask.path) {
            Err(why) => {
                s.keep_alive = false;
                let next = s.error(400, "Bad Request", "");
                log::debug!("static: {why}: {:?}", s.ask.path);
                (s, next)
            }
            Ok(clean) => {
                s.rel = clean.rel;
                s.slash = match s.ask.target.split('?').next() {
                    Some(t) if !t.is_empty() => t.ends_with('/'),
                    _ => clean.dir,
                };
                let next = s.open(Try::Target, &[]);
                (s, next)
            }
        }
    }

    /// Whether the connection may carry another request after this one.
    pub fn keep_alive(&self) -> bool {
        self.keep_alive
    }

    fn open(&mut self, step: Try, suffix: &[u8]) -> Next {
        self.phase = Phase::Opening(step);
        let mut p = if self.rel.is_empty() {
            b".".to_vec()
        } else {
            self.rel.clone()
        };
        if step == Try::Index {
            let index = self.site.index.as_deref().unwrap_or_default();
            p.push(b'/');
            p.extend_from_slice(index.as_bytes());
        }
        p.extend_from_slice(suffix);
        let resolve = if self.site.follow_symlinks {
            libc::RESOLVE_NO_MAGICLINKS
        } else {
            libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS
        };
        // `clean` removed NUL bytes, so this cannot fail.
        let path = CString::new(p).expect("no NUL in a cleaned path");
        Next::Open(Box::new(OpenReq {
            site: self.site.clone(),
            path,
            resolve,
        }))
    }

    /// An open finished. Returns whether the shard must keep the file it
    /// opened (as the one to read from), and what to do next.
    pub fn on_open(&mut self, res: Result<Meta, i32>) -> (bool, Next) {
        let Phase::Opening(step) = self.phase else {
            return (false, Next::Abort);
        };
        let file = match res {
            Ok(m) if m.kind == Kind::File => Some(m),
            _ => None,
        };
        match step {
            Try::Br | Try::Gz => match file {
                Some(m) => {
                    let enc = if step == Try::Br { "br" } else { "gzip" };
                    self.variant = Some((m, enc));
                    (true, self.answer())
                }
                None if step == Try::Br && self.accepts.gzip => (false, self.open(Try::Gz, b".gz")),
                None => (false, self.answer()),
            },
            Try::Target | Try::Index | Try::Fallback => {
                if file.is_some() && step == Try::Target && self.slash {
                    // `x/` names a directory; a file `x` is not it (nginx:
                    // ENOTDIR), so on to the fallback or 404.
                    return (false, self.missing(step));
                }
                if let Some(m) = file {
                    if step == Try::Index {
                        // The index's name decides its type and variants.
                        let index = self.site.index.as_deref().unwrap_or_default();
                        if !self.rel.is_empty() {
                            self.rel.push(b'/');
                        }
                        self.rel.extend_from_slice(index.as_bytes());
                    }
                    self.found = Some(m);
                    return (true, self.found_file());
                }
                match res {
                    Ok(m) if m.kind == Kind::Dir && step == Try::Target => {
                        if !self.slash {
                            return (false, self.redirect_to_slash());
                        }
                        if self.site.index.is_some() {
                            (false, self.open(Try::Index, &[]))
                        } else {
                            (false, self.missing(step))
                        }
                    }
                    Ok(_) => (false, self.missing(step)),
                    Err(e) => (false, self.open_failed(step, e)),
                }
            }
        }
    }

    fn open_failed(&mut self, step: Try, errno: i32) -> Next {
        match errno {
            libc::ENOENT | libc::ENOTDIR | libc::ENAMETOOLONG => self.missing(step),
            // Outside root (RESOLVE_BENEATH) or a symlink loop: hidden, and
            // never answered with the fallback.
            libc::EXDEV | libc::ELOOP => self.error(404, "Not Found", ""),
            libc::EACCES | libc::EPERM => self.error(403, "Forbidden", ""),
            libc::EMFILE | libc::ENFILE | libc::ENOMEM => {
                self.keep_alive = false;
                self.error(503, "Service Unavailable", "")
            }
            _ => {
                log::warn!(
                    "static: cannot open {:?} under {}: {}",
                    String::from_utf8_lossy(&self.rel),
                    self.site.root.display(),
                    std::io::Error::from_raw_os_error(errno)
                );
                self.error(500, "Internal Server Error", "")
            }
        }
    }

    /// A directory asked for without its slash: relative links in its
    /// index would resolve against the parent, so send the client to the
    /// slash form first (nginx does too), query kept.
    fn redirect_to_slash(&mut self) -> Next {
        let target = if self.ask.target.is_empty() {
            &self.ask.path
        } else {
            &self.ask.target
        };
        let location = match target.split_once('?') {
            Some((path, query)) => format!("{path}/?{query}"),
            None => format!("{target}/"),
        };
        self.error(
            301,
            "Moved Permanently",
            &format!("Location: {location}\r\n"),
        )
    }

    fn missing(&mut self, step: Try) -> Next {
        match (&self.site.fallback, step) {
            (Some(fb), Try::Target | Try::Index) => {
                self.rel = path::clean(fb).map(|c| c.rel).unwrap_or_default();
                self.open(Try::Fallback, &[])
            }
            _ => self.error(404, "Not Found", ""),
        }
    }

    fn found_file(&mut self) -> Next {
        let name = String::from_utf8_lossy(&self.rel);
        self.mime = mime_guess::from_path(name.as_ref())
            .first_raw()
            .unwrap_or("application/octet-stream");
        if self.site.precompressed {
            if self.accepts.br {
                return self.open(Try::Br, b".br");
            }
            if self.accepts.gzip {
                return self.open(Try::Gz, b".gz");
            }
        }
        self.answer()
    }

    fn compressible(&self) -> bool {
        (self.site.gzip || self.site.precompressed)
            && headers::type_listed(&self.site.gzip_types, self.mime)
    }

    /// The file (or its variant) is chosen: answer it.
    fn answer(&mut self) -> Next {
        let found = self.found.expect("answer without a file");
        let (meta, encoding) = match self.variant {
            Some((m, enc)) => (m, Some(enc)),
            None => (found, None),
        };
        let zip_now = encoding.is_none()
            && self.site.gzip
            && self.accepts.gzip
            && self.ask.range.is_none()
            && meta.size >= self.site.gzip_min_length
            && meta.size <= self.site.gzip_max_length
            && headers::type_listed(&self.site.gzip_types, self.mime);
        let tag = if zip_now {
            format!("W/{}", headers::etag(meta.mtime, meta.size))
        } else {
            headers::etag(meta.mtime, meta.size)
        };
        if headers::precondition_failed(
            self.ask.if_match.as_deref(),
            self.ask.if_unmodified_since.as_deref(),
            &tag,
            meta.mtime,
        ) {
            return self.error(412, "Precondition Failed", "");
        }
        if headers::not_modified(
            self.ask.if_none_match.as_deref(),
            self.ask.if_modified_since.as_deref(),
            &tag,
            meta.mtime,
        ) {
            self.status = 304;
            let head = self.head(304, &meta, &tag, encoding, None, None);
            return self.send_head_only(head);
        }
        if zip_now {
            let key = gzip::Key {
                dev: meta.dev,
                ino: meta.ino,
                size: meta.size,
                mtime: meta.mtime,
            };
            if let Some(gz) = gzip::get(&key) {
                return self.send_compressed(&meta, &tag, &gz);
            }
            return self.start_zipping(&meta, &tag, key);
        }
        let whole = meta.size;
        let range = if self.ask.method == "GET" {
            headers::range(
                self.ask.range.as_deref(),
                self.ask.if_range.as_deref(),
                &tag,
                meta.mtime,
                whole,
            )
        } else {
            Range::Full
        };
        let (status, first, len, content_range) = match range {
            Range::Full => (200, 0, whole, None),
            Range::Part(a, b) => (206, a, b - a + 1, Some(format!("bytes {a}-{b}/{whole}"))),
            Range::Unsatisfiable => {
                self.status = 416;
                let extra = format!("Content-Range: bytes */{whole}\r\n");
                return self.error(416, "Range Not Satisfiable", &extra);
            }
        };
        self.status = status;
        let head = self.head(status, &meta, &tag, encoding, Some(len), content_range);
        if self.ask.method == "HEAD" || len == 0 {
            return self.send_head_only(head);
        }
        self.left = len;
        self.next_off = first;
        if len as usize <= CHUNK {
            // Head and body leave in one send.
            let at = head.len();
            self.buf = head;
            self.buf.resize(at + len as usize, 0);
            self.left = 0;
            self.phase = Phase::ReadingBody;
            return self.read(at, len as usize, first);
        }
        // A large body: the head goes alone, the body follows by splice
        // (`on_sent`), so neither a read nor a send copies it.
        self.buf = head;
        self.phase = Phase::Sending;
        Next::Send {
            start: 0,
            len: self.buf.len(),
        }
    }

    fn read(&mut self, at: usize, len: usize, offset: u64) -> Next {
        self.at = at;
        self.want = len;
        self.read_off = offset;
        self.got = 0;
        Next::Read { at, len, offset }
    }

    /// A read finished with `res` bytes (or an errno).
    pub fn on_read(&mut self, res: Result<usize, i32>) -> Next {
        let n = match res {
            Ok(0) | Err(_) => {
                // The file shrank or failed after its length was promised
                // (or mid-way through a gzip stream, which then must not
                // look complete). Closing is the only honest answer.
                if let Err(e) = res {
                    log::warn!(
                        "static: read of {:?} failed: {}",
                        String::from_utf8_lossy(&self.rel),
                        std::io::Error::from_raw_os_error(e)
                    );
                }
                self.keep_alive = false;
                return Next::Abort;
            }
            Ok(n) => n,
        };
        self.got += n;
        if self.got < self.want {
            return Next::Read {
                at: self.at + self.got,
                len: self.want - self.got,
                offset: self.read_off + self.got as u64,
            };
        }
        match self.phase {
            Phase::Zipping => {
                let zip = self.zip.as_mut().expect("zipping");
                zip.feed(&mut self.buf, self.at, self.want);
                self.zip_step()
            }
            _ => {
                self.phase = Phase::Sending;
                Next::Send {
                    start: 0,
                    len: self.at + self.want,
                }
            }
        }
    }

    /// Everything handed over with the last `Send` is sent.
    pub fn on_sent(&mut self) -> Next {
        if self.phase == Phase::Zipping {
            self.buf.clear();
            if self.zip.as_ref().is_some_and(|z| z.finished) {
                self.zip = None;
                self.phase = Phase::Done;
                return Next::Done;
            }
            return self.zip_step();
        }
        if self.phase != Phase::Sending {
            return Next::Abort;
        }
        if self.left == 0 {
            self.phase = Phase::Done;
            return Next::Done;
        }
        if self.ask.no_splice {
            // Through a transforming transport: a chunk at a time, read
            // into the buffer, sent (sealed) from it, then the next.
            let n = self.left.min(CHUNK as u64) as usize;
            let offset = self.next_off;
            self.left -= n as u64;
            self.next_off += n as u64;
            self.buf.clear();
            self.buf.resize(n, 0);
            self.phase = Phase::ReadingBody;
            return self.read(0, n, offset);
        }
        let (offset, len) = (self.next_off, self.left);
        self.left = 0;
        self.buf = Vec::new();
        self.phase = Phase::Splicing;
        Next::Splice { offset, len }
    }

    /// The body asked for by [`Next::Splice`] is out (`true`), or moving it
    /// failed (the file shrank or could not be read; the client went away).
    pub fn on_spliced(&mut self, ok: bool) -> Next {
        if self.phase != Phase::Splicing || !ok {
            self.keep_alive = false;
            return Next::Abort;
        }
        self.phase = Phase::Done;
        Next::Done
    }

    /// A gzip answer not in the cache: the head now, the body compressed
    /// and sent a slice at a time (`zipping`), its end marked by the last
    /// chunk (HTTP/1.1) or by closing (HTTP/1.0, which has no chunks).
    fn start_zipping(&mut self, meta: &Meta, tag: &str, key: gzip::Key) -> Next {
        self.status = 200;
        let chunked = self.ask.minor >= 1;
        let get = self.ask.method != "HEAD";
        if get && !chunked {
            self.keep_alive = false;
        }
        let mut head = self.head(200, meta, tag, Some("gzip"), None, None);
        if chunked {
            // Before the blank line that ends the head.
            let end = head.len() - 2;
            head.splice(end..end, *b"Transfer-Encoding: chunked\r\n");
        }
        if !get {
            return self.send_head_only(head);
        }
        self.buf = head;
        self.zip = Some(Box::new(zipping::Zipping::new(
            key,
            chunked,
            self.gzip_cache,
        )));
        self.phase = Phase::Zipping;
        self.zip_read()
    }

    /// After a slice is compressed or its output sent: send what `buf`
    /// holds (output, and the head with the first of it), else read on.
    fn zip_step(&mut self) -> Next {
        if self.buf.is_empty() {
            return self.zip_read();
        }
        Next::Send {
            start: 0,
            len: self.buf.len(),
        }
    }

    /// Reads the next slice into `buf`, after what waits there to be sent.
    fn zip_read(&mut self) -> Next {
        let zip = self.zip.as_mut().expect("zipping");
        let (len, offset) = zip.next_slice();
        let at = self.buf.len();
        if len == 0 {
            // An empty file: nothing to read, only the gzip trailer.
            zip.feed(&mut self.buf, at, 0);
            return self.zip_step();
        }
        self.buf.resize(at + len, 0);
        self.read(at, len, offset)
    }

    fn send_compressed(&mut self, meta: &Meta, tag: &str, gz: &[u8]) -> Next {
        self.status = 200;
        let head = self.head(200, meta, tag, Some("gzip"), Some(gz.len() as u64), None);
        if self.ask.method == "HEAD" {
            return self.send_head_only(head);
        }
        self.buf = head;
        self.buf.extend_from_slice(gz);
        self.left = 0;
        self.phase = Phase::Sending;
        Next::Send {
            start: 0,
            len: self.buf.len(),
        }
    }

    fn send_head_only(&mut self, head: Vec<u8>) -> Next {
        self.buf = head;
        self.left = 0;
        self.phase = Phase::Sending;
        Next::Send {
            start: 0,
            len: self.buf.len(),
        }
    }

    fn error(&mut self, status: u16, reason: &str, extra: &str) -> Next {
        self.status = status;
        let body = format!("{status} {reason}\n");
        let mut h = format!(
            "HTTP/1.1 {status} {reason}\r\nDate: {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{extra}",
            headers::http_date(SystemTime::now()),
            body.len()
        );
        self.connection_header(&mut h);
        h.push_str("\r\n");
        if self.ask.method != "HEAD" {
            h.push_str(&body);
        }
        self.send_head_only(h.into_bytes())
    }

    fn connection_header(&self, h: &mut String) {
        if !self.keep_alive {
            h.push_str("Connection: close\r\n");
        } else if self.ask.minor == 0 {
            h.push_str("Connection: keep-alive\r\n");
        }
    }

    fn head(
        &self,
        status: u16,
        meta: &Meta,
        tag: &str,
        encoding: Option<&str>,
        len: Option<u64>,
        content_range: Option<String>,
    ) -> Vec<u8> {
        use std::fmt::Write;
        let reason = match status {
            200 => "OK",
            206 => "Partial Content",
            304 => "Not Modified",
            _ => "OK",
        };
        let mut h = String::with_capacity(320);
        let _ = write!(
            h,
            "HTTP/1.1 {status} {reason}\r\nDate: {}\r\nContent-Type: {}\r\nLast-Modified: {}\r\nETag: {tag}\r\n",
            headers::http_date(SystemTime::now()),
            self.mime,
            headers::http_date(meta.mtime),
        );
        if let Some(len) = len {
            let _ = write!(h, "Content-Length: {len}\r\n");
        }
        if let Some(cr) = content_range {
            let _ = write!(h, "Content-Range: {cr}\r\n");
        }
        if let Some(enc) = encoding {
            let _ = write!(h, "Content-Encoding: {enc}\r\n");
        }
        if encoding.is_some() || self.compressible() {
            h.push_str("Vary: Accept-Encoding\r\n");
        }
        if !tag.starts_with("W/") {
            h.push_str("Accept-Ranges: bytes\r\n");
        }
        if let Some(cc) = &self.site.cache_control {
            let _ = write!(h, "Cache-Control: {cc}\r\n");
        }
        self.connection_header(&mut h);
        h.push_str("\r\n");
        h.into_bytes()
    }
}
