//! Exponential backoff with full jitter: a link that stays down costs one attempt per
//! `max` seconds at most, and many boxes coming back at once do not retry in lockstep.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self { base, max, failures: 0 }
    }

    /// The wait after one more failure.
    pub fn fail(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let exp = self.base.saturating_mul(1u32 << self.failures.min(16)).min(self.max);
        let jitter = rand::random_range(0.5..=1.0);
        exp.mul_f64(jitter)
    }

    pub fn succeed(&mut self) {
        self.failures = 0;
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_is_capped() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let first = b.fail();
        assert!(first <= Duration::from_millis(200) && first >= Duration::from_millis(100));
        for _ in 0..30 {
            assert!(b.fail() <= Duration::from_secs(5));
        }
        b.succeed();
        assert_eq!(b.failures(), 0);
    }
}
