//! `ringlb demo`: two WebSocket echo backends on loopback and ringlb in
//! front of them, serving a page a browser can use, with the admin
//! dashboard on a port of its own and a status line per second. The
//! backends count the messages they echo, which is how the demo knows what
//! was relayed.
//!
//! ringlb serves the page itself from a `static` route on `/` (the page is
//! compiled into the binary and written to a private temporary directory at
//! start), and the echo backends sit behind a `websocket_only` route on
//! `/ws`: a browser's plain GETs (the page, `/favicon.ico`) never reach a
//! backend, so a visit cannot make one look broken and get it marked down.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::config::Config;
use crate::server::Server;

/// The page served at `/`.
pub const PAGE: &str = include_str!("demo.html");

/// The path of the WebSocket route in front of the echo backends.
pub const WS_PATH: &str = "/ws";

/// The WebSocket subprotocol the page asks for. A backend that agrees to it
/// first sends a greeting naming itself, then echoes; any other client gets
/// a pure echo, so echo checkers (`ringlb-load`) keep working unchanged.
pub const PROTOCOL: &str = "ringlb-demo";

/// A minimal threaded echo server; fine for a demo's handful of clients.
pub struct EchoBackend {
    pub name: String,
    pub addr: SocketAddr,
    pub messages: Arc<AtomicU64>,
}

impl EchoBackend {
    pub fn start(name: &str) -> std::io::Result<EchoBackend> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let messages = Arc::new(AtomicU64::new(0));
        let count = messages.clone();
        let greeting = serde_json::json!({ "backend": name, "addr": addr.to_string() }).to_string();
        std::thread::Builder::new()
            .name(format!("demo-echo-{}", addr.port()))
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    let count = count.clone();
                    let greeting = greeting.clone();
                    let _ =
                        std::thread::Builder::new().spawn(move || echo(stream, &count, &greeting));
                }
            })?;
        Ok(EchoBackend {
            name: name.to_string(),
            addr,
            messages,
        })
    }
}

/// True if a `Sec-WebSocket-Protocol` value lists [`PROTOCOL`].
fn asks_for_demo(value: &[u8]) -> bool {
    String::from_utf8_lossy(value)
        .split(',')
        .any(|p| p.trim() == PROTOCOL)
}

fn echo(stream: TcpStream, count: &AtomicU64, greeting: &str) {
    let mut demo = false;
    #[allow(clippy::result_large_err)] // the callback type is tungstenite's
    let agree = |req: &tungstenite::handshake::server::Request,
                 mut resp: tungstenite::handshake::server::Response| {
        if req
            .headers()
            .get_all("sec-websocket-protocol")
            .iter()
            .any(|v| asks_for_demo(v.as_bytes()))
        {
            demo = true;
            resp.headers_mut().insert(
                "sec-websocket-protocol",
                tungstenite::http::HeaderValue::from_static(PROTOCOL),
            );
        }
        Ok(resp)
    };
    let Ok(mut ws) = tungstenite::accept_hdr(stream, agree) else {
        return;
    };
    if demo && ws.send(tungstenite::Message::text(greeting)).is_err() {
        return;
    }
    while let Ok(msg) = ws.read() {
        if msg.is_text() || msg.is_binary() {
            count.fetch_add(1, Ordering::Relaxed);
            if ws.send(msg).is_err() {
                return;
            }
        }
    }
}

/// `<temp dir>/ringlb-demo-<PID>` holds the page of the demo with that PID.
pub const PAGE_DIR_PREFIX: &str = "ringlb-demo-";

/// The page's directory: private to this process, removed on drop.
struct PageDir(PathBuf);

impl PageDir {
    fn create() -> std::io::Result<PageDir> {
        use std::os::unix::fs::DirBuilderExt;
        let tmp = std::env::temp_dir();
        // Demos killed before they could clean up (SIGKILL) leave their
        // directory behind: remove those whose process is gone.
        for entry in std::fs::read_dir(&tmp)?.flatten() {
            let name = entry.file_name();
            let pid = name.to_str().and_then(|n| n.strip_prefix(PAGE_DIR_PREFIX));
            if pid.is_some_and(|p| p.parse::<u32>().is_ok() && !Path::new("/proc").join(p).exists())
            {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let dir = tmp.join(format!("{PAGE_DIR_PREFIX}{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        std::fs::write(dir.join("index.html"), PAGE)?;
        Ok(PageDir(dir))
    }
}

impl Drop for PageDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The demo's configuration, written as a file would be so that it goes
/// through the same validation.
fn config(listen: SocketAddr, admin: SocketAddr, root: &Path, backends: &[EchoBackend]) -> String {
    let servers: Vec<String> = backends
        .iter()
        .map(|b| format!("{{ addr = \"{}\" }}", b.addr))
        .collect();
    format!(
        "[server]\nlisten = [\"{listen}\"]\n\n[admin]\nlisten = \"{admin}\"\n\n\
         [[route]]\npath = \"{WS_PATH}\"\nupstream = \"echo\"\nwebsocket_only = true\n\n\
         [[route]]\npath = \"/\"\nstatic = {{ root = {root:?}, index = \"index.html\", cache_control = \"no-cache\" }}\n\n\
         [upstream.echo]\nservers = [{}]\n",
        servers.join(", "),
        root = root.display().to_string(),
    )
}

pub fn run(listen: SocketAddr, admin: SocketAddr) -> anyhow::Result<()> {
    let backends = [EchoBackend::start("echo-1")?, EchoBackend::start("echo-2")?];
    let page = PageDir::create().context("writing the demo page to a temporary directory")?;
    let text = config(listen, admin, &page.0, &backends);
    let cfg = Config::parse(&text, "the demo configuration")?;
    let mut server = Server::start(cfg).with_context(|| {
        format!(
            "the demo cannot start on {listen}; `ringlb demo --listen 127.0.0.1:0` picks a free \
             port"
        )
    })?;
    let at = server.local_addrs[0];
    println!("ringlb demo: open http://{at}/ in a browser");
    println!(
        "  WebSocket endpoint ws://{at}{WS_PATH}, least connections over echo backends {} ({}) and {} ({})",
        backends[0].name, backends[0].addr, backends[1].name, backends[1].addr
    );
    if let Some(a) = server.admin_addr {
        println!("  dashboard: http://{a}/   (admin API: /status, /metrics)");
    }
    println!(
        "  load from a terminal: cargo run --release -p ringlb-load -- pingpong --url ws://{at}{WS_PATH} --connections 50 --duration 10s"
    );
    println!("  Ctrl-C to stop");
    let _ = std::io::stdout().flush();

    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    let snap = server.control.snapshot();
    let upstream = &snap.upstreams[0];
    let mut last = 0;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_secs(1));
        if let Some(dead) = server.dead_shard() {
            server.abort(Duration::from_secs(2));
            anyhow::bail!("shard {} died: {}", dead.id, dead.why);
        }
        let total: u64 = backends
            .iter()
            .map(|b| b.messages.load(Ordering::Relaxed))
            .sum();
        let per_backend: Vec<String> = upstream
            .backends
            .iter()
            .map(|b| {
                let name = backends
                    .iter()
                    .find(|e| e.addr == b.addr)
                    .map_or("?", |e| e.name.as_str());
                format!("{name}={}", b.active())
            })
            .collect();
        println!(
            "connections: {} | per backend: {} | messages relayed: {} (+{}/s)",
            server.active_connections(),
            per_backend.join(" "),
            total,
            total - last
        );
        let _ = std::io::stdout().flush();
        last = total;
    }
    server.stop();
    drop(page);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pages_fetch_nothing_from_the_network() {
        for (name, page) in [("demo", PAGE), ("dashboard", crate::admin::DASHBOARD)] {
            for bad in ["http://", "https://", "@import", "<link rel=\"stylesheet"] {
                assert!(!page.contains(bad), "{name} page contains {bad:?}");
            }
            assert!(
                page.contains("<script>") && !page.contains("<script src"),
                "{name}"
            );
        }
    }

    #[test]
    fn the_subprotocol_is_found_in_a_list() {
        assert!(asks_for_demo(b"ringlb-demo"));
        assert!(asks_for_demo(b"chat, ringlb-demo"));
        assert!(!asks_for_demo(b"ringlb-demo2"));
        assert!(!asks_for_demo(b""));
    }
}
