//! `instruct` examples: chat-formatted tasks whose answers can be checked mechanically
//! (arithmetic, sorting, copying, reversing, counting) or against facts stated in the web set.

use super::web;
use super::world::World;
use crate::rng::{below, pick, rng_for, unit};
use rand_chacha::ChaCha8Rng;

pub(crate) const STREAM: u64 = 0x494e_5330; // "INS0"
const SPLIT_STREAM: u64 = 0x494e_5331;
const WORDS: &[&str] = &[
    "apple", "river", "stone", "cloud", "lamp", "forest", "candle", "mirror", "garden", "rocket",
    "violet", "banana", "pepper", "harbour",
];
const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyz";

/// The chat template (Jinja, as in a tokenizer_config.json) whose rendering of
/// `[{user: prompt}, {assistant: answer}]` is [`Example::chat_text`]; with
/// `add_generation_prompt` it ends where the answer starts.
pub const CHAT_TEMPLATE: &str = "{% for message in messages %}{% if message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '\\n' }}{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + message['content'] }}{% else %}{{ raise_exception('only user and assistant messages are supported') }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}";

pub struct Example {
    pub task: &'static str,
    pub prompt: String,
    pub answer: String,
    /// Identifies the problem itself, so identical problems never land in both splits.
    pub key: String,
}

impl Example {
    pub fn chat_text(&self) -> String {
        format!("{}{}", self.chat_prompt(), self.answer)
    }

    /// The text before the answer: what a model is prompted with.
    pub fn chat_prompt(&self) -> String {
        format!("<|user|>\n{}\n<|assistant|>\n", self.prompt)
    }
}

pub fn is_validation(seed: u64, key: &str, fraction: f64) -> bool {
    unit(&mut rng_for(
        seed,
        &[SPLIT_STREAM, crate::rng::name_id(key)],
    )) < fraction
}

fn random_word(rng: &mut ChaCha8Rng, min: u64, max: u64) -> String {
    let len = min + below(rng, max - min + 1);
    (0..len).map(|_| *pick(rng, LETTERS) as char).collect()
}

/// Example `index`. Fact questions only ask about facts that some training web document states,
/// which depends on how many web documents there are and the web split.
pub fn example(
    world: &World,
    seed: u64,
    index: u64,
    web_docs: u64,
    web_validation_fraction: f64,
) -> Example {
    let mut rng = rng_for(seed, &[STREAM, index]);
    let kind = below(&mut rng, 7);
    match kind {
        0 | 1 => {
            let (a, b) = (below(&mut rng, 1000) as i64, below(&mut rng, 1000) as i64);
            let (op, result, a, b) = match below(&mut rng, 3) {
                0 => ('+', a + b, a, b),
                1 => ('-', a - b, a, b),
                _ => ('*', (a % 100) * (b % 100), a % 100, b % 100),
            };
            Example {
                task: "arithmetic",
                prompt: format!("What is {a} {op} {b}?"),
                answer: result.to_string(),
                key: format!("arith:{a}{op}{b}"),
            }
        }
        2 => {
            let n = 3 + below(&mut rng, 6);
            let (prompt, mut items): (&str, Vec<String>) = if below(&mut rng, 2) == 0 {
                (
                    "Sort these numbers in ascending order",
                    (0..n).map(|_| below(&mut rng, 100).to_string()).collect(),
                )
            } else {
                (
                    "Sort these words alphabetically",
                    (0..n).map(|_| pick(&mut rng, WORDS).to_string()).collect(),
                )
            };
            let shown = items.join(", ");
            if prompt.contains("numbers") {
                items.sort_by_key(|s| s.parse::<u64>().expect("generated numbers parse"));
            } else {
                items.sort();
            }
            Example {
                task: "sort",
                prompt: format!("{prompt}: {shown}"),
                answer: items.join(", "),
                key: format!("sort:{shown}"),
            }
        }
        3 => {
            let s = random_word(&mut rng, 4, 16);
            Example {
                task: "copy",
                prompt: format!("Repeat exactly: {s}"),
                answer: s.clone(),
                key: format!("copy:{s}"),
            }
        }
        4 => {
            let s = random_word(&mut rng, 4, 16);
            Example {
                task: "reverse",
                prompt: format!("Reverse the letters of: {s}"),
                answer: s.chars().rev().collect(),
                key: format!("rev:{s}"),
            }
        }
        5 => {
            let w = random_word(&mut rng, 6, 14);
            let c = w.as_bytes()[below(&mut rng, w.len() as u64) as usize] as char;
            let count = w.chars().filter(|&x| x == c).count();
            Example {
                task: "count",
                prompt: format!("How many times does the letter '{c}' appear in \"{w}\"?"),
                answer: count.to_string(),
                key: format!("count:{c}:{w}"),
            }
        }
        _ => {
            // Draw training web documents until one is found; each states its primary fact.
            let fact = (0..64)
                .map(|_| below(&mut rng, web_docs.max(1)))
                .find(|&doc| {
                    web_docs > 0 && !web::is_validation(seed, doc, web_validation_fraction)
                })
                .map(|doc| web::primary_fact(world, doc));
            match fact {
                Some(fact) => {
                    let (prompt, answer) = world.question(fact);
                    Example {
                        task: "fact",
                        key: format!("fact:{prompt}"),
                        prompt,
                        answer,
                    }
                }
                None => {
                    let s = random_word(&mut rng, 4, 16);
                    Example {
                        task: "copy",
                        prompt: format!("Repeat exactly: {s}"),
                        answer: s.clone(),
                        key: format!("copy:{s}"),
                    }
                }
            }
        }
    }
}

/// Recomputes the answer of a self-contained task from its prompt; None for fact questions
/// (check those against the web set) or prompts this generator does not write.
pub fn expected_answer(task: &str, prompt: &str) -> Option<String> {
    match task {
        "arithmetic" => {
            let body = prompt.strip_prefix("What is ")?.strip_suffix('?')?;
            let mut parts = body.split(' ');
            let a: i64 = parts.next()?.parse().ok()?;
            let op = parts.next()?;
            let b: i64 = parts.next()?.parse().ok()?;
            Some(
                match op {
                    "+" => a + b,
                    "-" => a - b,
                    "*" => a * b,
                    _ => return None,
                }
                .to_string(),
            )
        }
        "sort" => {
            let (head, list) = prompt.split_once(": ")?;
            let mut items: Vec<&str> = list.split(", ").collect();
            if head.contains("numbers") {
                items.sort_by_key(|s| s.parse::<u64>().unwrap_or(u64::MAX));
            } else {
                items.sort();
            }
            Some(items.join(", "))
        }
        "copy" => Some(prompt.strip_prefix("Repeat exactly: ")?.to_owned()),
        "reverse" => Some(
            prompt
                .strip_prefix("Reverse the letters of: ")?
                .chars()
                .rev()
                .collect(),
        ),
        "count" => {
            let rest = prompt.strip_prefix("How many times does the letter '")?;
            let c = rest.chars().next()?;
            let word = rest.split('"').nth(1)?;
            Some(word.chars().filter(|&x| x == c).count().to_string())
        }
        _ => None,
    }
}
