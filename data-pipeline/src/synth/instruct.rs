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

/// An instruct task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Task {
    /// `What is a op b?`: a, b < 1000 for + and −, < 100 for ×.
    Arithmetic,
    /// Sort 3–8 numbers or words.
    Sort,
    /// Repeat a 4–16 letter string.
    Copy,
    /// Reverse a 4–16 letter string.
    Reverse,
    /// Count a letter in a 6–14 letter string.
    Count,
    /// A question about a fact stated in a training web document.
    Fact,
    /// Short arithmetic: `What is a + b?` with a < 100 and b < 10 (1000 distinct problems).
    /// Not in the standard mix.
    Add,
}

impl Task {
    pub const ALL: [Task; 7] = [
        Task::Arithmetic,
        Task::Sort,
        Task::Copy,
        Task::Reverse,
        Task::Count,
        Task::Fact,
        Task::Add,
    ];

    /// The name in the `task` column (and in a [`TaskMix`]).
    pub fn name(self) -> &'static str {
        match self {
            Task::Arithmetic => "arithmetic",
            Task::Sort => "sort",
            Task::Copy => "copy",
            Task::Reverse => "reverse",
            Task::Count => "count",
            Task::Fact => "fact",
            Task::Add => "add",
        }
    }

    pub fn from_name(name: &str) -> Option<Task> {
        Task::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// Which task each instruct example poses.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum TaskMix {
    /// Arithmetic 2/7, each other task 1/7: the set of docs/data.md.
    #[default]
    Standard,
    /// Tasks drawn with probabilities proportional to these weights (all finite, ≥ 0, some > 0).
    Weighted(Vec<(Task, f64)>),
}

impl TaskMix {
    /// A weighted mix from task names; errors name the bad entry and list the tasks.
    pub fn weighted<'a>(weights: impl IntoIterator<Item = (&'a str, f64)>) -> Result<Self, String> {
        let mut mix = Vec::new();
        for (name, weight) in weights {
            let task = Task::from_name(name).ok_or_else(|| {
                let known: Vec<_> = Task::ALL.iter().map(|t| t.name()).collect();
                format!(
                    "unknown instruct task {name:?}; the tasks are {}",
                    known.join(", ")
                )
            })?;
            if !(weight.is_finite() && weight >= 0.0) {
                return Err(format!(
                    "the weight of task {name:?} is {weight}; expected a finite number ≥ 0"
                ));
            }
            mix.push((task, weight));
        }
        if !mix.iter().any(|&(_, w)| w > 0.0) {
            return Err("no instruct task has a positive weight".into());
        }
        mix.sort_by_key(|&(task, _)| task);
        Ok(TaskMix::Weighted(mix))
    }

    fn draw(&self, rng: &mut ChaCha8Rng) -> Task {
        match self {
            TaskMix::Standard => match below(rng, 7) {
                0 | 1 => Task::Arithmetic,
                2 => Task::Sort,
                3 => Task::Copy,
                4 => Task::Reverse,
                5 => Task::Count,
                _ => Task::Fact,
            },
            TaskMix::Weighted(weights) => {
                let total: f64 = weights.iter().map(|&(_, w)| w).sum();
                let mut u = unit(rng) * total;
                for &(task, w) in weights {
                    if u < w {
                        return task;
                    }
                    u -= w;
                }
                // Rounding left u at the total: the last task with weight.
                weights
                    .iter()
                    .rev()
                    .find(|&&(_, w)| w > 0.0)
                    .expect("a weighted mix has a positive weight")
                    .0
            }
        }
    }

    /// Text that identifies a non-standard mix (for cache keys); None for the standard one.
    pub fn key(&self) -> Option<String> {
        match self {
            TaskMix::Standard => None,
            TaskMix::Weighted(weights) => Some(
                weights
                    .iter()
                    .map(|(task, w)| format!("{}={w}", task.name()))
                    .collect::<Vec<_>>()
                    .join(","),
            ),
        }
    }
}

/// `standard`, or `task=weight,…` (e.g. `copy=1,fact=2`), as `data synth --tasks` takes it.
impl std::str::FromStr for TaskMix {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if text == "standard" {
            return Ok(TaskMix::Standard);
        }
        let weights = text
            .split(',')
            .map(|entry| {
                let (name, weight) = entry
                    .split_once('=')
                    .ok_or_else(|| format!("{entry:?} is not task=weight (e.g. copy=1,fact=2)"))?;
                let weight: f64 = weight
                    .trim()
                    .parse()
                    .map_err(|_| format!("the weight in {entry:?} is not a number"))?;
                Ok((name.trim(), weight))
            })
            .collect::<Result<Vec<_>, String>>()?;
        TaskMix::weighted(weights)
    }
}

/// Example `index`, its task drawn from `mix`. Fact questions only ask about facts that some
/// training web document states, which depends on how many web documents there are and the
/// web split.
pub fn example(
    world: &World,
    seed: u64,
    index: u64,
    mix: &TaskMix,
    web_docs: u64,
    web_validation_fraction: f64,
) -> Example {
    let mut rng = rng_for(seed, &[STREAM, index]);
    let rng = &mut rng;
    match mix.draw(rng) {
        Task::Arithmetic => arithmetic(rng),
        Task::Sort => sort(rng),
        Task::Copy => copy(rng),
        Task::Reverse => reverse(rng),
        Task::Count => count(rng),
        Task::Fact => {
            fact(world, seed, rng, web_docs, web_validation_fraction).unwrap_or_else(|| copy(rng))
        }
        Task::Add => add(rng),
    }
}

fn arithmetic(rng: &mut ChaCha8Rng) -> Example {
    let (a, b) = (below(rng, 1000) as i64, below(rng, 1000) as i64);
    let (op, result, a, b) = match below(rng, 3) {
        0 => ('+', a + b, a, b),
        1 => ('-', a - b, a, b),
        _ => ('*', (a % 100) * (b % 100), a % 100, b % 100),
    };
    Example {
        task: Task::Arithmetic.name(),
        prompt: format!("What is {a} {op} {b}?"),
        answer: result.to_string(),
        key: format!("arith:{a}{op}{b}"),
    }
}

fn add(rng: &mut ChaCha8Rng) -> Example {
    let (a, b) = (below(rng, 100), below(rng, 10));
    Example {
        task: Task::Add.name(),
        prompt: format!("What is {a} + {b}?"),
        answer: (a + b).to_string(),
        key: format!("arith:{a}+{b}"),
    }
}

fn sort(rng: &mut ChaCha8Rng) -> Example {
    let n = 3 + below(rng, 6);
    let (prompt, mut items): (&str, Vec<String>) = if below(rng, 2) == 0 {
        (
            "Sort these numbers in ascending order",
            (0..n).map(|_| below(rng, 100).to_string()).collect(),
        )
    } else {
        (
            "Sort these words alphabetically",
            (0..n).map(|_| pick(rng, WORDS).to_string()).collect(),
        )
    };
    let shown = items.join(", ");
    if prompt.contains("numbers") {
        items.sort_by_key(|s| s.parse::<u64>().expect("generated numbers parse"));
    } else {
        items.sort();
    }
    Example {
        task: Task::Sort.name(),
        prompt: format!("{prompt}: {shown}"),
        answer: items.join(", "),
        key: format!("sort:{shown}"),
    }
}

fn copy(rng: &mut ChaCha8Rng) -> Example {
    let s = random_word(rng, 4, 16);
    Example {
        task: Task::Copy.name(),
        prompt: format!("Repeat exactly: {s}"),
        answer: s.clone(),
        key: format!("copy:{s}"),
    }
}

fn reverse(rng: &mut ChaCha8Rng) -> Example {
    let s = random_word(rng, 4, 16);
    Example {
        task: Task::Reverse.name(),
        prompt: format!("Reverse the letters of: {s}"),
        answer: s.chars().rev().collect(),
        key: format!("rev:{s}"),
    }
}

fn count(rng: &mut ChaCha8Rng) -> Example {
    let w = random_word(rng, 6, 14);
    let c = w.as_bytes()[below(rng, w.len() as u64) as usize] as char;
    let count = w.chars().filter(|&x| x == c).count();
    Example {
        task: Task::Count.name(),
        prompt: format!("How many times does the letter '{c}' appear in \"{w}\"?"),
        answer: count.to_string(),
        key: format!("count:{c}:{w}"),
    }
}

/// A question about the primary fact of a training web document, drawn until one is found
/// (None when 64 draws find none: a tiny or all-held-out web set).
fn fact(
    world: &World,
    seed: u64,
    rng: &mut ChaCha8Rng,
    web_docs: u64,
    web_validation_fraction: f64,
) -> Option<Example> {
    let doc = (0..64)
        .map(|_| below(rng, web_docs.max(1)))
        .find(|&doc| web_docs > 0 && !web::is_validation(seed, doc, web_validation_fraction))?;
    let (prompt, answer) = world.question(web::primary_fact(world, doc));
    Some(Example {
        task: Task::Fact.name(),
        key: format!("fact:{prompt}"),
        prompt,
        answer,
    })
}

/// Recomputes the answer of a self-contained task from its prompt; None for fact questions
/// (check those against the web set) or prompts this generator does not write.
pub fn expected_answer(task: &str, prompt: &str) -> Option<String> {
    match task {
        "arithmetic" | "add" => {
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
