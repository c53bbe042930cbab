//! gpod end to end: concurrency, socket security, malformed and oversized messages, a bounded
//! property-based storm of random messages, training jobs with progress events, SIGTERM, and
//! kill -9 followed by a restart that resumes the job.

mod common;

use common::{scratch, tiny_model};
use gpo::daemon::client::Client;
use proptest::prelude::*;
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Daemon {
    child: Child,
    socket: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where the tests' daemons let clients read models (the tiny models live there).
fn models_root() -> PathBuf {
    tiny_model("llama").parent().unwrap().to_path_buf()
}

/// Where the tests' daemons let clients' runs write.
fn runs_root() -> PathBuf {
    scratch("runs")
}

fn start(name: &str, model: Option<&Path>, state: &Path) -> Daemon {
    start_at(&scratch(&format!("{name}.sock")), model, state, &[])
}

fn start_at(socket: &Path, model: Option<&Path>, state: &Path, args: &[&str]) -> Daemon {
    let socket = socket.to_path_buf();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gpod"));
    cmd.arg("--socket").arg(&socket).arg("--state-dir").arg(state).stdout(Stdio::null()).stderr(Stdio::null());
    cmd.arg("--models-dir").arg(models_root()).arg("--runs-dir").arg(runs_root()).args(args);
    if let Some(m) = model {
        cmd.arg("--model").arg(m);
    }
    let mut child = cmd.spawn().expect("start gpod");
    let t0 = Instant::now();
    while Client::connect(&socket).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(60), "gpod did not come up");
        assert!(child.try_wait().unwrap().is_none(), "gpod exited");
        std::thread::sleep(Duration::from_millis(20));
    }
    Daemon { child, socket }
}

fn ok(v: &Value) -> &Value {
    assert_eq!(v["ok"], json!(true), "{v}");
    &v["result"]
}

#[test]
fn sixteen_clients_get_correct_independent_results() {
    let d = start("conc", Some(&tiny_model("llama-peaked")), &scratch("st-conc"));
    let req = |i: u64| json!({"op": "generate", "prompt": format!("client {i}"), "n": 2, "sampling": {"max_tokens": 12, "seed": i, "temperature": 0.8}});
    // Each request alone first: the reference.
    let mut solo = Client::connect(&d.socket).unwrap();
    let want: Vec<Value> = (0..16).map(|i| ok(&solo.call(req(i)).unwrap())["trajectories"].clone()).collect();
    let handles: Vec<_> = (0..16u64)
        .map(|i| {
            let sock = d.socket.clone();
            let r = req(i);
            std::thread::spawn(move || {
                let mut c = Client::connect(&sock).unwrap();
                let v = c.call(r).unwrap();
                (i, v)
            })
        })
        .collect();
    for h in handles {
        let (i, v) = h.join().unwrap();
        let got = &ok(&v)["trajectories"];
        assert_eq!(got.as_array().unwrap().len(), 2);
        for (g, w) in got.as_array().unwrap().iter().zip(want[i as usize].as_array().unwrap()) {
            assert_eq!(g["tokens"], w["tokens"], "client {i} got another client's result or a changed sample");
        }
    }
    let status = ok(&solo.call(json!({"op": "status"})).unwrap()).clone();
    assert!(status["stats"]["requests"].as_u64().unwrap() >= 32);
}

#[test]
fn socket_is_private_stale_sockets_are_replaced_and_live_ones_kept() {
    let state = scratch("st-sock");
    let d = start("sec", None, &state);
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    // A second daemon on the same path must not steal it.
    let out = Command::new(env!("CARGO_BIN_EXE_gpod"))
        .arg("--socket")
        .arg(&d.socket)
        .arg("--state-dir")
        .arg(&state)
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("held by another gpod"));
    assert!(Client::connect(&d.socket).is_ok());
    drop(d);
    // The killed daemon left its socket behind: the next one replaces it.
    let stale = scratch("sec.sock");
    assert!(stale.exists());
    let d2 = start("sec", None, &state);
    ok(&Client::connect(&d2.socket).unwrap().call(json!({"op": "status"})).unwrap());
    // A regular file at the path is never removed.
    let file = scratch("not-a-socket.sock");
    std::fs::write(&file, "keep me").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gpod"))
        .arg("--socket")
        .arg(&file)
        .arg("--state-dir")
        .arg(&state)
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not a socket"));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
}

#[test]
fn malformed_and_oversized_messages_get_errors_and_the_connection_stays_healthy() {
    let d = start("bad", Some(&tiny_model("llama")), &scratch("st-bad"));
    let mut c = Client::connect(&d.socket).unwrap();
    c.send_line("{not json").unwrap();
    assert_eq!(c.read().unwrap()["error"]["code"], json!("malformed"));
    c.send_line(&format!("{{\"v\":1,\"id\":1,\"op\":\"generate\",\"prompt\":\"{}\"}}", "x".repeat(2 << 20))).unwrap();
    assert_eq!(c.read().unwrap()["error"]["code"], json!("too_large"));
    let r = c.call(json!({"op": "generate", "prompt": "x", "sampling": {"top_p": 0}})).unwrap();
    assert_eq!(r["error"]["code"], json!("invalid"));
    assert!(r["error"]["message"].as_str().unwrap().contains("top_p"));
    let r = c.call(json!({"op": "fork", "trajectory": 999999, "at": 0})).unwrap();
    assert!(r["error"]["message"].as_str().unwrap().contains("unknown"));
    let r = c.call(json!({"op": "generate", "tokens": [1, 2, 99999999], "n": 1})).unwrap();
    assert_eq!(r["error"]["code"], json!("invalid"));
    // Invalid UTF-8 is refused, not replaced (that would run a prompt the client never sent).
    {
        use std::io::{BufRead, Write};
        let mut raw = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
        raw.write_all(b"{\"v\":1,\"op\":\"generate\",\"prompt\":\"\xff\xfe\"}\n").unwrap();
        let mut reply = String::new();
        std::io::BufReader::new(&raw).read_line(&mut reply).unwrap();
        let v: Value = serde_json::from_str(&reply).unwrap();
        assert_eq!(v["error"]["code"], json!("malformed"), "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("not UTF-8"), "{v}");
    }
    // Still healthy.
    let r = c.call(json!({"op": "generate", "prompt": "fine", "sampling": {"max_tokens": 3}})).unwrap();
    assert_eq!(ok(&r)["trajectories"][0]["tokens"].as_array().unwrap().len(), 3);
}

#[test]
fn a_storm_of_random_messages_never_takes_the_daemon_down() {
    let d = start("storm", Some(&tiny_model("llama")), &scratch("st-storm"));
    let c = std::cell::RefCell::new(Client::connect(&d.socket).unwrap());
    let bases = [
        r#"{"v":1,"id":1,"op":"generate","prompt":"hi","n":2,"sampling":{"max_tokens":2}}"#,
        r#"{"v":1,"id":"a","op":"values","trajectory":0,"answer":"5","rollouts":1,"sampling":{"max_tokens":2}}"#,
        r#"{"v":1,"op":"fork","trajectory":0,"at":1,"n":1,"sampling":{"max_tokens":2}}"#,
        r#"{"v":1,"id":2,"op":"status"}"#,
        r#"{"v":1,"id":3,"op":"cancel","target":1}"#,
    ];
    let mut runner =
        proptest::test_runner::TestRunner::new(proptest::test_runner::Config { cases: 2000, ..Default::default() });
    let strategy = (0..bases.len(), any::<u16>(), any::<u8>(), 0usize..200, prop::bool::ANY, ".{0,40}");
    let replies = std::cell::Cell::new(0usize);
    runner
        .run(&strategy, |(b, pos, byte, cut, garbage, text)| {
            let line = if garbage {
                text
            } else {
                let mut v = bases[b].as_bytes().to_vec();
                let i = pos as usize % v.len();
                v[i] = byte;
                v.truncate(cut.max(1).min(v.len()));
                String::from_utf8_lossy(&v).replace('\n', " ")
            };
            if line.trim().is_empty() {
                return Ok(());
            }
            let mut c = c.borrow_mut();
            c.send_line(&line).unwrap();
            // Every non-empty line gets exactly one reply, and it is JSON with ok or an error.
            let r = c.read().unwrap();
            prop_assert!(r.get("ok").is_some(), "{r}");
            prop_assert_eq!(&r["v"], &json!(1));
            replies.set(replies.get() + 1);
            Ok(())
        })
        .unwrap();
    assert!(replies.get() > 1000);
    ok(&Client::connect(&d.socket).unwrap().call(json!({"op": "status"})).unwrap());
}

/// A run's configuration; `out` is relative to the daemon's runs root.
fn train_config(out: &Path, iterations: usize) -> String {
    format!(
        "mode = \"gpo\"\niterations = {iterations}\noutput = \"{}\"\nmodel = \"{}\"\nseed = 4\n[tasks]\ntrain_count = 16\neval_count = 2\n[rollout]\nprompts = 2\ngroup_size = 4\nmax_tokens = 24\n[value]\nrollouts = 2\n[verifier]\nkind = \"regex\"\npattern = \"x\"\n[train]\nrank = 2\nalpha = 4.0\nlr = 5e-3\n[eval]\nmax_tokens = 4\n[engine]\nparallel = 8\nctx_per_sequence = 256\n",
        out.display(),
        tiny_model("llama").file_name().unwrap().to_str().unwrap()
    )
}

#[test]
fn training_jobs_stream_progress_and_a_shell_client_drives_them() {
    let d = start("train", Some(&tiny_model("llama")), &scratch("st-train"));
    let out = runs_root().join("job-run");
    let mut c = Client::connect(&d.socket).unwrap();
    let job = ok(&c
        .call(json!({"op": "train", "config": train_config(Path::new("job-run"), 2), "install": true}))
        .unwrap())["id"]
        .as_u64()
        .unwrap();
    let mut events = Vec::new();
    let done = c.call_with(json!({"op": "subscribe", "job": job}), |e| events.push(e.clone())).unwrap();
    assert_eq!(ok(&done)["state"], json!("done"), "{done}");
    // `install`: the served engine now samples with the trained adapter.
    let installed = &ok(&done)["result"]["installed"];
    assert_eq!(installed["version"], json!(1), "{done}");
    assert!(installed["adapter"].as_str().unwrap().ends_with("job-run/adapter.gguf"), "{done}");
    let t = ok(&c.call(json!({"op": "generate", "prompt": "q", "sampling": {"max_tokens": 2}})).unwrap()).clone();
    assert_eq!(t["trajectories"][0]["adapter_version"], json!(1));
    // The `adapter` op: report, remove, load a run's adapter by name; paths stay in the roots.
    assert_eq!(ok(&c.call(json!({"op": "adapter"})).unwrap())["version"], json!(1));
    let removed = ok(&c.call(json!({"op": "adapter", "remove": true})).unwrap()).clone();
    assert_eq!((removed["version"].clone(), removed["adapter"].clone()), (json!(2), Value::Null));
    let back = ok(&c.call(json!({"op": "adapter", "run": "job-run", "scale": 0.5})).unwrap()).clone();
    assert_eq!((back["version"].clone(), back["scale"].clone()), (json!(3), json!(0.5)));
    assert_eq!(ok(&c.call(json!({"op": "status"})).unwrap())["adapter"]["scale"], json!(0.5));
    for bad in [json!({"run": "no-such-run"}), json!({"run": "../st-train"}), json!({"path": "/etc/passwd"})] {
        let mut req = json!({"op": "adapter"});
        req.as_object_mut().unwrap().extend(bad.as_object().unwrap().clone());
        let r = c.call(req).unwrap();
        assert_eq!(r["error"]["code"], json!("invalid"), "{r}");
    }
    // A run of another model is not installed into this one.
    let other = train_config(Path::new("other-run"), 1).replace("tiny-llama.gguf", "tiny-llama-peaked.gguf");
    tiny_model("llama-peaked");
    let job2 = ok(&c.call(json!({"op": "train", "config": other, "install": true})).unwrap())["id"].as_u64().unwrap();
    let done2 = c.call(json!({"op": "subscribe", "job": job2})).unwrap();
    assert!(ok(&done2)["result"]["installed"]["error"].as_str().unwrap().contains("not installed"), "{done2}");
    assert_eq!(ok(&c.call(json!({"op": "adapter"})).unwrap())["version"], json!(3), "unchanged");
    let iterations: Vec<u64> = events.iter().filter_map(|e| e["data"]["metrics"]["iteration"].as_u64()).collect();
    assert_eq!(iterations, vec![0, 1], "progress events for both iterations");
    assert_eq!(gpo::gpo::read_metrics(&out).unwrap().len(), 2);
    // The same through socat, a shell client.
    let socat = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "printf '%s\\n' '{{\"v\":1,\"id\":9,\"op\":\"status\"}}' | socat -t 5 - UNIX-CONNECT:{}",
            d.socket.display()
        ))
        .output()
        .expect("socat is installed by scripts/setup.sh");
    let line: Value = serde_json::from_slice(&socat.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&socat.stdout)));
    assert_eq!(ok(&line)["jobs"][0]["state"], json!("done"));
    // A whole run driven by the README's shell client; the run lands in the daemon's runs root
    // under its output's last component.
    let dir = scratch("shell-run");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("run.toml");
    std::fs::write(&cfg, train_config(Path::new("../somewhere/shell-out"), 2)).unwrap();
    let shell = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/gpod-train.sh"))
        .arg(&cfg)
        .arg(&d.socket)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&shell.stdout);
    assert!(shell.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&shell.stderr));
    let lines: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let finished: Vec<&Value> = lines.iter().filter_map(|l| l["data"].get("metrics")).collect();
    assert_eq!(finished.len(), 2, "a progress event with metrics per iteration: {stdout}");
    assert!(finished.iter().all(|m| m["seconds"].as_f64().unwrap() > 0.0), "timings are reported: {stdout}");
    assert_eq!(ok(lines.last().unwrap())["state"], json!("done"), "{stdout}");
    assert_eq!(gpo::gpo::read_metrics(&runs_root().join("shell-out")).unwrap().len(), 2);
}

#[test]
fn sigterm_stops_cleanly_and_kill_9_mid_training_resumes_after_restart() {
    let state = scratch("st-crash");
    let out = runs_root().join("crash-run");
    let d = start("crash", Some(&tiny_model("llama")), &state);
    let mut c = Client::connect(&d.socket).unwrap();
    ok(&c.call(json!({"op": "train", "config": train_config(Path::new("crash-run"), 10)})).unwrap());
    // A second job waits in the queue behind the first.
    ok(&c.call(json!({"op": "train", "config": train_config(Path::new("crash-queued"), 1)})).unwrap());
    // Kill -9 once the first iteration is committed.
    let t0 = Instant::now();
    while gpo::gpo::read_metrics(&out).map_or(0, |m| m.len()) < 1 {
        assert!(t0.elapsed() < Duration::from_secs(180), "no iteration finished");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut d = d;
    d.child.kill().unwrap();
    d.child.wait().unwrap();
    let done_before = gpo::gpo::read_metrics(&out).unwrap().len();
    assert!(done_before < 10, "killed before the end");
    // Restart: the job is restored from the state directory and resumes from its checkpoint.
    let d2 = start("crash", Some(&tiny_model("llama")), &state);
    let mut c2 = Client::connect(&d2.socket).unwrap();
    let done = c2.call(json!({"op": "subscribe", "job": 1})).unwrap();
    assert_eq!(ok(&done)["state"], json!("done"), "{done}");
    let queued = c2.call(json!({"op": "subscribe", "job": 2})).unwrap();
    assert_eq!(ok(&queued)["state"], json!("done"), "the queued job resumed with its id: {queued}");
    assert_eq!(gpo::gpo::read_metrics(&runs_root().join("crash-queued")).unwrap().len(), 1);
    let rows = gpo::gpo::read_metrics(&out).unwrap();
    assert_eq!(
        rows.iter().map(|r| r.iteration).collect::<Vec<_>>(),
        (0..10).collect::<Vec<_>>(),
        "each iteration once"
    );
    // Job ids continue past every job the state directory has held; a cancel is persisted at
    // once, so a restart does not resume the cancelled job.
    let second = ok(&c2.call(json!({"op": "train", "config": train_config(Path::new("crash-2"), 50)})).unwrap())["id"]
        .as_u64()
        .unwrap();
    assert_eq!(second, 3);
    assert_eq!(ok(&c2.call(json!({"op": "cancel", "target": {"job": 3}})).unwrap())["cancelled"], json!(1));
    // SIGTERM: the daemon exits by itself and removes its socket.
    let mut d2 = d2;
    unsafe { libc::kill(d2.child.id() as i32, libc::SIGTERM) };
    let t0 = Instant::now();
    loop {
        if let Some(st) = d2.child.try_wait().unwrap() {
            assert!(st.success(), "{st}");
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "gpod ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!d2.socket.exists());
    // A third start: the cancelled job stays cancelled, and ids still do not repeat.
    let d3 = start("crash", Some(&tiny_model("llama")), &state);
    let mut c3 = Client::connect(&d3.socket).unwrap();
    assert_eq!(ok(&c3.call(json!({"op": "status"})).unwrap())["jobs"], json!([]), "nothing resumed");
    let third = ok(&c3.call(json!({"op": "train", "config": train_config(Path::new("crash-3"), 50)})).unwrap())["id"]
        .as_u64()
        .unwrap();
    assert_eq!(third, 4, "ids are unique across restarts");
    ok(&c3.call(json!({"op": "cancel", "target": {"job": 4}})).unwrap());
    // A daemon whose socket path was taken over meanwhile leaves the newcomer's socket alone.
    std::fs::remove_file(&d3.socket).unwrap();
    let newcomer = std::os::unix::net::UnixListener::bind(&d3.socket).unwrap();
    let mut d3 = d3;
    unsafe { libc::kill(d3.child.id() as i32, libc::SIGTERM) };
    assert!(d3.child.wait().unwrap().success());
    assert!(d3.socket.exists(), "the other socket was unlinked");
    drop(newcomer);
}

#[test]
fn command_verifier_refused_by_default() {
    let d = start("cmd", Some(&tiny_model("llama")), &scratch("st-cmd"));
    let mut c = Client::connect(&d.socket).unwrap();
    let witness = scratch("cmd-ran");
    let t = ok(&c.call(json!({"op": "generate", "prompt": "q", "sampling": {"max_tokens": 4}})).unwrap())
        ["trajectories"][0]["id"]
        .clone();
    let verifier = json!({"kind": "command", "command": ["touch", witness]});
    let r = c.call(json!({"op": "values", "trajectory": t, "answer": "1", "verifier": verifier})).unwrap();
    assert!(r["error"]["message"].as_str().unwrap().contains("command verifiers are disabled"), "{r}");
    let cfg = format!(
        "{}[verifier]\nkind = \"command\"\ncommand = [\"touch\", \"{}\"]\n",
        train_config(Path::new("cmd-run"), 1).split("[verifier]").next().unwrap(),
        witness.display()
    );
    let r = c.call(json!({"op": "train", "config": cfg})).unwrap();
    assert!(r["error"]["message"].as_str().unwrap().contains("disabled"), "{r}");
    assert!(!witness.exists(), "nothing ran");
    assert!(!runs_root().join("cmd-run").exists(), "nothing was written");
}

#[test]
fn output_escaping_refused() {
    let d = start("paths", Some(&tiny_model("llama")), &scratch("st-paths"));
    let mut c = Client::connect(&d.socket).unwrap();
    let outside = scratch("outside-run");
    for output in [outside.to_str().unwrap(), "../outside-run", "a/../../outside-run"] {
        let r = c.call(json!({"op": "train", "config": train_config(Path::new(output), 1)})).unwrap();
        assert_eq!(r["error"]["code"], json!("invalid"), "{output}: {r}");
        assert!(r["error"]["message"].as_str().unwrap().contains("output"), "{output}: {r}");
        let r = c.call(json!({"op": "train", "config": train_config(Path::new("in"), 1), "output": output})).unwrap();
        assert_eq!(r["error"]["code"], json!("invalid"), "{output}: {r}");
    }
    assert!(!outside.exists(), "no directory was created outside the runs root");
    let r = c.call(json!({"op": "train", "config": train_config(Path::new("x"), 1), "base": "/"})).unwrap();
    assert!(r["error"]["message"].as_str().unwrap().contains("base"), "{r}");
    // A model outside the models root, and one whose path escapes through a link.
    for model in ["/etc/passwd", "../st-paths/jobs", "escape/passwd"] {
        let _ = std::os::unix::fs::symlink("/etc", models_root().join("escape"));
        let r = c.call(json!({"op": "load", "model": model})).unwrap();
        assert_eq!(r["error"]["code"], json!("invalid"), "{model}: {r}");
    }
    // A file inside the root that is not a model: the error does not quote it.
    std::fs::write(models_root().join("secret.gguf"), "root:x:0:0").unwrap();
    let r = c.call(json!({"op": "load", "model": "secret.gguf"})).unwrap();
    let msg = r["error"]["message"].as_str().unwrap();
    assert!(msg.contains("not a GGUF file") && !msg.contains("root:"), "{r}");
}

#[test]
fn foreign_owned_state_dir_refused() {
    let refused = |state: &Path| {
        let out = Command::new(env!("CARGO_BIN_EXE_gpod"))
            .arg("--socket")
            .arg(scratch("foreign.sock"))
            .arg("--state-dir")
            .arg(state)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let open = scratch("st-world-writable");
    std::fs::create_dir_all(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let e = refused(&open);
    assert!(e.contains("other users"), "{e}");
    if unsafe { libc::geteuid() } != 0 {
        println!("skipped the foreign-owner case: it needs root to chown a directory to another user");
        return;
    }
    let foreign = scratch("st-foreign");
    std::fs::create_dir_all(foreign.join("jobs")).unwrap();
    std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).unwrap();
    let e = refused(&foreign);
    assert!(e.contains("owned by uid 65534"), "{e}");
}

#[test]
fn ids_unique_after_load() {
    let d = start("ids", Some(&tiny_model("llama")), &scratch("st-ids"));
    let mut c = Client::connect(&d.socket).unwrap();
    let gen = |c: &mut Client, prompt: &str| -> Vec<Value> {
        ok(&c
            .call(json!({"op": "generate", "prompt": prompt, "n": 2, "sampling": {"max_tokens": 6, "seed": 3}}))
            .unwrap())["trajectories"]
            .as_array()
            .unwrap()
            .clone()
    };
    let before = gen(&mut c, "first prompt");
    let name = tiny_model("llama-peaked").file_name().unwrap().to_str().unwrap().to_string();
    ok(&c.call(json!({"op": "load", "model": name})).unwrap());
    let after = gen(&mut c, "another prompt, with many more words than the first one had");
    let ids: Vec<u64> = before.iter().chain(&after).map(|t| t["id"].as_u64().unwrap()).collect();
    let mut unique = ids.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), 4, "ids repeat after load: {ids:?}");
    // A fork of an old id continues that trajectory, not a newer one.
    let f = ok(&c.call(json!({"op": "fork", "trajectory": ids[0], "at": 2, "sampling": {"max_tokens": 2}})).unwrap())
        ["trajectories"][0]
        .clone();
    let context = |t: &Value| t["context_tokens"].as_u64().unwrap();
    let prompt = |t: &Value| t["prompt_tokens"].as_u64().unwrap();
    assert_ne!(prompt(&before[0]), prompt(&after[0]));
    assert_eq!(prompt(&f), prompt(&before[0]), "{f}");
    assert_eq!(context(&f), prompt(&before[0]) + 2, "the prompt and the 2 tokens forked at: {f}");
}

#[test]
fn another_uid_cannot_fork_or_cancel() {
    let setpriv = Path::new("/usr/bin/setpriv");
    if unsafe { libc::geteuid() } != 0 || !setpriv.exists() {
        println!("skipped: acting as uid 65534 needs root and setpriv");
        return;
    }
    // The socket in a directory uid 65534 can reach; the group lets it connect.
    let socket = std::env::temp_dir().join(format!("gpo-uid-{}.sock", std::process::id()));
    let conf = scratch("uid-gpod.toml");
    std::fs::write(&conf, "allowed_uids = [65534]\ngroup = \"nogroup\"\n").unwrap();
    let d = start_at(&socket, Some(&tiny_model("llama")), &scratch("st-uid"), &["--config", conf.to_str().unwrap()]);
    let mut c = Client::connect(&d.socket).unwrap();
    let t = ok(&c.call(json!({"op": "generate", "prompt": "mine", "sampling": {"max_tokens": 4}})).unwrap())
        ["trajectories"][0]["id"]
        .as_u64()
        .unwrap();
    let job = ok(&c.call(json!({"op": "train", "config": train_config(Path::new("uid-run"), 50)})).unwrap())["id"]
        .as_u64()
        .unwrap();
    let as_nobody = |lines: &[Value]| -> Vec<Value> {
        let input: String = lines.iter().map(|l| format!("{l}\n")).collect();
        let mut child = Command::new(setpriv)
            .args(["--reuid", "65534", "--regid", "65534", "--clear-groups", "socat", "-t", "5", "-"])
            .arg(format!("UNIX-CONNECT:{}", socket.display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        let mut replies: Vec<Value> =
            String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        replies.sort_by_key(|r| r["id"].as_u64()); // each request runs on its own thread
        replies
    };
    let replies = as_nobody(&[
        json!({"v": 1, "id": 1, "op": "fork", "trajectory": t, "at": 1}),
        json!({"v": 1, "id": 2, "op": "cancel", "target": {"job": job}}),
        json!({"v": 1, "id": 3, "op": "status"}),
        json!({"v": 1, "id": 4, "op": "subscribe", "job": job}),
    ]);
    assert_eq!(replies.len(), 4, "{replies:?}");
    assert!(replies[0]["error"]["message"].as_str().unwrap().contains("unknown"), "{:?}", replies[0]);
    assert_eq!(ok(&replies[1])["cancelled"], json!(0));
    assert_eq!(ok(&replies[2])["jobs"], json!([]), "another user's jobs are not listed");
    assert!(replies[3]["error"]["message"].as_str().unwrap().contains("unknown"), "{:?}", replies[3]);
    // The owner still can.
    assert_eq!(ok(&c.call(json!({"op": "cancel", "target": {"job": job}})).unwrap())["cancelled"], json!(1));
    ok(&c.call(json!({"op": "fork", "trajectory": t, "at": 1, "sampling": {"max_tokens": 2}})).unwrap());
}

#[test]
fn disconnect_cancels_and_connections_are_bounded() {
    let conf = scratch("limits-gpod.toml");
    std::fs::write(
        &conf,
        "[limits]\nmax_connections = 3\nidle_timeout_s = 0.5\n[engine]\nparallel = 3\nctx_per_sequence = 4096\n",
    )
    .unwrap();
    let sock = scratch("limits.sock");
    let d = start_at(&sock, Some(&tiny_model("llama")), &scratch("st-limits"), &["--config", conf.to_str().unwrap()]);
    let mut c = Client::connect(&d.socket).unwrap();
    // A client sends a long generation and goes away: its sequences stop.
    {
        let mut gone = Client::connect(&d.socket).unwrap();
        gone.send_line(
            &json!({"v": 1, "id": 1, "op": "generate", "prompt": "long", "n": 16, "sampling": {"max_tokens": 2048}})
                .to_string(),
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    // One that hangs up at once, before its request's thread has registered the request: the
    // request cancels itself when it does.
    {
        let mut gone = Client::connect(&d.socket).unwrap();
        gone.send_line(
            &json!({"v": 1, "id": 1, "op": "generate", "prompt": "long", "n": 16, "sampling": {"max_tokens": 2048}})
                .to_string(),
        )
        .unwrap();
    }
    let t0 = Instant::now();
    let stats = loop {
        let s = ok(&c.call(json!({"op": "status"})).unwrap())["stats"].clone();
        if s["running"] == json!(0) && s["waiting"] == json!(0) && s["requests"] == json!(2) {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "a closed connection's request still runs: {s}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(stats["generated_tokens"].as_u64().unwrap() < 16 * 2048, "they were cancelled, not finished: {stats}");
    // A line left half-sent is closed after the idle timeout; waiting between lines is free.
    {
        use std::io::{BufRead, Write};
        let mut slow = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
        std::thread::sleep(Duration::from_millis(800));
        slow.write_all(b"{\"v\":1,\"id\":1,\"op\":\"status\"}\n{\"v\":1,").unwrap();
        let mut r = std::io::BufReader::new(slow);
        let mut first = String::new();
        r.read_line(&mut first).unwrap();
        assert_eq!(serde_json::from_str::<Value>(&first).unwrap()["ok"], json!(true), "{first}");
        let mut second = String::new();
        r.read_line(&mut second).unwrap();
        assert_eq!(serde_json::from_str::<Value>(&second).unwrap()["error"]["code"], json!("timeout"), "{second}");
        let mut eof = String::new();
        assert_eq!(r.read_line(&mut eof).unwrap(), 0, "then the connection is closed");
    }
    // At most three connections: the fourth is told so.
    let _b = Client::connect(&d.socket).unwrap();
    let mut third = Client::connect(&d.socket).unwrap();
    ok(&third.call(json!({"op": "status"})).unwrap());
    let mut fourth = Client::connect(&d.socket).unwrap();
    assert_eq!(fourth.read().unwrap()["error"]["code"], json!("busy"));
    drop((third, fourth));
    // `load`: an engine over the limits is refused; without `engine`, gpod.toml's settings.
    let name = tiny_model("llama").file_name().unwrap().to_str().unwrap().to_string();
    let r =
        c.call(json!({"op": "load", "model": name, "engine": {"parallel": 16, "ctx_per_sequence": 32768}})).unwrap();
    assert_eq!(r["error"]["code"], json!("too_large"), "{r}");
    let info = ok(&c.call(json!({"op": "load", "model": name})).unwrap()).clone();
    assert_eq!(info["n_parallel"], json!(3), "{info}");
}

#[test]
fn shutdown_with_generations_in_flight_replies_to_every_client() {
    let state = scratch("st-shutdown");
    for round in 0..20 {
        let d = start("shutdown", Some(&tiny_model("llama")), &state);
        let clients: Vec<_> = (0..4)
            .map(|i| {
                let sock = d.socket.clone();
                std::thread::spawn(move || {
                    let mut c = Client::connect(&sock).unwrap();
                    let req =
                        json!({"op": "generate", "prompt": format!("p{i}"), "n": 4, "sampling": {"max_tokens": 2048}});
                    c.call(req).unwrap()
                })
            })
            .collect();
        let mut c = Client::connect(&d.socket).unwrap();
        let t0 = Instant::now();
        while ok(&c.call(json!({"op": "status"})).unwrap())["stats"]["running"].as_u64().unwrap() == 0 {
            assert!(t0.elapsed() < Duration::from_secs(20), "the generations never started");
            std::thread::sleep(Duration::from_millis(5));
        }
        // Half the rounds by signal, half by request.
        if round % 2 == 0 {
            unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) };
        } else {
            ok(&c.call(json!({"op": "shutdown"})).unwrap());
        }
        for h in clients {
            let r = h.join().expect("every client gets a reply");
            assert!(r["ok"] == json!(true) || r["error"]["code"] == json!("cancelled"), "round {round}: {r}");
        }
        let mut d = d;
        let t0 = Instant::now();
        let st = loop {
            if let Some(st) = d.child.try_wait().unwrap() {
                break st;
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "round {round}: gpod did not exit");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(st.success(), "round {round}: {st}");
    }
}

#[test]
fn cancel_during_evaluation_stops_it_midway() {
    // The evaluation below takes about a minute on an idle 2-core machine (400 problems × up to 256
    // tokens); a cancel sent as soon as it starts must end the job within a fraction of that. The
    // bound is loose so that a loaded machine cannot fail it, and still far below the whole evaluation.
    let d = start("evalcancel", Some(&tiny_model("llama")), &scratch("st-evalcancel"));
    let mut c = Client::connect(&d.socket).unwrap();
    let cfg = train_config(Path::new("eval-cancel"), 2)
        .replace("eval_count = 2", "eval_count = 400")
        .replace("[eval]\nmax_tokens = 4", "[eval]\nmax_tokens = 256");
    let job = ok(&c.call(json!({"op": "train", "config": cfg})).unwrap())["id"].as_u64().unwrap();
    let sock = d.socket.clone();
    let (in_eval_tx, in_eval_rx) = std::sync::mpsc::channel();
    let watcher = std::thread::spawn(move || {
        let mut w = Client::connect(&sock).unwrap();
        w.call_with(json!({"op": "subscribe", "job": job}), |e| {
            if e["data"]["phase"].as_str().is_some_and(|p| p.contains("base model")) {
                let _ = in_eval_tx.send(());
            }
        })
        .unwrap()
    });
    in_eval_rx.recv_timeout(Duration::from_secs(120)).expect("the job reached its initial evaluation");
    let asked = Instant::now();
    assert_eq!(ok(&c.call(json!({"op": "cancel", "target": {"job": job}})).unwrap())["cancelled"], json!(1));
    let done = watcher.join().unwrap();
    let took = asked.elapsed();
    assert_eq!(ok(&done)["state"], json!("cancelled"), "{done}");
    assert!(took < Duration::from_secs(10), "cancel took {took:?}");
    assert!(!runs_root().join("eval-cancel/eval-initial.json").exists(), "stopped inside the evaluation");
}

#[test]
fn two_daemons_racing_for_a_stale_socket_one_wins() {
    for round in 0..5 {
        let sock = scratch(&format!("race-{round}.sock"));
        drop(std::os::unix::net::UnixListener::bind(&sock).unwrap()); // stale: nobody listens
        let spawn = |i: usize| {
            Command::new(env!("CARGO_BIN_EXE_gpod"))
                .arg("--socket")
                .arg(&sock)
                .arg("--state-dir")
                .arg(scratch(&format!("st-race-{round}-{i}")))
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        };
        let mut both = [spawn(0), spawn(1)];
        let t0 = Instant::now();
        while Client::connect(&sock).is_err() {
            assert!(t0.elapsed() < Duration::from_secs(30), "round {round}: neither came up");
            std::thread::sleep(Duration::from_millis(10));
        }
        // The loser exits once it finds the socket taken (however slowly a loaded machine starts
        // it); the winner keeps serving.
        let t0 = Instant::now();
        let alive = loop {
            let alive: Vec<bool> = both.iter_mut().map(|c| c.try_wait().unwrap().is_none()).collect();
            if alive.iter().filter(|a| **a).count() < 2 {
                break alive;
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "round {round}: both still run after 30 s");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(alive.iter().filter(|a| **a).count(), 1, "round {round}: exactly one serves ({alive:?})");
        ok(&Client::connect(&sock).unwrap().call(json!({"op": "status"})).unwrap());
        let loser = both.iter_mut().find_map(|c| c.try_wait().unwrap().is_some().then_some(c)).unwrap();
        let mut why = String::new();
        std::io::Read::read_to_string(loser.stderr.as_mut().unwrap(), &mut why).unwrap();
        assert!(
            why.contains("held by another gpod") || why.contains("served by a running gpod"),
            "round {round}: the loser says why: {why}"
        );
        for c in &mut both {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
