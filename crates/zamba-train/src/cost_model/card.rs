//! GPUs by their datasheet figures: the one table the cost model and the GPU check's report
//! (`bench report`) read.

use std::fmt;
use std::str::FromStr;

/// One GPU's datasheet figures.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Card {
    /// The `--card` name, e.g. `h100-sxm`.
    pub id: &'static str,
    /// The part of the name `nvidia-smi` prints that identifies the card (the table is searched
    /// in order and the first match wins, so the more specific parts come first).
    pub smi_part: &'static str,
    /// Dense (no sparsity) bf16 tensor-core TFLOP/s; TF32 is half of it on every card listed.
    pub bf16_tflops: f64,
    /// FP32 TFLOP/s of the CUDA cores (no tensor cores): the ceiling of element-wise arithmetic.
    pub f32_tflops: f64,
    /// HBM bandwidth, TB/s (10¹² bytes per second, read + written).
    pub hbm_tbs: f64,
    /// Streaming multiprocessors.
    pub sms: u32,
}

/// NVIDIA's datasheets. GH200 is its 96 GB HBM3 version (4 TB/s; the 144 GB HBM3e one has 4.9).
/// A100 without a memory size is the 40 GB card (1.555 TB/s, SXM4 and PCIe alike).
pub const CARDS: [Card; 10] = [
    card("h100-pcie", "H100 PCIe", 756.0, 51.2, 2.0, 114),
    card("h100-nvl", "H100 NVL", 835.0, 60.0, 3.9, 132),
    card("h200-nvl", "H200 NVL", 835.0, 60.0, 4.8, 132),
    card("gh200", "GH200", 989.4, 67.0, 4.0, 132),
    card("h100-sxm", "H100", 989.4, 67.0, 3.35, 132), // SXM: "NVIDIA H100 80GB HBM3"
    card("h200", "H200", 989.4, 67.0, 4.8, 132),      // SXM: "NVIDIA H200"
    card("a100-80gb-sxm", "A100-SXM4-80GB", 312.0, 19.5, 2.039, 108),
    card("a100-80gb-pcie", "A100 80GB PCIe", 312.0, 19.5, 1.935, 108),
    card("a100-40gb", "A100", 312.0, 19.5, 1.555, 108),
    card("l40s", "L40S", 362.0, 91.6, 0.864, 142),
];

const fn card(
    id: &'static str,
    smi_part: &'static str,
    bf16_tflops: f64,
    f32_tflops: f64,
    hbm_tbs: f64,
    sms: u32,
) -> Card {
    Card {
        id,
        smi_part,
        bf16_tflops,
        f32_tflops,
        hbm_tbs,
        sms,
    }
}

impl Card {
    /// The card whose `nvidia-smi` name `gpu` is (e.g. "NVIDIA H100 80GB HBM3"; case ignored).
    pub fn from_smi_name(gpu: &str) -> Option<Card> {
        let gpu = gpu.to_ascii_uppercase();
        CARDS
            .into_iter()
            .find(|c| gpu.contains(&c.smi_part.to_ascii_uppercase()))
    }

    /// Dense bf16 tensor-core peak, FLOP/s.
    pub fn bf16_flops(&self) -> f64 {
        self.bf16_tflops * 1e12
    }

    /// Tensor-core peak for operands in `precision`, FLOP/s: f32 products run as TF32.
    pub fn tensor_flops(&self, precision: zamba_model::Precision) -> f64 {
        match precision {
            zamba_model::Precision::Bf16 => self.bf16_flops(),
            zamba_model::Precision::Fp32 => self.bf16_flops() / 2.0,
        }
    }

    /// CUDA-core f32 peak, FLOP/s.
    pub fn vector_flops(&self) -> f64 {
        self.f32_tflops * 1e12
    }

    /// HBM bandwidth, bytes/s.
    pub fn bandwidth(&self) -> f64 {
        self.hbm_tbs * 1e12
    }
}

impl fmt::Display for Card {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} TFLOP/s dense bf16, {} TFLOP/s f32 (CUDA cores), {} TB/s HBM, {} SMs",
            self.id, self.bf16_tflops, self.f32_tflops, self.hbm_tbs, self.sms
        )
    }
}

/// A `--card` value: an id of [`CARDS`] or the name `nvidia-smi` prints.
impl FromStr for Card {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let wanted = s.trim().to_ascii_lowercase();
        CARDS
            .into_iter()
            .find(|c| c.id == wanted)
            .or_else(|| Card::from_smi_name(s))
            .ok_or_else(|| {
                let ids: Vec<&str> = CARDS.iter().map(|c| c.id).collect();
                format!(
                    "unknown card {s:?}: expected one of {} or a name as nvidia-smi prints it \
                     (e.g. \"NVIDIA H100 80GB HBM3\")",
                    ids.join(", ")
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smi(name: &str) -> Option<&'static str> {
        Card::from_smi_name(name).map(|c| c.id)
    }

    #[test]
    fn names_nvidia_smi_prints_find_their_card() {
        assert_eq!(smi("NVIDIA H100 80GB HBM3"), Some("h100-sxm"));
        assert_eq!(smi("NVIDIA H100 PCIe"), Some("h100-pcie"));
        assert_eq!(smi("NVIDIA H100 NVL"), Some("h100-nvl"));
        assert_eq!(smi("NVIDIA H200"), Some("h200"));
        assert_eq!(smi("NVIDIA H200 NVL"), Some("h200-nvl"));
        assert_eq!(smi("NVIDIA GH200 480GB"), Some("gh200"));
        assert_eq!(smi("NVIDIA A100-SXM4-80GB"), Some("a100-80gb-sxm"));
        assert_eq!(smi("NVIDIA A100 80GB PCIe"), Some("a100-80gb-pcie"));
        assert_eq!(smi("NVIDIA A100-PCIE-40GB"), Some("a100-40gb"));
        assert_eq!(smi("none"), None);
        let h100 = Card::from_smi_name("NVIDIA H100 80GB HBM3").unwrap();
        assert_eq!(h100.bf16_flops(), 989.4e12);
        assert_eq!(h100.tensor_flops(zamba_model::Precision::Fp32), 494.7e12);
        assert_eq!(h100.bandwidth(), 3.35e12);
    }

    #[test]
    fn card_values_are_ids_or_smi_names_and_bad_ones_list_the_ids() {
        assert_eq!("h100-sxm".parse::<Card>().unwrap().id, "h100-sxm");
        assert_eq!("H200".parse::<Card>().unwrap().id, "h200");
        assert_eq!("NVIDIA H100 PCIe".parse::<Card>().unwrap().id, "h100-pcie");
        let e = "rtx-4090".parse::<Card>().unwrap_err();
        assert!(
            e.contains("\"rtx-4090\"") && e.contains("h100-sxm, "),
            "{e}"
        );
        let ids: std::collections::HashSet<&str> = CARDS.iter().map(|c| c.id).collect();
        assert_eq!(ids.len(), CARDS.len(), "ids are distinct");
    }
}
