//! The `gpo` command line, end to end on the tiny model.

mod common;

use common::{scratch, tiny_model};
use std::process::Command;

fn gpo(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_gpo")).args(args).output().expect("run gpo");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn fit_writes_adapters_that_the_engine_loads_and_eval_uses() {
    let model = tiny_model("llama");
    let m = model.to_str().unwrap();
    let data = scratch("fit-nll.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"2+3?\", \"completion\": \"5\", \"reward\": 1}\n{\"prompt\": \"2+3?\", \"completion\": \"6\", \"reward\": 0}\n\n{\"prompt\": \"1+1?\", \"completion\": \"2\", \"reward\": 1, \"group\": 7}\n",
    )
    .unwrap();
    let out = scratch("fit-grpo.gguf");
    let (ok, stdout, stderr) = gpo(&[
        "fit",
        "--model",
        m,
        "--data",
        data.to_str().unwrap(),
        "--objective",
        "grpo",
        "--rank",
        "2",
        "--epochs",
        "2",
        "--out",
        out.to_str().unwrap(),
        "--metrics",
        scratch("fit.metrics.jsonl").to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("adapter written"), "{stdout}");
    let metrics = std::fs::read_to_string(scratch("fit.metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 2, "one metrics row per step (1 batch × 2 epochs)");
    let f = gpo::gguf::lora::LoraAdapterFile::read(&out).unwrap();
    assert_eq!(f.tensors.len(), 2 * 7);
    let model_h = gpo::llama::Model::load(&model, &Default::default()).unwrap();
    gpo::llama::LoraAdapter::load(&model_h, &out).unwrap();

    let pairs = scratch("fit-dpo.jsonl");
    std::fs::write(&pairs, "{\"prompt\": \"2+3?\", \"chosen\": \"5\", \"rejected\": \"6\"}\n").unwrap();
    let out2 = scratch("fit-dpo.gguf");
    let (ok, _, stderr) = gpo(&[
        "fit",
        "--model",
        m,
        "--data",
        pairs.to_str().unwrap(),
        "--objective",
        "dpo",
        "--rank",
        "2",
        "--out",
        out2.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");

    let (ok, stdout, stderr) = gpo(&[
        "eval",
        "--model",
        m,
        "--adapter",
        out.to_str().unwrap(),
        "--count",
        "3",
        "--max-tokens",
        "8",
        "--parallel",
        "4",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("greedy accuracy"), "{stdout}");
}

#[test]
fn bad_data_and_arguments_fail_with_the_line_and_field() {
    let m = tiny_model("llama");
    let data = scratch("fit-bad.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"a\", \"completion\": \"b\", \"reward\": 1}\n{\"prompt\": \"a\", \"completion\": \"b\"}\n",
    )
    .unwrap();
    let (ok, _, stderr) =
        gpo(&["fit", "--model", m.to_str().unwrap(), "--data", data.to_str().unwrap(), "--objective", "grpo"]);
    assert!(!ok);
    assert!(stderr.contains(":2:") && stderr.contains("reward"), "{stderr}");
    let (ok, _, stderr) =
        gpo(&["fit", "--model", m.to_str().unwrap(), "--data", data.to_str().unwrap(), "--objective", "sgd"]);
    assert!(!ok && stderr.contains("one of nll, ppo, grpo"), "{stderr}");
    let (ok, _, stderr) = gpo(&["generate", "--model", "/nonexistent.gguf", "--prompt", "x"]);
    assert!(!ok && stderr.contains("file not found"), "{stderr}");
    let (ok, _, stderr) = gpo(&["generate", "--model", m.to_str().unwrap(), "--prompt", "x", "--top-p", "0"]);
    assert!(!ok && stderr.contains("top_p"), "{stderr}");
}

#[test]
fn generate_json_and_tasks() {
    let m = tiny_model("llama");
    let (ok, stdout, stderr) = gpo(&[
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--prompt",
        "hi",
        "-n",
        "2",
        "--max-tokens",
        "6",
        "--json",
        "--parallel",
        "4",
    ]);
    assert!(ok, "{stderr}");
    let rows: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["tokens"].as_array().unwrap().len(), rows[0]["logprobs"].as_array().unwrap().len());
    let (ok, stdout, _) = gpo(&["tasks", "--count", "3", "--steps", "4"]);
    assert!(ok);
    for l in stdout.lines() {
        let t: gpo::task::Task = serde_json::from_str(l).unwrap();
        assert!(t.answer.parse::<u64>().is_ok());
    }
    assert_eq!(stdout.lines().count(), 3);
}

#[test]
fn progress_is_printed_as_plain_lines_when_stderr_is_not_a_terminal() {
    // Here stderr is a pipe (as in CI logs): no bar escapes, but a line per phase and the end.
    let model = tiny_model("llama");
    let (ok, stdout, stderr) =
        gpo(&["eval", "--model", model.to_str().unwrap(), "--steps", "1", "--count", "6", "--max-tokens", "8"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("greedy accuracy"), "{stdout}");
    assert!(stderr.lines().any(|l| l.starts_with("evaluating: 0/6")), "{stderr}");
    assert!(stderr.lines().any(|l| l.starts_with("evaluating: 6/6")), "{stderr}");
    assert!(!stderr.contains('\u{1b}'), "no terminal escapes in a log: {stderr:?}");
}

#[test]
fn info_says_what_the_engine_chose_and_why() {
    let model = tiny_model("llama");
    let m = model.to_str().unwrap();
    let (ok, stdout, stderr) = gpo(&["info", "--model", m, "--threads", "2", "--parallel", "2", "--ctx", "512"]);
    assert!(ok, "{stderr}");
    let gpu = gpo::llama::has_gpu();
    assert!(stdout.contains("\"graph_sampling\": ") && stdout.contains("devices:\n  CPU"), "{stdout}");
    let sampling = stdout.lines().find(|l| l.starts_with("sampling: ")).expect("a sampling line");
    assert_eq!(sampling.contains("in the decode graph (auto"), gpu, "{sampling}");
    assert!(stdout.contains("parallel: 2 sequences"), "{stdout}");
    let (ok, stdout, _) =
        gpo(&["info", "--model", m, "--threads", "2", "--parallel", "2", "--ctx", "512", "--sampling", "graph"]);
    assert!(ok && stdout.contains("sampling: in the decode graph (asked for)"), "{stdout}");
    let (ok, _, stderr) = gpo(&["info", "--model", m, "--sampling", "gpu"]);
    assert!(!ok && stderr.contains("not one of auto, graph, host"), "{stderr}");
}

/// The README's experiment tables, target block and plots are exactly what `gpo report`
/// regenerates from the committed metrics under docs/experiment/: a hand edit of a number, or
/// new runs committed without their report, fails here.
#[test]
fn the_readme_experiment_section_is_what_gpo_report_regenerates() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = scratch("report-check");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let readme = dir.join("README.md");
    std::fs::copy(root.join("README.md"), &readme).unwrap();
    let (ok, _, stderr) = gpo(&[
        "report",
        "--dir",
        root.join("docs/experiment").to_str().unwrap(),
        "--readme",
        readme.to_str().unwrap(),
        "--plots",
        dir.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let committed = std::fs::read_to_string(root.join("README.md")).unwrap();
    let regenerated = std::fs::read_to_string(&readme).unwrap();
    if committed != regenerated {
        let first = committed.lines().zip(regenerated.lines()).position(|(a, b)| a != b).map(|i| i + 1);
        panic!(
            "README.md differs from `gpo report --dir docs/experiment --readme README.md --plots docs` \
             (first differing line: {first:?}); run that command and commit its output"
        );
    }
    for setting in ["one-step", "two-step"] {
        let name = format!("experiment-{setting}.svg");
        assert_eq!(
            std::fs::read(root.join("docs").join(&name)).unwrap(),
            std::fs::read(dir.join(&name)).unwrap(),
            "docs/{name} differs from what gpo report draws"
        );
    }
}
