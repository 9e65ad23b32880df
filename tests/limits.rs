//! Resource exhaustion: at the open-file limit ringlb backs off instead of
//! spinning, keeps its live sessions, and recovers when descriptors free up.
//! The limit is lowered on the running ringlb with prlimit(1).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// This process's hard open-file limit (the tests raise soft limits up to it).
fn hard_limit() -> usize {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    line.split_whitespace().nth(4).unwrap().parse().unwrap()
}

fn set_nofile(pid: u32, n: usize) {
    let ok = Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            &format!("--nofile={n}:{}", hard_limit()),
        ])
        .status()
        .expect("prlimit (util-linux) is needed")
        .success();
    assert!(ok, "prlimit failed");
}

fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<&str> = s.rsplit_once(") ").unwrap().1.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_fd_limit_ringlb_backs_off_and_recovers() {
    let b = Backend::start().await;
    let toml = config(&[b.addr], "shards = 1", "").replace("shards = 2\n", "");
    // io_uring reads the fd limit when an accept is armed, so the limit must
    // already be low when ringlb starts: learn which descriptor numbers it
    // uses at rest (inherited ones leave holes), then start it again with a
    // limit that leaves exactly three numbers free.
    let used: Vec<usize> = {
        let p = Proxy::start(&toml);
        std::fs::read_dir(format!("/proc/{}/fd", p.pid()))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().parse().unwrap())
            .collect()
    };
    let max = (0..).filter(|n| !used.contains(n)).nth(3).unwrap();
    // Soft limit only: raising it back later needs no privilege.
    let limit = format!("--nofile={max}:{}", hard_limit());
    let proxy = Proxy::start_under(&toml, &["prlimit", &limit, "--"]);
    let pid = proxy.pid();
    let fds = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };

    // One session takes two descriptors: one is left.
    let (mut live, _) = match tokio_tungstenite::connect_async(proxy.url("/")).await {
        Ok(ok) => ok,
        Err(e) => {
            let now: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            panic!(
                "first session failed: {e}; limit {max}; at rest {used:?}; now {now:?}; log {:?}",
                proxy.log.lock().unwrap()
            );
        }
    };
    live.send(Message::Text("before".into())).await.unwrap();
    assert!(live.next().await.unwrap().unwrap().is_text());
    let with_live = fds();

    // Room for the accepted socket but not its backend leg: 503, and the
    // backend is not blamed for ringlb's own limit.
    let t = Instant::now();
    let r = raw_exchange(proxy.addr(), upgrade_request("/", "").as_bytes()).await;
    assert_eq!(status_of(&r), 503, "{}", String::from_utf8_lossy(&r));
    let deadline = Instant::now() + Duration::from_secs(10);
    while fds() != with_live {
        assert!(
            Instant::now() < deadline,
            "the 503 connection's socket was never closed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // A client that sends nothing takes the last descriptor; now accept
    // itself fails and these clients wait in the kernel's queue.
    let holder = TcpStream::connect(proxy.addr()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while fds() != with_live + 1 {
        assert!(Instant::now() < deadline, "the holder was never accepted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut waiting = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        s.write_all(upgrade_request("/", "").as_bytes())
            .await
            .unwrap();
        waiting.push(s);
    }
    proxy.wait_log("accept failed", Duration::from_secs(5));
    let before = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let spent = cpu_ticks(pid) - before;
    assert!(
        spent < 20,
        "ringlb used {spent} ticks in 1 s at EMFILE: it spins"
    );
    let logged = proxy
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("accept failed"))
        .count();
    assert_eq!(logged, 1, "accept errors must be rate-limited");

    // The live session is unharmed.
    live.send(Message::Text("during".into())).await.unwrap();
    assert_eq!(
        live.next().await.unwrap().unwrap(),
        Message::Text("during".into())
    );

    // Descriptors come back: the queued clients are served.
    set_nofile(pid, hard_limit());
    drop(holder);
    for mut s in waiting {
        let head = read_head(&mut s).await;
        assert_eq!(status_of(&head), 101, "{}", String::from_utf8_lossy(&head));
    }
    let (mut fresh, _) = tokio_tungstenite::connect_async(proxy.url("/"))
        .await
        .unwrap();
    fresh.send(Message::Text("after".into())).await.unwrap();
    assert_eq!(
        fresh.next().await.unwrap().unwrap(),
        Message::Text("after".into())
    );
    // And the backend was never blamed for ringlb's own limit.
    assert!(proxy
        .log
        .lock()
        .unwrap()
        .iter()
        .all(|l| !l.contains("marked down")));
    assert!(t.elapsed() < Duration::from_secs(30));
}
