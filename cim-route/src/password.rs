//! Password hashing: salted Argon2id (PHC strings), computed by a fixed set of hashing
//! workers, each an OS thread that owns one argon2 memory area for as long as it lives.
//!
//! Why workers and not the blocking pool: each hash needs `m` KiB (19 MiB by default) of
//! memory. Allocated per hash on whichever blocking-pool thread was free, those blocks stayed
//! in glibc's per-thread arenas after use (once a freed 19 MiB block raises malloc's mmap
//! threshold, later ones come from the arenas, and an arena whose top is below its trim
//! threshold keeps it): a route that had served 1,000 concurrent wrong-password logins kept
//! hundreds of MiB resident for good, however few hashes ran at once (issue 24; the figures
//! are in README.md). Here the memory is allocated once per worker and reused, so the
//! hashing memory is `workers × m` whatever the number of logins, and never returns to
//! malloc while the route runs.
//!
//! - **Bounded.** `workers` threads (the route's `password_workers`, default one per core;
//!   more would only queue on the cores) take jobs from a queue of `workers` places; callers
//!   beyond that wait for a place (asynchronously: the runtime threads never run a hash). A
//!   job whose caller went away meanwhile (request deadline) is skipped, not hashed.
//! - **One area per worker, allocated on its first job.** A route that never hashes uses no
//!   hashing memory; [`Passwords::memory`] counts the areas alive (for tests and figures).
//! - **Stored parameters win.** A verification uses the algorithm, version, parameters and
//!   salt of the PHC string, so hashes made under other settings keep verifying. A stored
//!   hash that needs more memory than the worker's area gets an area of its size (the old one
//!   freed first, so a worker never holds two), given back after that hash; one that asks for
//!   more than [`MAX_STORED_MEMORY_KIB`] (or the configured cost, if larger) is refused as
//!   corrupt rather than allowed to commit gigabytes per worker.
//! - **Constant-time.** The computed hash is compared with the stored one by
//!   `password_hash::Output`'s constant-time equality.
//! - **Connect-only accounts** (`POST /api/admin/users/bulk`) store [`CONNECT_ONLY_HASH`],
//!   which is no PHC string: a login to one verifies against the dummy hash, as for an
//!   unknown name, and fails like a wrong password (not as a corrupt hash).

use argon2::{
    password_hash::phc::{Output, ParamsString, PasswordHash, Salt},
    Algorithm, Argon2, Block, Params, Version,
};
use rand::Rng;
use std::sync::{
    atomic::{AtomicU64, AtomicUsize, Ordering},
    Arc, Mutex, PoisonError,
};
use tokio::sync::{mpsc, oneshot, OnceCell};

/// Largest memory cost a stored hash may ask for, in KiB, when the configured cost is lower:
/// 256 MiB, over ten times the default (19 MiB) and over five times OWASP's largest
/// recommendation (46 MiB).
pub const MAX_STORED_MEMORY_KIB: u32 = 256 * 1024;

/// The password hash of accounts without a password (created in bulk through the business
/// API, logged in only through its connect call): no password verifies against it.
pub const CONNECT_ONLY_HASH: &str = "!connect-only";

#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error("password hashing failed: {0}")]
    Hash(String),
    #[error("stored password hash is malformed: {0}")]
    Corrupt(String),
    #[error("password hashing task failed: {0}")]
    Task(String),
    /// More hashes are waiting than the queue limit: shed, not queued.
    #[error("too many password checks at once")]
    Busy,
}

/// Hashing memory in use, for tests and measurements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryUse {
    /// Workers (and so threads that may hold an area).
    pub workers: usize,
    /// Argon2 memory areas allocated now.
    pub live: usize,
    /// The most areas ever allocated at once.
    pub peak: usize,
    /// Areas allocated so far (a worker reuses its area: this grows only when a worker
    /// allocates its first one or one for a stored hash with larger parameters).
    pub allocations: u64,
}

/// Hashes and verifies passwords.
pub struct Passwords {
    params: Params,
    /// The workers' queue. When the last `Passwords` goes, the workers see it closed and end.
    jobs: mpsc::Sender<Job>,
    workers: usize,
    areas: Arc<AreaCount>,
    /// Hashes waiting for a worker or running, and the most allowed ([`Self::with_queue_limit`]).
    in_flight: AtomicUsize,
    max_in_flight: usize,
    /// Hash of a random password, verified against when the user does not exist so a failed
    /// login takes as long whether or not the name is registered. Computed on first use.
    dummy: OnceCell<String>,
}

/// One unit of work for a worker, given the worker's memory.
type Job = Box<dyn FnOnce(&mut Memory) + Send>;

impl Passwords {
    /// Hashes with `params` (Argon2id) on `workers` hashing threads (at least one), started
    /// here; each allocates its memory on its first job.
    pub fn with_params(params: Params, workers: usize) -> Self {
        let workers = workers.max(1);
        let (jobs, queue) = mpsc::channel::<Job>(workers);
        let queue = Arc::new(Mutex::new(queue));
        let areas = Arc::new(AreaCount::default());
        let limit = params.m_cost().max(MAX_STORED_MEMORY_KIB);
        for i in 0..workers {
            let mut memory = Memory {
                area: None,
                configured: params.block_count(),
                limit_kib: limit,
                areas: areas.clone(),
            };
            let queue = queue.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("cim-argon2-{i}"))
                .spawn(move || work(&queue, &mut memory));
            if let Err(e) = spawned {
                // Fewer workers still hash (at least one must start: with none, every hash
                // fails with a task error and the route logs why).
                tracing::error!(error = %e, "cannot start a password hashing worker");
            }
        }
        Self {
            params,
            jobs,
            workers,
            areas,
            in_flight: AtomicUsize::new(0),
            max_in_flight: usize::MAX,
            dummy: OnceCell::new(),
        }
    }

    /// At most `limit` hashes waiting or running at once (at least one per worker); past it
    /// a hash or verification fails at once with [`PasswordError::Busy`], so a flood costs a
    /// bounded wait to the logins behind it instead of queueing without end.
    pub fn with_queue_limit(mut self, limit: usize) -> Self {
        self.max_in_flight = limit.max(self.workers);
        self
    }

    /// The hashing memory areas: how many workers, how many are allocated, the most ever.
    pub fn memory(&self) -> MemoryUse {
        MemoryUse {
            workers: self.workers,
            live: self.areas.live.load(Ordering::SeqCst),
            peak: self.areas.peak.load(Ordering::SeqCst),
            allocations: self.areas.allocations.load(Ordering::SeqCst),
        }
    }

    /// Runs `f` on a worker with its memory and returns its answer.
    async fn on_worker<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Memory) -> Result<T, PasswordError> + Send + 'static,
    ) -> Result<T, PasswordError> {
        if self.in_flight.fetch_add(1, Ordering::AcqRel) >= self.max_in_flight {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(PasswordError::Busy);
        }
        let _in_flight = InFlight(&self.in_flight);
        let (answer, answered) = oneshot::channel();
        let job: Job = Box::new(move |memory| {
            // The caller gave up (its request's deadline) while this waited in the queue:
            // nobody would read the answer, so do not spend a hash on it.
            if !answer.is_closed() {
                let _ = answer.send(f(memory));
            }
        });
        self.jobs
            .send(job)
            .await
            .map_err(|_| PasswordError::Task("no password hashing worker is running".into()))?;
        answered
            .await
            .map_err(|_| PasswordError::Task("the password hashing worker failed".into()))?
    }

    /// A salted PHC hash string of `password`.
    pub async fn hash(&self, password: String) -> Result<String, PasswordError> {
        let params = self.params.clone();
        let mut salt = [0u8; 16];
        rand::rng().fill_bytes(&mut salt);
        self.on_worker(move |memory| hash_with(memory, &params, password.as_bytes(), &salt))
            .await
    }

    /// Whether `password` matches `stored`. With `stored == None` (unknown user) or
    /// [`CONNECT_ONLY_HASH`] it verifies against a dummy hash and answers false, spending the
    /// same time as a real check.
    pub async fn verify(
        &self,
        password: String,
        stored: Option<String>,
    ) -> Result<bool, PasswordError> {
        // A connect-only account costs the same time as an unknown name, and never matches.
        let (stored, real) = match stored.filter(|s| s != CONNECT_ONLY_HASH) {
            Some(s) => (s, true),
            None => (self.dummy_hash().await?, false),
        };
        let matches = self
            .on_worker(move |memory| verify_with(memory, password.as_bytes(), &stored))
            .await?;
        Ok(real && matches)
    }

    async fn dummy_hash(&self) -> Result<String, PasswordError> {
        self.dummy
            .get_or_try_init(|| async {
                let mut random = [0u8; 24];
                rand::rng().fill_bytes(&mut random);
                self.hash(format!("{random:02x?}")).await
            })
            .await
            .cloned()
    }
}

/// Counts one hash in flight until dropped (also when its caller gives up).
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A worker's loop: one job at a time until the queue closes. A job that panics costs its
/// caller an error (its answer is dropped) and the worker its area, not the worker itself.
fn work(queue: &Mutex<mpsc::Receiver<Job>>, memory: &mut Memory) {
    loop {
        // The workers share one receiver: the one holding the lock waits for the next job,
        // the others for the lock; either way they are idle.
        let job = queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .blocking_recv();
        let Some(job) = job else { return };
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(memory)));
        if ran.is_err() {
            tracing::error!("a password hashing job panicked");
            memory.area = None;
        }
        memory.shrink();
    }
}

/// Counts of argon2 memory areas alive (shared by the workers of one [`Passwords`]).
#[derive(Debug, Default)]
struct AreaCount {
    live: AtomicUsize,
    peak: AtomicUsize,
    allocations: AtomicU64,
}

/// One allocation of argon2 blocks, counted in [`AreaCount`] while it exists.
struct Area {
    blocks: Vec<Block>,
    count: Arc<AreaCount>,
}

impl Area {
    /// `len` zeroed blocks. Fails (rather than aborting the process) when the allocator
    /// cannot give them.
    fn new(len: usize, count: &Arc<AreaCount>) -> Result<Self, PasswordError> {
        let mut blocks = Vec::new();
        blocks.try_reserve_exact(len).map_err(|e| {
            PasswordError::Hash(format!("cannot allocate {} KiB for argon2: {e}", len))
        })?;
        let live = count.live.fetch_add(1, Ordering::SeqCst) + 1;
        count.peak.fetch_max(live, Ordering::SeqCst);
        count.allocations.fetch_add(1, Ordering::SeqCst);
        // Touched now (zeroed) rather than page by page during the first hash.
        blocks.resize(len, Block::default());
        Ok(Self {
            blocks,
            count: count.clone(),
        })
    }
}

impl Drop for Area {
    fn drop(&mut self) {
        // Freed before it stops being counted, so the count is never below what exists.
        drop(std::mem::take(&mut self.blocks));
        self.count.live.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A worker's memory: its area (once it has hashed) and what sizes it.
struct Memory {
    area: Option<Area>,
    /// Blocks of the configured parameters: the size the area is kept at.
    configured: usize,
    /// Largest memory cost accepted from a stored hash, in KiB.
    limit_kib: u32,
    areas: Arc<AreaCount>,
}

impl Memory {
    /// At least the blocks `params` need: the worker's area, reallocated first if it is
    /// smaller (the old one freed before the new one exists).
    fn blocks_for(&mut self, params: &Params) -> Result<&mut [Block], PasswordError> {
        let needed = params.block_count();
        if self.area.as_ref().is_none_or(|a| a.blocks.len() < needed) {
            self.area = None;
            self.area = Some(Area::new(needed.max(self.configured), &self.areas)?);
        }
        match &mut self.area {
            Some(area) => Ok(&mut area.blocks[..needed]),
            None => Err(PasswordError::Hash("no argon2 memory".into())),
        }
    }

    /// Gives back an area grown for a stored hash with larger parameters: the next job
    /// allocates the configured size again, so the steady state stays `workers × m`.
    fn shrink(&mut self) {
        if self
            .area
            .as_ref()
            .is_some_and(|a| a.blocks.len() > self.configured)
        {
            self.area = None;
        }
    }
}

/// The PHC string of `password` hashed with Argon2id v19, `params` and `salt`, computed in
/// the worker's memory. The same string argon2's own `PasswordHasher` makes.
fn hash_with(
    memory: &mut Memory,
    params: &Params,
    password: &[u8],
    salt_bytes: &[u8],
) -> Result<String, PasswordError> {
    let failed = |e: &dyn std::fmt::Display| PasswordError::Hash(e.to_string());
    let salt = Salt::new(salt_bytes).map_err(|e| failed(&e))?;
    let output = compute(
        memory,
        Algorithm::Argon2id,
        Version::V0x13,
        params,
        password,
        salt_bytes,
        params.output_len().unwrap_or(Params::DEFAULT_OUTPUT_LEN),
    )?;
    let phc = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(params).map_err(|e| failed(&e))?,
        salt: Some(salt),
        hash: Some(output),
    };
    Ok(phc.to_string())
}

/// Whether `password` hashes to `stored` (a PHC string) with `stored`'s own algorithm,
/// version, parameters and salt.
fn verify_with(memory: &mut Memory, password: &[u8], stored: &str) -> Result<bool, PasswordError> {
    let corrupt = |e: &dyn std::fmt::Display| PasswordError::Corrupt(e.to_string());
    let phc = PasswordHash::new(stored).map_err(|e| corrupt(&e))?;
    let algorithm = Algorithm::try_from(phc.algorithm.as_str()).map_err(|e| corrupt(&e))?;
    let version = phc
        .version
        .map(Version::try_from)
        .transpose()
        .map_err(|e| corrupt(&e))?
        .unwrap_or_default();
    let params = Params::try_from(&phc).map_err(|e| corrupt(&e))?;
    if params.m_cost() > memory.limit_kib {
        return Err(PasswordError::Corrupt(format!(
            "m={} KiB is over the {} KiB a stored hash may use",
            params.m_cost(),
            memory.limit_kib
        )));
    }
    let (Some(salt), Some(expected)) = (phc.salt, phc.hash) else {
        return Err(PasswordError::Corrupt("no salt or no hash".into()));
    };
    // What is hashed is the decoded salt (a PHC salt holds its bytes, at most 48), as
    // argon2's own `PasswordHasher` does.
    let computed = compute(
        memory,
        algorithm,
        version,
        &params,
        password,
        &salt,
        expected.len(),
    )?;
    // `Output`'s equality is constant-time.
    Ok(computed == expected)
}

/// The raw argon2 output of `len` bytes, computed in the worker's memory.
fn compute(
    memory: &mut Memory,
    algorithm: Algorithm,
    version: Version,
    params: &Params,
    password: &[u8],
    salt: &[u8],
    len: usize,
) -> Result<Output, PasswordError> {
    let blocks = memory.blocks_for(params)?;
    let argon2 = Argon2::new(algorithm, version, params.clone());
    let failed = |e: &dyn std::fmt::Display| PasswordError::Hash(e.to_string());
    let mut buf = [0u8; Output::MAX_LENGTH];
    let out = buf
        .get_mut(..len)
        .ok_or_else(|| PasswordError::Hash(format!("an output of {len} bytes is too long")))?;
    argon2
        .hash_password_into_with_memory(password, salt, out, &mut *blocks)
        .map_err(|e| failed(&e))?;
    Output::new(out).map_err(|e| failed(&e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::password_hash::{PasswordHasher, PasswordVerifier};

    /// Cheap parameters: the tests check behaviour, not hash strength.
    fn cheap_params() -> Params {
        Params::new(8, 1, 1, None).unwrap()
    }

    fn cheap() -> Passwords {
        Passwords::with_params(cheap_params(), 2)
    }

    /// A PHC string made by argon2's own hasher (what earlier versions of the route stored).
    fn by_argon2(algorithm: Algorithm, version: Version, params: Params, password: &str) -> String {
        Argon2::new(algorithm, version, params)
            .hash_password_with_salt(password.as_bytes(), b"sixteen byte salt")
            .unwrap()
            .to_string()
    }

    #[tokio::test]
    async fn hash_then_verify() {
        let p = cheap();
        let h = p.hash("correct horse".into()).await.unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=8,t=1,p=1$"), "{h}");
        assert!(!h.contains("correct horse"));
        assert!(p
            .verify("correct horse".into(), Some(h.clone()))
            .await
            .unwrap());
        assert!(!p
            .verify("wrong horse".into(), Some(h.clone()))
            .await
            .unwrap());
        // Salted: the same password hashes differently.
        assert_ne!(h, p.hash("correct horse".into()).await.unwrap());
    }

    #[tokio::test]
    async fn unknown_user_never_verifies() {
        let p = cheap();
        assert!(!p.verify("anything".into(), None).await.unwrap());
    }

    #[tokio::test]
    async fn corrupt_hash_is_an_error() {
        let p = cheap();
        for stored in [
            "not-a-phc-string",
            // Not argon2 at all.
            "$scrypt$ln=4,r=8,p=1$c2l4dGVlbiBieXRlIHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
            // No hash part.
            "$argon2id$v=19$m=8,t=1,p=1$c2l4dGVlbiBieXRlIHNhbHQ",
        ] {
            assert!(
                matches!(
                    p.verify("x".into(), Some(stored.into())).await,
                    Err(PasswordError::Corrupt(_))
                ),
                "{stored}"
            );
        }
    }

    /// Ours and argon2's own `PasswordHasher` make the same string from the same salt, and
    /// each verifies the other's: hashes stored before the workers keep verifying, and a
    /// route rolled back can verify hashes made by this one.
    #[tokio::test]
    async fn phc_strings_are_argon2s() {
        let params = cheap_params();
        let mut memory = Memory {
            area: None,
            configured: params.block_count(),
            limit_kib: MAX_STORED_MEMORY_KIB,
            areas: Arc::default(),
        };
        let ours = hash_with(&mut memory, &params, b"pw", b"sixteen byte salt").unwrap();
        let theirs = by_argon2(Algorithm::Argon2id, Version::V0x13, params, "pw");
        assert_eq!(ours, theirs);

        let p = cheap();
        let made = p.hash("pw".into()).await.unwrap();
        let parsed = PasswordHash::new(&made).unwrap();
        assert!(Argon2::default().verify_password(b"pw", &parsed).is_ok());
        assert!(Argon2::default().verify_password(b"px", &parsed).is_err());
    }

    /// Stored hashes made with other algorithms, versions and parameters (more memory than
    /// the workers' areas, more lanes, a longer output) verify with their own parameters.
    #[tokio::test]
    async fn stored_parameters_are_used() {
        let p = cheap();
        let stored = [
            by_argon2(
                Algorithm::Argon2id,
                Version::V0x13,
                Params::new(64, 1, 1, None).unwrap(),
                "pw",
            ),
            by_argon2(
                Algorithm::Argon2id,
                Version::V0x13,
                Params::new(32, 3, 2, Some(64)).unwrap(),
                "pw",
            ),
            by_argon2(Algorithm::Argon2i, Version::V0x13, cheap_params(), "pw"),
            by_argon2(Algorithm::Argon2d, Version::V0x10, cheap_params(), "pw"),
        ];
        for h in stored {
            assert!(p.verify("pw".into(), Some(h.clone())).await.unwrap(), "{h}");
            assert!(
                !p.verify("pW".into(), Some(h.clone())).await.unwrap(),
                "{h}"
            );
        }
        // The areas grown for the larger hashes were given back: each worker keeps at most
        // one, of the configured size.
        let used = p.memory();
        assert!(used.live <= 2 && used.peak <= 2, "{used:?}");
    }

    #[tokio::test]
    async fn stored_hash_over_the_memory_limit_is_refused() {
        let p = cheap();
        let h = by_argon2(Algorithm::Argon2id, Version::V0x13, cheap_params(), "pw");
        let huge = h.replace("m=8,", &format!("m={},", MAX_STORED_MEMORY_KIB + 1));
        assert!(matches!(
            p.verify("pw".into(), Some(huge)).await,
            Err(PasswordError::Corrupt(_))
        ));
        // Nothing was allocated for it.
        assert_eq!(p.memory().peak, 0);
    }

    /// The issue-24 bound: however many verifications run at once, no more argon2 memory
    /// areas exist than workers, and with the configured parameters each worker allocates
    /// its area once and reuses it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn live_areas_never_exceed_the_workers() {
        const WORKERS: usize = 3;
        let p = Arc::new(Passwords::with_params(
            Params::new(64, 1, 1, None).unwrap(),
            WORKERS,
        ));
        let right = p.hash("right".into()).await.unwrap();
        // A stored hash needing more memory than the areas: its worker reallocates.
        let larger = by_argon2(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(256, 1, 1, None).unwrap(),
            "right",
        );

        let done = tokio_util::sync::CancellationToken::new();
        let observer = tokio::spawn({
            let (p, done) = (p.clone(), done.clone());
            async move {
                let mut observations = 0u64;
                while !done.is_cancelled() {
                    let used = p.memory();
                    assert!(used.live <= WORKERS, "{used:?}");
                    observations += 1;
                    tokio::task::yield_now().await;
                }
                observations
            }
        });
        let checks = (0..200).map(|i| {
            let p = p.clone();
            let stored = match i % 5 {
                0 => None,
                1 => Some(larger.clone()),
                _ => Some(right.clone()),
            };
            let password = if i % 2 == 0 { "right" } else { "wrong" };
            let expected = stored.is_some() && password == "right";
            tokio::spawn(async move {
                let got = p.verify(password.into(), stored).await.unwrap();
                assert_eq!(got, expected, "check {i}");
            })
        });
        for check in futures_util::future::join_all(checks).await {
            check.unwrap();
        }
        done.cancel();
        assert!(observer.await.unwrap() > 0);
        let used = p.memory();
        assert!(used.peak <= WORKERS && used.peak >= 1, "{used:?}");
        assert!(used.live <= WORKERS, "{used:?}");

        // Only the configured parameters now: the areas are reused, none is allocated per
        // hash (the three workers allocate at most one each).
        let before = p.memory().allocations;
        let checks = (0..60).map(|_| {
            let (p, right) = (p.clone(), right.clone());
            tokio::spawn(async move { p.verify("wrong".into(), Some(right)).await.unwrap() })
        });
        for check in futures_util::future::join_all(checks).await {
            assert!(!check.unwrap());
        }
        let used = p.memory();
        assert!(
            used.allocations - before <= WORKERS as u64,
            "{before} → {used:?}"
        );
        assert!(used.peak <= WORKERS, "{used:?}");
    }
}
