//! Packaging: the Docker seccomp profile, the Dockerfile (and that CI runs
//! its build command), packaging/container-check.sh's claim to build the
//! Dockerfile's runtime stage, the SPA example's app image, the systemd
//! unit. Only packaging/container-check.sh (podman, in CI) runs the image;
//! these static checks are fast and need no container engine (the unit is
//! verified with systemd-analyze where it is installed).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

// ---- config/docker-seccomp.json ----

/// Syscalls an `SCMP_ACT_ALLOW` entry allows whatever the arguments,
/// architecture or capabilities (no `args`, `includes` or `excludes`).
fn unconditionally_allowed(profile: &serde_json::Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for e in profile["syscalls"].as_array().expect("syscalls is a list") {
        let empty = |k: &str| match &e[k] {
            serde_json::Value::Null => true,
            serde_json::Value::Array(a) => a.is_empty(),
            serde_json::Value::Object(o) => o.values().all(|v| v.is_null()),
            _ => false,
        };
        if e["action"] == "SCMP_ACT_ALLOW"
            && empty("args")
            && empty("includes")
            && empty("excludes")
        {
            for n in e["names"].as_array().expect("names is a list") {
                out.insert(n.as_str().unwrap().to_string());
            }
        }
    }
    out
}

#[test]
fn seccomp_profile_allows_io_uring_and_denies_by_default() {
    let text = read("config/docker-seccomp.json");
    let profile: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    assert_eq!(profile["defaultAction"], "SCMP_ACT_ERRNO");
    let allowed = unconditionally_allowed(&profile);
    for s in [
        "io_uring_setup",
        "io_uring_enter",
        "io_uring_register",
        "read",
        "write",
        "openat",
        "epoll_wait",
        "accept4",
        "mmap",
        "munmap",
        "eventfd2",
        "setsockopt",
        "futex",
    ] {
        assert!(allowed.contains(s), "{s} is not allowed unconditionally");
    }
    let arches: Vec<&str> = profile["archMap"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["architecture"].as_str().unwrap())
        .collect();
    assert!(arches.contains(&"SCMP_ARCH_X86_64") && arches.contains(&"SCMP_ARCH_AARCH64"));
}

/// The start-up error for a refused io_uring_setup names this file.
#[test]
fn seccomp_profile_is_where_the_error_message_says() {
    let probe = read("src/ring/probe.rs");
    assert!(probe.contains("--security-opt seccomp=config/docker-seccomp.json"));
    assert!(repo().join("config/docker-seccomp.json").is_file());
    assert!(read("README.md").contains("--security-opt seccomp=config/docker-seccomp.json"));
}

// ---- Dockerfile ----

/// Dockerfile instructions with continuation lines joined and comments
/// dropped: (INSTRUCTION, arguments).
fn dockerfile() -> Vec<(String, String)> {
    instructions("Dockerfile")
}

fn instructions(rel: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in read(rel).lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
            continue;
        }
        if let Some(head) = t.strip_suffix('\\') {
            cur.push_str(head);
            cur.push(' ');
            continue;
        }
        cur.push_str(t);
        let (ins, args) = cur.split_once(char::is_whitespace).unwrap_or((&cur, ""));
        out.push((ins.to_ascii_uppercase(), args.trim().to_string()));
        cur.clear();
    }
    out
}

/// The Dockerfile builds with the command CI runs: one `RUN cargo build`,
/// and `.ci/run` has the same command on a line of its own.
#[test]
fn dockerfile_build_command_is_the_one_ci_runs() {
    let builds: Vec<String> = dockerfile()
        .into_iter()
        .filter(|(i, a)| i == "RUN" && a.starts_with("cargo build"))
        .map(|(_, a)| a)
        .collect();
    assert_eq!(builds.len(), 1, "one RUN cargo build: {builds:?}");
    let cmd = &builds[0];
    assert!(
        cmd.contains("--release") && cmd.contains("--locked") && cmd.contains("-p ringlb"),
        "{cmd}"
    );
    let ci = read(".ci/run");
    let found = ci
        .lines()
        .map(|l| l.split(" #").next().unwrap().trim())
        .any(|l| l == cmd);
    assert!(found, ".ci/run does not run the Dockerfile's {cmd:?}");
}

/// What the Dockerfile copies exists and is not excluded by .dockerignore;
/// the runtime is not root; the health check asks the admin listener the
/// image's configuration sets; the static root it configures is where the
/// files are copied.
#[test]
fn dockerfile_is_consistent_with_its_inputs() {
    let ins = dockerfile();
    let ignore: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_end_matches('/').to_string())
        .collect();
    let mut copies = Vec::new();
    for (i, a) in &ins {
        if i != "COPY" || a.starts_with("--from") {
            continue;
        }
        let parts: Vec<&str> = a.split_whitespace().collect();
        let (dest, srcs) = parts.split_last().unwrap();
        for src in srcs {
            let src = src.trim_end_matches('/');
            assert!(repo().join(src).exists(), "COPY {src}: missing");
            let top = src.split('/').next().unwrap();
            for pat in &ignore {
                assert!(
                    pat != src && pat != top,
                    "COPY {src} but .dockerignore has {pat}"
                );
            }
            copies.push((src.to_string(), dest.trim_end_matches('/').to_string()));
        }
    }
    for big in ["target-*", "fuzz", ".git"] {
        assert!(ignore.iter().any(|p| p == big), ".dockerignore lacks {big}");
    }
    assert!(ignore.iter().any(|p| p == "target" || p == "**/target"));

    let config_src = copies
        .iter()
        .find(|(_, d)| d == "/etc/ringlb/ringlb.toml")
        .map(|(s, _)| s.clone())
        .expect("a COPY to /etc/ringlb/ringlb.toml");
    let config = read(&config_src);
    let cfg: toml::Value = toml::from_str(&config).unwrap();
    let admin = cfg["admin"]["listen"]
        .as_str()
        .expect("an [admin] listener");
    let (host, port) = admin.rsplit_once(':').unwrap();
    assert_eq!(host, "127.0.0.1", "admin stays inside the container");

    let health = ins
        .iter()
        .find(|(i, _)| i == "HEALTHCHECK")
        .map(|(_, a)| a.clone())
        .expect("a HEALTHCHECK");
    assert!(
        health.contains(&format!("/dev/tcp/127.0.0.1/{port}"))
            && health.contains("/status")
            && health.contains(&format!("Host: 127.0.0.1:{port}")),
        "{health}"
    );

    let static_roots: BTreeSet<&str> = cfg["route"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r.get("static").and_then(|s| s["root"].as_str()))
        .collect();
    assert!(!static_roots.is_empty());
    for root in static_roots {
        assert!(
            copies.iter().any(|(_, d)| d == root),
            "static root {root} is not a COPY destination"
        );
    }

    let user = ins
        .iter()
        .rev()
        .find(|(i, _)| i == "USER")
        .map(|(_, a)| a.as_str());
    assert!(
        matches!(user, Some(u) if u != "root" && u != "0"),
        "runs as {user:?}"
    );
    let listen = cfg["server"]["listen"][0].as_str().unwrap();
    let port = listen.rsplit_once(':').unwrap().1;
    assert!(
        ins.iter()
            .any(|(i, a)| i == "EXPOSE" && a.split_whitespace().any(|p| p == port)),
        "EXPOSE {port}"
    );
}

// ---- packaging/container-check.sh and the SPA example's app image ----

/// The stages of a Dockerfile: (FROM arguments, its instructions).
fn stages(ins: &[(String, String)]) -> Vec<(String, Vec<(String, String)>)> {
    let mut out: Vec<(String, Vec<(String, String)>)> = Vec::new();
    for (i, a) in ins {
        if i == "FROM" {
            out.push((a.clone(), Vec::new()));
        } else if let Some(last) = out.last_mut() {
            last.1.push((i.clone(), a.clone()));
        }
    }
    out
}

/// container-check.sh builds the Dockerfile's runtime stage, not a copy of
/// it: `--target runtime` of the repository's Dockerfile, its base given as
/// the RUNTIME_BASE argument, and the host's binary as the build context
/// named after the build stage, at the path that stage leaves it.
#[test]
fn container_check_builds_the_dockerfiles_runtime_stage() {
    let ins = dockerfile();
    let global_args: Vec<&str> = ins
        .iter()
        .take_while(|(i, _)| i != "FROM")
        .filter(|(i, _)| i == "ARG")
        .map(|(_, a)| a.as_str())
        .collect();
    assert!(
        global_args.contains(&"RUNTIME_BASE=debian:bookworm-slim"),
        "ARG RUNTIME_BASE=debian:bookworm-slim before the first FROM: {global_args:?}"
    );
    let st = stages(&ins);
    assert_eq!(st.len(), 2, "a build and a runtime stage");
    let (build_from, build) = &st[0];
    assert!(build_from.ends_with(" AS build"), "{build_from}");
    // `docker build .` without --target builds the last stage.
    let (runtime_from, runtime) = &st[1];
    assert_eq!(runtime_from, "${RUNTIME_BASE} AS runtime");
    let workdir = build
        .iter()
        .rev()
        .find(|(i, _)| i == "WORKDIR")
        .map(|(_, a)| a.trim_end_matches('/').to_string())
        .expect("a WORKDIR in the build stage");
    let bin = format!("{workdir}/target/release/ringlb");
    let copy = runtime
        .iter()
        .find(|(i, a)| i == "COPY" && a.starts_with("--from="))
        .map(|(_, a)| a.as_str())
        .expect("the runtime stage copies the binary from the build stage");
    assert_eq!(copy, format!("--from=build {bin} /usr/local/bin/ringlb"));

    let script = read("packaging/container-check.sh");
    for needle in [
        "-f Dockerfile --target runtime",
        "--build-arg \"RUNTIME_BASE=$ROOT_IMAGE\"",
        "--build-context \"build=$WORK/build-stage\"",
        "--isolation=chroot",
        "mmdebstrap --variant=minbase",
        "--security-opt seccomp=config/docker-seccomp.json",
    ] {
        assert!(
            script.contains(needle),
            "container-check.sh lacks {needle:?}"
        );
    }
    assert!(
        script.contains(&format!("\"$WORK/build-stage{bin}\"")),
        "container-check.sh does not put the binary at the build stage's {bin}"
    );
    // The binary in the image is the one the Dockerfile's command builds.
    let cmd = build
        .iter()
        .find(|(i, a)| i == "RUN" && a.starts_with("cargo build"))
        .map(|(_, a)| a.as_str())
        .unwrap();
    assert!(
        script.lines().any(|l| l.trim() == cmd),
        "container-check.sh does not run {cmd:?}"
    );
}

/// What container-check.sh looks for in ringlb's output is what ringlb
/// says, so a reworded message fails here rather than late in CI.
#[test]
fn container_check_expects_what_ringlb_logs() {
    let script = read("packaging/container-check.sh");
    let probe = read("src/ring/probe.rs");
    let main = read("src/main.rs");
    for (text, src, file) in [
        ("blocked by a seccomp filter", &probe, "src/ring/probe.rs"),
        (
            "--security-opt seccomp=config/docker-seccomp.json",
            &probe,
            "src/ring/probe.rs",
        ),
        ("draining: listeners closed", &main, "src/main.rs"),
        ("drained; exiting", &main, "src/main.rs"),
    ] {
        assert!(
            script.contains(text),
            "container-check.sh no longer checks {text:?}"
        );
        assert!(src.contains(text), "{file} no longer says {text:?}");
    }
}

/// CI runs the container check, after the tests.
#[test]
fn ci_runs_the_container_check() {
    let ci = read(".ci/run");
    let line = |needle: &str| {
        ci.lines()
            .position(|l| l.trim() == needle)
            .unwrap_or_else(|| panic!(".ci/run has no line {needle:?}"))
    };
    assert!(
        line("bash packaging/container-check.sh")
            > line("cargo test --workspace 2>&1 | tee \"$TEST_LOG\"")
    );
}

/// The SPA example's app image is built FROM the ringlb image, as the
/// seed's was FROM its nginx base; both build scripts agree on the names.
#[test]
fn spa_app_image_builds_from_the_ringlb_image() {
    let ins = instructions("examples/spa/Dockerfile");
    assert!(ins.contains(&("ARG".into(), "RINGLB_IMAGE=ringlb:latest".into())));
    let froms: Vec<&str> = ins
        .iter()
        .filter(|(i, _)| i == "FROM")
        .map(|(_, a)| a.as_str())
        .collect();
    assert_eq!(froms.last(), Some(&"${RINGLB_IMAGE}"));
    for (i, a) in &ins {
        if i == "COPY" && !a.starts_with("--from") {
            let src = a.split_whitespace().next().unwrap();
            assert!(
                repo().join("examples/spa").join(src).exists(),
                "COPY {src}: missing"
            );
        }
    }
    let user = ins
        .iter()
        .rev()
        .find(|(i, _)| i == "USER")
        .map(|(_, a)| a.as_str());
    assert_eq!(user, Some("ringlb"), "the app image runs as ringlb");
    let sh = read("examples/spa/image_build.sh");
    let ps1 = read("examples/spa/image_build.ps1");
    for needle in [
        "ringlb:latest",
        "app-front:latest",
        "RINGLB_IMAGE=",
        "--format",
    ] {
        assert!(sh.contains(needle), "image_build.sh lacks {needle:?}");
        assert!(ps1.contains(needle), "image_build.ps1 lacks {needle:?}");
    }
}

// ---- packaging/ringlb.service ----

fn unit_settings() -> Vec<(String, String)> {
    read("packaging/ringlb.service")
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn systemd_unit_has_the_required_settings() {
    let s = unit_settings();
    let has = |k: &str, v: &str| s.iter().any(|(a, b)| a == k && b == v);
    let get = |k: &str| {
        s.iter()
            .find(|(a, _)| a == k)
            .map(|(_, b)| b.as_str())
            .unwrap_or_else(|| panic!("no {k}="))
    };
    assert!(get("ExecStart").ends_with("ringlb run --config /etc/ringlb/ringlb.toml"));
    assert!(has("ExecReload", "/bin/kill -HUP $MAINPID"));
    assert!(has("KillSignal", "SIGTERM"));
    // A binary upgrade hands the unit to the new process by sd_notify.
    assert!(has("Type", "notify"));
    assert!(has("NotifyAccess", "all"));
    let nofile: u64 = get("LimitNOFILE").parse().unwrap();
    assert!(
        nofile >= 2 * 100_000,
        "LimitNOFILE below 2 x default max_connections"
    );
    assert!(has("LimitMEMLOCK", "infinity"));
    assert!(has("AmbientCapabilities", "CAP_NET_BIND_SERVICE"));
    assert!(has("CapabilityBoundingSet", "CAP_NET_BIND_SERVICE"));
    assert!(has("DynamicUser", "yes"));
    assert!(has("NoNewPrivileges", "yes"));
    assert!(has("LogsDirectory", "ringlb"));
    // A syscall filter must keep io_uring: systemd puts it in @aio, which
    // @system-service includes.
    if let Some((_, f)) = s.iter().find(|(k, _)| k == "SystemCallFilter") {
        assert_eq!(f, "@system-service");
    }
}

/// `systemd-analyze verify` on the unit, with the test's ringlb binary
/// standing in for /usr/local/bin/ringlb. Skipped (with a note) where
/// systemd-analyze is not installed.
#[test]
fn systemd_unit_verifies() {
    let Ok(found) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
    else {
        // .ci/run installs systemd, so CI never takes this branch.
        assert!(
            std::env::var_os("CI").is_none(),
            "systemd-analyze missing in CI"
        );
        eprintln!("systemd-analyze not installed: unit not verified");
        return;
    };
    assert!(found.status.success());
    let dir = tempfile::tempdir().unwrap();
    let unit: PathBuf = dir.path().join("ringlb.service");
    let text = read("packaging/ringlb.service")
        .replace("/usr/local/bin/ringlb", env!("CARGO_BIN_EXE_ringlb"));
    std::fs::write(&unit, text).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.trim().is_empty(), "{err}");
}

// ---- deploy/kubernetes ----
// deploy/kubernetes/validate.sh (in CI) checks the manifests against the
// Kubernetes schemas and runs `ringlb check`; these are the cross-file
// claims no schema can see.

/// The lines under `key:` (the first line that reads `key:` once trimmed),
/// as long as they are indented deeper than it.
fn yaml_block(text: &str, key: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.trim() == format!("{key}:"))
        .unwrap_or_else(|| panic!("no {key}:"));
    let indent = |l: &str| l.len() - l.trim_start().len();
    let base = indent(lines[start]);
    lines[start + 1..]
        .iter()
        .take_while(|l| l.trim().is_empty() || indent(l) > base)
        .map(|l| format!("{}\n", l.trim()))
        .collect()
}

/// The value of the first `key: value` line.
fn yaml_value(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{key}: ")))
        .unwrap_or_else(|| panic!("no {key}: value"))
        .trim()
        .to_string()
}

/// deploy/kubernetes/ringlb.toml, loaded as the pod loads it (admin.token
/// from the Secret next to it); configmap.yaml must embed it verbatim.
fn kubernetes_config() -> ringlb::config::Config {
    let toml = read("deploy/kubernetes/ringlb.toml");
    let cm = read("deploy/kubernetes/configmap.yaml");
    let (_, body) = cm
        .split_once("  ringlb.toml: |\n")
        .expect("configmap.yaml has data.ringlb.toml as a block");
    let embedded: String = body
        .lines()
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect();
    assert_eq!(
        embedded, toml,
        "configmap.yaml's ringlb.toml differs from deploy/kubernetes/ringlb.toml \
         (bash deploy/kubernetes/validate.sh --write-configmap)"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ringlb.toml"), &toml).unwrap();
    std::fs::write(dir.path().join("admin.token"), "t\n").unwrap();
    ringlb::config::Config::load(&dir.path().join("ringlb.toml")).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn kubernetes_pods_probe_readyz_and_healthz_run_confined_and_outlast_the_drain() {
    let config = kubernetes_config();
    let admin = config
        .admin
        .as_ref()
        .expect("an admin listener for the probes")
        .listen;
    // The kubelet probes the pod IP with Host POD_IP:port; ringlb answers
    // that only on an unspecified bind.
    assert!(admin.ip().is_unspecified(), "admin.listen {admin}");
    let drain = config
        .server
        .drain_timeout
        .expect("a drain_timeout, or the grace period cannot cover it");
    let linger = config.server.linger_timeout;
    let readme = read("deploy/kubernetes/README.md");
    for file in [
        "deploy/kubernetes/deployment.yaml",
        "deploy/kubernetes/daemonset.yaml",
    ] {
        let m = read(file);
        // Seccomp: the Localhost profile the README installs, made from
        // config/docker-seccomp.json.
        let sc = yaml_block(&m, "seccompProfile");
        assert!(sc.contains("type: Localhost\n"), "{file}: {sc}");
        let profile = yaml_value(&sc, "localhostProfile");
        assert!(
            readme.contains(&profile),
            "README.md does not say how to install {profile}"
        );
        assert!(readme.contains("config/docker-seccomp.json"));
        assert_eq!(yaml_value(&m, "runAsNonRoot"), "true", "{file}");
        assert_ne!(yaml_value(&m, "runAsUser"), "0", "{file}");
        // Probes on the admin port: readiness GET /readyz (fails while
        // draining), liveness GET /healthz.
        assert!(
            m.contains(&format!("containerPort: {}\n", admin.port())),
            "{file}"
        );
        let port_name = yaml_block(&m, "ports")
            .lines()
            .collect::<Vec<_>>()
            .windows(2)
            .find(|w| w[1] == format!("containerPort: {}", admin.port()))
            .map(|w| w[0].trim_start_matches("- name: ").to_string())
            .unwrap_or_else(|| panic!("{file}: no named admin port"));
        for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
            let p = yaml_block(&m, probe);
            assert!(
                p.contains(&format!("httpGet:\npath: {path}\n")),
                "{file} {probe}: {p}"
            );
            assert_eq!(yaml_value(&p, "port"), port_name, "{file} {probe}");
        }
        // SIGTERM comes after preStop; the grace period covers both, then
        // the drain and, at its deadline, the clean close: up to one
        // linger_timeout for a frame boundary and one for the peers.
        let pre_stop = yaml_block(&m, "preStop");
        let sleep: u64 = pre_stop
            .split("[\"sleep\", \"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{file}: preStop is not [\"sleep\", \"N\"]: {pre_stop}"));
        let grace: u64 = yaml_value(&m, "terminationGracePeriodSeconds")
            .parse()
            .unwrap();
        let needed = std::time::Duration::from_secs(sleep) + drain + 2 * linger;
        assert!(
            std::time::Duration::from_secs(grace) > needed,
            "{file}: terminationGracePeriodSeconds {grace} <= preStop {sleep}s + drain_timeout {drain:?} + 2 x linger_timeout {linger:?}"
        );
    }
    let svc = read("deploy/kubernetes/service.yaml");
    assert_eq!(yaml_value(&svc, "type"), "LoadBalancer");
    assert_eq!(yaml_value(&svc, "externalTrafficPolicy"), "Local");
    assert_eq!(
        yaml_value(&read("deploy/kubernetes/pdb.yaml"), "kind"),
        "PodDisruptionBudget"
    );
}

/// CI validates the manifests, after the container check.
#[test]
fn ci_validates_the_kubernetes_manifests() {
    let ci = read(".ci/run");
    let line = |needle: &str| {
        ci.lines()
            .position(|l| l.trim() == needle)
            .unwrap_or_else(|| panic!(".ci/run has no line {needle:?}"))
    };
    assert!(line("bash deploy/kubernetes/validate.sh") > line("bash packaging/container-check.sh"));
}
