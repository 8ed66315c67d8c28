//! Compiles the CUDA sources into `libpalu_kernels.a` when the `cuda` feature is on: SASS for
//! the target architecture (`CUDA_COMPUTE_CAP`, default 90a: the H200; 90 is built as 90a) plus compute_80 PTX so
//! that other Ampere-or-newer GPUs can JIT it. Without the feature nothing is compiled; CI checks
//! that the sources compile with `scripts/kernels-check.sh` instead.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    #[cfg(feature = "cuda")]
    cuda::build();
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::path::PathBuf;

    pub fn build() {
        let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
        let arch = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90a".to_string());
        // Hopper: the arch-specific target (sm_90a SASS runs on every sm_90 part, H100/H200),
        // which the experimental wgmma kernels need (PALU_WGMMA; docs/kernels.md).
        let arch = if arch == "90" {
            "90a".to_string()
        } else {
            arch
        };
        let wgmma: &[&str] = if arch == "90a" {
            &["-DPALU_WGMMA"]
        } else {
            &[]
        };
        cudaforge::KernelBuilder::new()
            .source_files([
                "src/palu_decode.cu",
                "src/latent_codec.cu",
                "src/paged_rows.cu",
            ])
            .watch([
                "src/palu_decode.cuh",
                "src/palu_decode_mma.cuh",
                "src/latent_dequant.cuh",
            ])
            .compute_cap_arch(&arch)
            .args([
                "-std=c++17",
                "-O3",
                "-gencode=arch=compute_80,code=compute_80",
            ])
            .args(wgmma)
            .args(["-Xcompiler", "-fPIC"])
            // Cargo reruns this script when a source changes (rerun-if-changed); cudaforge's own
            // object cache missed an edit made during a build, so it is off.
            .no_incremental()
            .build_lib(out.join("libpalu_kernels.a"))
            .unwrap_or_else(|e| {
                panic!("palu-kernels: nvcc failed ({e}); is CUDA 13.0 on PATH? see scripts/nvcc.sh")
            });
        println!("cargo::rustc-link-search=native={}", out.display());
        println!("cargo::rustc-link-lib=static=palu_kernels");
        println!("cargo::rustc-link-lib=dylib=cudart");
        println!("cargo::rustc-link-lib=dylib=stdc++");
    }
}
