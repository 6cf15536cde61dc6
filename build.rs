//! Embeds every workflows/*.toml into the binary as (file name, contents) pairs.
use std::fmt::Write;

fn main() {
    println!("cargo:rerun-if-changed=workflows");
    let mut names: Vec<_> = std::fs::read_dir("workflows")
        .expect("workflows/ directory")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().and_then(|x| x.to_str()) == Some("toml"))
        .collect();
    names.sort();
    let mut out = String::from("&[\n");
    for p in names {
        println!("cargo:rerun-if-changed={}", p.display());
        let abs = std::fs::canonicalize(&p).expect("canonical path");
        let file = p.file_name().and_then(|f| f.to_str()).expect("utf-8 file name");
        writeln!(out, "    ({file:?}, include_str!({:?})),", abs.display().to_string()).expect("write");
    }
    out.push(']');
    let dest = std::path::Path::new(&std::env::var("OUT_DIR").expect("OUT_DIR")).join("embedded_workflows.rs");
    std::fs::write(dest, out).expect("write embedded_workflows.rs");
}
