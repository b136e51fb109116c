//! The job-matching data set in SQLite: jobs and candidates in one file the replicas
//! on a host share (`DATABASE_URL`), seeded with generated data on first start, and
//! the queries the routes run there. SQLite is compiled in (rusqlite's `bundled`);
//! connections come from an r2d2 pool and run on tokio's blocking threads.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::{Deserialize, Serialize};

const SKILLS: &[&str] = &[
    "rust",
    "go",
    "python",
    "java",
    "kotlin",
    "typescript",
    "react",
    "postgres",
    "redis",
    "kafka",
    "kubernetes",
    "terraform",
    "aws",
    "gcp",
    "ml",
    "pytorch",
    "spark",
    "tokio",
    "grpc",
    "graphql",
];
const TITLES: &[&str] = &[
    "Backend engineer",
    "Platform engineer",
    "Data engineer",
    "Site reliability engineer",
    "Frontend engineer",
    "ML engineer",
    "Engineering manager",
    "Security engineer",
];
const COMPANIES: &[&str] = &[
    "Acme",
    "Globex",
    "Initech",
    "Umbrella",
    "Hooli",
    "Stark",
    "Wayne",
    "Tyrell",
    "Cyberdyne",
    "Soylent",
];
const LOCATIONS: &[&str] = &[
    "Berlin",
    "London",
    "Paris",
    "Remote",
    "Madrid",
    "Warsaw",
    "Lisbon",
    "Amsterdam",
];
/// Dimensions of the profile vectors the matcher compares.
const DIMS: usize = 1024;
/// Jobs on a search page.
pub const PAGE_SIZE: usize = 20;
/// What a fresh database is seeded with.
pub const DEFAULT_SEED: Seed = Seed {
    jobs: 5_000,
    candidates: 1_000,
};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    title TEXT NOT NULL,
    title_lower TEXT NOT NULL,  -- what a search matches
    company TEXT NOT NULL,
    location TEXT NOT NULL,
    skills TEXT NOT NULL,   -- lower-case, comma separated
    salary INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_location ON jobs (location COLLATE NOCASE);
-- Apart from the jobs: a search scans the jobs' few hundred kilobytes, not 4 KiB of
-- profile a row (measured: 24 ms of CPU a search with the profiles inline).
CREATE TABLE IF NOT EXISTS job_profiles (
    job_id INTEGER PRIMARY KEY REFERENCES jobs (id),
    profile BLOB NOT NULL   -- DIMS little-endian f32
);
CREATE TABLE IF NOT EXISTS candidates (
    id INTEGER PRIMARY KEY,
    skills TEXT NOT NULL,
    profile BLOB NOT NULL
);
";

/// How much generated data a fresh database gets.
#[derive(Debug, Clone, Copy)]
pub struct Seed {
    /// Generated jobs.
    pub jobs: usize,
    /// Generated candidates.
    pub candidates: usize,
}

/// A job offer.
#[derive(Debug, Clone, Serialize)]
pub struct Job {
    id: i64,
    title: String,
    company: String,
    location: String,
    skills: Vec<String>,
    salary: u32,
}

/// A job to add, as `POST /jobs` takes it.
#[derive(Debug, Deserialize)]
pub struct NewJob {
    /// What the job is called.
    pub title: String,
    /// Who offers it.
    pub company: String,
    /// Where it is (a city, or `Remote`).
    pub location: String,
    /// What it asks for.
    #[serde(default)]
    pub skills: Vec<String>,
    /// Yearly, in euros.
    #[serde(default)]
    pub salary: u32,
}

/// One page of a search, with the counts of every match by location and company.
#[derive(Debug, Serialize)]
pub struct SearchResults {
    total: i64,
    page: usize,
    jobs: Vec<Job>,
    facets: Facets,
}

#[derive(Debug, Serialize)]
struct Facets {
    location: Vec<(String, i64)>,
    company: Vec<(String, i64)>,
}

/// A job scored for a candidate.
#[derive(Debug, Serialize)]
pub struct Match {
    job_id: i64,
    title: String,
    company: String,
    score: f32,
}

/// What the data set could not do.
#[derive(Debug)]
pub enum DataError {
    /// Another connection holds the lock (`SQLITE_BUSY`, `SQLITE_LOCKED`).
    Busy(String),
    /// Anything else.
    Other(String),
}

impl std::fmt::Display for DataError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DataError::Busy(e) | DataError::Other(e) => f.write_str(e),
        }
    }
}

impl std::error::Error for DataError {}

impl From<rusqlite::Error> for DataError {
    fn from(e: rusqlite::Error) -> Self {
        let busy = matches!(
            e.sqlite_error_code(),
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
        );
        let text = format!("sqlite: {e}");
        if busy {
            DataError::Busy(text)
        } else {
            DataError::Other(text)
        }
    }
}

impl From<rusqlite::types::FromSqlError> for DataError {
    fn from(e: rusqlite::types::FromSqlError) -> Self {
        DataError::Other(format!("sqlite value: {e}"))
    }
}

impl From<r2d2::Error> for DataError {
    fn from(e: r2d2::Error) -> Self {
        DataError::Other(format!("sqlite pool: {e}"))
    }
}

/// The database file a `DATABASE_URL` names: `sqlite://path`, `sqlite:path` or a
/// plain path; unset or empty, `job_match.db` in the working directory. Other
/// schemes are refused: the example is SQLite only.
pub fn database_path(url: Option<&str>) -> Result<PathBuf, DataError> {
    let url = url.map(str::trim).filter(|u| !u.is_empty());
    let Some(url) = url else {
        return Ok(PathBuf::from("job_match.db"));
    };
    let path = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or(url);
    if path.is_empty() || (path.contains("://") && !url.starts_with("sqlite")) {
        return Err(DataError::Other(format!(
            "DATABASE_URL {url:?}: job_match keeps its data in SQLite only (sqlite://path)"
        )));
    }
    Ok(PathBuf::from(path))
}

/// The shared data set: a pool of connections to one SQLite file.
pub struct Data {
    pool: r2d2::Pool<SqliteConnectionManager>,
    /// A file this handle made and removes when dropped (`Data::temporary`).
    owned: Option<PathBuf>,
}

impl Drop for Data {
    fn drop(&mut self) {
        if let Some(path) = &self.owned {
            for suffix in ["", "-wal", "-shm"] {
                let mut file = path.clone().into_os_string();
                file.push(suffix);
                let _ = std::fs::remove_file(file);
            }
        }
    }
}

impl Data {
    /// Opens (creating it if needed) the database at `path`, seeding it with `seed`
    /// when it holds no jobs: the first of several replicas starting together seeds,
    /// the others find the data.
    pub fn open(path: &Path, seed: Seed) -> Result<Arc<Self>, DataError> {
        Self::connect(path, seed).map(Arc::new)
    }

    fn connect(path: &Path, seed: Seed) -> Result<Self, DataError> {
        let manager = SqliteConnectionManager::file(path).with_init(|c| {
            // Replicas write the same file: wait for another's write lock rather
            // than fail with SQLITE_BUSY.
            c.busy_timeout(Duration::from_secs(5))?;
            c.execute_batch("PRAGMA synchronous = NORMAL;")
        });
        // Set up on a connection of its own that waits briefly for a lock and
        // retries (`initialise`), before the pool opens any.
        let mut setup = Connection::open(path)?;
        setup.busy_timeout(Duration::from_millis(100))?;
        initialise(&mut setup, seed)?;
        drop(setup);
        let pool = r2d2::Pool::builder().max_size(8).build(manager)?;
        Ok(Data { pool, owned: None })
    }

    /// A database of its own in a new temporary file, removed when dropped (tests
    /// and benchmarks).
    pub fn temporary(seed: Seed) -> Result<Arc<Self>, DataError> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "job_match-{}-{}.db",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&path);
        let mut data = Data::connect(&path, seed)?;
        data.owned = Some(path);
        Ok(Arc::new(data))
    }

    /// Runs `work` on a pooled connection, on a blocking thread.
    async fn with<T, F>(self: &Arc<Self>, work: F) -> Result<T, DataError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, DataError> + Send + 'static,
    {
        let data = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let mut conn = data.pool.get()?;
            work(&mut conn)
        })
        .await
        .map_err(|e| DataError::Other(format!("database task: {e}")))?
    }

    /// The jobs whose title or skills contain `q` (any case; empty: all), in
    /// `location` when given: page `page` (from 1), the total, and the facets.
    pub async fn search(
        self: &Arc<Self>,
        q: String,
        location: Option<String>,
        page: usize,
    ) -> Result<SearchResults, DataError> {
        self.with(move |conn| {
            let q = q.to_lowercase();
            // A query with a comma cannot be part of one skill.
            let in_skills = (!q.contains(',')).then(|| q.clone());
            let tx = conn.transaction()?;
            // One snapshot for the page, the total and the facets.
            const MATCHING: &str = "(?1 = '' OR instr(title_lower, ?1) > 0 \
                 OR (?3 IS NOT NULL AND instr(skills, ?3) > 0)) \
                 AND (?2 IS NULL OR location = ?2 COLLATE NOCASE)";
            let page = page.max(1);
            let offset = i64::try_from((page - 1).saturating_mul(PAGE_SIZE)).unwrap_or(i64::MAX);
            let jobs = {
                let mut stmt = tx.prepare_cached(&format!(
                    "SELECT id, title, company, location, skills, salary FROM jobs \
                     WHERE {MATCHING} ORDER BY id LIMIT ?4 OFFSET ?5"
                ))?;
                let rows = stmt.query_map(
                    params![q, location, in_skills, PAGE_SIZE as i64, offset],
                    job_row,
                )?;
                rows.collect::<Result<Vec<_>, _>>()?
            };
            // The total and both facets from one scan, counted here: SQLite's
            // GROUP BY sorts through a temporary B-tree, five times the scan's cost
            // (measured).
            let mut stmt = tx.prepare_cached(&format!(
                "SELECT location, company FROM jobs WHERE {MATCHING}"
            ))?;
            let mut rows = stmt.query(params![q, location, in_skills])?;
            let (mut by_location, mut by_company) = (BTreeMap::new(), BTreeMap::new());
            let mut total = 0;
            while let Some(row) = rows.next()? {
                total += 1;
                count_into(&mut by_location, row.get_ref(0)?.as_str()?);
                count_into(&mut by_company, row.get_ref(1)?.as_str()?);
            }
            Ok(SearchResults {
                total,
                page,
                jobs,
                facets: Facets {
                    location: by_count(by_location),
                    company: by_count(by_company),
                },
            })
        })
        .await
    }

    /// The job `id`, if there is one.
    pub async fn job(self: &Arc<Self>, id: i64) -> Result<Option<Job>, DataError> {
        self.with(move |conn| {
            Ok(conn
                .query_row(
                    "SELECT id, title, company, location, skills, salary FROM jobs WHERE id = ?1",
                    [id],
                    job_row,
                )
                .optional()?)
        })
        .await
    }

    /// The `top` jobs that best match candidate `id` (profile similarity plus shared
    /// skills), scoring every job; `None` for no such candidate.
    pub async fn matches(
        self: &Arc<Self>,
        id: i64,
        top: usize,
    ) -> Result<Option<Vec<Match>>, DataError> {
        self.with(move |conn| {
            let candidate = conn
                .query_row(
                    "SELECT skills, profile FROM candidates WHERE id = ?1",
                    [id],
                    |row| Ok((row.get::<_, String>(0)?, row.get::<_, Vec<u8>>(1)?)),
                )
                .optional()?;
            let Some((skills, profile)) = candidate else {
                return Ok(None);
            };
            let skills = split_skills(&skills);
            let profile = decode_profile(&profile);
            let mut stmt = conn.prepare_cached(
                "SELECT j.id, j.title, j.company, j.skills, p.profile \
                 FROM jobs j JOIN job_profiles p ON p.job_id = j.id",
            )?;
            let rows = stmt.query_map([], |row| {
                let job_skills = split_skills(&row.get::<_, String>(3)?);
                let job_profile = row.get_ref(4)?.as_blob()?;
                let similarity: f32 = profile_values(job_profile)
                    .zip(&profile)
                    .map(|(a, b)| a * b)
                    .sum();
                let shared = job_skills.iter().filter(|s| skills.contains(s)).count() as f32;
                Ok(Match {
                    job_id: row.get(0)?,
                    title: row.get(1)?,
                    company: row.get(2)?,
                    score: similarity + 0.05 * shared,
                })
            })?;
            let mut scored = rows.collect::<Result<Vec<_>, _>>()?;
            scored.sort_by(|a, b| b.score.total_cmp(&a.score));
            scored.truncate(top);
            Ok(Some(scored))
        })
        .await
    }

    /// Adds `job`; returns its id.
    pub async fn add_job(self: &Arc<Self>, job: NewJob) -> Result<i64, DataError> {
        self.with(move |conn| {
            let skills: Vec<String> = job.skills.iter().map(|s| s.to_lowercase()).collect();
            let mut rng = XorShift(0xDEAD_BEEF);
            let profile = encode_profile(&profile(&skills, &mut rng));
            let tx = conn.transaction()?;
            tx.execute(
                "INSERT INTO jobs (title, title_lower, company, location, skills, salary) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    job.title,
                    job.title.to_lowercase(),
                    job.company,
                    job.location,
                    skills.join(","),
                    job.salary
                ],
            )?;
            let id = tx.last_insert_rowid();
            tx.execute(
                "INSERT INTO job_profiles (job_id, profile) VALUES (?1, ?2)",
                params![id, profile],
            )?;
            tx.commit()?;
            Ok(id)
        })
        .await
    }
}

/// Counts one more `value`, allocating only for a value not seen yet.
fn count_into(counts: &mut BTreeMap<String, i64>, value: &str) {
    match counts.get_mut(value) {
        Some(n) => *n += 1,
        None => {
            counts.insert(value.to_owned(), 1);
        }
    }
}

/// Counts, most first, then by name.
fn by_count(counts: BTreeMap<String, i64>) -> Vec<(String, i64)> {
    let mut counts: Vec<(String, i64)> = counts.into_iter().collect();
    counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    counts
}

fn job_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Job> {
    Ok(Job {
        id: row.get(0)?,
        title: row.get(1)?,
        company: row.get(2)?,
        location: row.get(3)?,
        skills: split_skills(&row.get::<_, String>(4)?),
        salary: row.get(5)?,
    })
}

fn split_skills(joined: &str) -> Vec<String> {
    joined
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

fn encode_profile(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A stored profile's values; a truncated blob gives what it holds.
fn profile_values(blob: &[u8]) -> impl Iterator<Item = f32> + '_ {
    blob.chunks_exact(4)
        .filter_map(|b| <[u8; 4]>::try_from(b).ok())
        .map(f32::from_le_bytes)
}

fn decode_profile(blob: &[u8]) -> Vec<f32> {
    profile_values(blob).collect()
}

/// Puts the database in WAL mode (readers never wait for the writer), creates the
/// tables and seeds them, retrying for 30 s while another process holds the lock
/// (another replica seeding, seen with two started together: one waited out
/// SQLite's busy wait and exited with "database is locked").
fn initialise(conn: &mut Connection, seed: Seed) -> Result<(), DataError> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let attempt = conn
            .execute_batch("PRAGMA journal_mode = WAL;")
            .and_then(|()| conn.execute_batch(SCHEMA));
        let attempt = match attempt {
            Ok(()) => seed_if_empty(conn, seed),
            Err(e) => Err(e.into()),
        };
        match attempt {
            Err(DataError::Busy(_)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(25));
            }
            other => return other,
        }
    }
}

/// Seeds a database with no jobs, in one write transaction: of replicas starting
/// together, the first takes the lock and seeds; the others then find the jobs.
fn seed_if_empty(conn: &mut Connection, seed: Seed) -> Result<(), DataError> {
    let count = |conn: &Connection| -> rusqlite::Result<i64> {
        conn.query_row("SELECT count(*) FROM jobs", [], |row| row.get(0))
    };
    if count(conn)? > 0 {
        return Ok(());
    }
    // Generated before the lock is taken: the others wait for the inserts only.
    let (jobs, candidates) = generate(seed);
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    if count(&tx)? > 0 {
        return Ok(());
    }
    {
        let mut insert = tx.prepare(
            "INSERT INTO jobs (id, title, title_lower, company, location, skills, salary) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        let mut insert_profile =
            tx.prepare("INSERT INTO job_profiles (job_id, profile) VALUES (?1, ?2)")?;
        for (job, profile) in &jobs {
            insert.execute(params![
                job.id,
                job.title,
                job.title.to_lowercase(),
                job.company,
                job.location,
                job.skills.join(","),
                job.salary
            ])?;
            insert_profile.execute(params![job.id, profile])?;
        }
        let mut insert =
            tx.prepare("INSERT INTO candidates (id, skills, profile) VALUES (?1, ?2, ?3)")?;
        for (id, (skills, profile)) in (0_i64..).zip(&candidates) {
            insert.execute(params![id, skills.join(","), profile])?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// A generated candidate: skills and encoded profile.
type Generated = (Vec<String>, Vec<u8>);

/// A seed's jobs and candidates, each with its encoded profile.
fn generate(seed: Seed) -> (Vec<(Job, Vec<u8>)>, Vec<Generated>) {
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let jobs = (0..seed.jobs as i64)
        .map(|id| {
            let skills = skills(&mut rng);
            let title = rng.pick(TITLES).to_owned();
            let company = rng.pick(COMPANIES).to_owned();
            let location = rng.pick(LOCATIONS).to_owned();
            let salary = 40_000 + (rng.next() % 80) as u32 * 1_000;
            let profile = encode_profile(&profile(&skills, &mut rng));
            let job = Job {
                id,
                title,
                company,
                location,
                skills,
                salary,
            };
            (job, profile)
        })
        .collect();
    let candidates = (0..seed.candidates)
        .map(|_| {
            let skills = skills(&mut rng);
            let profile = encode_profile(&profile(&skills, &mut rng));
            (skills, profile)
        })
        .collect();
    (jobs, candidates)
}

/// A small deterministic generator, so every seed is the same data.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        let at = (self.next() % items.len().max(1) as u64) as usize;
        items.get(at).copied().unwrap_or_default()
    }
    fn unit(&mut self) -> f32 {
        (self.next() % 10_000) as f32 / 10_000.0
    }
}

fn profile(skills: &[String], rng: &mut XorShift) -> Vec<f32> {
    let mut v: Vec<f32> = (0..DIMS).map(|_| rng.unit() * 0.1).collect();
    for skill in skills {
        let seed = skill.bytes().fold(1469598103934665603u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(1099511628211)
        });
        let mut srng = XorShift(seed | 1);
        for x in v.iter_mut() {
            *x += srng.unit();
        }
    }
    let norm = v
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(f32::EPSILON);
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

fn skills(rng: &mut XorShift) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for _ in 0..(2 + rng.next() % 4) {
        let skill = rng.pick(SKILLS).to_owned();
        if !out.contains(&skill) {
            out.push(skill);
        }
    }
    out
}
