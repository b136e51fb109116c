//! The document the HTTP benches' handlers serve: about 3 KB of JSON, twenty search
//! results, rendered from a seed (the `?i=` of the request).

use serde::Serialize;

#[derive(Serialize, Clone)]
struct Job {
    id: u64,
    title: &'static str,
    company: &'static str,
    location: &'static str,
    skills: [&'static str; 4],
    salary: u32,
    score: f64,
}

/// The JSON document every handler serves (about 3 KB): twenty search results.
pub(crate) fn render(seed: u64) -> Vec<u8> {
    let jobs: Vec<Job> = (0..20)
        .map(|i| Job {
            id: seed.wrapping_mul(31).wrapping_add(i),
            title: "Senior backend engineer",
            company: "Acme Corporation",
            location: "Berlin, Germany",
            skills: ["rust", "tokio", "postgres", "kubernetes"],
            salary: 70_000 + (i as u32) * 1_000,
            score: 1.0 / (i as f64 + 1.0),
        })
        .collect();
    serde_json::to_vec(&jobs).unwrap()
}

#[derive(serde::Deserialize)]
pub(crate) struct Seed {
    pub(crate) i: Option<u64>,
}
