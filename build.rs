//! Generates the C header with cbindgen into OUT_DIR and `include/gpo.h`. The header is committed;
//! `tests/header.rs` fails when the committed copy differs from this fresh generation.

use std::path::PathBuf;

fn main() {
    let crate_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("manifest dir"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("out dir")).join("gpo.h");
    println!("cargo:rerun-if-changed=src/ffi");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let bindings =
        cbindgen::Builder::new().with_crate(&crate_dir).with_config(config).generate().expect("cbindgen failed");
    bindings.write_to_file(&out);
    let header = crate_dir.join("include").join("gpo.h");
    let fresh = std::fs::read(&out).expect("fresh header");
    if std::fs::read(&header).ok().as_deref() != Some(&fresh[..]) {
        std::fs::create_dir_all(header.parent().unwrap()).expect("include/");
        std::fs::write(&header, &fresh).expect("write include/gpo.h");
    }
}
