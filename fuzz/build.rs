//! The client's reply-envelope parser (`parse_error`, `preview` in `src/client.rs`) is private.
//! Rather than fuzz a copy, this extracts the real source text of those two functions at
//! build time, so the `reply_envelope` target always fuzzes the code the client runs.

use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let client = manifest.join("../src/client.rs");
    println!("cargo:rerun-if-changed={}", client.display());
    let text = std::fs::read_to_string(&client).expect("read ../src/client.rs");
    let start = text
        .find("fn parse_error(")
        .expect("src/client.rs no longer has fn parse_error");
    let end = start
        + text[start..]
            .find("\nfn base_properties")
            .expect("src/client.rs: fn base_properties no longer follows parse_error/preview");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("reply_envelope.rs");
    std::fs::write(&out, &text[start..end]).unwrap();
}
