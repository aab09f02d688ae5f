//! Sliding anti-replay window over 64-bit packet numbers (RFC 4303 section 3.4.3; bitmap as in
//! RFC 6479). Check before opening a packet, accept only after it opened: a forged packet must
//! not move the window.

use crate::Error;

/// Words in the bitmap; the window spans `(WORDS - 1) * 64` packet numbers behind the highest.
const WORDS: usize = 16;
const BITS: u64 = (WORDS * 64) as u64;
/// How far behind the highest accepted number a packet may be and still be accepted.
pub const WINDOW: u64 = BITS - 64;

/// Remembers which of the last [`WINDOW`] packet numbers were accepted.
#[derive(Debug, Clone)]
pub struct ReplayWindow {
    /// Highest accepted packet number, `None` before the first.
    highest: Option<u64>,
    /// Bit `n % BITS` set: packet `n` accepted. Words wholly behind the window are cleared as
    /// `highest` moves past them (RFC 6479), so a bit is never read for a number it does not hold.
    bitmap: [u64; WORDS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl ReplayWindow {
    /// An empty window.
    pub fn new() -> Self {
        Self {
            highest: None,
            bitmap: [0; WORDS],
        }
    }

    /// Highest accepted packet number.
    pub fn highest(&self) -> Option<u64> {
        self.highest
    }

    /// Whether `n` may be accepted; does not change the window.
    pub fn check(&self, n: u64) -> Result<(), Error> {
        let Some(highest) = self.highest else {
            return Ok(());
        };
        if n > highest {
            return Ok(());
        }
        if highest - n >= WINDOW {
            return Err(Error::TooOld);
        }
        if self.bit(n) {
            return Err(Error::Replayed);
        }
        Ok(())
    }

    /// Checks `n` and records it as accepted.
    pub fn accept(&mut self, n: u64) -> Result<(), Error> {
        self.check(n)?;
        match self.highest {
            Some(highest) if n <= highest => {}
            Some(highest) => {
                // Clear every word between the old highest's word and n's word.
                let old_word = highest / 64;
                let new_word = n / 64;
                let steps = (new_word - old_word).min(WORDS as u64);
                for k in 1..=steps {
                    self.bitmap[((old_word + k) % WORDS as u64) as usize] = 0;
                }
                self.highest = Some(n);
            }
            None => {
                self.bitmap = [0; WORDS];
                self.highest = Some(n);
            }
        }
        let word = ((n / 64) % WORDS as u64) as usize;
        self.bitmap[word] |= 1 << (n % 64);
        Ok(())
    }

    fn bit(&self, n: u64) -> bool {
        let word = ((n / 64) % WORDS as u64) as usize;
        self.bitmap[word] & (1 << (n % 64)) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn replays_and_stale_numbers_are_refused() {
        let mut w = ReplayWindow::new();
        assert_eq!(w.accept(5), Ok(()));
        assert_eq!(w.accept(5), Err(Error::Replayed));
        assert_eq!(w.accept(3), Ok(()));
        assert_eq!(w.accept(3), Err(Error::Replayed));
        assert_eq!(w.accept(5000), Ok(()));
        assert_eq!(w.check(5000 - WINDOW), Err(Error::TooOld));
        assert_eq!(w.accept(5000 - WINDOW + 1), Ok(()));
        assert_eq!(w.accept(4999), Ok(()));
        assert_eq!(w.accept(4999), Err(Error::Replayed));
        assert_eq!(w.accept(u64::MAX), Ok(()));
        assert_eq!(w.accept(u64::MAX), Err(Error::Replayed));
    }

    #[test]
    fn check_alone_does_not_move_the_window() {
        let mut w = ReplayWindow::new();
        w.accept(10).unwrap();
        assert_eq!(w.check(100_000), Ok(()));
        assert_eq!(w.highest(), Some(10));
        assert_eq!(w.accept(10), Err(Error::Replayed));
    }

    proptest! {
        /// The window agrees with an exact set model on every number inside its reach.
        #[test]
        fn agrees_with_a_set_model(steps in prop::collection::vec((0u64..3000, any::<bool>()), 1..400)) {
            let mut w = ReplayWindow::new();
            let mut seen = BTreeSet::new();
            let mut highest: Option<u64> = None;
            for (n, _) in steps {
                let model = match highest {
                    Some(h) if n <= h && h - n >= WINDOW => Err(Error::TooOld),
                    _ if seen.contains(&n) => Err(Error::Replayed),
                    _ => Ok(()),
                };
                prop_assert_eq!(w.accept(n), model, "n {}", n);
                if model.is_ok() {
                    seen.insert(n);
                    highest = Some(highest.map_or(n, |h| h.max(n)));
                }
            }
        }
    }
}
