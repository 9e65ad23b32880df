//! `ringlb demo`: two WebSocket echo backends on loopback and ringlb in
//! front of them, with a status line per second. The backends count the
//! messages they echo, which is how the demo knows what was relayed.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::config::Config;
use crate::server::Server;

/// A minimal threaded echo server; fine for a demo's handful of clients.
pub struct EchoBackend {
    pub addr: SocketAddr,
    pub messages: Arc<AtomicU64>,
}

impl EchoBackend {
    pub fn start() -> std::io::Result<EchoBackend> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let messages = Arc::new(AtomicU64::new(0));
        let count = messages.clone();
        std::thread::Builder::new()
            .name(format!("demo-echo-{}", addr.port()))
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    let count = count.clone();
                    let _ = std::thread::Builder::new().spawn(move || echo(stream, &count));
                }
            })?;
        Ok(EchoBackend { addr, messages })
    }
}

fn echo(stream: TcpStream, count: &AtomicU64) {
    let Ok(mut ws) = tungstenite::accept(stream) else {
        return;
    };
    while let Ok(msg) = ws.read() {
        if msg.is_text() || msg.is_binary() {
            count.fetch_add(1, Ordering::Relaxed);
            if ws.send(msg).is_err() {
                return;
            }
        }
    }
}

pub fn run(listen: SocketAddr) -> anyhow::Result<()> {
    let backends = [EchoBackend::start()?, EchoBackend::start()?];
    let cfg = Config::quick(
        vec![listen],
        backends.iter().map(|b| b.addr).collect(),
        None,
    );
    let mut server = Server::start(cfg).with_context(|| {
        format!(
            "the demo cannot start on {listen}; `ringlb demo --listen 127.0.0.1:0` picks a free \
             port"
        )
    })?;
    let url = format!("ws://{}/", server.local_addrs[0]);
    println!(
        "ringlb demo: proxying {url} to echo backends {} and {}",
        backends[0].addr, backends[1].addr
    );
    println!("try it:  python3 -m websockets {url}   (or any WebSocket client); Ctrl-C to stop");
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
            .map(|b| format!("{}={}", b.addr, b.active()))
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
    Ok(())
}
