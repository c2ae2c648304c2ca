//! The machine's real f32 GEMM peak, the denominator of every MFU this crate reports.
//!
//! Three candidates, each at the shapes of square products (512³, 1024³, 2048³) and of the
//! training step's projections (`[2048 tokens × 256] · [256 × N]`, N = 1024, 2048, 4096), all
//! threads of the current rayon pool:
//! - Burn's `matmul` on Flex (what the model's GEMMs run through),
//! - the `gemm` crate called directly (what Burn's Flex backend calls; the gap to Burn shows
//!   what Burn's matmul path costs),
//! - PyTorch's `torch.matmul`, when a Python with torch is available (`ZAMBA_TORCH_PYTHON`, else
//!   `python3`), run as a child process with the same thread count.
//!
//! The peak is the best of all of them: an MFU is never reported against a peak that a faster
//! library on the same machine beats.

use std::process::Command;
use std::time::Instant;

use burn::tensor::{DType, Device, Distribution, Tensor};

/// `(m, k, n)` of a matrix product.
pub type GemmShape = (usize, usize, usize);

/// `(m, k, n)` of the products `bench peak` measures.
pub const PEAK_SHAPES: [GemmShape; 6] = [
    (512, 512, 512),
    (1024, 1024, 1024),
    (2048, 2048, 2048),
    (2048, 256, 1024),
    (2048, 256, 2048),
    (2048, 256, 4096),
];

/// The products the trainer measures at start for its `mfu` column: the training step's largest
/// projection shape and a square one, so that the measurement takes well under a second.
pub const TRAINER_PEAK_SHAPES: [GemmShape; 2] = [(2048, 256, 4096), (1024, 1024, 1024)];

/// Environment variable naming the Python interpreter that has torch.
pub const TORCH_PYTHON_ENV: &str = "ZAMBA_TORCH_PYTHON";

/// One library's GFLOP/s at each of [`PEAK_SHAPES`].
#[derive(Debug, Clone, PartialEq)]
pub struct GemmMeasurement {
    pub library: String,
    pub gflops: Vec<f64>,
}

impl GemmMeasurement {
    pub fn best(&self) -> f64 {
        self.gflops.iter().cloned().fold(0.0, f64::max)
    }
}

/// The measured candidates and the peak taken from them.
#[derive(Debug, Clone, PartialEq)]
pub struct PeakReport {
    pub threads: usize,
    pub shapes: Vec<GemmShape>,
    pub burn: GemmMeasurement,
    pub gemm: GemmMeasurement,
    /// `Err` says why torch was not measured.
    pub torch: Result<GemmMeasurement, String>,
}

impl PeakReport {
    /// The fastest of the candidates: `(library, GFLOP/s)`.
    pub fn best(&self) -> (&str, f64) {
        let mut best = (self.burn.library.as_str(), self.burn.best());
        for m in [Some(&self.gemm), self.torch.as_ref().ok()]
            .into_iter()
            .flatten()
        {
            if m.best() > best.1 {
                best = (m.library.as_str(), m.best());
            }
        }
        best
    }

    /// The peak in GFLOP/s (see [`PeakReport::best`]).
    pub fn peak_gflops(&self) -> f64 {
        self.best().1
    }

    /// A table of every candidate at every shape, and the chosen peak.
    pub fn render(&self) -> String {
        let mut out = format!("f32 GEMM peak, {} threads (GFLOP/s):\n", self.threads);
        out += &format!("  {:<34}", "m×k×n");
        for (m, k, n) in &self.shapes {
            out += &format!("{:>16}", format!("{m}×{k}×{n}"));
        }
        out += "      best\n";
        let rows = [Some(&self.burn), Some(&self.gemm), self.torch.as_ref().ok()];
        for m in rows.into_iter().flatten() {
            out += &format!("  {:<34}", m.library);
            for g in &m.gflops {
                out += &format!("{g:>16.1}");
            }
            out += &format!("{:>10.1}\n", m.best());
        }
        if let Err(why) = &self.torch {
            out += &format!("  {:<34}not measured: {why}\n", "torch.matmul");
        }
        let (library, peak) = self.best();
        out += &format!("  peak used for MFU: {peak:.1} GFLOP/s ({library})\n");
        out
    }
}

/// Measures every candidate at `shapes` with the current rayon pool's threads (`with_torch`:
/// also try PyTorch in a child process; a second or two more). At [`PEAK_SHAPES`], about 2–5 s
/// on a 2-core machine.
pub fn measure_f32_peak(shapes: &[GemmShape], with_torch: bool) -> PeakReport {
    let threads = rayon::current_num_threads();
    PeakReport {
        threads,
        shapes: shapes.to_vec(),
        burn: measure_burn(shapes),
        gemm: measure_gemm_crate(shapes),
        torch: match with_torch {
            true => measure_torch(threads, shapes, "cpu", "f32"),
            false => Err("not requested".into()),
        },
    }
}

/// Repetitions so that one measurement takes ~0.1-0.3 s at ~100 GFLOP/s; best of them.
fn repetitions(m: usize, k: usize, n: usize) -> usize {
    (2e10 / (2.0 * (m * k * n) as f64)).clamp(3.0, 50.0) as usize
}

fn best_gflops(m: usize, k: usize, n: usize, mut run: impl FnMut()) -> f64 {
    run();
    let flops = 2.0 * (m * k * n) as f64;
    (0..repetitions(m, k, n))
        .map(|_| {
            let t = Instant::now();
            run();
            flops / t.elapsed().as_secs_f64() / 1e9
        })
        .fold(0.0, f64::max)
}

fn measure_burn(shapes: &[GemmShape]) -> GemmMeasurement {
    let device = Device::flex();
    let gflops = shapes
        .iter()
        .map(|&(m, k, n)| {
            let a = Tensor::<2>::random([m, k], Distribution::Default, &device);
            let b = Tensor::<2>::random([k, n], Distribution::Default, &device);
            best_gflops(m, k, n, || {
                let c = a.clone().matmul(b.clone());
                std::hint::black_box(c);
            })
        })
        .collect();
    GemmMeasurement {
        library: "burn matmul (Flex → gemm)".into(),
        gflops,
    }
}

fn measure_gemm_crate(shapes: &[GemmShape]) -> GemmMeasurement {
    let gflops = shapes
        .iter()
        .map(|&(m, k, n)| {
            let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
            let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
            let mut c = vec![0f32; m * n];
            best_gflops(m, k, n, || {
                // SAFETY: row-major m×k, k×n and m×n buffers of exactly those sizes.
                unsafe {
                    gemm::gemm(
                        m,
                        n,
                        k,
                        c.as_mut_ptr(),
                        1,
                        n as isize,
                        false,
                        a.as_ptr(),
                        1,
                        k as isize,
                        b.as_ptr(),
                        1,
                        n as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::Rayon(0),
                    )
                };
                std::hint::black_box(&mut c);
            })
        })
        .collect();
    GemmMeasurement {
        library: "gemm crate, called directly".into(),
        gflops,
    }
}

/// GFLOP/s of a `size × size × size` product through the model's GEMM path
/// (`zamba_kernels::linear`: Burn's matmul on the CubeCL backends, the direct GEMMs on Flex) on
/// `device` with `dtype` operands: best of several products, each timed with the device
/// synchronised before and after.
pub fn measure_linear(device: &Device, dtype: DType, size: usize) -> Result<f64, String> {
    let operand = |seed| {
        device.seed(seed);
        Tensor::<2>::random([size, size], Distribution::Default, device).cast(dtype)
    };
    let (a, b) = (operand(1), operand(2));
    let sync = || device.sync().map_err(|e| format!("device error: {e:?}"));
    let mut failure = None;
    let gflops = best_gflops(size, size, size, || {
        let c = zamba_kernels::linear(a.clone(), b.clone());
        if let Err(e) = sync() {
            failure = Some(e);
        }
        std::hint::black_box(c);
    });
    match failure {
        Some(e) => Err(e),
        None => Ok(gflops),
    }
}

/// The Python side of the torch measurement: prints one JSON list of GFLOP/s.
const TORCH_SCRIPT: &str = include_str!("../../../scripts/bench_torch_matmul.py");

/// torch.matmul at `shapes` on torch's `device` ("cpu", "cuda") in `dtype` ("f32", "bf16"), in a
/// child Python (`ZAMBA_TORCH_PYTHON`, else `python3`); `Err` says why it could not be measured.
pub fn measure_torch(
    threads: usize,
    shapes: &[GemmShape],
    device: &str,
    dtype: &str,
) -> Result<GemmMeasurement, String> {
    let python = std::env::var(TORCH_PYTHON_ENV).unwrap_or_else(|_| "python3".into());
    measure_torch_in(&python, threads, shapes, device, dtype)
}

/// [`measure_torch`] in the Python interpreter `python`.
fn measure_torch_in(
    python: &str,
    threads: usize,
    shapes: &[GemmShape],
    device: &str,
    dtype: &str,
) -> Result<GemmMeasurement, String> {
    let shape_args: Vec<String> = shapes
        .iter()
        .map(|(m, k, n)| format!("{m}x{k}x{n}"))
        .collect();
    let output = Command::new(python)
        .arg("-c")
        .arg(TORCH_SCRIPT)
        .arg("--threads")
        .arg(threads.to_string())
        .args(["--device", device, "--dtype", dtype])
        .arg("--shapes")
        .args(&shape_args)
        .output()
        .map_err(|e| format!("could not run {python} ({e}); set {TORCH_PYTHON_ENV}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr.lines().last().unwrap_or("").trim().to_string();
        return Err(format!(
            "{python} failed ({last}); set {TORCH_PYTHON_ENV} to a Python with torch"
        ));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let parsed: serde_json::Value = serde_json::from_str(stdout.trim())
        .map_err(|e| format!("unexpected output from the torch script ({e}): {stdout}"))?;
    let gflops: Vec<f64> = parsed["gflops"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_f64()).collect())
        .unwrap_or_default();
    if gflops.len() != shapes.len() {
        return Err(format!("unexpected output from the torch script: {stdout}"));
    }
    let version = parsed["torch"].as_str().unwrap_or("?");
    Ok(GemmMeasurement {
        library: format!("torch.matmul (torch {version}, {device}, {dtype})"),
        gflops,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measurement(library: &str, gflops: &[f64]) -> GemmMeasurement {
        GemmMeasurement {
            library: library.into(),
            gflops: gflops.to_vec(),
        }
    }

    #[test]
    fn the_peak_is_the_fastest_library_at_its_best_shape() {
        let mut report = PeakReport {
            threads: 2,
            shapes: vec![(1, 1, 1), (2, 2, 2)],
            burn: measurement("burn", &[100.0, 140.0]),
            gemm: measurement("gemm", &[120.0, 280.0]),
            torch: Err("absent".into()),
        };
        assert_eq!(report.best(), ("gemm", 280.0));
        assert!(report.render().contains("not measured: absent"));
        report.torch = Ok(measurement("torch", &[300.0, 10.0]));
        assert_eq!(report.best(), ("torch", 300.0));
        assert_eq!(report.peak_gflops(), 300.0);
    }

    #[test]
    fn a_missing_python_is_reported_not_fatal() {
        let err = measure_torch_in("/nonexistent/python", 1, &PEAK_SHAPES, "cpu", "f32");
        let err = err.unwrap_err();
        assert!(err.contains("/nonexistent/python"), "{err}");
        assert!(err.contains(TORCH_PYTHON_ENV), "{err}");
    }
}
