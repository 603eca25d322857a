//! Generates the gRPC code and a file descriptor set (for server reflection).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // A body that does not decode is the client's error: INVALID_ARGUMENT, not INTERNAL.
        .codec_path("crate::codec::StrictProstCodec")
        .file_descriptor_set_path(out.join("indexrelay_descriptor.bin"))
        .compile_protos(
            &[
                "proto/indexrelay/v1/generate.proto",
                "proto/indexrelay/v1/stage.proto",
                "proto/indexrelay/v1/admin.proto",
            ],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
