//! serve-bench on the CPU: its decode tokens/s divides the tokens every stream decoded by the
//! slowest stream's decode time, so every stream must decode exactly `--gen` tokens. Random
//! weights emit the tokenizer's `</s>` now and then; before the benchmark's tokenizer ended
//! streams with a token the model cannot emit, this configuration stopped streams early.
use std::process::Command;

#[test]
fn every_stream_decodes_exactly_gen_tokens() {
    let work = tempfile::tempdir().unwrap();
    let (streams, gen) = (4, 64);
    let out = Command::new(env!("CARGO_BIN_EXE_serve_bench"))
        .env("PALU_FIXTURES", palu_integration_tests::fixtures())
        .args(["--cpu", "--work"])
        .arg(work.path())
        .args(["--layers", "1", "--context", "64", "--configs", "palu"])
        .args(["--streams", &streams.to_string(), "--gen", &gen.to_string()])
        .output()
        .expect("run serve_bench");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "serve_bench failed:\n{log}");
    // "<server>: prefill P s, decode D s for N tokens (T tok/s), wall W s"
    let counts: Vec<usize> = log
        .lines()
        .filter_map(|l| {
            l.split(" s for ")
                .nth(1)?
                .split(" tokens")
                .next()?
                .parse()
                .ok()
        })
        .collect();
    // Each stream's first token comes from the prefill; the rest are decode steps.
    assert_eq!(counts, vec![streams * (gen - 1)], "{log}");
}
