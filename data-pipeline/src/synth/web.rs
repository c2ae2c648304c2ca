//! `web` documents: a small probabilistic grammar around the world's facts.

use super::world::{Fact, World};
use crate::rng::{below, pick, rng_for, shuffle, unit};
use rand_chacha::ChaCha8Rng;

pub(crate) const STREAM: u64 = 0x5745_4230; // "WEB0"
pub(crate) const SPLIT_STREAM: u64 = 0x5745_4231;

const ADJECTIVES: &[&str] = &[
    "quiet", "busy", "narrow", "ancient", "bright", "windy", "crowded", "green", "old", "famous",
    "small", "grey",
];
const NOUNS: &[&str] = &[
    "market",
    "harbour",
    "bridge",
    "library",
    "square",
    "garden",
    "station",
    "workshop",
    "tower",
    "river bank",
];
const SEASONS: &[&str] = &["spring", "summer", "autumn", "winter"];
const VERBS: &[&str] = &[
    "fills with people",
    "stays calm",
    "hosts a festival",
    "is repaired",
    "is painted",
    "draws visitors",
];
const OPENERS: &[&str] = &[
    "Here is a short note about",
    "A few words on",
    "Notes on",
    "Some facts about",
    "Remembering",
];

/// Whether web document `index` belongs to the held-out split.
pub fn is_validation(seed: u64, index: u64, fraction: f64) -> bool {
    unit(&mut rng_for(seed, &[SPLIT_STREAM, index])) < fraction
}

/// The fact that web document `index` is built around (so every fact is stated once per `facts.len()` documents).
pub fn primary_fact(world: &World, index: u64) -> Fact {
    world.facts[(index % world.facts.len() as u64) as usize]
}

fn filler(world: &World, rng: &mut ChaCha8Rng) -> String {
    let city = &pick(rng, &world.cities).name;
    match below(rng, 4) {
        0 => format!(
            "{city} has {} streets and a {} {}.",
            pick(rng, ADJECTIVES),
            pick(rng, ADJECTIVES),
            pick(rng, NOUNS)
        ),
        1 => format!(
            "In {}, the {} near {city} {}.",
            pick(rng, SEASONS),
            pick(rng, NOUNS),
            pick(rng, VERBS)
        ),
        2 => format!(
            "Visitors say the {} in {city} is {}.",
            pick(rng, NOUNS),
            pick(rng, ADJECTIVES)
        ),
        _ => format!(
            "Every {} the {} {} of {city} {}.",
            pick(rng, SEASONS),
            pick(rng, ADJECTIVES),
            pick(rng, NOUNS),
            pick(rng, VERBS)
        ),
    }
}

/// Web document `index`: a heading, the facts of one subject in varied phrasing and order, and filler.
pub fn document(world: &World, seed: u64, index: u64) -> String {
    let mut rng = rng_for(seed, &[STREAM, index]);
    let primary = primary_fact(world, index);
    let mut facts = world.related(primary);
    facts.retain(|&f| f != primary);
    facts.insert(0, primary);
    shuffle(&mut rng, &mut facts[1..]);
    // Keep the primary fact, drop some of the others.
    let keep = 1 + below(&mut rng, facts.len() as u64) as usize;
    facts.truncate(keep);
    let mut sentences: Vec<String> = facts
        .iter()
        .map(|&f| world.statement(f, &mut rng))
        .collect();
    for _ in 0..1 + below(&mut rng, 4) {
        sentences.push(filler(world, &mut rng));
    }
    shuffle(&mut rng, &mut sentences);
    let mut text = format!(
        "{} {}.\n\n",
        pick(&mut rng, OPENERS),
        world.subject(primary)
    );
    for (i, sentence) in sentences.iter().enumerate() {
        text.push_str(sentence);
        text.push(if i + 1 < sentences.len() && below(&mut rng, 4) == 0 {
            '\n'
        } else {
            ' '
        });
    }
    text.truncate(text.trim_end().len());
    text
}
