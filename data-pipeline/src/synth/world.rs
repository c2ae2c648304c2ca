//! The synthetic world: invented people, cities, countries and companies, and facts relating them.
//! Web documents state the facts; instruct examples ask about them, so a model can learn and be tested.

use crate::rng::{below, pick, rng_for, shuffle};
use rand_chacha::ChaCha8Rng;
use std::collections::HashSet;

pub const COLOURS: &[&str] = &[
    "red", "blue", "green", "amber", "violet", "silver", "orange", "teal", "crimson", "ivory",
    "indigo", "olive",
];
pub const PRODUCTS: &[&str] = &[
    "bicycles",
    "lanterns",
    "telescopes",
    "umbrellas",
    "clocks",
    "violins",
    "boats",
    "maps",
    "ceramic tiles",
    "wool blankets",
    "solar panels",
    "garden tools",
    "paper kites",
    "glass bottles",
    "leather boots",
    "radios",
    "pianos",
    "printing presses",
];
const ONSETS: &[&str] = &[
    "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st",
    "th", "sh", "gr", "pl", "tr", "h",
];
const VOWELS: &[&str] = &["a", "e", "i", "o", "u", "ai", "ea", "io", "ou", "y"];
const CODAS: &[&str] = &["", "", "", "n", "r", "l", "s", "th", "nd", "m", "x", "k"];

pub struct Person {
    pub name: String,
    pub born_in: usize,
    pub works_for: usize,
    pub colour: usize,
}

pub struct City {
    pub name: String,
    pub country: usize,
}

pub struct Company {
    pub name: String,
    pub city: usize,
    pub product: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fact {
    BornIn(usize),
    WorksFor(usize),
    Colour(usize),
    CompanyCity(usize),
    CompanyProduct(usize),
    CityCountry(usize),
}

pub struct World {
    pub people: Vec<Person>,
    pub cities: Vec<City>,
    pub countries: Vec<String>,
    pub companies: Vec<Company>,
    pub facts: Vec<Fact>,
}

struct Namer {
    rng: ChaCha8Rng,
    used: HashSet<String>,
}

impl Namer {
    fn word(&mut self, syllables: u64) -> String {
        loop {
            let mut w = String::new();
            for _ in 0..syllables {
                w.push_str(pick::<&str>(&mut self.rng, ONSETS));
                w.push_str(pick::<&str>(&mut self.rng, VOWELS));
            }
            w.push_str(pick::<&str>(&mut self.rng, CODAS));
            let mut chars = w.chars();
            let capitalised: String = chars
                .next()
                .map(|c| c.to_ascii_uppercase())
                .into_iter()
                .chain(chars)
                .collect();
            if self.used.insert(capitalised.clone()) {
                return capitalised;
            }
        }
    }
}

impl World {
    pub fn new(seed: u64) -> Self {
        let mut namer = Namer {
            rng: rng_for(seed, &[0x3031_4c44]),
            used: HashSet::new(),
        };
        let countries: Vec<String> = (0..12).map(|_| namer.word(2) + "ia").collect();
        let cities: Vec<City> = (0..48)
            .map(|i| {
                let syllables = 2 + below(&mut namer.rng, 2);
                City {
                    name: namer.word(syllables),
                    country: i % countries.len(),
                }
            })
            .collect();
        let suffixes = [
            "Works",
            "Industries",
            "& Sons",
            "Company",
            "Guild",
            "Collective",
        ];
        let companies: Vec<Company> = (0..36)
            .map(|_| {
                let name = format!("{} {}", namer.word(2), pick(&mut namer.rng, &suffixes));
                Company {
                    name,
                    city: below(&mut namer.rng, cities.len() as u64) as usize,
                    product: below(&mut namer.rng, PRODUCTS.len() as u64) as usize,
                }
            })
            .collect();
        let people: Vec<Person> = (0..240)
            .map(|_| {
                let syllables = 1 + below(&mut namer.rng, 2);
                let first = namer.word(syllables);
                let last = namer.word(2);
                Person {
                    name: format!("{first} {last}"),
                    born_in: below(&mut namer.rng, cities.len() as u64) as usize,
                    works_for: below(&mut namer.rng, companies.len() as u64) as usize,
                    colour: below(&mut namer.rng, COLOURS.len() as u64) as usize,
                }
            })
            .collect();
        let mut facts = Vec::new();
        for p in 0..people.len() {
            facts.extend([Fact::BornIn(p), Fact::WorksFor(p), Fact::Colour(p)]);
        }
        for c in 0..companies.len() {
            facts.extend([Fact::CompanyCity(c), Fact::CompanyProduct(c)]);
        }
        facts.extend((0..cities.len()).map(Fact::CityCountry));
        // Interleave fact kinds so any prefix of documents covers every relation.
        shuffle(&mut rng_for(seed, &[0x3031_4c45]), &mut facts);
        Self {
            people,
            cities,
            countries,
            companies,
            facts,
        }
    }

    /// Name of the entity a fact is about.
    pub fn subject(&self, fact: Fact) -> &str {
        match fact {
            Fact::BornIn(p) | Fact::WorksFor(p) | Fact::Colour(p) => &self.people[p].name,
            Fact::CompanyCity(c) | Fact::CompanyProduct(c) => &self.companies[c].name,
            Fact::CityCountry(c) => &self.cities[c].name,
        }
    }

    /// The value a fact asserts (the answer to a question about it).
    pub fn object(&self, fact: Fact) -> &str {
        match fact {
            Fact::BornIn(p) => &self.cities[self.people[p].born_in].name,
            Fact::WorksFor(p) => &self.companies[self.people[p].works_for].name,
            Fact::Colour(p) => COLOURS[self.people[p].colour],
            Fact::CompanyCity(c) => &self.cities[self.companies[c].city].name,
            Fact::CompanyProduct(c) => PRODUCTS[self.companies[c].product],
            Fact::CityCountry(c) => &self.countries[self.cities[c].country],
        }
    }

    /// Facts about the same subject as `fact` (its "page" in the world).
    pub fn related(&self, fact: Fact) -> Vec<Fact> {
        match fact {
            Fact::BornIn(p) | Fact::WorksFor(p) | Fact::Colour(p) => {
                let person = &self.people[p];
                vec![
                    Fact::BornIn(p),
                    Fact::WorksFor(p),
                    Fact::Colour(p),
                    Fact::CityCountry(person.born_in),
                    Fact::CompanyCity(person.works_for),
                ]
            }
            Fact::CompanyCity(c) | Fact::CompanyProduct(c) => {
                vec![
                    Fact::CompanyCity(c),
                    Fact::CompanyProduct(c),
                    Fact::CityCountry(self.companies[c].city),
                ]
            }
            Fact::CityCountry(c) => {
                let mut related = vec![Fact::CityCountry(c)];
                related.extend(
                    self.companies
                        .iter()
                        .enumerate()
                        .filter(|(_, co)| co.city == c)
                        .map(|(i, _)| Fact::CompanyCity(i))
                        .take(2),
                );
                related
            }
        }
    }

    /// A sentence stating the fact, in one of several phrasings.
    pub fn statement(&self, fact: Fact, rng: &mut ChaCha8Rng) -> String {
        let (s, o) = (self.subject(fact), self.object(fact));
        let variant = below(rng, 3);
        match (fact, variant) {
            (Fact::BornIn(_), 0) => format!("{s} was born in {o}."),
            (Fact::BornIn(_), 1) => format!("The birthplace of {s} is {o}."),
            (Fact::BornIn(_), _) => format!("Born in {o}, {s} never forgot the place."),
            (Fact::WorksFor(_), 0) => format!("{s} works for {o}."),
            (Fact::WorksFor(_), 1) => format!("{s} is employed by {o}."),
            (Fact::WorksFor(_), _) => format!("These days {s} works at {o}."),
            (Fact::Colour(_), 0) => format!("The favourite colour of {s} is {o}."),
            (Fact::Colour(_), 1) => format!("{s} likes the colour {o} more than any other."),
            (Fact::Colour(_), _) => format!("Ask {s} about colours and the answer is always {o}."),
            (Fact::CompanyCity(_), 0) => format!("{s} is based in {o}."),
            (Fact::CompanyCity(_), 1) => format!("The headquarters of {s} are in {o}."),
            (Fact::CompanyCity(_), _) => format!("In {o} you will find the offices of {s}."),
            (Fact::CompanyProduct(_), 0) => format!("{s} makes {o}."),
            (Fact::CompanyProduct(_), 1) => format!("{s} is known for its {o}."),
            (Fact::CompanyProduct(_), _) => format!("Most of the {o} sold nearby come from {s}."),
            (Fact::CityCountry(_), 0) => format!("{s} is a city in {o}."),
            (Fact::CityCountry(_), 1) => format!("{s} lies in {o}."),
            (Fact::CityCountry(_), _) => format!("The city of {s} belongs to {o}."),
        }
    }

    /// A question about the fact and its checkable answer sentence.
    pub fn question(&self, fact: Fact) -> (String, String) {
        let (s, o) = (self.subject(fact), self.object(fact));
        match fact {
            Fact::BornIn(_) => (
                format!("Where was {s} born?"),
                format!("{s} was born in {o}."),
            ),
            Fact::WorksFor(_) => (
                format!("Which company does {s} work for?"),
                format!("{s} works for {o}."),
            ),
            Fact::Colour(_) => (
                format!("What is the favourite colour of {s}?"),
                format!("The favourite colour of {s} is {o}."),
            ),
            Fact::CompanyCity(_) => (
                format!("In which city is {s} based?"),
                format!("{s} is based in {o}."),
            ),
            Fact::CompanyProduct(_) => (format!("What does {s} make?"), format!("{s} makes {o}.")),
            Fact::CityCountry(_) => (
                format!("In which country is {s}?"),
                format!("{s} is a city in {o}."),
            ),
        }
    }
}
