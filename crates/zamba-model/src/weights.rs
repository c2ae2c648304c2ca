//! Where parameters come from. Every parameter is requested by its transformers state-dict name,
//! in transformers' layout, from a [`WeightSource`]: either a fresh initialisation that follows
//! transformers' `_init_weights` ([`RandomInit`]) or a checkpoint ([`crate::hf::HfCheckpoint`]).
//! The model then converts transformers' layout to its own in one place (`model.rs`), so random
//! init and checkpoint loading cannot disagree about layouts.

use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::error::ModelError;

/// A row-major f32 tensor on the host, in transformers' layout.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "HostTensor: {} values do not fill shape {shape:?}",
            data.len()
        );
        Self { shape, data }
    }

    /// Transpose of a 2-D tensor (PyTorch Linear `[out, in]` ↔ Burn Linear `[in, out]`).
    pub fn transposed(&self) -> HostTensor {
        let [rows, cols] = self.shape[..] else {
            panic!(
                "transposed() needs a 2-D tensor, got shape {:?}",
                self.shape
            )
        };
        let mut out = vec![0.0; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                out[c * rows + r] = self.data[r * cols + c];
            }
        }
        HostTensor::new(vec![cols, rows], out)
    }
}

/// transformers' `_init_weights` for each kind of parameter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// N(0, std²): Linear, Conv1d, Embedding weights and `x_proj_weight`.
    Normal {
        std: f64,
    },
    /// Embedding: N(0, std²) with the padding row zeroed.
    Embedding {
        std: f64,
        padding_idx: Option<u32>,
    },
    /// U(−bound, bound): `dt_proj_weight` with bound = dt_rank^-1/2.
    Uniform {
        bound: f64,
    },
    Ones,
    Zeros,
    /// `A_log[..., n] = ln(n + 1)`.
    ALog {
        d_state: usize,
    },
    /// `dt_proj_bias = softplus⁻¹(dt)` with `dt = exp(U[ln min, ln max])` clamped at `floor`.
    DtBias {
        min: f64,
        max: f64,
        floor: f64,
    },
}

/// Supplies parameters by transformers state-dict name.
pub trait WeightSource {
    fn tensor(&mut self, name: &str, shape: &[usize], init: Init)
    -> Result<HostTensor, ModelError>;
}

/// Fresh parameters as transformers initialises them. Each tensor's values depend only on the
/// seed and the tensor's name, not on the order in which tensors are requested.
pub struct RandomInit {
    seed: u64,
}

impl RandomInit {
    pub fn new(seed: u64) -> Self {
        Self { seed }
    }

    fn rng_for(&self, name: &str) -> ChaCha8Rng {
        // FNV-1a: a stable hash (std's hasher is not guaranteed stable across releases).
        let mut h: u64 = 0xcbf29ce484222325;
        for b in name.bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
        ChaCha8Rng::seed_from_u64(self.seed ^ h)
    }
}

impl WeightSource for RandomInit {
    fn tensor(
        &mut self,
        name: &str,
        shape: &[usize],
        init: Init,
    ) -> Result<HostTensor, ModelError> {
        let numel: usize = shape.iter().product();
        let mut rng = self.rng_for(name);
        let data: Vec<f32> = match init {
            Init::Normal { std } => sample_normal(&mut rng, numel, std),
            Init::Embedding { std, padding_idx } => {
                let mut data = sample_normal(&mut rng, numel, std);
                if let Some(pad) = padding_idx {
                    let width = shape[1];
                    let row = pad as usize * width;
                    data[row..row + width].fill(0.0);
                }
                data
            }
            Init::Uniform { bound } => (0..numel)
                .map(|_| rng.random_range(-bound..bound) as f32)
                .collect(),
            Init::Ones => vec![1.0; numel],
            Init::Zeros => vec![0.0; numel],
            Init::ALog { d_state } => (0..numel)
                .map(|i| (((i % d_state) + 1) as f32).ln())
                .collect(),
            Init::DtBias { min, max, floor } => (0..numel)
                .map(|_| {
                    let u: f64 = rng.random();
                    let dt = (u * (max.ln() - min.ln()) + min.ln()).exp().max(floor);
                    // softplus⁻¹(dt) = dt + ln(−expm1(−dt))
                    (dt + (-(-dt).exp_m1()).ln()) as f32
                })
                .collect(),
        };
        Ok(HostTensor::new(shape.to_vec(), data))
    }
}

/// `[batch, len]` token ids drawn uniformly from `0..vocab`, a function of `seed` alone. Unlike
/// `Tensor::random` after `Device::seed`, whose generator is one per process, concurrent callers
/// (ranks as threads, tests run in parallel) cannot interleave their draws.
pub fn random_tokens(
    seed: u64,
    vocab: usize,
    [batch, len]: [usize; 2],
    device: &Device,
) -> Tensor<2, Int> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let ids: Vec<i64> = (0..batch * len)
        .map(|_| rng.random_range(0..vocab as i64))
        .collect();
    Tensor::from_data(TensorData::new(ids, [batch, len]), device)
}

fn sample_normal(rng: &mut ChaCha8Rng, n: usize, std: f64) -> Vec<f32> {
    let normal = Normal::new(0.0, std).expect("initializer std must be finite and >= 0");
    (0..n).map(|_| normal.sample(rng) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_follows_transformers_formulas() {
        let mut src = RandomInit::new(7);
        let a = src
            .tensor("a", &[2, 3, 4], Init::ALog { d_state: 4 })
            .unwrap();
        assert_eq!(&a.data[..4], &[0.0, 2f32.ln(), 3f32.ln(), 4f32.ln()]);
        assert_eq!(&a.data[20..24], &a.data[..4]);

        let dt = src
            .tensor(
                "dt",
                &[4096],
                Init::DtBias {
                    min: 1e-3,
                    max: 0.1,
                    floor: 1e-4,
                },
            )
            .unwrap();
        for &b in &dt.data {
            let softplus = (1.0 + (b as f64).exp()).ln();
            assert!(
                (1e-3 - 1e-9..=0.1 + 1e-9).contains(&softplus),
                "softplus(bias) = {softplus}"
            );
        }

        let w = src
            .tensor("w", &[200, 100], Init::Normal { std: 0.02 })
            .unwrap();
        let mean = w.data.iter().map(|&x| x as f64).sum::<f64>() / 20000.0;
        let var = w
            .data
            .iter()
            .map(|&x| (x as f64 - mean).powi(2))
            .sum::<f64>()
            / 20000.0;
        assert!(
            mean.abs() < 1e-3 && (var.sqrt() - 0.02).abs() < 1e-3,
            "mean {mean} std {}",
            var.sqrt()
        );

        let e = src
            .tensor(
                "e",
                &[5, 3],
                Init::Embedding {
                    std: 0.02,
                    padding_idx: Some(1),
                },
            )
            .unwrap();
        assert_eq!(&e.data[3..6], &[0.0; 3]);
        assert!(e.data[..3].iter().all(|&x| x != 0.0));
    }

    #[test]
    fn values_depend_on_seed_and_name_not_order() {
        let init = Init::Normal { std: 1.0 };
        let mut first = RandomInit::new(1);
        let x1 = first.tensor("x", &[8], init).unwrap();
        let _ = first.tensor("y", &[8], init).unwrap();
        let mut second = RandomInit::new(1);
        let _ = second.tensor("y", &[8], init).unwrap();
        assert_eq!(second.tensor("x", &[8], init).unwrap(), x1);
        assert_ne!(RandomInit::new(2).tensor("x", &[8], init).unwrap(), x1);
    }

    #[test]
    fn transpose_round_trips() {
        let t = HostTensor::new(vec![2, 3], vec![1., 2., 3., 4., 5., 6.]);
        assert_eq!(t.transposed().data, vec![1., 4., 2., 5., 3., 6.]);
        assert_eq!(t.transposed().transposed(), t);
    }

    #[test]
    fn random_tokens_depend_on_the_seed_alone_even_drawn_concurrently() {
        let device = Device::flex();
        let ids = |seed| {
            random_tokens(seed, 50, [3, 40], &device)
                .into_data()
                .convert::<i64>()
                .try_to_vec::<i64>()
                .unwrap()
        };
        let alone: Vec<_> = (0..8).map(ids).collect();
        let concurrent: Vec<_> = std::thread::scope(|s| {
            let threads: Vec<_> = (0..8).map(|seed| s.spawn(move || ids(seed))).collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        });
        assert_eq!(alone, concurrent);
        assert_ne!(alone[0], alone[1]);
        let all: Vec<i64> = alone.concat();
        assert!(all.iter().all(|&t| (0..50).contains(&t)));
        // Uniform over the vocabulary: 960 draws reach every id (P(missing one) < 1e-6).
        assert!((0..50).all(|t| all.contains(&t)));
    }
}
