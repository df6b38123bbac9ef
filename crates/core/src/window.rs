//! Rolling windows: per segment, how many promoters, passives and detractors answered within
//! each configured window, queried at any `now`, in small fixed memory; and the time rules
//! the windows imply (`too_old`, `future`).
//!
//! Each window moves in steps (its resolution): `length / buckets` by default (60 buckets, so
//! a 1h window moves in 1-minute steps), or a step configured per window
//! ([`WindowSpecs::with_resolutions`]). A step divides the length into whole milliseconds and
//! is at most 1/60 of it. Steps are aligned to the Unix epoch: step `k` is the half-open
//! interval `[k * step, (k + 1) * step)`.
//!
//! At time `now` a window covers the half-open event-time interval `[from, to)`
//! ([`WindowSpec::interval`]): `to` is the end of the step that holds `now`, and
//! `from = to - length`. A response counts in the window exactly when
//! `from <= responded_at < to`. The counts are computed from that very interval, so the
//! numbers served and the interval stated with them cannot disagree.
//!
//! A response is `too_old` when `t < from` of the longest window at `now`
//! ([`WindowSpecs::longest_from`]), so every accepted response counts in at least one window;
//! it is `future` when `t > now + max_future_skew`. A response ahead of the clock but within
//! the skew counts once `to` has passed it; a late one counts in every window whose
//! interval still holds it.
//!
//! Each window also answers for the window just before it, `[from - length, from)`, so that
//! its change can be tested ([`crate::nps::Change`]).
//!
//! A ring per window and segment holds one tally per step of the window and of the one before
//! it, plus headroom for responses up to the allowed clock skew ahead of `now`. Memory per
//! segment is therefore bounded, whatever the traffic, and proportional to the number of
//! steps: at most `16 bytes * (2 * length / step + skew / step)` per window (about 8 KiB for
//! the four default windows at 60 steps each; a slot holds 32-bit counts, saturating). A ring
//! with counts in only a few steps (up to 8) keeps just those (24 bytes each): most segments
//! of a deployment with many segments see few responses per window. A finer resolution costs
//! memory in every busy segment: a 28d window in 1-minute steps needs 80,640 slots, about
//! 1.3 MiB per segment.

use std::fmt;

use crate::nps::{Category, Tally};
use crate::time::{Span, Timestamp};

/// The fewest steps a window is cut into: a step is at most 1/60 of the window's length.
pub const MIN_STEPS: i64 = 60;

/// One rolling window: its name (as configured, e.g. `7d`), its length and its step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowSpec {
    name: String,
    length: Span,
    bucket: Span,
    /// Steps (buckets) in the window: `length / bucket`.
    buckets: i64,
    /// Slots in each ring: twice `buckets` (this window and the one before) plus headroom for
    /// future events.
    slots: i64,
}

impl WindowSpec {
    /// The configured name, used in labels and the API (`1h`, `7d`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How far back the window reaches: `to - from`.
    pub fn length(&self) -> Span {
        self.length
    }

    /// The window's step (resolution): the width of one bucket, how far `from` and `to`
    /// move at once.
    pub fn bucket(&self) -> Span {
        self.bucket
    }

    /// How many steps (buckets) the window covers: `length / bucket`.
    pub fn buckets(&self) -> i64 {
        self.buckets
    }

    /// The bucket (step number) an instant lies in: `floor(t / bucket)`.
    pub fn bucket_of(&self, t: Timestamp) -> i64 {
        t.millis().div_euclid(self.bucket.millis())
    }

    /// The half-open event-time interval `[from, to)` the window covers at `now`: `to` is the
    /// end of the step that holds `now`, `from = to - length`. A response at `t` counts in
    /// the window exactly when `from <= t < to`. Both ends are multiples of the step, and
    /// `from <= now < to`.
    pub fn interval(&self, now: Timestamp) -> (Timestamp, Timestamp) {
        let step = self.bucket.millis();
        let to = self.bucket_of(now).saturating_add(1).saturating_mul(step);
        let from = to.saturating_sub(self.length.millis());
        (Timestamp(from), Timestamp(to))
    }

    /// The interval just before the window at `now`: `[from - length, from)`.
    pub fn previous_interval(&self, now: Timestamp) -> (Timestamp, Timestamp) {
        let (from, _) = self.interval(now);
        (
            Timestamp(from.millis().saturating_sub(self.length.millis())),
            from,
        )
    }

    /// The buckets `first..=last` that make up the interval at `now`.
    fn bucket_range(&self, now: Timestamp) -> (i64, i64) {
        let (from, to) = self.interval(now);
        (
            self.bucket_of(from),
            self.bucket_of(Timestamp(to.millis() - 1)),
        )
    }
}

/// The configured windows and the time rules they imply: which responses are too old to
/// count anywhere, and how far ahead of the clock a response may be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowSpecs {
    windows: Vec<WindowSpec>,
    longest: Span,
    max_future_skew: Span,
}

/// Why a window configuration is not usable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WindowSpecError {
    /// No windows configured.
    Empty,
    /// A window name is not a duration.
    BadName(String),
    /// Two windows have the same name.
    Repeated(String),
    /// A window without a configured resolution: its length is not a positive whole number
    /// of `buckets` buckets of whole milliseconds.
    NotDivisible {
        /// The window.
        name: String,
        /// Buckets per window.
        buckets: u32,
    },
    /// The skew is negative.
    NegativeSkew,
    /// A configured resolution is zero or negative.
    NonPositiveStep {
        /// The window.
        name: String,
        /// The configured step.
        step: Span,
    },
    /// A configured resolution does not divide the window's length.
    StepNotDivisor {
        /// The window.
        name: String,
        /// The configured step.
        step: Span,
    },
    /// A window's step (configured, or `length / buckets`) is coarser than 1/60 of its
    /// length.
    StepTooCoarse {
        /// The window.
        name: String,
        /// The step.
        step: Span,
    },
    /// A resolution is given for a window that is not configured.
    UnknownWindow(String),
    /// Two resolutions are given for the same window.
    RepeatedResolution(String),
}

impl fmt::Display for WindowSpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WindowSpecError::Empty => f.write_str("at least one window is needed"),
            WindowSpecError::BadName(name) => {
                write!(f, "window {name:?} is not a duration such as 1h, 24h, 7d")
            }
            WindowSpecError::Repeated(name) => write!(f, "window {name:?} is listed twice"),
            WindowSpecError::NotDivisible { name, buckets } => write!(
                f,
                "window {name:?} cannot be cut into {buckets} buckets of whole milliseconds"
            ),
            WindowSpecError::NegativeSkew => f.write_str("the allowed clock skew is negative"),
            WindowSpecError::NonPositiveStep { name, step } => write!(
                f,
                "resolution of window {name:?} is {}ms; it must be positive",
                step.millis()
            ),
            WindowSpecError::StepNotDivisor { name, step } => write!(
                f,
                "resolution {step} does not divide window {name:?} into whole steps"
            ),
            WindowSpecError::StepTooCoarse { name, step } => write!(
                f,
                "window {name:?} would move in steps of {step}, coarser than 1/{MIN_STEPS} of \
                 its length; use a finer resolution or more buckets"
            ),
            WindowSpecError::UnknownWindow(name) => write!(
                f,
                "a resolution is given for window {name:?}, which is not in windows.lengths"
            ),
            WindowSpecError::RepeatedResolution(name) => {
                write!(f, "two resolutions are given for window {name:?}")
            }
        }
    }
}

impl std::error::Error for WindowSpecError {}

/// Whether a response's event time lets it count, given the clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// At or after the longest window's `from`, and no more than the skew ahead of `now`.
    Admitted,
    /// Before the longest window's `from` at `now`: it can count in no window.
    TooOld,
    /// More than the allowed skew ahead of `now`.
    Future,
}

impl WindowSpecs {
    /// Windows named by their lengths (`["1h", "24h", "7d", "28d"]`), each cut into
    /// `buckets` steps, admitting responses up to `max_future_skew` ahead of the clock.
    /// The same as [`WindowSpecs::with_resolutions`] with no resolutions.
    pub fn new<S: AsRef<str>>(
        names: &[S],
        buckets: u32,
        max_future_skew: Span,
    ) -> Result<WindowSpecs, WindowSpecError> {
        Self::with_resolutions(names, buckets, &[], max_future_skew)
    }

    /// Windows named by their lengths (`["1h", "24h", "7d", "28d"]`), admitting responses up
    /// to `max_future_skew` ahead of the clock. A window named in `resolutions` (window name
    /// -> step) moves in that step; the others in steps of `length / buckets`.
    ///
    /// Every step must be positive, divide its window's length, and be at most 1/60 of it.
    /// Memory per segment grows with the number of steps: a window of `length / step` steps
    /// keeps that many tallies (24 bytes each) in every segment.
    pub fn with_resolutions<S: AsRef<str>>(
        names: &[S],
        buckets: u32,
        resolutions: &[(String, Span)],
        max_future_skew: Span,
    ) -> Result<WindowSpecs, WindowSpecError> {
        if names.is_empty() {
            return Err(WindowSpecError::Empty);
        }
        if max_future_skew.millis() < 0 {
            return Err(WindowSpecError::NegativeSkew);
        }
        for (i, (name, _)) in resolutions.iter().enumerate() {
            let name = name.trim();
            if !names.iter().any(|n| n.as_ref().trim() == name) {
                return Err(WindowSpecError::UnknownWindow(name.to_owned()));
            }
            if resolutions[..i].iter().any(|(n, _)| n.trim() == name) {
                return Err(WindowSpecError::RepeatedResolution(name.to_owned()));
            }
        }
        let mut windows: Vec<WindowSpec> = Vec::with_capacity(names.len());
        for name in names.iter().map(|n| n.as_ref().trim()) {
            let length: Span = name
                .parse()
                .map_err(|_| WindowSpecError::BadName(name.to_owned()))?;
            if windows.iter().any(|w| w.name == name) {
                return Err(WindowSpecError::Repeated(name.to_owned()));
            }
            let configured = resolutions
                .iter()
                .find(|(n, _)| n.trim() == name)
                .map(|(_, step)| *step);
            let bucket = match configured {
                Some(step) if step.millis() <= 0 => {
                    return Err(WindowSpecError::NonPositiveStep {
                        name: name.to_owned(),
                        step,
                    })
                }
                Some(step) if length.millis() <= 0 || length.millis() % step.millis() != 0 => {
                    return Err(WindowSpecError::StepNotDivisor {
                        name: name.to_owned(),
                        step,
                    })
                }
                Some(step) => step,
                None => {
                    let divisible = buckets > 0
                        && length.millis() > 0
                        && length.millis() % i64::from(buckets) == 0;
                    if !divisible {
                        return Err(WindowSpecError::NotDivisible {
                            name: name.to_owned(),
                            buckets,
                        });
                    }
                    Span(length.millis() / i64::from(buckets))
                }
            };
            let steps = length.millis() / bucket.millis();
            if steps < MIN_STEPS {
                return Err(WindowSpecError::StepTooCoarse {
                    name: name.to_owned(),
                    step: bucket,
                });
            }
            let headroom = (max_future_skew.millis() + bucket.millis() - 1) / bucket.millis();
            windows.push(WindowSpec {
                name: name.to_owned(),
                length,
                bucket,
                buckets: steps,
                slots: 2 * steps + headroom,
            });
        }
        let longest = windows.iter().map(|w| w.length).max().unwrap_or_default();
        Ok(WindowSpecs {
            windows,
            longest,
            max_future_skew,
        })
    }

    /// The windows, in configured order.
    pub fn windows(&self) -> &[WindowSpec] {
        &self.windows
    }

    /// The index of a window by name.
    pub fn position(&self, name: &str) -> Option<usize> {
        self.windows.iter().position(|w| w.name == name)
    }

    /// The longest window's length.
    pub fn longest(&self) -> Span {
        self.longest
    }

    /// How far ahead of the clock a response may be.
    pub fn max_future_skew(&self) -> Span {
        self.max_future_skew
    }

    /// The coarsest time resolution that loses nothing: the greatest common divisor of the
    /// windows' steps. Every window's `from` and `to` are multiples of it, so pre-aggregated
    /// counts may round event times down to it without changing any window's counts.
    pub fn resolution(&self) -> Span {
        let gcd = |mut a: i64, mut b: i64| {
            while b != 0 {
                (a, b) = (b, a % b);
            }
            a
        };
        Span(
            self.windows
                .iter()
                .fold(0, |g, w| gcd(g, w.bucket.millis())),
        )
    }

    /// The `from` of the longest window at `now`: the earliest event time any window covers
    /// at `now`. Strictly it is the earliest `from` of all windows, which is the longest
    /// window's unless two windows' lengths differ by less than a step; either way every
    /// response at or after it counts in at least one window at `now` (once `now` reaches it).
    pub fn longest_from(&self, now: Timestamp) -> Timestamp {
        self.windows
            .iter()
            .map(|w| w.interval(now).0)
            .min()
            .unwrap_or(now)
    }

    /// Whether a response at `t` can count, with the clock at `now`: too old if
    /// `t < longest_from(now)` (it would count in no window), future if
    /// `t > now + max_future_skew`.
    pub fn admit(&self, t: Timestamp, now: Timestamp) -> Admission {
        if t < self.longest_from(now) {
            Admission::TooOld
        } else if t > now.plus(self.max_future_skew) {
            Admission::Future
        } else {
            Admission::Admitted
        }
    }
}

/// One segment's counts in every configured window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentWindows {
    rings: Box<[Ring]>,
}

/// The recent buckets of one window: the buckets `newest - len < b <= newest`. A ring starts
/// sparse (only the buckets that have counts, at most [`Ring::SPARSE_MAX`]) and turns dense
/// (one slot per bucket, bucket `b` in slot `b mod len`) when more buckets have counts: most
/// segments of a deployment with many segments see few responses per window, and a dense
/// ring costs `16 bytes * len` whatever its counts.
#[derive(Debug, Clone)]
struct Ring {
    newest: i64,
    len: i64,
    slots: Slots,
}

#[derive(Debug, Clone)]
enum Slots {
    /// `(bucket, counts)` of the buckets with counts, in bucket order.
    Sparse(Vec<(i64, Slot)>),
    /// One slot per bucket.
    Dense(Box<[Slot]>),
}

/// Two rings are equal when they hold the same counts, however they hold them.
impl PartialEq for Ring {
    fn eq(&self, other: &Ring) -> bool {
        self.len == other.len && self.export() == other.export()
    }
}

impl Eq for Ring {}

/// One step's counts in a ring: 32 bits each (saturating), half a [`Tally`]'s size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Slot {
    promoters: u32,
    passives: u32,
    detractors: u32,
    invitations: u32,
}

impl Slot {
    fn add(&mut self, tally: Tally) {
        let add = |slot: &mut u32, n: u64| {
            *slot = slot.saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
        };
        add(&mut self.promoters, tally.promoters);
        add(&mut self.passives, tally.passives);
        add(&mut self.detractors, tally.detractors);
        add(&mut self.invitations, tally.invitations);
    }

    fn tally(self) -> Tally {
        Tally {
            promoters: u64::from(self.promoters),
            passives: u64::from(self.passives),
            detractors: u64::from(self.detractors),
            invitations: u64::from(self.invitations),
        }
    }
}

impl Ring {
    /// The most buckets with counts a sparse ring holds (24 bytes each) before it turns dense.
    const SPARSE_MAX: usize = 8;

    fn new(len: i64) -> Ring {
        Ring {
            newest: i64::MIN,
            len,
            slots: Slots::Sparse(Vec::new()),
        }
    }

    fn slot(&self, bucket: i64) -> usize {
        bucket.rem_euclid(self.len) as usize
    }

    fn add(&mut self, bucket: i64, tally: Tally) {
        if bucket > self.newest {
            let fresh = self.newest == i64::MIN || bucket - self.newest >= self.len;
            match &mut self.slots {
                Slots::Sparse(buckets) => buckets.retain(|(b, _)| *b > bucket - self.len),
                Slots::Dense(slots) if fresh => slots.fill(Slot::default()),
                Slots::Dense(slots) => {
                    for b in self.newest + 1..=bucket {
                        slots[b.rem_euclid(self.len) as usize] = Slot::default();
                    }
                }
            }
            self.newest = bucket;
        } else if bucket <= self.newest - self.len {
            return; // Older than anything any query can still ask for.
        }
        if tally.is_zero() {
            return;
        }
        let slot = self.slot(bucket);
        match &mut self.slots {
            Slots::Dense(slots) => slots[slot].add(tally),
            Slots::Sparse(buckets) => match buckets.binary_search_by_key(&bucket, |e| e.0) {
                Ok(i) => buckets[i].1.add(tally),
                Err(i) if buckets.len() < Self::SPARSE_MAX => {
                    let mut counts = Slot::default();
                    counts.add(tally);
                    buckets.insert(i, (bucket, counts));
                }
                Err(_) => {
                    let mut slots = vec![Slot::default(); self.len as usize].into_boxed_slice();
                    for (b, counts) in buckets.iter() {
                        slots[b.rem_euclid(self.len) as usize] = *counts;
                    }
                    slots[slot].add(tally);
                    self.slots = Slots::Dense(slots);
                }
            },
        }
    }

    /// The sum of buckets `first..=last` that the ring still holds.
    fn sum(&self, first: i64, last: i64) -> Tally {
        if self.newest == i64::MIN {
            return Tally::default();
        }
        let first = first.max(self.newest - self.len + 1);
        let last = last.min(self.newest);
        match &self.slots {
            Slots::Dense(slots) => {
                (first..=last).fold(Tally::default(), |sum, b| sum + slots[self.slot(b)].tally())
            }
            Slots::Sparse(buckets) => buckets
                .iter()
                .filter(|(b, _)| (first..=last).contains(b))
                .fold(Tally::default(), |sum, (_, counts)| sum + counts.tally()),
        }
    }
}

/// One window's counts as data: the window's name and bucket width, the newest bucket, and
/// the non-empty buckets it still holds as `(bucket, promoters, passives, detractors)`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WindowCounts {
    /// Window name, e.g. `7d`.
    pub window: String,
    /// Bucket width in milliseconds.
    pub bucket_ms: i64,
    /// The newest bucket counted.
    pub newest: i64,
    /// Non-empty buckets.
    pub buckets: Vec<BucketCounts>,
}

/// One bucket's counts, in a snapshot as `[bucket, promoters, passives, detractors]`, with
/// the invitations as a fifth number when there are any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketCounts {
    /// The bucket (step number).
    pub bucket: i64,
    /// Its counts.
    pub tally: Tally,
}

impl serde::Serialize for BucketCounts {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let t = &self.tally;
        let with_invitations = t.invitations > 0;
        let mut seq = serializer.serialize_seq(Some(if with_invitations { 5 } else { 4 }))?;
        seq.serialize_element(&self.bucket)?;
        seq.serialize_element(&t.promoters)?;
        seq.serialize_element(&t.passives)?;
        seq.serialize_element(&t.detractors)?;
        if with_invitations {
            seq.serialize_element(&t.invitations)?;
        }
        seq.end()
    }
}

impl<'de> serde::Deserialize<'de> for BucketCounts {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let numbers: Vec<i64> = serde::Deserialize::deserialize(deserializer)?;
        let count = |i: usize| -> Result<u64, D::Error> {
            numbers.get(i).map_or(Ok(0), |n| {
                u64::try_from(*n).map_err(|_| serde::de::Error::custom("a negative count"))
            })
        };
        if !(4..=5).contains(&numbers.len()) {
            return Err(serde::de::Error::custom(
                "a bucket is [bucket, promoters, passives, detractors(, invitations)]",
            ));
        }
        Ok(BucketCounts {
            bucket: numbers[0],
            tally: Tally {
                promoters: count(1)?,
                passives: count(2)?,
                detractors: count(3)?,
                invitations: count(4)?,
            },
        })
    }
}

impl Ring {
    /// The newest bucket and the buckets the ring holds that have counts, in bucket order.
    fn export(&self) -> Option<(i64, Vec<BucketCounts>)> {
        if self.newest == i64::MIN {
            return None;
        }
        let counts = |(bucket, slot): (i64, Slot)| BucketCounts {
            bucket,
            tally: slot.tally(),
        };
        let buckets = match &self.slots {
            Slots::Dense(slots) => (self.newest - self.len + 1..=self.newest)
                .map(|b| counts((b, slots[self.slot(b)])))
                .filter(|c| !c.tally.is_zero())
                .collect(),
            Slots::Sparse(buckets) => buckets.iter().copied().map(counts).collect(),
        };
        Some((self.newest, buckets))
    }
}

impl SegmentWindows {
    /// The counts of every window that has any, for a snapshot.
    pub fn export(&self, specs: &WindowSpecs) -> Vec<WindowCounts> {
        self.rings
            .iter()
            .zip(&specs.windows)
            .filter_map(|(ring, spec)| {
                let (newest, buckets) = ring.export()?;
                Some(WindowCounts {
                    window: spec.name.clone(),
                    bucket_ms: spec.bucket.millis(),
                    newest,
                    buckets,
                })
            })
            .collect()
    }

    /// Windows rebuilt from exported counts. Counts of windows that are no longer configured,
    /// or whose bucket width changed, are left out: such a window starts empty.
    pub fn import(specs: &WindowSpecs, counts: &[WindowCounts]) -> SegmentWindows {
        let mut windows = SegmentWindows::new(specs);
        for saved in counts {
            let Some(index) = specs.position(&saved.window) else {
                continue;
            };
            if specs.windows[index].bucket.millis() != saved.bucket_ms {
                continue;
            }
            let ring = &mut windows.rings[index];
            ring.add(saved.newest, Tally::default());
            for counts in &saved.buckets {
                ring.add(counts.bucket, counts.tally);
            }
        }
        windows
    }

    /// Empty counts for every window in `specs`.
    pub fn new(specs: &WindowSpecs) -> SegmentWindows {
        SegmentWindows {
            rings: specs.windows.iter().map(|w| Ring::new(w.slots)).collect(),
        }
    }

    /// Counts one response of `category` at event time `t` in every window.
    pub fn record(&mut self, specs: &WindowSpecs, t: Timestamp, category: Category) {
        self.add(specs, t, Tally::of(category, 1));
    }

    /// Adds a tally of responses at event time `t` in every window.
    pub fn add(&mut self, specs: &WindowSpecs, t: Timestamp, tally: Tally) {
        for (ring, spec) in self.rings.iter_mut().zip(&specs.windows) {
            ring.add(spec.bucket_of(t), tally);
        }
    }

    /// The counts of window number `window` (an index into `specs.windows()`) at `now`: the
    /// responses with `from <= t < to`, where `(from, to)` is
    /// [`WindowSpec::interval`]`(now)`.
    pub fn tally(&self, specs: &WindowSpecs, window: usize, now: Timestamp) -> Tally {
        let (first, last) = specs.windows[window].bucket_range(now);
        self.rings[window].sum(first, last)
    }

    /// The counts of the window just before window `window` at `now`:
    /// `[from - length, from)` ([`WindowSpec::previous_interval`]).
    pub fn previous_tally(&self, specs: &WindowSpecs, window: usize, now: Timestamp) -> Tally {
        let spec = &specs.windows[window];
        let (first, last) = spec.bucket_range(now);
        self.rings[window].sum(first - spec.buckets, last - spec.buckets)
    }

    /// True until something is counted.
    pub fn is_empty(&self) -> bool {
        self.rings.iter().all(|r| r.newest == i64::MIN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nps::Category::*;
    use proptest::prelude::*;

    const MINUTE: i64 = 60_000;

    fn specs() -> WindowSpecs {
        WindowSpecs::new(&["1h", "24h"], 60, Span::minutes(5)).expect("valid")
    }

    fn at(minutes: i64) -> Timestamp {
        Timestamp(minutes * MINUTE)
    }

    fn ms(t: Timestamp, delta: i64) -> Timestamp {
        Timestamp(t.millis() + delta)
    }

    fn resolutions(pairs: &[(&str, Span)]) -> Vec<(String, Span)> {
        pairs.iter().map(|(n, s)| ((*n).to_owned(), *s)).collect()
    }

    /// Window configurations the recount tests run on: uniform steps, per-window steps
    /// (including steps whose greatest common divisor is finer than any of them), and no skew.
    fn configs() -> Vec<WindowSpecs> {
        vec![
            specs(),
            WindowSpecs::with_resolutions(
                &["1h", "24h", "7d"],
                60,
                &resolutions(&[("1h", Span::seconds(30)), ("7d", Span::hours(1))]),
                Span::minutes(5),
            )
            .expect("valid"),
            WindowSpecs::with_resolutions(
                &["10m", "90m"],
                60,
                &resolutions(&[("90m", Span::minutes(1))]),
                Span(0),
            )
            .expect("valid"),
            WindowSpecs::with_resolutions(
                &["6s", "1m"],
                60,
                &resolutions(&[("6s", Span(100)), ("1m", Span(750))]),
                Span::seconds(1),
            )
            .expect("valid"),
        ]
    }

    /// The definition, applied to the raw responses: a response counts when
    /// `from <= t < to`.
    fn recount(responses: &[(Timestamp, Category)], spec: &WindowSpec, now: Timestamp) -> Tally {
        let (from, to) = spec.interval(now);
        recount_in(responses, from, to)
    }

    fn recount_in(responses: &[(Timestamp, Category)], from: Timestamp, to: Timestamp) -> Tally {
        responses
            .iter()
            .filter(|(t, _)| from <= *t && *t < to)
            .fold(Tally::default(), |sum, (_, c)| sum + Tally::of(*c, 1))
    }

    /// The interval's own definition, checked without `interval`'s arithmetic.
    fn check_interval(spec: &WindowSpec, now: Timestamp) {
        let (from, to) = spec.interval(now);
        let step = spec.bucket().millis();
        assert_eq!(to.millis().rem_euclid(step), 0, "to is on a step edge");
        assert!(
            now < to && to.millis() - now.millis() <= step,
            "to ends now's step"
        );
        assert_eq!(to.millis() - from.millis(), spec.length().millis());
    }

    /// Records `responses`, then checks every window at every `now` against the recount.
    /// Responses are no later than `skew` past the earliest `now`, as the admission rules
    /// guarantee for the wall clock.
    fn assert_recount(
        specs: &WindowSpecs,
        responses: &[(Timestamp, Category)],
        nows: &[Timestamp],
    ) {
        let mut w = SegmentWindows::new(specs);
        for &(t, category) in responses {
            w.record(specs, t, category);
        }
        let back = SegmentWindows::import(specs, &w.export(specs));
        for &now in nows {
            for (index, spec) in specs.windows().iter().enumerate() {
                check_interval(spec, now);
                let expected = recount(responses, spec, now);
                assert_eq!(
                    w.tally(specs, index, now),
                    expected,
                    "{} at {now:?}",
                    spec.name()
                );
                assert_eq!(
                    back.tally(specs, index, now),
                    expected,
                    "{} restored",
                    spec.name()
                );
                // The window before it, [from - length, from), from the same counts.
                let (from, to) = spec.previous_interval(now);
                assert_eq!(to, spec.interval(now).0);
                assert_eq!(to.millis() - from.millis(), spec.length().millis());
                let before = recount_in(responses, from, to);
                assert_eq!(
                    w.previous_tally(specs, index, now),
                    before,
                    "{} previous at {now:?}",
                    spec.name()
                );
                assert_eq!(back.previous_tally(specs, index, now), before);
            }
        }
    }

    /// `now` on, just before and just after each window's step edges near `base`.
    fn edge_nows(specs: &WindowSpecs, base: Timestamp) -> Vec<Timestamp> {
        let mut nows = vec![base];
        for spec in specs.windows() {
            let step = spec.bucket().millis();
            let edge = (base.millis().div_euclid(step) + 1) * step;
            for k in 0..3 {
                let edge = edge + k * step;
                nows.extend([Timestamp(edge - 1), Timestamp(edge), Timestamp(edge + 1)]);
            }
            nows.push(base.plus(spec.length()));
        }
        nows.retain(|n| *n >= base);
        nows
    }

    /// Responses on the edges of every window's interval at each of `nows`: exactly at
    /// `from`, one ms before it, at `to - 1ms` and at `to` (when not ahead of the skew).
    fn edge_responses(specs: &WindowSpecs, base: Timestamp, nows: &[Timestamp]) -> Vec<Timestamp> {
        let latest = base.plus(specs.max_future_skew());
        let mut times = Vec::new();
        for &now in nows {
            for spec in specs.windows() {
                let (from, to) = spec.interval(now);
                times.extend([ms(from, -1), from, ms(from, 1), ms(to, -1), to]);
            }
        }
        times.retain(|t| *t <= latest);
        times
    }

    #[test]
    fn interval_ends_with_the_step_that_holds_now() {
        let specs = specs();
        let hour = &specs.windows()[0];
        // On a step edge, `now` is the first instant of its step.
        assert_eq!(hour.interval(at(60)), (at(1), at(61)));
        assert_eq!(hour.interval(ms(at(60), -1)), (at(0), at(60)));
        assert_eq!(hour.interval(ms(at(60), 1)), (at(1), at(61)));
        let day = &specs.windows()[1];
        assert_eq!(day.interval(at(60)), (at(72 - 24 * 60), at(72)));
        // Before the epoch steps are aligned the same way.
        assert_eq!(hour.interval(ms(at(0), -1)), (at(-60), at(0)));
    }

    #[test]
    fn window_counts_exactly_from_to_the_end_of_nows_step() {
        let specs = specs();
        let mut w = SegmentWindows::new(&specs);
        w.record(&specs, at(0), Promoter);
        w.record(&specs, at(30), Detractor);
        w.record(&specs, ms(at(60), -1), Passive);
        // At 59:59.999 the 1h window is [0, 60m): all three.
        assert_eq!(w.tally(&specs, 0, ms(at(60), -1)).responses(), 3);
        // At 60:00 it is [1m, 61m): the response at 0 left it.
        let t = w.tally(&specs, 0, at(60));
        assert_eq!((t.promoters, t.passives, t.detractors), (0, 1, 1));
        assert_eq!(w.tally(&specs, 1, at(60)).responses(), 3);
        assert_eq!(w.tally(&specs, 0, at(200)).responses(), 0);
        // Before the responses happened, the window is empty too.
        assert_eq!(w.tally(&specs, 0, ms(at(0), -1)).responses(), 0);
        // A response at `to` counts only from the next step on.
        w.record(&specs, at(61), Promoter);
        assert_eq!(w.tally(&specs, 0, at(60)).promoters, 0);
        assert_eq!(w.tally(&specs, 0, at(61)).promoters, 1);
    }

    #[test]
    fn late_and_future_events_land_in_their_buckets() {
        let specs = specs();
        let mut w = SegmentWindows::new(&specs);
        w.record(&specs, at(100), Promoter);
        w.record(&specs, at(104), Promoter); // ahead of a clock at minute 100, within skew
        w.record(&specs, at(45), Detractor); // late, still inside the 1h window at 100
        w.record(&specs, at(30), Detractor); // too late for 1h, fine for 24h
        assert_eq!(
            w.tally(&specs, 0, at(100)),
            Tally {
                promoters: 1,
                passives: 0,
                detractors: 1,
                invitations: 0,
            }
        );
        assert_eq!(w.tally(&specs, 0, at(104)).promoters, 2);
        assert_eq!(w.tally(&specs, 1, at(104)).detractors, 2);
    }

    #[test]
    fn windows_recount_exactly_on_step_edges() {
        for specs in configs() {
            for base in [Timestamp(1_795_305_600_000), Timestamp(-7 * 86_400_000 + 1)] {
                let nows = edge_nows(&specs, base);
                let times = edge_responses(&specs, base, &nows);
                let responses: Vec<(Timestamp, Category)> = times
                    .iter()
                    .enumerate()
                    .map(|(i, t)| (*t, Category::ALL[i % 3]))
                    .collect();
                assert_recount(&specs, &responses, &nows);
            }
        }
    }

    /// A ring holds its first buckets sparsely and turns dense past `Ring::SPARSE_MAX`,
    /// counting like the definition either way; rings with the same counts are equal however
    /// they hold them.
    #[test]
    fn rings_turn_dense_past_a_few_buckets_and_count_the_same() {
        let specs = specs();
        let dense =
            |w: &SegmentWindows, window: usize| matches!(w.rings[window].slots, Slots::Dense(_));
        let mut w = SegmentWindows::new(&specs);
        let mut responses = Vec::new();
        for i in 0..Ring::SPARSE_MAX as i64 + 3 {
            // One a minute: a new bucket of the 1h window each time.
            let t = at(100 + i);
            w.record(&specs, t, if i % 2 == 0 { Promoter } else { Detractor });
            responses.push((t, if i % 2 == 0 { Promoter } else { Detractor }));
            assert_eq!(
                dense(&w, 0),
                i >= Ring::SPARSE_MAX as i64,
                "after {} buckets",
                i + 1
            );
            for now in [t, at(130 + i), at(170 + i), at(300)] {
                for (index, spec) in specs.windows().iter().enumerate() {
                    assert_eq!(w.tally(&specs, index, now), recount(&responses, spec, now));
                }
            }
        }
        assert!(!dense(&w, 1), "11 minutes are one bucket of the 24h window");
        // The 1h ring holds 125 buckets (the window, the one before, the skew): at minute 230
        // only minutes 106-110 and 230 are left, and the dense ring stays dense.
        w.record(&specs, at(230), Passive);
        responses.push((at(230), Passive));
        assert!(dense(&w, 0));
        let back = SegmentWindows::import(&specs, &w.export(&specs));
        assert!(!dense(&back, 0), "six buckets are imported sparsely");
        assert_eq!(back, w);
        for (index, spec) in specs.windows().iter().enumerate() {
            assert_eq!(
                back.tally(&specs, index, at(231)),
                recount(&responses, spec, at(231))
            );
            assert_eq!(
                back.tally(&specs, index, at(231)),
                w.tally(&specs, index, at(231))
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Random responses and clocks, with many on and next to step edges: every window
        /// at every `now` holds exactly the responses with `from <= t < to`.
        #[test]
        fn windows_recount_like_the_definition(
            config in 0usize..4,
            base in -1_000_000_000i64..2_000_000_000_000,
            // Fractions of the longest window before `base` (or up to the skew after it).
            offsets in proptest::collection::vec((0u32..=1000, 0usize..3, any::<bool>()), 0..60),
            later in proptest::collection::vec(0u32..=1000, 1..8),
        ) {
            let specs = &configs()[config];
            let base = Timestamp(base);
            let longest = specs.longest().millis();
            let skew = specs.max_future_skew().millis();
            let mut nows: Vec<Timestamp> = later
                .iter()
                .map(|f| base.plus(Span(longest * 2 * i64::from(*f) / 1000)))
                .collect();
            nows.extend(edge_nows(specs, base));
            let mut responses: Vec<(Timestamp, Category)> = offsets
                .iter()
                .map(|(f, c, ahead)| {
                    let t = if *ahead {
                        base.plus(Span(skew * i64::from(*f) / 1000))
                    } else {
                        base.minus(Span(2 * longest * i64::from(*f) / 1000))
                    };
                    (t, Category::ALL[*c])
                })
                .collect();
            let edges = edge_responses(specs, base, &nows);
            responses.extend(edges.iter().step_by(3).map(|t| (*t, Promoter)));
            assert_recount(specs, &responses, &nows);
        }
    }

    #[test]
    fn export_and_import_keep_every_count() {
        let specs = specs();
        let mut w = SegmentWindows::new(&specs);
        for (minute, category) in [
            (100, Promoter),
            (104, Detractor),
            (45, Passive),
            (30, Detractor),
        ] {
            w.record(&specs, at(minute), category);
        }
        let exported = w.export(&specs);
        assert_eq!(exported.len(), 2);
        let back = SegmentWindows::import(&specs, &exported);
        assert_eq!(back, w);
        for now in [0, 60, 100, 104, 130, 1000] {
            for window in 0..2 {
                assert_eq!(
                    back.tally(&specs, window, at(now)),
                    w.tally(&specs, window, at(now))
                );
            }
        }
        // A window whose step changed starts empty; the others are kept.
        let other = WindowSpecs::new(&["1h", "24h"], 120, Span::minutes(5)).expect("valid");
        let partly = SegmentWindows::import(&other, &exported);
        assert_eq!(partly.tally(&other, 0, at(104)).responses(), 0);
        assert!(SegmentWindows::import(&specs, &[]).is_empty());
    }

    #[test]
    fn export_and_import_with_per_window_steps() {
        let specs = &configs()[1];
        let mut w = SegmentWindows::new(specs);
        for (minute, category) in [
            (100, Promoter),
            (104, Detractor),
            (45, Passive),
            (-3000, Detractor),
        ] {
            w.record(specs, at(minute), category);
        }
        let exported = w.export(specs);
        let steps: Vec<(String, i64)> = exported
            .iter()
            .map(|c| (c.window.clone(), c.bucket_ms))
            .collect();
        assert_eq!(
            steps,
            [
                ("1h".to_owned(), 30_000),
                ("24h".to_owned(), 24 * MINUTE),
                ("7d".to_owned(), 60 * MINUTE)
            ]
        );
        assert_eq!(SegmentWindows::import(specs, &exported), w);
        // Only the window whose step changed (1h: 30s -> 1m) starts empty.
        let changed = WindowSpecs::with_resolutions(
            &["1h", "24h", "7d"],
            60,
            &resolutions(&[("7d", Span::hours(1))]),
            Span::minutes(5),
        )
        .expect("valid");
        let partly = SegmentWindows::import(&changed, &exported);
        assert_eq!(partly.tally(&changed, 0, at(104)).responses(), 0);
        assert_eq!(
            partly.tally(&changed, 1, at(104)),
            w.tally(specs, 1, at(104))
        );
        assert_eq!(
            partly.tally(&changed, 2, at(104)),
            w.tally(specs, 2, at(104))
        );
    }

    #[test]
    fn too_old_is_before_the_longest_windows_from() {
        let specs = specs();
        // 24h moves in 24-minute steps: at 24h10m it covers [24m, 24h24m).
        let now = at(24 * 60 + 10);
        assert_eq!(specs.windows()[1].interval(now), (at(24), at(24 * 60 + 24)));
        assert_eq!(specs.longest_from(now), at(24));
        assert_eq!(specs.admit(now, now), Admission::Admitted);
        assert_eq!(specs.admit(at(24), now), Admission::Admitted);
        assert_eq!(specs.admit(ms(at(24), -1), now), Admission::TooOld);
        // Newer than `now - 24h` yet before `from`: it would count nowhere, so it is too old.
        assert_eq!(specs.admit(ms(at(10), 1), now), Admission::TooOld);
        assert_eq!(
            specs.admit(now.plus(Span::minutes(5)), now),
            Admission::Admitted
        );
        assert_eq!(
            specs.admit(ms(now.plus(Span::minutes(5)), 1), now),
            Admission::Future
        );
        // With the clock on a step edge, `from` has just moved on.
        let edge = at(48 * 60);
        let day = at(24 * 60);
        assert_eq!(specs.longest_from(ms(edge, -1)), day);
        assert_eq!(specs.longest_from(edge), day.plus(Span::minutes(24)));
        assert_eq!(specs.admit(day, ms(edge, -1)), Admission::Admitted);
        assert_eq!(specs.admit(day, edge), Admission::TooOld);
    }

    #[test]
    fn every_admitted_response_counts_in_some_window_once_due() {
        // With 1h in 1m steps and 61m in 61s steps, the longest window's `from` is not always
        // the earliest one: `longest_from` is the earliest `from` of all windows, so that a
        // response at it still counts somewhere.
        let specs = WindowSpecs::with_resolutions(
            &["1h", "61m"],
            60,
            &resolutions(&[("61m", Span::seconds(61))]),
            Span(0),
        )
        .expect("valid");
        for now in (0..200_000).step_by(997).map(|s| Timestamp(s * 1_000)) {
            let earliest = specs
                .windows()
                .iter()
                .map(|w| w.interval(now).0)
                .min()
                .expect("windows");
            assert_eq!(specs.longest_from(now), earliest);
            assert_eq!(specs.admit(ms(earliest, -1), now), Admission::TooOld);
            let mut w = SegmentWindows::new(&specs);
            w.record(&specs, earliest, Promoter);
            let counted = (0..2).any(|i| w.tally(&specs, i, now).responses() == 1);
            assert!(
                counted,
                "a response at longest_from counts somewhere at {now:?}"
            );
        }
    }

    #[test]
    fn resolutions_are_per_window() {
        let specs = WindowSpecs::with_resolutions(
            &["1h", "24h", "7d", "28d"],
            60,
            &resolutions(&[("1h", Span::seconds(10)), ("28d", Span::hours(1))]),
            Span::minutes(5),
        )
        .expect("valid");
        let steps: Vec<Span> = specs.windows().iter().map(|w| w.bucket()).collect();
        assert_eq!(
            steps,
            [
                Span::seconds(10),
                Span::minutes(24),
                Span::minutes(168),
                Span::hours(1)
            ]
        );
        assert_eq!(specs.windows()[0].buckets(), 360);
        assert_eq!(specs.windows()[3].buckets(), 672);
        assert_eq!(specs.resolution(), Span::seconds(10));
        assert_eq!(specs.longest(), Span::days(28));
        assert_eq!(
            WindowSpecs::with_resolutions(&["1h", "24h", "7d", "28d"], 60, &[], Span::minutes(5)),
            WindowSpecs::new(&["1h", "24h", "7d", "28d"], 60, Span::minutes(5))
        );
        // A resolution makes a window independent of `buckets`.
        let odd = WindowSpecs::with_resolutions(
            &["7m"],
            60,
            &resolutions(&[("7m", Span::seconds(7))]),
            Span(0),
        )
        .expect("valid");
        assert_eq!(odd.windows()[0].buckets(), 60);
    }

    #[test]
    fn bad_resolutions_are_rejected_with_reasons() {
        let windows = ["1h", "24h"];
        let with = |pairs: &[(&str, Span)]| {
            WindowSpecs::with_resolutions(&windows, 60, &resolutions(pairs), Span(0))
        };
        let cases = [
            (
                with(&[("1h", Span::seconds(7))]),
                WindowSpecError::StepNotDivisor {
                    name: "1h".into(),
                    step: Span::seconds(7),
                },
                "resolution 7s does not divide window \"1h\" into whole steps",
            ),
            (
                with(&[("1h", Span::minutes(2))]),
                WindowSpecError::StepTooCoarse {
                    name: "1h".into(),
                    step: Span::minutes(2),
                },
                "window \"1h\" would move in steps of 2m, coarser than 1/60 of its length; use a finer resolution or more buckets",
            ),
            (
                with(&[("24h", Span(0))]),
                WindowSpecError::NonPositiveStep {
                    name: "24h".into(),
                    step: Span(0),
                },
                "resolution of window \"24h\" is 0ms; it must be positive",
            ),
            (
                with(&[("24h", Span(-60_000))]),
                WindowSpecError::NonPositiveStep {
                    name: "24h".into(),
                    step: Span(-60_000),
                },
                "resolution of window \"24h\" is -60000ms; it must be positive",
            ),
            (
                with(&[("7d", Span::hours(1))]),
                WindowSpecError::UnknownWindow("7d".into()),
                "a resolution is given for window \"7d\", which is not in windows.lengths",
            ),
            (
                with(&[("1h", Span::minutes(1)), ("1h", Span::seconds(30))]),
                WindowSpecError::RepeatedResolution("1h".into()),
                "two resolutions are given for window \"1h\"",
            ),
            (
                WindowSpecs::new(&windows, 30, Span(0)),
                WindowSpecError::StepTooCoarse {
                    name: "1h".into(),
                    step: Span::minutes(2),
                },
                "window \"1h\" would move in steps of 2m, coarser than 1/60 of its length; use a finer resolution or more buckets",
            ),
        ];
        for (got, error, text) in cases {
            assert_eq!(got, Err(error.clone()));
            assert_eq!(error.to_string(), text);
        }
    }

    #[test]
    fn specs_validate_and_report_resolution() {
        let specs = WindowSpecs::new(&["1h", "24h", "7d", "28d"], 60, Span::minutes(5))
            .expect("defaults are valid");
        assert_eq!(specs.longest(), Span::days(28));
        assert_eq!(specs.resolution(), Span::minutes(1));
        assert_eq!(specs.windows()[1].bucket(), Span::minutes(24));
        assert_eq!(specs.position("7d"), Some(2));
        assert_eq!(
            WindowSpecs::new(&["1h", "1h"], 60, Span(0)),
            Err(WindowSpecError::Repeated("1h".into()))
        );
        assert_eq!(
            WindowSpecs::new(&["7ms"], 60, Span(0)),
            Err(WindowSpecError::NotDivisible {
                name: "7ms".into(),
                buckets: 60
            })
        );
        assert_eq!(
            WindowSpecs::new(&["week"], 60, Span(0)),
            Err(WindowSpecError::BadName("week".into()))
        );
        assert_eq!(
            WindowSpecs::new::<&str>(&[], 60, Span(0)),
            Err(WindowSpecError::Empty)
        );
        assert_eq!(
            WindowSpecs::new(&["1h"], 60, Span(-1)),
            Err(WindowSpecError::NegativeSkew)
        );
    }
}
