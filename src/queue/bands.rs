//! Priority bands: priorities for quorum queues.

/// Priority bands for quorum queues: one queue per band, consumed with weights.
///
/// `Bands::new(&[(7, 8), (0, 1)])`: priorities 7 and up go to the high band, the rest to the
/// low band; while both have work, the high band gets 8 picks for each low pick.
///
/// ```
/// use cottontail::{Bands, Queue};
/// let q = Queue::new("uploads").bands(Bands::new(&[(7, 8), (3, 2), (0, 1)]));
/// assert_eq!(Bands::new(&[(7, 8), (0, 1)]).band_of(9), 0);
/// assert_eq!(Bands::new(&[(7, 8), (0, 1)]).band_of(2), 1);
/// # let _ = q;
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bands {
    /// (lowest priority of the band, weight), highest band first.
    pub(crate) levels: Vec<(u8, u32)>,
}

impl Bands {
    /// Bands from `(lowest priority, weight)` pairs, in any order; a band starting at 0 is
    /// added (weight 1) if missing, so every message has a band.
    pub fn new(levels: &[(u8, u32)]) -> Self {
        let mut levels: Vec<(u8, u32)> = levels.iter().map(|(p, w)| (*p, (*w).max(1))).collect();
        levels.sort_by_key(|l| std::cmp::Reverse(l.0));
        levels.dedup_by_key(|l| l.0);
        if levels.last().map(|l| l.0) != Some(0) {
            levels.push((0, 1));
        }
        Self { levels }
    }

    /// The band (0 = highest) of a message priority.
    pub fn band_of(&self, priority: u8) -> usize {
        self.levels
            .iter()
            .position(|(min, _)| priority >= *min)
            .unwrap_or(self.levels.len() - 1)
    }

    /// How many bands.
    pub fn len(&self) -> usize {
        self.levels.len()
    }

    /// Never true: there is always a band starting at priority 0.
    pub fn is_empty(&self) -> bool {
        self.levels.is_empty()
    }
}
