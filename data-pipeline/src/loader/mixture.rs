//! Which source each row of a global batch comes from.
//!
//! Rows are handed out greedily to the source furthest behind its target share
//! (`weight × rows so far`), so every source stays within one row of its exact cumulative share
//! after every row (hence within two rows in any single batch), and the choice depends only on
//! counters in the state.

/// Appends `rows` source indices for the next global batch, advancing the per-source counters.
pub fn allocate(weights: &[f64], allocated: &mut [u64], rows: usize) -> Vec<u16> {
    let already: u64 = allocated.iter().sum();
    let mut sources = Vec::with_capacity(rows);
    for total in already..already + rows as u64 {
        let target = (total + 1) as f64;
        let mut best = 0;
        let mut best_deficit = f64::NEG_INFINITY;
        for (i, (&w, &n)) in weights.iter().zip(allocated.iter()).enumerate() {
            let deficit = w * target - n as f64;
            // Zero-weight sources never win: the positive deficits always sum to one row.
            if w > 0.0 && deficit > best_deficit {
                best = i;
                best_deficit = deficit;
            }
        }
        allocated[best] += 1;
        sources.push(best as u16);
    }
    sources
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_stay_within_one_row_of_target() {
        let weights = [0.7, 0.2, 0.1, 0.0];
        let mut allocated = [0u64; 4];
        for _ in 0..100 {
            allocate(&weights, &mut allocated, 7);
            let total: u64 = allocated.iter().sum();
            for (w, n) in weights.iter().zip(allocated) {
                assert!(
                    (w * total as f64 - n as f64).abs() < 1.0 + 1e-9,
                    "{allocated:?}"
                );
            }
        }
        assert_eq!(allocated[3], 0);
    }
}
