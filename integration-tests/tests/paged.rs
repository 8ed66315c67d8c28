//! The Palu model over the engine's paged KV blocks, driven on the CPU with the inputs the
//! engine's paged scheduler builds (the engine itself has no CPU paged attention; the GPU test
//! in engine_gpu.rs runs the same steps through the CUDA kernel). SmolLM2-135M at Palu-50 %
//! (the shipped allocation), real text; the yardstick is the same model's plain (unpaged)
//! prefill of the whole sequence.
use candle_core::{DType, Device};
use palu_integration_tests::direct::paged_steps_match_the_plain_cache;

#[test]
fn paged_forward_on_cpu_matches_the_plain_cache_16_bit_blocks_of_16() {
    paged_steps_match_the_plain_cache(&Device::Cpu, DType::F32, None, 16, 16, 1e-5, 1.0);
}

#[test]
fn paged_forward_on_cpu_matches_the_plain_cache_4_bit_blocks_of_32() {
    paged_steps_match_the_plain_cache(&Device::Cpu, DType::F32, None, 4, 32, 1e-5, 1.0);
}

/// fp8 blocks (`--pa-cache-type f8e4m3`): 16-bit latents stored as float8 e4m3 without a scale.
/// Against the f32 plain cache the distance is fp8's rounding of the latents; its effect on
/// perplexity is measured in docs/accuracy.md.
#[test]
fn paged_forward_on_cpu_with_fp8_blocks_stays_close_to_the_plain_cache() {
    paged_steps_match_the_plain_cache(
        &Device::Cpu,
        DType::F32,
        Some(DType::F8E4M3),
        16,
        16,
        0.1,
        0.9,
    );
}
