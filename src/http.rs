//! HTTP/1.1 heads: the client's request, the head ringlb forwards, and the
//! backend's response. Pure functions over byte slices; no sockets.
//!
//! ringlb never forwards the client's head byte for byte. It parses it with
//! `httparse`, checks it (RFC 6455 §4.2.1 for upgrades, RFC 9112 framing rules
//! for everything), and writes a new head: one canonical request line, the
//! client's end-to-end headers in their order, then the headers ringlb owns
//! (`X-Forwarded-For`, `X-Real-IP`, `X-Forwarded-Proto`, `Connection`,
//! `Upgrade`). Re-serialising is what makes smuggling shapes harmless: the
//! backend only ever sees framing that ringlb itself decided on.

use std::net::IpAddr;

use base64::Engine as _;
use sha1::{Digest, Sha1};

const WS_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Why ringlb answers a request itself. The status is what the client gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    BadRequest(&'static str),
    /// Refused by a route's policy (an `Origin` not allowed).
    Forbidden(&'static str),
    /// Sec-WebSocket-Version is not 13.
    UpgradeVersion,
    /// Route is WebSocket-only and the request is not an upgrade.
    UpgradeRequired,
    HeadTooLarge,
    NotFound,
    BadGateway(&'static str),
    ServiceUnavailable,
    /// Over the upgrade budget (admission control): come back in this many
    /// seconds.
    Busy {
        retry_after: u32,
    },
    /// Over the connections allowed from one address.
    TooManyRequests,
    GatewayTimeout,
    /// The request body stopped arriving while the backend waited for it.
    RequestTimeout,
}

impl Reject {
    pub fn status(self) -> u16 {
        match self {
            Reject::BadRequest(_) => 400,
            Reject::NotFound => 404,
            Reject::Forbidden(_) => 403,
            Reject::RequestTimeout => 408,
            Reject::UpgradeVersion | Reject::UpgradeRequired => 426,
            Reject::HeadTooLarge => 431,
            Reject::BadGateway(_) => 502,
            Reject::ServiceUnavailable | Reject::Busy { .. } => 503,
            Reject::TooManyRequests => 429,
            Reject::GatewayTimeout => 504,
        }
    }

    /// The whole response ringlb sends; every one closes the connection.
    pub fn response(self) -> Vec<u8> {
        let retry: String;
        let (reason, extra, body): (&str, &str, &str) = match self {
            Reject::BadRequest(why) => ("Bad Request", "", why),
            Reject::Forbidden(why) => ("Forbidden", "", why),
            Reject::NotFound => ("Not Found", "", "no route for this path"),
            Reject::UpgradeVersion => (
                "Upgrade Required",
                "Sec-WebSocket-Version: 13\r\nUpgrade: websocket\r\n",
                "only WebSocket version 13 is supported",
            ),
            Reject::UpgradeRequired => (
                "Upgrade Required",
                "Sec-WebSocket-Version: 13\r\nUpgrade: websocket\r\n",
                "this route only accepts WebSocket upgrades",
            ),
            Reject::HeadTooLarge => (
                "Request Header Fields Too Large",
                "",
                "request head too large",
            ),
            Reject::BadGateway(why) => ("Bad Gateway", "", why),
            Reject::ServiceUnavailable => ("Service Unavailable", "", "over capacity"),
            Reject::Busy { retry_after } => {
                retry = format!("Retry-After: {retry_after}\r\n");
                (
                    "Service Unavailable",
                    &retry,
                    "too many new sessions; retry later",
                )
            }
            Reject::TooManyRequests => (
                "Too Many Requests",
                "",
                "too many connections from this address",
            ),
            Reject::GatewayTimeout => ("Gateway Timeout", "", "backend did not answer in time"),
            Reject::RequestTimeout => ("Request Timeout", "", "the request body stopped arriving"),
        };
        format!(
            "HTTP/1.1 {} {reason}\r\n{extra}Content-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}\n",
            self.status(),
            body.len() + 1
        )
        .into_bytes()
    }
}

/// A parsed, checked client request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Bytes of the head including the blank line; what follows is body or frames.
    pub head_len: usize,
    pub method: String,
    /// Origin-form target: path and query.
    pub target: String,
    /// HTTP/1.x minor version; forwarded as sent, so an HTTP/1.0 request
    /// without Host never becomes an invalid HTTP/1.1 one.
    pub minor: u8,
    /// `Some(key)` for a valid WebSocket upgrade.
    pub ws_key: Option<String>,
    /// The end-to-end headers to forward, in order, original name case.
    headers: Vec<(String, Vec<u8>)>,
    /// Values of X-Forwarded-For the client sent, joined.
    forwarded_for: Option<String>,
    /// The connection may carry another request (RFC 9112 §9.3).
    persistent: bool,
    /// How the request body is framed.
    pub body: ReqBody,
}

/// How a request's body is framed (RFC 9112 §6.3); ringlb forwards exactly
/// that much of what follows the head, and nothing after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReqBody {
    None,
    Length(u64),
    Chunked,
}

impl Request {
    pub fn is_upgrade(&self) -> bool {
        self.ws_key.is_some()
    }

    pub fn keep_alive(&self) -> bool {
        self.persistent
    }

    pub fn has_body(&self) -> bool {
        self.body != ReqBody::None
    }

    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }
}

/// Parses the client's head. `Ok(None)`: incomplete, read more (the caller
/// enforces `max_head` on what it has buffered).
pub fn parse_request(
    buf: &[u8],
    max_head: usize,
    max_headers: usize,
) -> Result<Option<Request>, Reject> {
    let mut storage = vec![httparse::EMPTY_HEADER; max_headers];
    let mut req = httparse::Request::new(&mut storage);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() >= max_head {
                Err(Reject::HeadTooLarge)
            } else {
                Ok(None)
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(Reject::HeadTooLarge),
        Err(_) => return Err(Reject::BadRequest("malformed request head")),
    };
    if head_len > max_head {
        return Err(Reject::HeadTooLarge);
    }
    let method = req.method.unwrap_or_default();
    let target = req.path.unwrap_or_default();
    let minor = req.version.unwrap_or(0);
    if !target.starts_with('/') {
        // Absolute-form and asterisk-form have no business at a WebSocket front.
        return Err(Reject::BadRequest("request target must be a path"));
    }

    let mut host_count = 0;
    let mut upgrade_ws = false;
    let mut conn_upgrade = false;
    let mut conn_close = false;
    let mut conn_keep_alive = false;
    let mut conn_named: Vec<String> = Vec::new();
    let mut ws_version: Option<&[u8]> = None;
    let mut ws_key: Option<&[u8]> = None;
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut forwarded_for: Vec<String> = Vec::new();

    for h in req.headers.iter() {
        let name = h.name;
        let value = h.value;
        if name.eq_ignore_ascii_case("host") {
            host_count += 1;
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade_ws |= has_token(value, "websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            conn_upgrade |= has_token(value, "upgrade");
            conn_close |= has_token(value, "close");
            conn_keep_alive |= has_token(value, "keep-alive");
            for t in tokens(value) {
                conn_named.push(t.to_ascii_lowercase());
            }
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            ws_version = Some(value);
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            if ws_key.is_some() {
                return Err(Reject::BadRequest("Sec-WebSocket-Key sent twice"));
            }
            ws_key = Some(value);
        } else if name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(value)
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or(Reject::BadRequest("invalid Content-Length"))?;
            if content_length.is_some_and(|c| c != v) {
                return Err(Reject::BadRequest("conflicting Content-Length"));
            }
            content_length = Some(v);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // Only a lone "chunked" is framing ringlb can pass through safely.
            if chunked || !value.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                return Err(Reject::BadRequest("unsupported Transfer-Encoding"));
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case("x-forwarded-for") {
            let v = std::str::from_utf8(value)
                .map_err(|_| Reject::BadRequest("invalid X-Forwarded-For"))?;
            let v = v.trim();
            if !v.is_empty() {
                forwarded_for.push(v.to_string());
            }
        }
    }
    if content_length.is_some() && chunked {
        return Err(Reject::BadRequest(
            "both Content-Length and Transfer-Encoding",
        ));
    }
    if minor == 1 && host_count != 1 {
        return Err(Reject::BadRequest("HTTP/1.1 needs exactly one Host header"));
    }
    if host_count > 1 {
        return Err(Reject::BadRequest("more than one Host header"));
    }

    let ws_key = if upgrade_ws {
        if method != "GET" {
            return Err(Reject::BadRequest("WebSocket upgrade must use GET"));
        }
        if minor != 1 {
            return Err(Reject::BadRequest("WebSocket upgrade needs HTTP/1.1"));
        }
        if !conn_upgrade {
            return Err(Reject::BadRequest(
                "Connection header lacks the upgrade token",
            ));
        }
        if ws_version.map(|v| v.trim_ascii()) != Some(b"13") {
            return Err(Reject::UpgradeVersion);
        }
        let key = ws_key
            .map(|k| k.trim_ascii())
            .ok_or(Reject::BadRequest("missing Sec-WebSocket-Key"))?;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(key)
            .map_err(|_| Reject::BadRequest("Sec-WebSocket-Key is not base64"))?;
        if decoded.len() != 16 {
            return Err(Reject::BadRequest("Sec-WebSocket-Key must encode 16 bytes"));
        }
        if chunked || content_length.is_some_and(|c| c > 0) {
            return Err(Reject::BadRequest("WebSocket upgrade with a body"));
        }
        // Checked as base64 above, so it is ASCII.
        Some(String::from_utf8_lossy(key).into_owned())
    } else {
        None
    };

    let mut headers = Vec::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let lname = h.name.to_ascii_lowercase();
        if is_hop_by_hop(&lname) || is_owned_by_proxy(&lname) {
            continue;
        }
        // The client may name more hop-by-hop headers. Host is never one,
        // whatever it says, or the backend could not route the request; nor
        // are the handshake's own headers of an upgrade, which ringlb has
        // just checked and the backend must see to compute its accept key.
        let essential =
            lname == "host" || (ws_key.is_some() && lname.starts_with("sec-websocket-"));
        if !essential && conn_named.contains(&lname) {
            continue;
        }
        headers.push((h.name.to_string(), h.value.to_vec()));
    }

    Ok(Some(Request {
        head_len,
        method: method.to_string(),
        target: target.to_string(),
        minor: minor as u8,
        ws_key,
        headers,
        forwarded_for: if forwarded_for.is_empty() {
            None
        } else {
            Some(forwarded_for.join(", "))
        },
        persistent: !conn_close && (minor >= 1 || conn_keep_alive),
        body: match content_length {
            _ if chunked => ReqBody::Chunked,
            Some(n) if n > 0 => ReqBody::Length(n),
            _ => ReqBody::None,
        },
    }))
}

/// Headers that only concern one hop (RFC 9110 §7.6.1, RFC 2616 §13.5.1).
/// Transfer-Encoding stays: ringlb relays a request body unchanged, so the
/// framing the backend needs is the client's.
fn is_hop_by_hop(lname: &str) -> bool {
    matches!(
        lname,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "upgrade"
    )
}

/// Headers ringlb sets itself, and those a backend could take for them
/// (`Forwarded`, any `X-Forwarded-*`), in any spelling: CGI and WSGI servers
/// map `X_Real_IP` and `X-Real-IP` to the same variable, so an underscore
/// variant is the same header to them. A client's copy would be spoofing.
/// (A client's `X-Forwarded-For` is kept, in its one proper spelling, only
/// with `forwarded_for = "append"`.)
fn is_owned_by_proxy(lname: &str) -> bool {
    let canon = lname.replace('_', "-");
    matches!(canon.as_str(), "x-real-ip" | "forwarded") || canon.starts_with("x-forwarded-")
}

/// Writes the head sent to the backend. `target` is the (possibly rewritten)
/// request target; `append_xff`: keep the client's `X-Forwarded-For` list
/// in front of its address (behind a trusted proxy), else replace it.
pub fn forward_head(
    req: &Request,
    target: &str,
    client: IpAddr,
    append_xff: bool,
    extra: &[u8],
) -> Vec<u8> {
    forward_head_proto(req, target, client, append_xff, extra, false)
}

/// [`forward_head`], saying `X-Forwarded-Proto: https` when the client
/// came over TLS.
pub fn forward_head_proto(
    req: &Request,
    target: &str,
    client: IpAddr,
    append_xff: bool,
    extra: &[u8],
    https: bool,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        256 + req
            .headers
            .iter()
            .map(|(n, v)| n.len() + v.len() + 4)
            .sum::<usize>()
            + extra.len(),
    );
    out.extend_from_slice(req.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(if req.minor == 0 {
        b" HTTP/1.0\r\n"
    } else {
        b" HTTP/1.1\r\n"
    });
    for (n, v) in &req.headers {
        out.extend_from_slice(n.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v);
        out.extend_from_slice(b"\r\n");
    }
    let ip = client.to_canonical().to_string();
    out.extend_from_slice(b"X-Forwarded-For: ");
    if let Some(prev) = req.forwarded_for.as_ref().filter(|_| append_xff) {
        out.extend_from_slice(prev.as_bytes());
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(ip.as_bytes());
    out.extend_from_slice(b"\r\nX-Real-IP: ");
    out.extend_from_slice(ip.as_bytes());
    out.extend_from_slice(if https {
        b"\r\nX-Forwarded-Proto: https\r\n"
    } else {
        b"\r\nX-Forwarded-Proto: http\r\n"
    });
    if req.is_upgrade() {
        out.extend_from_slice(b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n");
    } else {
        out.extend_from_slice(b"Connection: close\r\n\r\n");
    }
    out.extend_from_slice(extra);
    out
}

/// How much body follows a response head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// 101: from here on, WebSocket frames both ways.
    Upgraded,
    None,
    Length(u64),
    /// Chunked or unframed: relayed until the backend closes.
    UntilClose,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub head_len: usize,
    pub status: u16,
    pub body: Body,
}

/// Parses the backend's response head. For an upgrade (`ws_key` given), a 101
/// must carry the right `Sec-WebSocket-Accept`, or it is a bad gateway.
pub fn parse_response(
    buf: &[u8],
    max_head: usize,
    ws_key: Option<&str>,
    head_request: bool,
) -> Result<Option<Response>, Reject> {
    let mut storage = [httparse::EMPTY_HEADER; 128];
    let mut resp = httparse::Response::new(&mut storage);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n <= max_head => n,
        Ok(httparse::Status::Partial) if buf.len() < max_head => return Ok(None),
        Ok(_) | Err(httparse::Error::TooManyHeaders) => {
            return Err(Reject::BadGateway("backend response head too large"))
        }
        Err(_) => return Err(Reject::BadGateway("malformed backend response")),
    };
    let status = resp.code.unwrap_or(0);
    let headers: &[httparse::Header<'_>] = resp.headers;
    let find = |name: &'static str| {
        headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };

    if status == 101 {
        let Some(key) = ws_key else {
            return Err(Reject::BadGateway(
                "backend switched protocols on a plain request",
            ));
        };
        if !find("upgrade").any(|v| has_token(v, "websocket")) {
            return Err(Reject::BadGateway("backend 101 without Upgrade: websocket"));
        }
        let want = accept_key(key);
        let ok = find("sec-websocket-accept").any(|v| v.trim_ascii() == want.as_bytes());
        if !ok {
            return Err(Reject::BadGateway(
                "backend sent a wrong Sec-WebSocket-Accept",
            ));
        }
        return Ok(Some(Response {
            head_len,
            status,
            body: Body::Upgraded,
        }));
    }
    if (100..200).contains(&status) {
        // 100 Continue and friends precede the real answer; ringlb does not
        // send Expect, so treat a stray one as the start of an unframed reply.
        return Ok(Some(Response {
            head_len,
            status,
            body: Body::UntilClose,
        }));
    }
    let has_te = find("transfer-encoding").next().is_some();
    if has_te && find("content-length").next().is_some() {
        // Which one a cache in front believes decides where it thinks the
        // next response starts (RFC 9112 §6.3): refuse to pass it on.
        return Err(Reject::BadGateway(
            "backend sent both Content-Length and Transfer-Encoding",
        ));
    }
    let body = if head_request || status == 204 || status == 304 {
        Body::None
    } else if has_te {
        Body::UntilClose
    } else {
        let mut lens = find("content-length").map(|v| {
            std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
        });
        match (lens.next(), lens.next()) {
            (None, _) => Body::UntilClose,
            (Some(Some(n)), None) => Body::Length(n),
            _ => return Err(Reject::BadGateway("backend sent an invalid Content-Length")),
        }
    };
    Ok(Some(Response {
        head_len,
        status,
        body,
    }))
}

/// How a backend answer's body is framed, for a relay that must find its
/// bytes (to compress them) rather than pass them through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Length(u64),
    Chunked,
    UntilClose,
}

/// Whether ringlb compresses this backend answer on the fly (nginx's
/// `gzip_proxied any` with its defaults: status 200, 403 or 404, a listed
/// type, no `Content-Encoding`, no range, not declared shorter than
/// `min_length`), and if so the head to send instead: no length or
/// transfer coding of the backend's, `Content-Encoding: gzip`,
/// `Vary: Accept-Encoding`, a weak ETag (the bytes differ), chunked for an
/// HTTP/1.1 client (`chunked_out`), and `Connection: close` (a proxied
/// answer ends the client connection).
pub fn gzip_head(
    head: &[u8],
    types: &[String],
    min_length: u64,
    chunked_out: bool,
) -> Option<(Vec<u8>, Framing)> {
    let mut storage = [httparse::EMPTY_HEADER; 128];
    let mut r = httparse::Response::new(&mut storage);
    let Ok(httparse::Status::Complete(_)) = r.parse(head) else {
        return None;
    };
    let status = r.code?;
    if !matches!(status, 200 | 403 | 404) {
        return None;
    }
    let (mut mime, mut length, mut chunked) = (None, None, false);
    for h in r.headers.iter() {
        let v = std::str::from_utf8(h.value).ok()?.trim();
        match h.name.to_ascii_lowercase().as_str() {
            "content-encoding" if !v.eq_ignore_ascii_case("identity") => return None,
            "content-range" => return None,
            "content-type" => {
                mime = Some(
                    v.split(';')
                        .next()
                        .unwrap_or("")
                        .trim()
                        .to_ascii_lowercase(),
                )
            }
            "content-length" => length = Some(v.parse::<u64>().ok()?),
            "transfer-encoding" => chunked = has_token(h.value, "chunked"),
            _ => {}
        }
    }
    if !crate::files::headers::type_listed(types, mime.as_deref()?) {
        return None;
    }
    if length.is_some_and(|n| n == 0 || n < min_length) {
        return None;
    }
    let framing = match (chunked, length) {
        (true, _) => Framing::Chunked,
        (false, Some(n)) => Framing::Length(n),
        (false, None) => Framing::UntilClose,
    };
    let mut out = format!(
        "HTTP/1.{} {status} {}\r\n",
        r.version.unwrap_or(1),
        r.reason.unwrap_or("")
    )
    .into_bytes();
    for h in r.headers.iter() {
        let lname = h.name.to_ascii_lowercase();
        if matches!(
            lname.as_str(),
            "content-length" | "transfer-encoding" | "connection" | "keep-alive"
        ) {
            continue;
        }
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        if lname == "etag" && !h.value.starts_with(b"W/") {
            out.extend_from_slice(b"W/");
        }
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"Content-Encoding: gzip\r\nVary: Accept-Encoding\r\n");
    if chunked_out {
        out.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    Some((out, framing))
}

/// `Sec-WebSocket-Accept` for a key (RFC 6455 §4.2.2).
pub fn accept_key(key: &str) -> String {
    let mut h = Sha1::new();
    h.update(key.as_bytes());
    h.update(WS_GUID);
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

fn tokens(value: &[u8]) -> impl Iterator<Item = &str> {
    std::str::from_utf8(value)
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

fn has_token(value: &[u8], token: &str) -> bool {
    tokens(value).any(|t| t.eq_ignore_ascii_case(token))
}

#[cfg(test)]
mod tests;
