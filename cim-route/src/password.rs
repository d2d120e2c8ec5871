//! Password hashing: salted Argon2id (PHC strings), computed on the blocking thread pool so
//! the async runtime threads never stall on a deliberately slow hash, and bounded by a
//! semaphore because each hash holds ~19 MiB of memory (a burst of logins must not exhaust
//! RAM through the blocking pool's 512 threads).

use argon2::{
    password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString},
    Argon2, Params,
};
use rand::RngCore;
use std::sync::Arc;
use tokio::sync::{OnceCell, Semaphore};

#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error("password hashing failed: {0}")]
    Hash(String),
    #[error("stored password hash is malformed: {0}")]
    Corrupt(String),
    #[error("password hashing task failed: {0}")]
    Task(String),
}

/// Hashes and verifies passwords.
pub struct Passwords {
    params: Params,
    permits: Arc<Semaphore>,
    /// Hash of a random password, verified against when the user does not exist so a failed
    /// login takes as long whether or not the name is registered. Computed on first use.
    dummy: OnceCell<String>,
}

impl Passwords {
    /// Hashes with `params` (Argon2id), at most `max_concurrent` at once.
    pub fn with_params(params: Params, max_concurrent: usize) -> Self {
        Self {
            params,
            permits: Arc::new(Semaphore::new(max_concurrent.max(1))),
            dummy: OnceCell::new(),
        }
    }

    fn hasher(params: Params) -> Argon2<'static> {
        Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
    }

    /// Runs `f` on the blocking pool, holding a permit.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, PasswordError> + Send + 'static,
    ) -> Result<T, PasswordError> {
        // The semaphore is never closed, so acquiring only fails if it were.
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| PasswordError::Task(e.to_string()))?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            f()
        })
        .await
        .map_err(|e| PasswordError::Task(e.to_string()))?
    }

    /// A salted PHC hash string of `password`.
    pub async fn hash(&self, password: String) -> Result<String, PasswordError> {
        let params = self.params.clone();
        self.blocking(move || {
            let mut salt = [0u8; 16];
            rand::rng().fill_bytes(&mut salt);
            let salt =
                SaltString::encode_b64(&salt).map_err(|e| PasswordError::Hash(e.to_string()))?;
            Self::hasher(params)
                .hash_password(password.as_bytes(), &salt)
                .map(|h| h.to_string())
                .map_err(|e| PasswordError::Hash(e.to_string()))
        })
        .await
    }

    /// Whether `password` matches `stored`. With `stored == None` (unknown user) it verifies
    /// against a dummy hash and answers false, spending the same time as a real check.
    pub async fn verify(
        &self,
        password: String,
        stored: Option<String>,
    ) -> Result<bool, PasswordError> {
        let (stored, real) = match stored {
            Some(s) => (s, true),
            None => (self.dummy_hash().await?, false),
        };
        let matches = self
            .blocking(move || {
                let parsed = PasswordHash::new(&stored)
                    .map_err(|e| PasswordError::Corrupt(e.to_string()))?;
                // Parameters come from the PHC string, so old hashes keep verifying after a
                // change of defaults.
                Ok(Argon2::default()
                    .verify_password(password.as_bytes(), &parsed)
                    .is_ok())
            })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Cheap parameters: the tests check behaviour, not hash strength.
    fn cheap() -> Passwords {
        Passwords::with_params(Params::new(8, 1, 1, None).unwrap(), 2)
    }

    #[tokio::test]
    async fn hash_then_verify() {
        let p = cheap();
        let h = p.hash("correct horse".into()).await.unwrap();
        assert!(h.starts_with("$argon2id$"), "{h}");
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
        assert!(matches!(
            p.verify("x".into(), Some("not-a-phc-string".into())).await,
            Err(PasswordError::Corrupt(_))
        ));
    }
}
