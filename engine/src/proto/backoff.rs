//! NAK back-off: a truncated exponential delay sized by group size (RFC 5401, section 2.5.1).
//!
//! Most delays fall near the maximum and few near zero, so of the receivers that missed a
//! packet usually only one NAKs before the others hear it and hold back.

use super::Nanos;
use rand::Rng;

/// Draws NAK delays in `0..max_backoff_ns` from the distribution of Nonnenmacher and Biersack.
#[derive(Debug, Clone)]
pub struct NakBackoff {
    max_backoff_ns: Nanos,
    lambda: f64,
    /// `e^lambda - 1`, kept so each draw is one logarithm.
    base: f64,
}

impl NakBackoff {
    /// A back-off for a group of about `group_size` members.
    pub fn new(max_backoff_ns: Nanos, group_size: u32) -> Self {
        let lambda = (f64::from(group_size.max(2))).ln() + 1.0;
        Self {
            max_backoff_ns,
            lambda,
            base: lambda.exp() - 1.0,
        }
    }

    /// One delay, from the caller's seeded random source.
    pub fn delay_ns(&self, rng: &mut impl Rng) -> Nanos {
        if self.max_backoff_ns == 0 {
            return 0;
        }
        let x: f64 = rng.random();
        let fraction = (x * self.base + 1.0).ln() / self.lambda;
        (fraction.clamp(0.0, 1.0) * self.max_backoff_ns as f64) as Nanos
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn delays_stay_in_range_and_lean_late() {
        let b = NakBackoff::new(1_000_000, 1000);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let draws: Vec<_> = (0..10_000).map(|_| b.delay_ns(&mut rng)).collect();
        assert!(draws.iter().all(|&d| d <= 1_000_000));
        let early = draws.iter().filter(|&&d| d < 500_000).count();
        // With lambda = ln(1000) + 1 about 2% of the draws land in the first half.
        assert!(early < 1000, "too many early delays: {early}");
        assert!(early > 0);
    }
}
