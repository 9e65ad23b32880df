//! The demo page and the admin dashboard in a real browser: headless
//! Chromium (Debian's `chromium` package; `.ci/run` installs it), driven
//! over the DevTools protocol so the tests can click the pages' buttons.
//! Every check reads what the pages' JavaScript put in the DOM and compares
//! it with the admin API at that moment.
//!
//! Screenshots go to `$RINGLB_SCREENSHOTS` if set (`docs/img` to refresh
//! the ones in the docs), else to a scratch directory under `target/`.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// One browser at a time: the machine is small and each test starts its own.
static BROWSER: Mutex<()> = Mutex::new(());

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Headless Chromium with one page, driven over the DevTools protocol on a
/// loopback port the browser picks itself. Killed by PID on drop.
struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    cdp: Ws,
    session: String,
    next_id: u64,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    async fn start() -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let bin = std::env::var("CHROMIUM").unwrap_or_else(|_| "chromium".into());
        let mut child = Command::new(&bin)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--remote-debugging-port=0",
                "--window-size=1200,800",
                "--hide-scrollbars",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {bin:?} ({e}): the browser tests need headless Chromium; \
                     install it with `apt-get install -y chromium` (.ci/run does), or point \
                     CHROMIUM at the binary"
                )
            });
        // Chromium announces its DevTools endpoint on stderr; the rest of
        // its stderr is drained so it can never block on a full pipe.
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(url.trim().to_string());
                    }
                }
            }
        });
        let url = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("chromium did not print its DevTools address within 30 s");
        let (cdp, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        let mut b = Browser {
            child,
            _profile: profile,
            cdp,
            session: String::new(),
            next_id: 0,
        };
        let target = b
            .call("Target.createTarget", json!({ "url": "about:blank" }))
            .await;
        let attached = b
            .call(
                "Target.attachToTarget",
                json!({ "targetId": target["targetId"], "flatten": true }),
            )
            .await;
        b.session = attached["sessionId"].as_str().unwrap().to_string();
        b.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": 1200, "height": 800, "deviceScaleFactor": 1, "mobile": false }),
        )
        .await;
        b
    }

    /// One DevTools command (on the page's session once attached); its result.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if !self.session.is_empty() {
            msg["sessionId"] = json!(self.session);
        }
        self.cdp.send(Message::Text(msg.to_string())).await.unwrap();
        loop {
            let m = tokio::time::timeout(Duration::from_secs(30), self.cdp.next())
                .await
                .unwrap_or_else(|_| panic!("no answer to {method} within 30 s"))
                .expect("DevTools connection closed")
                .unwrap();
            let Message::Text(text) = m else { continue };
            let v: Value = serde_json::from_str(&text).unwrap();
            // Events carry no id; answers to this command carry ours.
            if v["id"].as_u64() == Some(id) {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    async fn goto(&mut self, url: &str) {
        self.call("Page.navigate", json!({ "url": url })).await;
        self.wait_for("the page loaded", "document.readyState === 'complete'")
            .await;
    }

    /// Evaluates a JavaScript expression in the page; its value as JSON.
    async fn eval(&mut self, expr: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expr, "returnByValue": true, "awaitPromise": true }),
            )
            .await;
        assert!(r.get("exceptionDetails").is_none(), "{expr}: {r}");
        r["result"]["value"].clone()
    }

    /// Re-evaluates `expr` until it is truthy (bounded: 30 s); its value.
    async fn wait_for(&mut self, what: &str, expr: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.eval(expr).await;
            let truthy = match &v {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return v;
            }
            assert!(Instant::now() < deadline, "not within 30 s: {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the dashboard has applied `n` more answers from /status.
    async fn polls_after(&mut self, n: u64) {
        let now = self.polls().await;
        self.wait_for(
            "the dashboard polled /status",
            &format!("Number(document.body.dataset.polls || 0) >= {}", now + n),
        )
        .await;
    }

    async fn polls(&mut self) -> u64 {
        self.eval("Number(document.body.dataset.polls || 0)")
            .await
            .as_u64()
            .unwrap()
    }

    async fn screenshot(&mut self, name: &str) {
        let r = self
            .call("Page.captureScreenshot", json!({ "format": "png" }))
            .await;
        use base64::Engine;
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap())
            .unwrap();
        let dir = std::env::var_os("RINGLB_SCREENSHOTS")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), png).unwrap();
    }
}

/// A GET to an admin listener, with the token if given; (status, body).
fn admin_get(admin: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(admin).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(s, "GET {path} HTTP/1.1\r\nHost: {admin}\r\n{auth}\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status_of(out.as_bytes()), body)
}

fn status_json(admin: SocketAddr, token: Option<&str>) -> Value {
    let (code, body) = admin_get(admin, "/status", token);
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// The backends of the first upstream in a /status answer, by address.
fn backends(st: &Value) -> Vec<(String, u64, String)> {
    st["upstreams"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["addr"].as_str().unwrap().to_string(),
                b["active"].as_u64().unwrap(),
                b["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// `ringlb demo` as a child process, killed by PID on drop.
struct Demo {
    child: Child,
    page: String,
    admin: SocketAddr,
    /// (name, address) of each echo backend, as the demo printed them.
    echoes: Vec<(String, String)>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Demo {
    fn start() -> Demo {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ringlb"))
            .args(["demo", "--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut lines = stdout.lines();
        let mut head = Vec::new();
        // The banner ends with the Ctrl-C line; the status lines follow.
        for line in lines.by_ref() {
            let line = line.unwrap();
            let done = line.contains("Ctrl-C");
            head.push(line);
            if done {
                break;
            }
        }
        // Keep reading the status lines so the demo never blocks on stdout.
        std::thread::spawn(move || for _ in lines {});
        let word_after = |marker: &str| {
            head.iter()
                .find_map(|l| l.split(marker).nth(1))
                .and_then(|rest| rest.split_whitespace().next())
                .unwrap_or_else(|| panic!("no {marker:?} in {head:?}"))
                .to_string()
        };
        let page = word_after("open ");
        let admin = word_after("dashboard: ")
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .unwrap();
        let banner = head.join("\n");
        let echoes = ["echo-1", "echo-2"]
            .iter()
            .map(|name| {
                let addr = banner
                    .split(&format!("{name} ("))
                    .nth(1)
                    .and_then(|r| r.split(')').next())
                    .unwrap_or_else(|| panic!("no address for {name} in {banner}"));
                (name.to_string(), addr.to_string())
            })
            .collect();
        Demo {
            child,
            page,
            admin,
            echoes,
        }
    }

    fn addr_of(&self, name: &str) -> &str {
        &self.echoes.iter().find(|(n, _)| n == name).unwrap().1
    }
}

/// The demo page in a browser: its session's echo names the backend that
/// answered (the one the admin API shows holding it), 50 more sessions
/// spread over both backends exactly as the admin API counts them, closing
/// them closes them in ringlb, and no plain GET ever reached a backend.
#[test]
fn demo_page_echoes_and_spreads_sessions() {
    let _one = BROWSER.lock().unwrap_or_else(|e| e.into_inner());
    let demo = Demo::start();
    runtime().block_on(async {
        let mut b = Browser::start().await;
        b.goto(&demo.page).await;
        let mine = b
            .wait_for("the tab's session greeted", "document.body.dataset.backend")
            .await;
        let mine = mine.as_str().unwrap().to_string();
        assert!(mine == "echo-1" || mine == "echo-2", "{mine}");

        // Type a message and press Send: the echo comes back, labelled.
        b.eval("document.getElementById('msg').value = 'hello through ringlb'; document.getElementById('send').click()").await;
        let echo = b
            .wait_for(
                "the echo",
                "(() => { const li = document.querySelector('#log li.echo'); \
                 return li && [li.dataset.backend, li.querySelector('.text').textContent]; })()",
            )
            .await;
        assert_eq!(echo, json!([mine, "hello through ringlb"]));
        let st = status_json(demo.admin, None);
        for (addr, active, state) in backends(&st) {
            let want = u64::from(addr == demo.addr_of(&mine));
            assert_eq!(active, want, "{addr} in {st}");
            assert_eq!(state, "up", "{st}");
        }

        // Open 50 sessions at once: each says hello and gets its echo.
        b.eval("document.getElementById('open-many').click()").await;
        b.wait_for(
            "50 extra sessions open and echoed",
            "document.body.dataset.manyOpen === '50' && \
             [...document.querySelectorAll('#counts td.echoes')].reduce((n, td) => n + Number(td.textContent), 0) === 51",
        )
        .await;
        let shown = b
            .eval(
                "Object.fromEntries([...document.querySelectorAll('#counts tbody tr')].map(tr => \
                 [tr.dataset.backend, [tr.children[1].textContent, Number(tr.querySelector('.sessions').textContent)]]))",
            )
            .await;
        let st = status_json(demo.admin, None);
        let mut total = 0;
        for (name, addr) in &demo.echoes {
            let (_, active, _) = backends(&st)
                .into_iter()
                .find(|(a, _, _)| a == addr)
                .unwrap();
            assert_eq!(shown[name], json!([addr, active]), "page {shown} vs {st}");
            // Least connections, counted across shards: 51 sessions split
            // nearly evenly, whatever races two shards' picks have.
            assert!(active >= 20, "{name} got {active} of 51: {st}");
            total += active;
        }
        assert_eq!(total, 51, "{st}");
        b.screenshot("demo.png").await;

        // Close them: ringlb sees them go, the tab's own session stays.
        b.eval("document.getElementById('close-many').click()").await;
        b.wait_for(
            "the extra sessions closed",
            "document.body.dataset.manyOpen === '0'",
        )
        .await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let st = status_json(demo.admin, None);
            let active: u64 = backends(&st).iter().map(|b| b.1).sum();
            if active == 1 {
                break;
            }
            assert!(Instant::now() < deadline, "sessions not closed: {st}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });

    // Plain GETs are answered by ringlb itself; none reached an echo
    // backend, and none marked one down.
    let ask = |req: &str| -> u16 {
        let mut s = std::net::TcpStream::connect(
            demo.page
                .trim_start_matches("http://")
                .trim_end_matches('/'),
        )
        .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).unwrap();
        status_of(&buf[..n])
    };
    let get =
        |path: &str| format!("GET {path} HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n");
    assert_eq!(ask(&get("/")), 200);
    assert_eq!(ask(&get("/favicon.ico")), 404);
    assert_eq!(ask(&get("/ws")), 426);
    let st = status_json(demo.admin, None);
    let totals: u64 = st["upstreams"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            assert_eq!(b["state"], "up", "{st}");
            assert_eq!(b["connect_failures"], 0, "{st}");
            b["connections_total"].as_u64().unwrap()
        })
        .sum();
    assert_eq!(
        totals, 51,
        "only the 51 WebSocket sessions reached a backend: {st}"
    );

    // SIGTERM ends the demo cleanly, and its page directory goes with it.
    let mut demo = demo;
    let page_dir = std::env::temp_dir().join(format!("ringlb-demo-{}", demo.child.id()));
    assert!(page_dir.join("index.html").exists(), "{page_dir:?}");
    let ok = Command::new("kill")
        .args(["-TERM", &demo.child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let deadline = Instant::now() + Duration::from_secs(10);
    while demo.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the demo ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!page_dir.exists(), "{page_dir:?} left behind");
}

/// Reads the dashboard's backend table: address -> (sessions, state, button).
async fn dashboard_rows(b: &mut Browser) -> Value {
    b.eval(
        "Object.fromEntries([...document.querySelectorAll('#backends tbody tr')].map(tr => \
         [tr.dataset.backend, [Number(tr.querySelector('.active').textContent), tr.dataset.state, \
          tr.querySelector('button').textContent]]))",
    )
    .await
}

/// The dashboard shows what /status says: 3 sessions held on the one
/// backend left undrained, the drained one marked, closes by reason,
/// sessions per shard, and charts with a legend. Traffic (new sessions
/// and messages) runs first so the charts have something to draw.
#[test]
fn dashboard_shows_what_the_admin_api_says() {
    let _one = BROWSER.lock().unwrap_or_else(|e| e.into_inner());
    runtime().block_on(async {
        let a = Backend::start().await;
        let c = Backend::start().await;
        let proxy = Proxy::start(&format!(
            "{}\n[admin]\nlisten = \"127.0.0.1:0\"\n",
            config(&[a.addr, c.addr], "", "")
        ));
        let admin = proxy.admin.unwrap();
        let mut b = Browser::start().await;
        b.goto(&format!("http://{admin}/")).await;
        b.polls_after(1).await;

        // A few seconds of traffic: short sessions and echoes.
        for round in 0..5 {
            let mut ws: Vec<Ws> = Vec::new();
            for _ in 0..4 + round {
                ws.push(connect(&proxy.url("/")).await);
            }
            for w in &mut ws {
                echo(w, &"x".repeat(2000 * (round + 1))).await;
            }
            drop(ws);
            b.polls_after(1).await;
        }

        // Then a fixed state: the second backend drained, 3 sessions held
        // on the first, one more opened and closed by its client.
        let (code, text) = proxy.admin("POST", &format!("/backends/u/{}/drain", c.addr));
        assert_eq!(code, 200, "{text}");
        let mut held = Vec::new();
        for _ in 0..3 {
            let mut w = connect(&proxy.url("/")).await;
            echo(&mut w, "held").await;
            held.push(w);
        }
        let mut gone = connect(&proxy.url("/")).await;
        gone.close(None).await.unwrap();
        while gone.next().await.is_some() {}
        drop(gone);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let st = status_json(admin, None);
            if st["connections"] == 3 && backends(&st).iter().map(|b| b.1).sum::<u64>() == 3 {
                break;
            }
            assert!(Instant::now() < deadline, "not 3 sessions: {st}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        wait_until("every earlier session counted as closed", || {
            let st = status_json(admin, None);
            let closed: u64 = st["sessions_closed"]
                .as_object()
                .unwrap()
                .values()
                .map(|v| v.as_u64().unwrap())
                .sum();
            closed == st["handshakes"]["101"].as_u64().unwrap() - 3
        })
        .await;
        b.polls_after(2).await;
        b.screenshot("dashboard.png").await;

        let st = status_json(admin, None);
        let rows = dashboard_rows(&mut b).await;
        assert_eq!(rows[a.addr.to_string()], json!([3, "up", "drain"]), "{rows}");
        assert_eq!(
            rows[c.addr.to_string()],
            json!([0, "draining", "undrain"]),
            "{rows}"
        );
        for (addr, active, state) in backends(&st) {
            assert_eq!(rows[&addr][0], active, "{rows} vs {st}");
            assert_eq!(rows[&addr][1], state.as_str(), "{rows} vs {st}");
        }
        let shards = b
            .eval("[...document.querySelectorAll('#shards tbody tr')].map(tr => Number(tr.querySelector('.active').textContent))")
            .await;
        let want: Vec<u64> = st["shards"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["active"].as_u64().unwrap())
            .collect();
        assert_eq!(shards, json!(want), "{st}");
        let closes = b
            .eval("Object.fromEntries([...document.querySelectorAll('#closes tbody tr')].map(tr => [tr.dataset.key, Number(tr.querySelector('.total').textContent)]))")
            .await;
        assert_eq!(closes, st["sessions_closed"], "{st}");
        assert!(st["sessions_closed"]["client"].as_u64().unwrap() >= 1, "{st}");
        let legend = b.eval("document.getElementById('legend-hs').textContent").await;
        assert!(
            legend.as_str().unwrap().contains("new sessions (101)"),
            "{legend}"
        );
        let painted = b
            .eval("(() => { const c = document.getElementById('chart-hs'); \
                   const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; \
                   let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n; })()")
            .await;
        assert!(painted.as_u64().unwrap() > 1000, "the chart is blank");
        let up = b.eval("document.getElementById('rate-up').textContent").await;
        assert!(up.as_str().unwrap().ends_with("/s"), "{up}");
        drop(held);
    });
}

/// With a token configured the page itself loads without it, asks for it,
/// keeps it in session storage only, and its drain/undrain buttons work
/// with it (the admin API refuses them without `X-Ringlb-Admin` and the
/// token, so a success proves the page sends both).
#[test]
fn dashboard_asks_for_the_token_and_its_buttons_drain() {
    let _one = BROWSER.lock().unwrap_or_else(|e| e.into_inner());
    runtime().block_on(async {
        let secrets = tempfile::tempdir().unwrap();
        let token_file = secrets.path().join("admin.token");
        std::fs::write(&token_file, "dash-Token_9\n").unwrap();
        let a = Backend::start().await;
        let c = Backend::start().await;
        let proxy = Proxy::start(&format!(
            "{}\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = {:?}\n",
            config(&[a.addr, c.addr], "", ""),
            token_file
        ));
        let admin = proxy.admin.unwrap();
        let token = Some("dash-Token_9");
        let (code, page) = admin_get(admin, "/", None);
        assert_eq!(code, 200);
        assert!(page.contains("ringlb dashboard"));
        assert_eq!(admin_get(admin, "/status", None).0, 401);

        let mut b = Browser::start().await;
        b.goto(&format!("http://{admin}/")).await;
        b.wait_for(
            "the token prompt",
            "!document.getElementById('auth').hidden && document.getElementById('poll-state').textContent === 'needs token'",
        )
        .await;
        b.eval("document.getElementById('token').value = 'wrong'; document.getElementById('token-use').click()").await;
        b.wait_for(
            "the refusal",
            "document.getElementById('auth-msg').textContent.includes('refused')",
        )
        .await;
        b.eval("document.getElementById('token').value = 'dash-Token_9'; document.getElementById('token-use').click()").await;
        b.wait_for(
            "data with the token",
            "document.querySelectorAll('#backends tbody tr').length === 2",
        )
        .await;
        let stored = b
            .eval("[sessionStorage.getItem('ringlb-admin-token'), localStorage.length]")
            .await;
        assert_eq!(stored, json!(["dash-Token_9", 0]));

        // Click drain on one backend, then undrain.
        let click = |addr: SocketAddr| {
            format!("document.querySelector('#backends tr[data-backend=\"{addr}\"] button').click()")
        };
        b.eval(&click(c.addr)).await;
        wait_until("the click drained the backend", || {
            backends(&status_json(admin, token))
                .iter()
                .any(|(addr, _, state)| *addr == c.addr.to_string() && state == "draining")
        })
        .await;
        b.wait_for(
            "the row shows it",
            &format!("document.querySelector('#backends tr[data-backend=\"{}\"]').dataset.state === 'draining'", c.addr),
        )
        .await;
        let rows = dashboard_rows(&mut b).await;
        assert_eq!(rows[c.addr.to_string()], json!([0, "draining", "undrain"]));
        assert_eq!(rows[a.addr.to_string()], json!([0, "up", "drain"]));
        b.eval(&click(c.addr)).await;
        wait_until("the click undrained it", || {
            backends(&status_json(admin, token))
                .iter()
                .all(|(_, _, state)| state == "up")
        })
        .await;
    });
}

/// 200 backends: busiest first, the table scrolls inside its card instead
/// of stretching the page, and the filter finds one backend.
#[test]
fn dashboard_stays_usable_with_200_backends() {
    let _one = BROWSER.lock().unwrap_or_else(|e| e.into_inner());
    runtime().block_on(async {
        let mut all = Vec::new();
        for _ in 0..200 {
            all.push(Backend::start().await);
        }
        let addrs: Vec<SocketAddr> = all.iter().map(|b| b.addr).collect();
        let proxy = Proxy::start(&format!(
            "{}\n[admin]\nlisten = \"127.0.0.1:0\"\n",
            config(&addrs, "", "")
        ));
        let admin = proxy.admin.unwrap();
        let mut held = Vec::new();
        for _ in 0..5 {
            held.push(connect(&proxy.url("/")).await);
        }
        let busy: Vec<String> = backends(&status_json(admin, None))
            .into_iter()
            .filter(|b| b.1 > 0)
            .map(|b| b.0)
            .collect();
        assert_eq!(busy.len(), 5);

        let mut b = Browser::start().await;
        b.goto(&format!("http://{admin}/")).await;
        b.polls_after(2).await;
        let top = b
            .eval("[...document.querySelectorAll('#backends tbody tr')].slice(0, 5).map(tr => [tr.dataset.backend, tr.querySelector('.active').textContent])")
            .await;
        let mut top: Vec<(String, String)> = serde_json::from_value(top).unwrap();
        top.sort();
        let mut want: Vec<(String, String)> = busy.iter().map(|a| (a.clone(), "1".into())).collect();
        want.sort();
        assert_eq!(top, want);
        let layout = b
            .eval("(() => { const s = document.querySelector('#backends').parentElement; \
                   return [document.querySelectorAll('#backends tbody tr').length, s.clientHeight, s.scrollHeight, \
                   document.getElementById('backend-count').textContent]; })()")
            .await;
        assert_eq!(layout[0], 200, "{layout}");
        assert!(layout[1].as_u64().unwrap() <= 400, "{layout}");
        assert!(
            layout[2].as_u64().unwrap() > 4 * layout[1].as_u64().unwrap(),
            "{layout}"
        );
        assert_eq!(layout[3], "200 backends", "{layout}");
        b.screenshot("dashboard-200.png").await;

        let one = &busy[0];
        b.eval(&format!(
            "const f = document.getElementById('filter'); f.value = '{one}'; f.dispatchEvent(new Event('input'))"
        ))
        .await;
        let visible = b
            .eval("[...document.querySelectorAll('#backends tbody tr')].filter(tr => !tr.hidden).map(tr => tr.dataset.backend)")
            .await;
        // Only backends whose address contains it (another port may start
        // with the same digits), this one among them.
        let visible: Vec<String> = serde_json::from_value(visible).unwrap();
        assert!(visible.contains(one), "{visible:?}");
        assert!(visible.iter().all(|v| v.contains(one.as_str())), "{visible:?}");
        assert!(visible.len() < 5, "{visible:?}");
        drop(held);
    });
}
