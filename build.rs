//! Embeds every workflows/*.toml into the binary as (file name, contents) pairs, and compiles
//! proto/tern/v1/*.proto with protox (no protoc needed) into tonic code plus the descriptor set
//! that server reflection serves.
use std::fmt::Write;

fn main() {
    compile_protos();
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

fn compile_protos() {
    println!("cargo:rerun-if-changed=proto");
    let mut files: Vec<_> = std::fs::read_dir("proto/tern/v1")
        .expect("proto/tern/v1 directory")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().and_then(|x| x.to_str()) == Some("proto"))
        .collect();
    files.sort();
    let fds = protox::compile(&files, ["proto"]).unwrap_or_else(|e| panic!("compiling the protos: {e}"));
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let descriptor = out.join("tern_descriptor.bin");
    std::fs::write(&descriptor, prost::Message::encode_to_vec(&fds)).expect("write tern_descriptor.bin");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // A request that does not decode is INVALID_ARGUMENT, not tonic's INTERNAL.
        .codec_path("crate::api::codec::ProstCodec")
        .skip_protoc_run()
        .compile_fds(fds)
        .expect("generating the gRPC code");
}
