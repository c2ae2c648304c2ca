//! The prediction as a table for people and as JSON for scripts (`bench report` reads it back).

use serde_json::{Value, json};

use super::{Bound, Group, Prediction};

impl Bound {
    pub fn name(self) -> &'static str {
        match self {
            Bound::Compute => "compute",
            Bound::Memory => "memory",
            Bound::Launches => "launches",
        }
    }
}

impl Prediction {
    /// The per-op-class table, then the step's time, tokens/s and MFU.
    pub fn table(&self) -> String {
        let f = &self.fractions;
        let mut out = format!("card {}\n", self.card);
        out += &format!(
            "{} kernels; fractions of the peaks reached: GEMM {}, attention {}, element-wise \
             arithmetic {}, memory-bound kernels {}, scan memory {}; {} µs per kernel launch\n",
            self.kernels, f.gemm, f.attention, f.vector, f.memory, f.scan_memory, f.launch_us
        );
        out += &format!(
            "{:<42} {:>11} {:>11} {:>9} {:>8} {:>9} {:>6}  {}\n",
            "op class",
            "model GFLOP",
            "run GFLOP",
            "GB moved",
            "launches",
            "time ms",
            "share",
            "bound"
        );
        let step = self.step_seconds();
        for op in &self.ops {
            let c = &op.cost;
            out += &format!(
                "{:<42} {:>11.1} {:>11.1} {:>9.3} {:>8.0} {:>9.3} {:>5.1}%  {}\n",
                c.class.name(),
                c.model_flops / 1e9,
                c.flops / 1e9,
                c.bytes / 1e9,
                c.launches,
                op.seconds * 1e3,
                100.0 * op.seconds / step,
                op.bound.name()
            );
        }
        let total = |v: fn(&super::OpTime) -> f64| self.ops.iter().map(v).sum::<f64>();
        out += &format!(
            "{:<42} {:>11.1} {:>11.1} {:>9.3} {:>8.0} {:>9.3}\n",
            "step",
            self.model_flops / 1e9,
            total(|o| o.cost.flops) / 1e9,
            total(|o| o.cost.bytes) / 1e9,
            total(|o| o.cost.launches),
            step * 1e3
        );
        out += &format!(
            "predicted step {:.2} ms -> {:.0} tokens/s, MFU {:.1}% (model FLOPs {:.3e} / step time / {} TFLOP/s dense bf16)\n",
            step * 1e3,
            self.tokens_per_second(),
            100.0 * self.mfu(),
            self.model_flops,
            self.card.bf16_tflops
        );
        out
    }

    /// Everything the table shows, and the predicted time of each traced-step group.
    pub fn to_json(&self) -> Value {
        let f = &self.fractions;
        let ops: Vec<Value> = self
            .ops
            .iter()
            .map(|o| {
                json!({
                    "class": o.cost.class.name(),
                    "group": o.cost.class.group().name(),
                    "model_flops": o.cost.model_flops,
                    "flops": o.cost.flops,
                    "bytes": o.cost.bytes,
                    "launches": o.cost.launches,
                    "seconds": o.seconds,
                    "bound": o.bound.name(),
                })
            })
            .collect();
        let groups: serde_json::Map<String, Value> = Group::ALL
            .iter()
            .map(|g| (g.name().to_string(), json!(self.group_seconds(*g))))
            .collect();
        json!({
            "card": {
                "id": self.card.id,
                "bf16_tflops": self.card.bf16_tflops,
                "f32_tflops": self.card.f32_tflops,
                "hbm_tbs": self.card.hbm_tbs,
                "sms": self.card.sms,
            },
            "kernels": self.kernels.to_string(),
            "fractions": {
                "gemm": f.gemm,
                "attention": f.attention,
                "vector": f.vector,
                "memory": f.memory,
                "scan_memory": f.scan_memory,
                "launch_us": f.launch_us,
            },
            "tokens": self.tokens,
            "model_flops": self.model_flops,
            "step_seconds": self.step_seconds(),
            "tokens_per_sec": self.tokens_per_second(),
            "mfu": self.mfu(),
            "ops": ops,
            "group_seconds": groups,
        })
    }
}
