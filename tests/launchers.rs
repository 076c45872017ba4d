//! The launchers under `deploy/` (DEPLOY.md): the Kubernetes manifests parse and say
//! what a node needs, the systemd unit drains and takes its key as a credential, and
//! the Slurm and ssh scripts start nodes with the right environment (through a fake
//! `srun` and a fake `ssh` on PATH) without the key on any command line.
//!
//! Needs no feature, no network and no Redis: the names the manifests must match (the
//! task stream, the consumer group) are checked against the source that defines them,
//! `src/pool/remote/frame.rs`, whose items are crate-private.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use yaml_rust2::{Yaml, YamlLoader};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The consumer group and the task stream's shape, as `frame.rs` defines them.
const GROUP: &str = "nodes";

#[test]
fn the_names_the_manifests_use_are_the_codes() {
    let src = fs::read_to_string(repo().join("src/pool/remote/frame.rs"))
        .expect("read src/pool/remote/frame.rs");
    for needle in [
        "pub(crate) const GROUP: &str = \"nodes\";",
        "prefix: format!(\"{{pp:{namespace}}}\")",
        "format!(\"{}:b:{build}:tasks\", self.prefix)",
    ] {
        assert!(
            src.contains(needle),
            "src/pool/remote/frame.rs no longer has `{needle}`: update deploy/, DEPLOY.md \
             and this test to the new names"
        );
    }
}

// ---------------------------------------------------------------- Kubernetes

/// Every document of every manifest under deploy/kubernetes, by kind.
fn manifests() -> BTreeMap<String, Vec<(PathBuf, Yaml)>> {
    let dir = repo().join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .expect("list deploy/kubernetes")
        .map(|e| e.expect("read deploy/kubernetes").path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifest in {}", dir.display());
    let mut by_kind: BTreeMap<String, Vec<(PathBuf, Yaml)>> = BTreeMap::new();
    for file in files {
        let text = fs::read_to_string(&file).expect("read a manifest");
        let docs = YamlLoader::load_from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", file.display()));
        // A `---` separated file has one document per resource; none may be empty.
        let separators = text.lines().filter(|l| l.trim_end() == "---").count();
        assert_eq!(
            docs.len(),
            separators + 1,
            "{}: every document parses",
            file.display()
        );
        for doc in docs {
            let kind = doc["kind"]
                .as_str()
                .unwrap_or_else(|| panic!("{}: a document without kind", file.display()))
                .to_owned();
            assert!(
                doc["apiVersion"].as_str().is_some(),
                "{}: {kind} without apiVersion",
                file.display()
            );
            assert!(
                doc["metadata"]["name"].as_str().is_some(),
                "{}: {kind} without metadata.name",
                file.display()
            );
            by_kind.entry(kind).or_default().push((file.clone(), doc));
        }
    }
    by_kind
}

fn one<'a>(by_kind: &'a BTreeMap<String, Vec<(PathBuf, Yaml)>>, kind: &str) -> &'a Yaml {
    match by_kind.get(kind).map(Vec::as_slice) {
        Some([(_, doc)]) => doc,
        other => panic!(
            "expected exactly one {kind} under deploy/kubernetes, found {}",
            other.map_or(0, <[_]>::len)
        ),
    }
}

fn str_of<'a>(y: &'a Yaml, what: &str) -> &'a str {
    y.as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {y:?}"))
}

/// A container's env: name to the entry (value or valueFrom).
fn env_of(container: &Yaml) -> BTreeMap<String, Yaml> {
    container["env"]
        .as_vec()
        .expect("the node container has env")
        .iter()
        .map(|e| (str_of(&e["name"], "an env name").to_owned(), e.clone()))
        .collect()
}

#[test]
fn the_deployment_runs_nodes_with_their_env_and_the_key_from_a_secret() {
    let by_kind = manifests();
    let deploy = one(&by_kind, "Deployment");
    let pod = &deploy["spec"]["template"]["spec"];
    let containers = pod["containers"].as_vec().expect("containers");
    assert_eq!(containers.len(), 1, "one container: the node");
    let c = &containers[0];
    assert!(c["image"].as_str().is_some(), "the node has an image");
    let env = env_of(c);
    for name in [
        "PROCPOOL_NODE",
        "PROCPOOL_NAMESPACE",
        "PROCPOOL_NODE_PROCESSES",
        "PROCPOOL_NODE_GRACE",
        "PROCPOOL_KEY_FILE",
    ] {
        assert!(env.contains_key(name), "the node's env has {name}: {env:?}");
    }
    assert!(
        !env.contains_key("PROCPOOL_KEY"),
        "the key goes as a file, not as PROCPOOL_KEY"
    );
    let url = str_of(&env["PROCPOOL_NODE"]["value"], "PROCPOOL_NODE");
    assert!(
        url.starts_with("redis://") || url.starts_with("rediss://"),
        "{url}"
    );
    // Every $(VAR) in a value refers to a variable defined before it (Kubernetes only
    // expands those), and each such variable comes from a Secret.
    let names: Vec<&str> = c["env"]
        .as_vec()
        .expect("env")
        .iter()
        .map(|e| str_of(&e["name"], "an env name"))
        .collect();
    for (i, e) in c["env"].as_vec().expect("env").iter().enumerate() {
        let Some(v) = e["value"].as_str() else {
            continue;
        };
        for part in v.split("$(").skip(1) {
            let var = part.split(')').next().expect("a $(VAR) reference");
            assert!(
                names[..i].contains(&var),
                "{} uses $({var}) before it is defined",
                names[i]
            );
            assert!(
                env[var]["valueFrom"]["secretKeyRef"]["name"]
                    .as_str()
                    .is_some(),
                "{var} comes from a Secret"
            );
        }
    }
    let processes = str_of(&env["PROCPOOL_NODE_PROCESSES"]["value"], "processes");
    assert!(
        processes.parse::<usize>().is_ok_and(|n| n > 0),
        "{processes}"
    );
    let grace: i64 = str_of(&env["PROCPOOL_NODE_GRACE"]["value"], "grace")
        .parse()
        .expect("PROCPOOL_NODE_GRACE is a number of seconds");
    let termination = pod["terminationGracePeriodSeconds"]
        .as_i64()
        .expect("terminationGracePeriodSeconds is set");
    assert!(
        termination > grace,
        "terminationGracePeriodSeconds {termination} must exceed the drain grace {grace}"
    );

    // PROCPOOL_KEY_FILE lies in a read-only mount of a Secret volume.
    let key_file = str_of(&env["PROCPOOL_KEY_FILE"]["value"], "PROCPOOL_KEY_FILE");
    let mounts = c["volumeMounts"].as_vec().expect("volumeMounts");
    let mount = mounts
        .iter()
        .find(|m| {
            let at = str_of(&m["mountPath"], "mountPath");
            key_file.starts_with(&format!("{}/", at.trim_end_matches('/')))
        })
        .unwrap_or_else(|| panic!("no volume is mounted where {key_file} is"));
    assert_eq!(
        mount["readOnly"].as_bool(),
        Some(true),
        "the key's mount is read-only"
    );
    let volume_name = str_of(&mount["name"], "the mount's volume");
    let volume = pod["volumes"]
        .as_vec()
        .expect("volumes")
        .iter()
        .find(|v| v["name"].as_str() == Some(volume_name))
        .unwrap_or_else(|| panic!("no volume {volume_name}"));
    let secret = &volume["secret"];
    assert!(
        secret["secretName"].as_str().is_some(),
        "the key's volume is a Secret: {volume:?}"
    );
    let file_name = key_file.rsplit('/').next().expect("a file name");
    let items = secret["items"].as_vec().expect("the Secret's items");
    assert!(
        items.iter().any(|i| i["path"].as_str() == Some(file_name)),
        "the Secret volume has the file {file_name}"
    );
}

#[test]
fn the_scaled_object_watches_the_builds_task_stream_and_the_node_group() {
    let by_kind = manifests();
    let deploy = one(&by_kind, "Deployment");
    let scaled = one(&by_kind, "ScaledObject");
    assert_eq!(
        scaled["apiVersion"].as_str(),
        Some("keda.sh/v1alpha1"),
        "a KEDA ScaledObject"
    );
    assert_eq!(
        scaled["spec"]["scaleTargetRef"]["name"].as_str(),
        deploy["metadata"]["name"].as_str(),
        "it scales the node Deployment"
    );
    // From zero nodes nothing is ever queued (a parent fails NoCompatibleNodes first).
    assert!(
        scaled["spec"]["minReplicaCount"]
            .as_i64()
            .is_some_and(|n| n >= 1),
        "minReplicaCount is at least 1"
    );
    let triggers = scaled["spec"]["triggers"].as_vec().expect("triggers");
    assert_eq!(triggers.len(), 1);
    let t = &triggers[0];
    assert_eq!(t["type"].as_str(), Some("redis-streams"));
    let meta = &t["metadata"];
    assert_eq!(meta["consumerGroup"].as_str(), Some(GROUP));
    assert!(
        meta["pendingEntriesCount"]
            .as_str()
            .is_some_and(|n| n.parse::<u32>().is_ok()),
        "pendingEntriesCount is a number, as a string"
    );
    let env = env_of(&deploy["spec"]["template"]["spec"]["containers"][0]);
    let ns = str_of(&env["PROCPOOL_NAMESPACE"]["value"], "namespace");
    let stream = str_of(&meta["stream"], "stream");
    let build = stream
        .strip_prefix(&format!("{{pp:{ns}}}:b:"))
        .and_then(|s| s.strip_suffix(":tasks"))
        .unwrap_or_else(|| panic!("{stream} is not {{pp:{ns}}}:b:<fingerprint>:tasks"));
    let hex = build
        .strip_prefix("id-")
        .or_else(|| build.strip_prefix("sha-"))
        .unwrap_or_else(|| panic!("{build} is not id-<build-id> or sha-<sha256>"));
    assert!(
        !hex.is_empty()
            && hex
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
        "{build}: lowercase hex"
    );
    // Its credentials come from the TriggerAuthentication beside it.
    let auth = one(&by_kind, "TriggerAuthentication");
    assert_eq!(
        t["authenticationRef"]["name"].as_str(),
        auth["metadata"]["name"].as_str()
    );
    let refs = auth["spec"]["secretTargetRef"]
        .as_vec()
        .expect("secretTargetRef");
    assert!(
        refs.iter()
            .any(|r| r["parameter"].as_str() == Some("password")),
        "the Redis password comes from a Secret"
    );
}

// ---------------------------------------------------------------- systemd

#[test]
fn the_systemd_unit_drains_restarts_and_takes_the_key_as_a_credential() {
    let path = repo().join("deploy/systemd/procpool-node.service");
    let text = fs::read_to_string(&path).expect("read the unit");
    let mut section = String::new();
    let mut lines: Vec<(String, String, String)> = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("line {}: not key=value: {raw}", n + 1));
        assert!(!section.is_empty(), "line {}: outside a section", n + 1);
        lines.push((section.clone(), k.trim().to_owned(), v.trim().to_owned()));
    }
    let all = |key: &str| -> Vec<&str> {
        lines
            .iter()
            .filter(|(s, k, _)| s == "Service" && k == key)
            .map(|(_, _, v)| v.as_str())
            .collect()
    };
    let single = |key: &str| -> &str {
        match all(key).as_slice() {
            [v] => v,
            other => panic!("[Service] {key}= appears {} times", other.len()),
        }
    };
    assert_eq!(single("KillMode"), "mixed");
    assert_eq!(single("KillSignal"), "SIGTERM");
    assert_eq!(single("Restart"), "on-failure");
    assert!(
        single("ExecStart").starts_with('/'),
        "ExecStart runs the app by its absolute path"
    );
    let env: BTreeMap<&str, &str> = all("Environment")
        .into_iter()
        .map(|v| v.split_once('=').expect("Environment=NAME=value"))
        .collect();
    for name in [
        "PROCPOOL_NODE",
        "PROCPOOL_NAMESPACE",
        "PROCPOOL_NODE_PROCESSES",
        "PROCPOOL_NODE_GRACE",
        "PROCPOOL_KEY_FILE",
    ] {
        assert!(env.contains_key(name), "Environment={name}=... is set");
    }
    assert!(!env.contains_key("PROCPOOL_KEY"), "no key in the unit file");
    let (credential, source) = single("LoadCredential")
        .split_once(':')
        .expect("LoadCredential=NAME:PATH");
    assert!(source.starts_with('/'), "{source}");
    assert_eq!(
        env["PROCPOOL_KEY_FILE"],
        format!("%d/{credential}"),
        "the node reads the key from the credentials directory"
    );
    let grace: u64 = env["PROCPOOL_NODE_GRACE"].parse().expect("grace seconds");
    let stop: u64 = single("TimeoutStopSec")
        .trim_end_matches('s')
        .parse()
        .expect("TimeoutStopSec in seconds");
    assert!(
        stop > grace,
        "TimeoutStopSec {stop} must exceed the grace {grace}"
    );
    // It hides /proc/sys/kernel/hostname, which names the node.
    assert!(all("ProcSubset").is_empty(), "no ProcSubset=");
    assert_eq!(single("NoNewPrivileges"), "yes");
}

// ---------------------------------------------------------------- scripts

/// A scratch directory of its own for a test, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("procpool-launchers-{}-{name}", std::process::id()));
        if dir.exists() {
            fs::remove_dir_all(&dir).expect("clear an old scratch directory");
        }
        fs::create_dir_all(&dir).expect("make a scratch directory");
        Scratch(dir)
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }

    /// Writes an executable script at `rel`.
    fn script(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.path(rel);
        fs::create_dir_all(p.parent().expect("a parent")).expect("make the script's directory");
        fs::write(&p, text).expect("write a script");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).expect("chmod a script");
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        fs::remove_dir_all(&self.0).ok();
    }
}

/// `bash SCRIPT ARGS` with only the environment given (and PATH led by `bin`).
fn run_bash(script: &str, args: &[&str], bin: &Path, env: &[(&str, &str)]) -> Output {
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".to_owned())
    );
    Command::new("bash")
        .arg(repo().join(script))
        .args(args)
        .env_clear()
        .env("PATH", path)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run bash")
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

#[test]
fn the_scripts_parse_and_pass_shellcheck_where_it_is_installed() {
    for script in [
        "deploy/slurm/procpool-nodes.sbatch",
        "deploy/ssh/start-nodes.sh",
    ] {
        let out = Command::new("bash")
            .arg("-n")
            .arg(repo().join(script))
            .output()
            .expect("run bash -n");
        assert!(
            out.status.success(),
            "bash -n {script}: {}",
            text(&out.stderr)
        );
        match Command::new("shellcheck").arg(repo().join(script)).output() {
            Ok(out) => assert!(
                out.status.success(),
                "shellcheck {script}:\n{}",
                text(&out.stdout)
            ),
            Err(_) => eprintln!("shellcheck is not installed: {script} only checked by bash -n"),
        }
    }
}

const SECRET: &str = "s3cr3t-hmac-key-value";

/// A fake `srun` that records its argv and environment, and runs nothing.
const FAKE_SRUN: &str = r#"#!/bin/sh
printf '%s\n' "$@" > "$FAKE_OUT/argv"
env | sort > "$FAKE_OUT/env"
"#;

#[test]
fn the_sbatch_script_srun_s_one_node_per_task_with_its_env_and_no_key_value() {
    let s = Scratch::new("slurm");
    let bin = s.path("bin");
    s.script("bin/srun", FAKE_SRUN);
    let app = s.script("shared/myapp", "#!/bin/sh\nexit 0\n");
    fs::create_dir_all(s.path("out")).expect("mkdir out");
    fs::write(s.path("shared/procpool.key"), SECRET).expect("write the key");
    let out_dir = s.path("out");
    let app_s = app.to_str().expect("utf-8 path");
    let env = |key_file: &str| {
        vec![
            ("FAKE_OUT", out_dir.to_str().expect("utf-8").to_owned()),
            ("SLURM_NTASKS", "3".to_owned()),
            ("SLURM_CPUS_PER_TASK", "4".to_owned()),
            ("SLURM_JOB_ID", "4242".to_owned()),
            ("PROCPOOL_NODE", "redis://redis.example:6379".to_owned()),
            ("PROCPOOL_NAMESPACE", "thumbs".to_owned()),
            ("PROCPOOL_KEY_FILE", key_file.to_owned()),
            // Set, and not passed on: nodes read the file.
            ("PROCPOOL_KEY", SECRET.to_owned()),
        ]
    };
    let key_abs = s.path("shared/procpool.key");
    let vars = env(key_abs.to_str().expect("utf-8"));
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = run_bash(
        "deploy/slurm/procpool-nodes.sbatch",
        &[app_s, "--ignored-arg"],
        &bin,
        &vars,
    );
    assert!(
        out.status.success(),
        "the batch script failed: {}",
        text(&out.stderr)
    );
    let argv = fs::read_to_string(s.path("out/argv")).expect("srun was run");
    let argv: Vec<&str> = argv.lines().collect();
    assert!(argv.contains(&"--ntasks=3"), "one node per task: {argv:?}");
    let at = argv
        .iter()
        .position(|a| *a == app_s)
        .unwrap_or_else(|| panic!("srun runs the app: {argv:?}"));
    assert_eq!(
        argv[at + 1..],
        ["--ignored-arg"],
        "the app's arguments follow it"
    );
    assert!(
        argv.iter().all(|a| !a.contains(SECRET)),
        "the key is on srun's command line: {argv:?}"
    );
    let env_seen = fs::read_to_string(s.path("out/env")).expect("srun's env");
    let lines: Vec<&str> = env_seen.lines().collect();
    for want in [
        "PROCPOOL_NODE=redis://redis.example:6379".to_owned(),
        "PROCPOOL_NAMESPACE=thumbs".to_owned(),
        "PROCPOOL_NODE_PROCESSES=4".to_owned(),
        "PROCPOOL_NODE_GRACE=60".to_owned(),
        format!("PROCPOOL_KEY_FILE={}", key_abs.display()),
    ] {
        assert!(
            lines.contains(&want.as_str()),
            "srun's env has {want}: {lines:?}"
        );
    }
    assert!(
        !env_seen.contains("PROCPOOL_KEY=") && !env_seen.contains(SECRET),
        "the key's value reached srun's environment"
    );
    assert!(
        text(&out.stderr).contains("PROCPOOL_KEY is ignored"),
        "it says so"
    );

    // A relative key path is made absolute (steps may start elsewhere); without a URL
    // nothing starts.
    fs::remove_file(s.path("out/env")).expect("clear");
    let out = Command::new("bash")
        .arg(repo().join("deploy/slurm/procpool-nodes.sbatch"))
        .arg(app_s)
        .current_dir(s.path("shared"))
        .env_clear()
        .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
        .env("FAKE_OUT", &out_dir)
        .env("PROCPOOL_NODE", "unix:///run/redis.sock")
        .env("PROCPOOL_KEY_FILE", "procpool.key")
        .output()
        .expect("run bash");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let env_seen = fs::read_to_string(s.path("out/env")).expect("srun's env");
    let key_canon = fs::canonicalize(&key_abs).expect("canonical key path");
    assert!(
        env_seen.contains(&format!("PROCPOOL_KEY_FILE={}\n", key_canon.display()))
            || env_seen.contains(&format!("PROCPOOL_KEY_FILE={}\n", key_abs.display())),
        "{env_seen}"
    );
    assert!(env_seen.contains("PROCPOOL_NAMESPACE=default\n"));
    assert!(env_seen.contains("PROCPOOL_NODE_PROCESSES=1\n"));

    fs::remove_file(s.path("out/env")).expect("clear");
    let out = run_bash(
        "deploy/slurm/procpool-nodes.sbatch",
        &[app_s],
        &bin,
        &[
            ("FAKE_OUT", out_dir.to_str().expect("utf-8")),
            ("PROCPOOL_KEY_FILE", key_abs.to_str().expect("utf-8")),
        ],
    );
    assert_eq!(out.status.code(), Some(2), "no PROCPOOL_NODE: refused");
    assert!(text(&out.stderr).contains("PROCPOOL_NODE"));
    assert!(!s.path("out/env").exists(), "srun was not run");
}

/// A fake `ssh`: records its argv and standard input (call by call), then runs the
/// remote command in a home of the host's own under `$FAKE_HOMES`, as sshd would.
const FAKE_SSH: &str = r#"#!/bin/sh
n=$(($(cat "$FAKE_OUT/calls" 2>/dev/null || echo 0) + 1))
echo "$n" > "$FAKE_OUT/calls"
printf '%s\n' "$@" > "$FAKE_OUT/argv.$n"
while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do shift; done
[ "$#" -ge 3 ] || { echo "fake ssh: want -- HOST COMMAND" >&2; exit 255; }
shift
host=$1
shift
cat > "$FAKE_OUT/stdin.$n"
HOME="$FAKE_HOMES/$host"
export HOME
mkdir -p "$HOME"
cd "$HOME" || exit 255
exec sh -c "$*" < "$FAKE_OUT/stdin.$n"
"#;

/// The app on the fake hosts: records its environment, then says it is done through a
/// FIFO the test reads (so the test waits for it without sleeping).
const FAKE_APP: &str = r#"#!/bin/sh
env | sort > "$HOME/app.env"
pwd > "$HOME/app.cwd"
echo done > "$HOME/done"
"#;

/// Waits for the fake app on `home` to have run, up to a minute.
fn wait_for_app(home: &Path) {
    let fifo = home.join("done");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        tx.send(fs::read_to_string(&fifo)).ok();
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(Ok(s)) => assert_eq!(s.trim(), "done"),
        Ok(Err(e)) => panic!("cannot read the app's FIFO: {e}"),
        Err(_) => panic!("the app did not run on {} within 60 s", home.display()),
    }
}

#[test]
fn the_ssh_script_starts_a_node_per_host_with_the_key_copied_on_stdin_only() {
    let s = Scratch::new("ssh");
    let bin = s.path("bin");
    s.script("bin/ssh", FAKE_SSH);
    let app = s.script("opt/myapp", FAKE_APP);
    let out_dir = s.path("out");
    let homes = s.path("homes");
    fs::create_dir_all(&out_dir).expect("mkdir out");
    // A key with a trailing newline and a quote: copied byte for byte.
    let key = format!("{SECRET}'\n");
    fs::write(s.path("procpool.key"), &key).expect("write the key");
    fs::write(s.path("hosts.txt"), "# the fleet\nalpha\n\n  \n").expect("write the hosts");
    for host in ["alpha", "beta"] {
        let home = homes.join(host);
        fs::create_dir_all(&home).expect("mkdir a home");
        let made = Command::new("mkfifo")
            .arg(home.join("done"))
            .status()
            .expect("run mkfifo");
        assert!(made.success(), "mkfifo");
    }
    // A password with shell metacharacters: quoted through, never expanded.
    let url = "redis://procpool-node:pa'ss$(id)`x`@redis.example:6379";
    let local_home = s.path("local-home");
    fs::create_dir_all(&local_home).expect("mkdir");
    let path = |p: &Path| p.to_str().expect("utf-8 path").to_owned();
    let (out_s, homes_s, key_s, app_s) = (
        path(&out_dir),
        path(&homes),
        path(&s.path("procpool.key")),
        path(&app),
    );
    let env = [
        ("HOME", path(&local_home)),
        ("FAKE_OUT", out_s.clone()),
        ("FAKE_HOMES", homes_s.clone()),
        ("PROCPOOL_NODE", url.to_owned()),
        ("PROCPOOL_KEY_FILE", key_s.clone()),
        ("PROCPOOL_KEY", SECRET.to_owned()),
        ("PROCPOOL_NAMESPACE", "thumbs".to_owned()),
        ("PROCPOOL_NODE_PROCESSES", "3".to_owned()),
        ("PROCPOOL_NODE_GRACE", "45".to_owned()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let hosts_file = path(&s.path("hosts.txt"));
    let out = run_bash(
        "deploy/ssh/start-nodes.sh",
        &["-a", &app_s, "-f", &hosts_file, "beta"],
        &bin,
        &env,
    );
    assert!(
        out.status.success(),
        "start-nodes.sh failed:\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    for host in ["alpha", "beta"] {
        wait_for_app(&homes.join(host));
    }

    let calls: usize = fs::read_to_string(out_dir.join("calls"))
        .expect("ssh was run")
        .trim()
        .parse()
        .expect("a count");
    assert_eq!(calls, 4, "two hosts, two connections each (key, start)");
    for n in 1..=calls {
        let argv = fs::read_to_string(out_dir.join(format!("argv.{n}"))).expect("argv");
        let stdin = fs::read(out_dir.join(format!("stdin.{n}"))).expect("stdin");
        for secret in [SECRET, "pa'ss", url] {
            assert!(
                !argv.contains(secret),
                "call {n}: {secret:?} is on ssh's command line:\n{argv}"
            );
        }
        let args: Vec<&str> = argv.lines().collect();
        assert!(args.contains(&"BatchMode=yes"), "{args:?}");
        let host = args[args.iter().position(|a| *a == "--").expect("--") + 1];
        assert_eq!(host, if n <= 2 { "alpha" } else { "beta" });
        if n % 2 == 1 {
            assert_eq!(stdin, key.as_bytes(), "call {n} sends the key on stdin");
        } else {
            assert_eq!(
                args.last(),
                Some(&"sh -s"),
                "call {n} runs a script from stdin"
            );
            let script = String::from_utf8(stdin).expect("a text script");
            assert!(
                !script.contains(SECRET),
                "the key is not in the start script"
            );
        }
    }

    for host in ["alpha", "beta"] {
        let home = homes.join(host);
        let dir = home.join(".procpool/thumbs");
        let copied = dir.join("key");
        assert_eq!(
            fs::read(&copied).expect("the key was copied"),
            key.as_bytes(),
            "{host}: byte for byte"
        );
        let mode = fs::metadata(&copied).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{host}: the key file is the user's only");
        let app_env = fs::read_to_string(home.join("app.env")).expect("the app's env");
        let lines: Vec<&str> = app_env.lines().collect();
        for want in [
            format!("PROCPOOL_NODE={url}"),
            "PROCPOOL_NAMESPACE=thumbs".to_owned(),
            "PROCPOOL_NODE_PROCESSES=3".to_owned(),
            "PROCPOOL_NODE_GRACE=45".to_owned(),
            format!("PROCPOOL_KEY_FILE={}", copied.display()),
        ] {
            assert!(
                lines.contains(&want.as_str()),
                "{host}: the node's env has {want}: {lines:?}"
            );
        }
        assert!(
            !lines.iter().any(|l| l.starts_with("PROCPOOL_KEY=")),
            "{host}: PROCPOOL_KEY reached the node"
        );
        assert_eq!(
            fs::read_to_string(home.join("app.cwd"))
                .expect("cwd")
                .trim(),
            dir.to_str().expect("utf-8"),
            "{host}: the node runs in its directory"
        );
        let pid = fs::read_to_string(dir.join("node.pid")).expect("a pid file");
        assert!(pid.trim().parse::<u32>().is_ok(), "{host}: {pid}");
    }

    // Stop: SIGTERM to the node its pid file names (here a stand-in the test owns,
    // since the fake app has exited), and the pid file goes.
    let mut stand_in = Command::new("sleep")
        .arg("600")
        .spawn()
        .expect("start a stand-in node");
    let pid_file = homes.join("alpha/.procpool/thumbs/node.pid");
    fs::write(&pid_file, format!("{}\n", stand_in.id())).expect("write the pid file");
    let out = run_bash(
        "deploy/ssh/start-nodes.sh",
        &["-x", "alpha"],
        &bin,
        &[
            ("FAKE_OUT", &out_s),
            ("FAKE_HOMES", &homes_s),
            ("PROCPOOL_NAMESPACE", "thumbs"),
        ],
    );
    if !text(&out.stdout).contains("SIGTERM sent") {
        stand_in.kill().ok(); // not left behind when the script failed
    }
    let status = stand_in.wait().expect("wait for the stand-in");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("SIGTERM sent"),
        "{}",
        text(&out.stdout)
    );
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.signal(),
        Some(15),
        "the node got SIGTERM: {status:?}"
    );
    assert!(!pid_file.exists(), "the pid file is removed");

    // Without the app, nothing is contacted.
    let out = run_bash(
        "deploy/ssh/start-nodes.sh",
        &["gamma"],
        &bin,
        &[
            ("FAKE_OUT", &out_s),
            ("FAKE_HOMES", &homes_s),
            ("PROCPOOL_NODE", "redis://x"),
            ("PROCPOOL_KEY_FILE", &key_s),
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(!homes.join("gamma").exists());
}
