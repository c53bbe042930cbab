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

#[test]
fn header_exports_only_gpo_names() {
    // Every macro, type and function carries the gpo prefix: nothing from the Rust side leaks
    // into a C program's namespace.
    for line in FRESH.lines() {
        let name = if let Some(rest) = line.strip_prefix("#define ") {
            rest.split_whitespace().next()
        } else if let Some(rest) = line.strip_prefix("typedef ") {
            rest.split(['(', '{', ' ']).find(|w| w.starts_with("Gpo") || w.starts_with('*')).or(Some(rest))
        } else {
            None
        };
        if let Some(name) = name {
            let name = name.trim_start_matches('*');
            assert!(
                name.starts_with("GPO_") || name.starts_with("Gpo") || name == "GPO_H",
                "include/gpo.h exports `{name}` without the gpo prefix: {line}"
            );
        }
    }
    // Function declarations start at column 0 with their return type.
    let declarations =
        FRESH.lines().filter(|l| l.contains('(') && !l.starts_with([' ', '#', '/', '}']) && !l.starts_with("typedef"));
    for line in declarations {
        let ident = line[..line.find('(').unwrap()].rsplit([' ', '*']).next().unwrap_or("");
        assert!(ident.starts_with("gpo_"), "function `{ident}` lacks the gpo_ prefix: {line}");
    }
}
