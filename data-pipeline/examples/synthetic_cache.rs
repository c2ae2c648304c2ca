//! Builds (or reuses) the quickstart's synthetic data cache and prints where it is:
//! `cargo run -p zamba-data --example synthetic_cache -- [CACHE_DIR]`

use std::time::Instant;
use zamba_data::{SyntheticCacheOptions, ensure_synthetic_cache};

fn main() -> anyhow::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "runs/data-cache".to_owned());
    let start = Instant::now();
    let cache = ensure_synthetic_cache(dir.as_ref(), &SyntheticCacheOptions::default())?;
    println!("{:#?}", cache);
    println!("ready in {:.1}s", start.elapsed().as_secs_f64());
    Ok(())
}
