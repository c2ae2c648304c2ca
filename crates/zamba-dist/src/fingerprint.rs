//! What must be the same on every rank of a job: each rank brings an ordered list of named
//! values (the trainer's: its binary, resolved config, model parameter table and data), and
//! the rendezvous compares them before any rank trains, naming the first key that differs.

use crate::wire::{Reader, Writer};

/// Ordered `key → value` pairs; the order decides which difference is reported first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fingerprint {
    entries: Vec<(String, String)>,
}

/// The first key whose value differs between two fingerprints; `None` where a side lacks it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Difference {
    pub key: String,
    pub ours: Option<String>,
    pub theirs: Option<String>,
}

/// Values longer than this are cut in messages.
const SHOWN_CHARS: usize = 160;

impl Fingerprint {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.entries.push((key.into(), value.into()));
    }

    pub fn entries(&self) -> &[(String, String)] {
        &self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The first of our keys (in our order) whose value `theirs` does not share, then the first
    /// key only `theirs` has.
    pub fn first_difference(&self, theirs: &Fingerprint) -> Option<Difference> {
        let value_of = |entries: &[(String, String)], key: &str| {
            entries
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
        };
        for (key, ours) in &self.entries {
            let other = value_of(&theirs.entries, key);
            if other.as_ref() != Some(ours) {
                return Some(Difference {
                    key: key.clone(),
                    ours: Some(ours.clone()),
                    theirs: other,
                });
            }
        }
        theirs
            .entries
            .iter()
            .find(|(key, _)| value_of(&self.entries, key).is_none())
            .map(|(key, value)| Difference {
                key: key.clone(),
                ours: None,
                theirs: Some(value.clone()),
            })
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u32(self.entries.len() as u32);
        for (key, value) in &self.entries {
            w.bytes(key.as_bytes()).bytes(value.as_bytes());
        }
        w.0
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, String> {
        let mut r = Reader(bytes);
        let n = r.u32()? as usize;
        if n > bytes.len() / 8 {
            return Err(format!("{n} entries announced in {} bytes", bytes.len()));
        }
        let entries = (0..n)
            .map(|_| Ok((r.string()?, r.string()?)))
            .collect::<Result<_, String>>()?;
        r.finish()?;
        Ok(Self { entries })
    }
}

impl Difference {
    /// `data.seq_len is 128 on rank 1 but 64 on rank 0`.
    pub fn describe(&self, our_rank: usize, their_rank: usize) -> String {
        let shown = |v: &Option<String>| match v {
            None => "absent".to_string(),
            Some(v) if v.chars().count() > SHOWN_CHARS => {
                let head: String = v.chars().take(SHOWN_CHARS).collect();
                format!("{head:?}…")
            }
            Some(v) => format!("{v:?}"),
        };
        format!(
            "{} is {} on rank {our_rank} but {} on rank {their_rank}",
            self.key,
            shown(&self.ours),
            shown(&self.theirs)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fingerprint(pairs: &[(&str, &str)]) -> Fingerprint {
        let mut f = Fingerprint::new();
        for (k, v) in pairs {
            f.push(*k, *v);
        }
        f
    }

    #[test]
    fn the_first_differing_key_is_named_with_both_values() {
        let a = fingerprint(&[
            ("binary", "0.1.0"),
            ("data.seq_len", "64"),
            ("train.steps", "6"),
        ]);
        let b = fingerprint(&[
            ("binary", "0.1.0"),
            ("data.seq_len", "128"),
            ("train.steps", "9"),
        ]);
        assert_eq!(a.first_difference(&a.clone()), None);
        let d = b.first_difference(&a).unwrap();
        assert_eq!(d.key, "data.seq_len");
        assert_eq!(
            d.describe(1, 0),
            "data.seq_len is \"128\" on rank 1 but \"64\" on rank 0"
        );
        let shorter = fingerprint(&[("binary", "0.1.0"), ("data.seq_len", "64")]);
        let d = shorter.first_difference(&a).unwrap();
        assert_eq!(
            (d.key.as_str(), d.ours, d.theirs),
            ("train.steps", None, Some("6".into()))
        );
        assert!(
            a.first_difference(&shorter)
                .unwrap()
                .describe(0, 2)
                .contains("absent on rank 2")
        );
    }

    #[test]
    fn encoding_round_trips_and_garbage_is_an_error() {
        let a = fingerprint(&[("model.param.embed_tokens.weight", "[264, 32]"), ("é", "")]);
        assert_eq!(Fingerprint::decode(&a.encode()).unwrap(), a);
        assert!(Fingerprint::decode(&[255, 255, 255, 255]).is_err());
        assert!(Fingerprint::decode(&a.encode()[..10]).is_err());
    }
}
