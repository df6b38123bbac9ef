//! Rolling windows: per segment, how many promoters, passives and detractors answered within
//! each configured window length, queried at any `now`, in small fixed memory.
//!
//! Each window is cut into `buckets` equal buckets of event time (`bucket = length /
//! buckets`; 60 by default, so a 1h window moves in 1-minute steps). A response with event
//! time `t` lies in bucket `floor(t / bucket)`, and the window at `now` covers the `buckets`
//! buckets ending with the one `now` lies in. So window membership is exact at bucket
//! resolution: the window's start moves in bucket-sized steps. A ring of slots per window
//! holds those buckets plus headroom for events up to the allowed clock skew ahead of `now`.

use std::fmt;

use crate::nps::{Category, Tally};
use crate::time::{Span, Timestamp};

/// One rolling window: its name (as configured, e.g. `7d`), its length and bucket width.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowSpec {
    name: String,
    length: Span,
    bucket: Span,
    /// Buckets in the window.
    buckets: i64,
    /// Slots in each ring: `buckets` plus headroom for future events.
    slots: i64,
}

impl WindowSpec {
    /// The configured name, used in labels and the API (`1h`, `7d`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How far back the window reaches.
    pub fn length(&self) -> Span {
        self.length
    }

    /// The width of one bucket: how far the window's start moves in one step.
    pub fn bucket(&self) -> Span {
        self.bucket
    }

    /// The bucket an instant lies in.
    pub fn bucket_of(&self, t: Timestamp) -> i64 {
        t.millis().div_euclid(self.bucket.millis())
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
    /// A window's length is not a positive whole number of buckets of whole milliseconds.
    NotDivisible {
        /// The window.
        name: String,
        /// Buckets per window.
        buckets: u32,
    },
    /// The skew is negative.
    NegativeSkew,
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
        }
    }
}

impl std::error::Error for WindowSpecError {}

/// Whether a response's event time lets it count, given the clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Within the longest window (or ahead of it by no more than the skew).
    Admitted,
    /// At or before `now - longest window`: it can count in no window.
    TooOld,
    /// More than the allowed skew ahead of `now`.
    Future,
}

impl WindowSpecs {
    /// Windows named by their lengths (`["1h", "24h", "7d", "28d"]`), each cut into
    /// `buckets` buckets, admitting responses up to `max_future_skew` ahead of the clock.
    pub fn new<S: AsRef<str>>(
        names: &[S],
        buckets: u32,
        max_future_skew: Span,
    ) -> Result<WindowSpecs, WindowSpecError> {
        if names.is_empty() {
            return Err(WindowSpecError::Empty);
        }
        if max_future_skew.millis() < 0 {
            return Err(WindowSpecError::NegativeSkew);
        }
        let mut windows: Vec<WindowSpec> = Vec::with_capacity(names.len());
        for name in names.iter().map(|n| n.as_ref().trim()) {
            let length: Span = name
                .parse()
                .map_err(|_| WindowSpecError::BadName(name.to_owned()))?;
            let divisible =
                buckets > 0 && length.millis() > 0 && length.millis() % i64::from(buckets) == 0;
            if !divisible {
                return Err(WindowSpecError::NotDivisible {
                    name: name.to_owned(),
                    buckets,
                });
            }
            if windows.iter().any(|w| w.name == name) {
                return Err(WindowSpecError::Repeated(name.to_owned()));
            }
            let bucket = Span(length.millis() / i64::from(buckets));
            let headroom = (max_future_skew.millis() + bucket.millis() - 1) / bucket.millis();
            windows.push(WindowSpec {
                name: name.to_owned(),
                length,
                bucket,
                buckets: i64::from(buckets),
                slots: i64::from(buckets) + headroom,
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
    /// bucket widths. Pre-aggregated counts may round event times down to it.
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

    /// Whether a response at `t` can count, with the clock at `now`: too old if
    /// `t <= now - longest`, future if `t > now + max_future_skew`.
    pub fn admit(&self, t: Timestamp, now: Timestamp) -> Admission {
        if t <= now.minus(self.longest) {
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

/// The recent buckets of one window. Slot `b mod slots` holds bucket `b`, for the buckets
/// `newest - slots < b <= newest`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ring {
    newest: i64,
    slots: Box<[Tally]>,
}

impl Ring {
    fn new(slots: i64) -> Ring {
        Ring {
            newest: i64::MIN,
            slots: vec![Tally::default(); slots as usize].into_boxed_slice(),
        }
    }

    fn len(&self) -> i64 {
        self.slots.len() as i64
    }

    fn slot(&self, bucket: i64) -> usize {
        bucket.rem_euclid(self.len()) as usize
    }

    fn add(&mut self, bucket: i64, tally: Tally) {
        if bucket > self.newest {
            if self.newest == i64::MIN || bucket - self.newest >= self.len() {
                self.slots.fill(Tally::default());
            } else {
                for b in self.newest + 1..=bucket {
                    let slot = self.slot(b);
                    self.slots[slot] = Tally::default();
                }
            }
            self.newest = bucket;
        } else if bucket <= self.newest - self.len() {
            return; // Older than anything any query can still ask for.
        }
        let slot = self.slot(bucket);
        self.slots[slot] += tally;
    }

    /// The sum of buckets `first..=last` that the ring still holds.
    fn sum(&self, first: i64, last: i64) -> Tally {
        if self.newest == i64::MIN {
            return Tally::default();
        }
        let first = first.max(self.newest - self.len() + 1);
        let last = last.min(self.newest);
        (first..=last).fold(Tally::default(), |sum, b| sum + self.slots[self.slot(b)])
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

/// One bucket's counts: `(bucket, promoters, passives, detractors)`.
pub type BucketCounts = (i64, u64, u64, u64);

impl Ring {
    fn export(&self) -> Option<(i64, Vec<BucketCounts>)> {
        if self.newest == i64::MIN {
            return None;
        }
        let buckets = (self.newest - self.len() + 1..=self.newest)
            .map(|b| (b, self.slots[self.slot(b)]))
            .filter(|(_, t)| !t.is_empty())
            .map(|(b, t)| (b, t.promoters, t.passives, t.detractors))
            .collect();
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
            for &(bucket, promoters, passives, detractors) in &saved.buckets {
                let tally = Tally {
                    promoters,
                    passives,
                    detractors,
                };
                ring.add(bucket, tally);
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

    /// The counts of window number `window` (an index into `specs.windows()`) at `now`.
    pub fn tally(&self, specs: &WindowSpecs, window: usize, now: Timestamp) -> Tally {
        let spec = &specs.windows[window];
        let last = spec.bucket_of(now);
        self.rings[window].sum(last - spec.buckets + 1, last)
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

    const MINUTE: i64 = 60_000;

    fn specs() -> WindowSpecs {
        WindowSpecs::new(&["1h", "24h"], 60, Span::minutes(5)).expect("valid")
    }

    fn at(minutes: i64) -> Timestamp {
        Timestamp(minutes * MINUTE)
    }

    #[test]
    fn window_covers_its_buckets_ending_at_now() {
        let specs = specs();
        let mut w = SegmentWindows::new(&specs);
        w.record(&specs, at(0), Promoter);
        w.record(&specs, at(30), Detractor);
        w.record(&specs, at(59), Passive);
        assert_eq!(w.tally(&specs, 0, at(59)).responses(), 3);
        // At minute 60 the 1h window is minutes 1..=60: the response at minute 0 left it.
        let t = w.tally(&specs, 0, at(60));
        assert_eq!((t.promoters, t.passives, t.detractors), (0, 1, 1));
        assert_eq!(w.tally(&specs, 1, at(60)).responses(), 3);
        assert_eq!(w.tally(&specs, 0, at(200)).responses(), 0);
        // Before the responses happened, the window is empty too.
        assert_eq!(w.tally(&specs, 0, at(-1)).responses(), 0);
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
                detractors: 1
            }
        );
        assert_eq!(w.tally(&specs, 0, at(104)).promoters, 2);
        assert_eq!(w.tally(&specs, 1, at(104)).detractors, 2);
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
        // A window whose bucket width changed starts empty; the others are kept.
        let other = WindowSpecs::new(&["1h", "24h"], 30, Span::minutes(5)).expect("valid");
        let partly = SegmentWindows::import(&other, &exported);
        assert_eq!(partly.tally(&other, 0, at(104)).responses(), 0);
        assert!(SegmentWindows::import(&specs, &[]).is_empty());
    }

    #[test]
    fn admission_rules_follow_the_longest_window_and_skew() {
        let specs = specs();
        let now = at(24 * 60 + 10);
        assert_eq!(specs.admit(now, now), Admission::Admitted);
        assert_eq!(specs.admit(at(10), now), Admission::TooOld);
        assert_eq!(
            specs.admit(Timestamp(at(10).0 + 1), now),
            Admission::Admitted
        );
        assert_eq!(
            specs.admit(now.plus(Span::minutes(5)), now),
            Admission::Admitted
        );
        assert_eq!(
            specs.admit(Timestamp(now.plus(Span::minutes(5)).0 + 1), now),
            Admission::Future
        );
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
    }
}
