//! The C ABI from C and C++: the example GPO iteration, a safety test under AddressSanitizer
//! (leak checking on), and the C++ RAII wrapper's example. Needs `cargo build --release` first
//! (scripts/test.sh does it): cargo does not refresh libgpo.so for `cargo test`.

mod common;

use common::{real_model, scratch, tiny_model};
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn newest(dir: &Path) -> std::time::SystemTime {
    let mut t = std::time::SystemTime::UNIX_EPOCH;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let m = if e.path().is_dir() { newest(&e.path()) } else { e.metadata().unwrap().modified().unwrap() };
        t = t.max(m);
    }
    t
}

/// target/<profile>, holding a libgpo.so no older than the sources.
fn lib_dir() -> PathBuf {
    let dir = std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().to_path_buf();
    let so = dir.join("libgpo.so");
    let built = std::fs::metadata(&so)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| panic!("{} missing: run `cargo build --release` first", so.display()));
    assert!(
        built >= newest(&root().join("src")),
        "{} is older than the sources: run `cargo build --release` first (scripts/test.sh does)",
        so.display()
    );
    dir
}

fn compile(compiler: &str, src: &str, out: &Path, extra: &[&str]) {
    let lib = lib_dir();
    let st = Command::new(compiler)
        .args(["-Wall", "-Wextra", "-Werror", "-g"])
        .args(extra)
        .arg(root().join(src))
        .arg("-I")
        .arg(root().join("include"))
        .arg("-I")
        .arg(root().join("bindings/cpp"))
        .arg("-L")
        .arg(&lib)
        .args(["-lgpo", "-lm", "-lpthread", "-o"])
        .arg(out)
        .status()
        .unwrap_or_else(|e| panic!("{compiler}: {e}"));
    assert!(st.success(), "{compiler} failed on {src}");
}

fn run(exe: &Path, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out =
        Command::new(exe).args(args).env("LD_LIBRARY_PATH", lib_dir()).envs(env.iter().copied()).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn c_example_runs_a_gpo_iteration_on_the_real_model() {
    let exe = scratch("gpo_demo");
    compile("cc", "examples/c/gpo_demo.c", &exe, &["-std=c11"]);
    let dir = scratch("c-demo");
    std::fs::create_dir_all(&dir).unwrap();
    let (ok, stdout, stderr) = run(&exe, &[real_model().to_str().unwrap(), dir.to_str().unwrap()], &[]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(
        stdout.contains("critical step")
            && stdout.contains("sample after training carries version 1")
            && stdout.ends_with("ok\n"),
        "{stdout}"
    );
}

/// A two-iteration run configuration on the tiny model, written into `dir`.
fn tiny_run_config(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = dir.join("run.toml");
    std::fs::write(
        &cfg,
        format!(
            "mode = \"gpo\"\niterations = 2\noutput = \"{}\"\nmodel = \"{}\"\n[tasks]\ntrain_count = 8\neval_count = 2\n[rollout]\nprompts = 1\ngroup_size = 3\nmax_tokens = 12\n[value]\nrollouts = 2\n[verifier]\nkind = \"regex\"\npattern = \"x\"\n[train]\nrank = 2\nalpha = 4.0\n[eval]\nmax_tokens = 4\n[engine]\nparallel = 4\nctx_per_sequence = 128\n",
            dir.join("out").display(),
            tiny_model("llama").display()
        ),
    )
    .unwrap();
    cfg
}

#[test]
fn c_run_driver_runs_and_resumes_a_whole_run() {
    let exe = scratch("gpo_run");
    compile("cc", "examples/c/gpo_run.c", &exe, &["-std=c11"]);
    let cfg = tiny_run_config(&scratch("c-run-driver"));
    let (ok, stdout, stderr) = run(&exe, &[cfg.to_str().unwrap()], &[]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(
        stdout.contains("iteration 1/2: reward")
            && stdout.contains("iteration 2/2: reward")
            && stdout.ends_with("done\n"),
        "{stdout}"
    );
    // Finished runs resume to completion without repeating an iteration.
    let (ok, stdout, stderr) = run(&exe, &[cfg.to_str().unwrap()], &[]);
    assert!(ok && stdout == "done\n", "{stdout}\n{stderr}");
    let (ok, _, stderr) = run(&exe, &["/nonexistent/run.toml"], &[]);
    assert!(!ok && stderr.contains("gpo_run_new"), "{stderr}");
}

#[test]
fn c_abi_is_safe_under_address_sanitizer() {
    let exe = scratch("abi_test_asan");
    compile("cc", "tests/c/abi_test.c", &exe, &["-std=c11", "-fsanitize=address", "-fno-omit-frame-pointer"]);
    let dir = scratch("c-abi-run");
    let cfg = tiny_run_config(&dir);
    let (ok, stdout, stderr) = run(
        &exe,
        &[tiny_model("llama").to_str().unwrap(), cfg.to_str().unwrap(), dir.to_str().unwrap()],
        &[("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0:halt_on_error=1")],
    );
    assert!(!stderr.contains("AddressSanitizer") && !stderr.contains("LeakSanitizer"), "{stderr}");
    assert!(ok && stdout.contains("ok"), "{stdout}\n{stderr}");
}

#[test]
fn cpp_wrapper_example_runs() {
    let exe = scratch("cpp_example");
    compile("c++", "bindings/cpp/example.cpp", &exe, &["-std=c++17"]);
    let adapter = scratch("cpp_adapter.gguf");
    let (ok, stdout, stderr) = run(&exe, &[tiny_model("llama").to_str().unwrap(), adapter.to_str().unwrap()], &[]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(
        stdout.contains("adapter version 1") && stdout.contains("caught: invalid argument") && stdout.ends_with("ok\n"),
        "{stdout}"
    );
}
