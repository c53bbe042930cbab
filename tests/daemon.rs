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

fn start(name: &str, model: Option<&Path>, state: &Path) -> Daemon {
    let socket = scratch(&format!("{name}.sock"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gpod"));
    cmd.arg("--socket").arg(&socket).arg("--state-dir").arg(state).stdout(Stdio::null()).stderr(Stdio::null());
    if let Some(m) = model {
        cmd.arg("--model").arg(m);
    }
    let child = cmd.spawn().expect("start gpod");
    let t0 = Instant::now();
    while Client::connect(&socket).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(60), "gpod did not come up");
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
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("served by a running gpod"));
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

fn train_config(out: &Path, iterations: usize) -> String {
    format!(
        "mode = \"gpo\"\niterations = {iterations}\noutput = \"{}\"\nmodel = \"{}\"\nseed = 4\n[tasks]\ntrain_count = 16\neval_count = 2\n[rollout]\nprompts = 2\ngroup_size = 4\nmax_tokens = 24\n[value]\nrollouts = 2\n[verifier]\nkind = \"regex\"\npattern = \"x\"\n[train]\nrank = 2\nalpha = 4.0\nlr = 5e-3\n[eval]\nmax_tokens = 4\n[engine]\nparallel = 8\nctx_per_sequence = 256\n",
        out.display(),
        tiny_model("llama").display()
    )
}

#[test]
fn training_jobs_stream_progress_and_a_shell_client_drives_them() {
    let d = start("train", Some(&tiny_model("llama")), &scratch("st-train"));
    let out = scratch("job-run");
    let mut c = Client::connect(&d.socket).unwrap();
    let job = ok(&c.call(json!({"op": "train", "config": train_config(&out, 2)})).unwrap())["id"].as_u64().unwrap();
    let mut events = Vec::new();
    let done = c.call_with(json!({"op": "subscribe", "job": job}), |e| events.push(e.clone())).unwrap();
    assert_eq!(ok(&done)["state"], json!("done"), "{done}");
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
    // A whole run driven by the README's shell client; its relative output is taken relative to
    // the configuration file, as `gpo train --config` does.
    let dir = scratch("shell-run");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("run.toml");
    std::fs::write(&cfg, train_config(Path::new("out"), 2)).unwrap();
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
    assert_eq!(gpo::gpo::read_metrics(&dir.join("out")).unwrap().len(), 2);
}

#[test]
fn sigterm_stops_cleanly_and_kill_9_mid_training_resumes_after_restart() {
    let state = scratch("st-crash");
    let out = scratch("crash-run");
    let d = start("crash", Some(&tiny_model("llama")), &state);
    let mut c = Client::connect(&d.socket).unwrap();
    ok(&c.call(json!({"op": "train", "config": train_config(&out, 5)})).unwrap());
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
    assert!(done_before < 5);
    // Restart: the job is restored from the state directory and resumes from its checkpoint.
    let d2 = start("crash", Some(&tiny_model("llama")), &state);
    let mut c2 = Client::connect(&d2.socket).unwrap();
    let done = c2.call(json!({"op": "subscribe", "job": 1})).unwrap();
    assert_eq!(ok(&done)["state"], json!("done"), "{done}");
    let rows = gpo::gpo::read_metrics(&out).unwrap();
    assert_eq!(rows.iter().map(|r| r.iteration).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4], "each iteration once");
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
}
