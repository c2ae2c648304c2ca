//! The dtype contract of the ops in this crate.
//!
//! Burn does not promote dtypes: on the CubeCL backend a binary op, `cat` or `slice_assign` takes
//! the first operand's (or the output's) dtype and reads the others' buffers as that type, which
//! gives wrong values (a bf16 buffer read as f32, or read past its end) rather than an error. So
//! every tensor an op creates carries the dtype of the data it meets, and the ops of this crate
//! check, in debug builds (every test build), that the operands they combine agree.

use burn::tensor::DType;

/// Panics (debug builds only) unless every operand has the dtype of the first, naming the op and
/// each operand's dtype.
#[track_caller]
pub fn expect_same_dtype(op: &str, operands: &[(&str, DType)]) {
    if !cfg!(debug_assertions) {
        return;
    }
    let Some((_, first)) = operands.first() else {
        return;
    };
    if operands.iter().any(|(_, dtype)| dtype != first) {
        let listed: Vec<String> = operands
            .iter()
            .map(|(name, dtype)| format!("{name}: {dtype:?}"))
            .collect();
        panic!(
            "{op}: operands of different dtypes ({}); Burn does not promote dtypes, so cast them \
             to one type first",
            listed.join(", ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agreeing_operands_pass() {
        expect_same_dtype("op", &[("x", DType::BF16), ("w", DType::BF16)]);
        expect_same_dtype("op", &[]);
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "linear: operands of different dtypes (x: BF16, weight: F32)")]
    fn a_mismatch_names_the_op_and_every_operand() {
        expect_same_dtype("linear", &[("x", DType::BF16), ("weight", DType::F32)]);
    }
}
