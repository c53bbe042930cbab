//! The committed C header is what cbindgen generates from the current source, and it compiles.

use std::process::Command;

const FRESH: &str = include_str!(concat!(env!("OUT_DIR"), "/gpo.h"));

#[test]
fn committed_header_matches_a_fresh_generation() {
    let out = Command::new("git")
        .args(["show", "HEAD:include/gpo.h"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("git must be installed to compare the committed header");
    assert!(out.status.success(), "include/gpo.h is not committed: {}", String::from_utf8_lossy(&out.stderr));
    let committed = String::from_utf8(out.stdout).expect("header is UTF-8");
    assert!(committed == FRESH, "include/gpo.h is stale: `cargo build` regenerated it; commit the new header");
}

#[test]
fn header_compiles_as_c_and_cpp() {
    let header = concat!(env!("CARGO_MANIFEST_DIR"), "/include/gpo.h");
    for (compiler, lang) in [("cc", "c"), ("c++", "c++")] {
        let st = Command::new(compiler)
            .args(["-x", lang, "-fsyntax-only", "-Wall", "-Wextra", "-Werror", header])
            .status()
            .unwrap_or_else(|e| panic!("{compiler} not found: {e}"));
        assert!(st.success(), "{compiler} rejected include/gpo.h");
    }
}
