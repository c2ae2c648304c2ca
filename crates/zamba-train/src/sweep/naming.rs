//! Directory names of sweep points, built from their overrides.

use std::collections::BTreeMap;

/// Shell-safe text of an override value, for directory names.
pub(super) fn value_text(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub(super) fn sanitize(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-=+,".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// FNV-1a, to tell apart names that sanitizing or truncation made equal.
fn short_hash(text: &str) -> String {
    let h = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    format!("{:08x}", h as u32)
}

/// The shortest dotted suffix of each key that no other key shares (`weight` → `web.weight`).
fn short_keys(keys: &[String]) -> Vec<String> {
    keys.iter()
        .map(|key| {
            let segments: Vec<&str> = key.split('.').collect();
            (1..=segments.len())
                .map(|n| segments[segments.len() - n..].join("."))
                .find(|suffix| {
                    keys.iter()
                        .filter(|k| *k == key || k.ends_with(&format!(".{suffix}")) || *k == suffix)
                        .count()
                        == 1
                })
                .unwrap_or_else(|| key.clone())
        })
        .collect()
}

/// Directory names for the points, unique and at most ~110 characters.
pub fn point_names(keys: &[String], points: &[Vec<(String, toml::Value)>]) -> Vec<String> {
    let short = short_keys(keys);
    let short_of: BTreeMap<&str, &str> = keys
        .iter()
        .map(String::as_str)
        .zip(short.iter().map(String::as_str))
        .collect();
    let full: Vec<String> = points
        .iter()
        .map(|p| {
            p.iter()
                .map(|(k, v)| {
                    format!(
                        "{}={}",
                        short_of.get(k.as_str()).copied().unwrap_or(k.as_str()),
                        value_text(v)
                    )
                })
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect();
    let mut names: Vec<String> = full
        .iter()
        .map(|f| {
            let s = sanitize(f);
            if s.len() > 100 {
                format!("{}-{}", &s[..100], short_hash(f))
            } else {
                s
            }
        })
        .collect();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for n in &names {
        *counts.entry(n.clone()).or_default() += 1;
    }
    for (n, f) in names.iter_mut().zip(&full) {
        if counts[n.as_str()] > 1 {
            *n = format!("{n}-{}", short_hash(f));
        }
    }
    names
}
