//! One decode step of one attention layer (one query token per sequence over L cached tokens):
//! the uncompressed baseline (grouped attention over full K/V, what the stock cache feeds)
//! against Palu's candle-op path (rebuild K with RoPE, values in latent space) and the decode
//! op (its CPU twin here; with `--features cuda` on a GPU, the fused kernel), all in one run.
//!
//!   cargo bench -p palu-plugin --bench decode                    # CPU, f32
//!   cargo bench -p palu-plugin --bench decode --features cuda    # adds the GPU rows (f16)
use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use palu::decode_op::LatentDecode;
use palu::lowrank::LowRankProj;
use palu::model::{grouped_attention, latent_attention, Rope};

struct Shape {
    name: &'static str,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// KV heads per low-rank group and rank per group (Palu-50 %: half of g·head_dim).
    g: usize,
    rank: usize,
}

const SHAPES: [Shape; 2] = [
    Shape {
        name: "smollm2-135m g3",
        heads: 9,
        kv_heads: 3,
        head_dim: 64,
        g: 3,
        rank: 96,
    },
    Shape {
        name: "llama3-8b g1",
        heads: 32,
        kv_heads: 8,
        head_dim: 128,
        g: 1,
        rank: 64,
    },
];

fn rope(s: &Shape, dev: &Device) -> Rope {
    let cfg = palu::config::ModelConfig::from_json_str(
        &format!(
            r#"{{"model_type":"llama","hidden_size":{},"intermediate_size":64,"num_hidden_layers":1,
                "num_attention_heads":{},"num_key_value_heads":{},"vocab_size":32,"rms_norm_eps":1e-5,
                "max_position_embeddings":131072,"rope_theta":500000.0}}"#,
            s.heads * s.head_dim,
            s.heads,
            s.kv_heads
        ),
        std::path::Path::new("bench-config.json"),
    )
    .expect("bench config");
    Rope::new(&cfg, dev)
}

fn randn(shape: &[usize], dtype: DType, dev: &Device) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, dev)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// A random Palu-50 % K or V projection of the shape: groups of `g` KV heads at rank `rank`.
fn projection(s: &Shape, dtype: DType, dev: &Device) -> LowRankProj {
    let groups = s.kv_heads / s.g;
    let ups = (0..groups)
        .map(|_| randn(&[s.g * s.head_dim, s.rank], dtype, dev))
        .collect();
    let down = randn(&[groups * s.rank, s.heads * s.head_dim], dtype, dev);
    LowRankProj::new(down, ups, None).unwrap()
}

fn bench_device(c: &mut Criterion, dev: &Device, dtype: DType, label: &str) {
    let mut group = c.benchmark_group(format!("decode step, one layer, {label}"));
    group.sample_size(10);
    for s in &SHAPES {
        let rope = rope(s, dev);
        let groups = s.kv_heads / s.g;
        let rand = |shape: &[usize]| randn(shape, dtype, dev);
        let (kp, vp) = (projection(s, dtype, dev), projection(s, dtype, dev));
        let op =
            LatentDecode::from_projections(&kp, &vp, s.heads, s.kv_heads, rope.inv_freq(), dtype)
                .unwrap()
                .expect("uniform ranks");
        for len in [1024usize, 4096] {
            let b = 1;
            let q = rand(&[b, s.heads, 1, s.head_dim]);
            let k = rand(&[b, s.kv_heads, len, s.head_dim]);
            let v = rand(&[b, s.kv_heads, len, s.head_dim]);
            let hk = rand(&[b, len, groups * s.rank]);
            let hv = rand(&[b, len, groups * s.rank]);
            let id = |what: &str| BenchmarkId::new(format!("{} {what}", s.name), len);
            let sync = |t: Tensor| {
                dev.synchronize().unwrap();
                t
            };
            group.bench_function(id("dense K/V (baseline)"), |bch| {
                bch.iter(|| sync(grouped_attention(&q, &k, &v, len - 1, None, false).unwrap()))
            });
            group.bench_function(id("palu candle ops"), |bch| {
                bch.iter(|| {
                    sync(
                        latent_attention(
                            &q,
                            &hk,
                            &hv,
                            &kp,
                            &vp,
                            s.kv_heads,
                            &rope,
                            len - 1,
                            None,
                            false,
                        )
                        .unwrap(),
                    )
                })
            });
            let op = op.with_lens(vec![len; b]);
            let q3 = q.squeeze(2).unwrap().contiguous().unwrap();
            group.bench_function(
                id(if dev.is_cpu() {
                    "palu op (CPU twin)"
                } else {
                    "palu op (fused kernel)"
                }),
                |bch| bch.iter(|| sync(op.forward(&q3, &hk, &hv).unwrap())),
            );
        }
    }
    group.finish();
}

/// Unpacking one layer's 4-bit key cache (Llama-3-8B, g = 1, Palu-50 %: 8 groups × rank 64 per
/// token) for 8 sequences: the CPU codec; on a GPU the device-to-host round trip through it
/// (what packed latents cost on CUDA before the codec kernels) against the unpack kernel.
fn unpack(c: &mut Criterion) {
    use palu::latent_codec::LatentCodec;
    use palu::quant::ZeroPoint;
    let codec = LatentCodec::new(4, &[64; 8], ZeroPoint::Free).expect("codec");
    let mut group = c.benchmark_group("unpack 4-bit latents, llama3-8b g1 K cache, batch 8");
    group.sample_size(10);
    for l in [4096usize, 16384] {
        let h = Tensor::randn(0f32, 1.0, (8, l, codec.width()), &Device::Cpu).expect("latents");
        let rows = codec.encode(&h).expect("encode");
        if l == 4096 {
            group.bench_function(BenchmarkId::new("CPU codec", l), |bch| {
                bch.iter(|| codec.decode(&rows, DType::F32).expect("decode"))
            });
        }
        #[cfg(feature = "cuda")]
        if let Ok(gpu) = Device::new_cuda(0) {
            let on_gpu = rows.to_device(&gpu).expect("upload");
            let sync = |t: Tensor| {
                gpu.synchronize().expect("sync");
                t
            };
            group.bench_function(BenchmarkId::new("GPU via host round trip", l), |bch| {
                bch.iter(|| {
                    let host = on_gpu.to_device(&Device::Cpu).expect("download");
                    sync(
                        codec
                            .decode(&host, DType::F32)
                            .expect("decode")
                            .to_device(&gpu)
                            .expect("upload"),
                    )
                })
            });
            group.bench_function(BenchmarkId::new("GPU unpack kernel", l), |bch| {
                bch.iter(|| sync(codec.decode(&on_gpu, DType::F16).expect("decode")))
            });
        }
    }
    group.finish();
}

/// The planner's executors at a serving shape (Llama-3-8B attention, g = 1, Palu-50 %, batch 8,
/// 16K tokens): latent keys on the fused kernel with unfused or fused values, and a full-key
/// layer on candle ops (q·Kᵀ over the cached post-RoPE K, then the latent values). The full-key
/// row calibrates the cost model's `full_keys_tbps` (docs/kernels.md, "Planner").
#[cfg(feature = "cuda")]
fn planner_executors(c: &mut Criterion, dev: &Device) {
    use palu::model::{attention_probs, latent_values};
    let s = &SHAPES[1];
    let (b, len, dtype) = (8usize, 16384usize, DType::F16);
    let rope = rope(s, dev);
    let groups = s.kv_heads / s.g;
    let rand = |shape: &[usize]| randn(shape, dtype, dev);
    let (kp, vp) = (projection(s, dtype, dev), projection(s, dtype, dev));
    let op = LatentDecode::from_projections(&kp, &vp, s.heads, s.kv_heads, rope.inv_freq(), dtype)
        .unwrap()
        .expect("uniform ranks")
        .with_lens(vec![len; b]);
    let q = rand(&[b, s.heads, s.head_dim]);
    let hk = rand(&[b, len, groups * s.rank]);
    let hv = rand(&[b, len, groups * s.rank]);
    let k_full = rand(&[b, s.kv_heads, len, s.head_dim]);
    let sync = |t: Tensor| {
        dev.synchronize().unwrap();
        t
    };
    let mut group =
        c.benchmark_group("decode step, planner executors, GPU f16, llama3-8b g1 r64, batch 8");
    group.sample_size(10);
    let id = |what: &str| BenchmarkId::new(what, len);
    group.bench_function(id("latent keys, unfused values (fused kernel)"), |bch| {
        bch.iter(|| sync(op.forward(&q, &hk, &hv).unwrap()))
    });
    let fused = op.clone().with_latent_out();
    group.bench_function(
        id("latent keys, fused values (kernel, latent out)"),
        |bch| bch.iter(|| sync(fused.forward(&q, &hk, &hv).unwrap())),
    );
    // The engine's paged blocks (block 32, a shuffled table): the same kernel through block
    // tables, with the op's per-call host work (lens, table checks) included.
    let bs = 32usize;
    let per = len / bs;
    let pool = |h: &Tensor| {
        h.reshape((b * per, bs, groups * s.rank / 8, 8))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .unsqueeze(1)
            .unwrap()
    };
    let (pool_k, pool_v) = (pool(&hk), pool(&hv));
    let mut ids: Vec<u32> = (0..(b * per) as u32).collect();
    // A fixed permutation (a multiplicative step coprime with the block count).
    let n = ids.len() as u64;
    for (i, x) in ids.iter_mut().enumerate() {
        *x = ((i as u64 * 7919 + 13) % n) as u32;
    }
    let tables = Tensor::from_vec(ids, (b, per), dev).unwrap();
    let paged = op.with_pages(tables, bs);
    group.bench_function(
        id("latent keys, unfused values, paged blocks of 32"),
        |bch| bch.iter(|| sync(paged.forward(&q, &pool_k, &pool_v).unwrap())),
    );
    let q4 = q.unsqueeze(2).unwrap();
    group.bench_function(id("full keys (candle ops), unfused values"), |bch| {
        bch.iter(|| {
            let probs = attention_probs(&q4, &k_full, len - 1, None, false).unwrap();
            sync(latent_values(&probs, &hv, &vp, s.kv_heads, s.heads, s.head_dim).unwrap())
        })
    });
    group.finish();
}

/// Writing new tokens' 4-bit key latents (Llama-3-8B: d = 4096, g = 1, 8 groups of rank 64):
/// the GEMM then the encode kernel, against the fused projection + quantization kernel, for a
/// decode step of 8 sequences and a 4096-token prefill.
#[cfg(feature = "cuda")]
fn latent_write(c: &mut Criterion, dev: &Device) {
    use palu::latent_codec::LatentCodec;
    use palu::quant::ZeroPoint;
    let codec = LatentCodec::new(4, &[64; 8], ZeroPoint::Free).expect("codec");
    let down = Tensor::randn(0f32, 0.02, (512, 4096), dev)
        .and_then(|t| t.to_dtype(DType::F16))
        .expect("down factor");
    let mut group = c.benchmark_group("latent write, GPU f16, llama3-8b K g1 r64, 4-bit");
    group.sample_size(10);
    for n in [1usize, 8, 32, 4096] {
        let x = Tensor::randn(0f32, 1.0, (n, 4096), dev)
            .and_then(|t| t.to_dtype(DType::F16))
            .expect("x");
        let sync = |t: Tensor| {
            dev.synchronize().expect("sync");
            t
        };
        group.bench_function(BenchmarkId::new("GPU GEMM + encode kernel", n), |bch| {
            bch.iter(|| {
                let h = palu::lowrank::linear(&x, &down, None).expect("gemm");
                sync(codec.encode(&h).expect("encode"))
            })
        });
        group.bench_function(BenchmarkId::new("GPU fused write kernel", n), |bch| {
            bch.iter(|| sync(codec.project_encode_op(&x, &down).expect("fused")))
        });
    }
    group.finish();
}

fn decode(c: &mut Criterion) {
    bench_device(c, &Device::Cpu, DType::F32, "CPU f32");
    #[cfg(feature = "cuda")]
    if let Ok(gpu) = Device::new_cuda(0) {
        bench_device(c, &gpu, DType::F16, "GPU f16");
        planner_executors(c, &gpu);
        latent_write(c, &gpu);
    }
    unpack(c);
}

criterion_group!(benches, decode);
criterion_main!(benches);
