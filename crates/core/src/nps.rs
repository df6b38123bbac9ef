//! NPS arithmetic: scores, their categories, tallies of categories, and what a tally says
//! (NPS, its 95 % margin of error, its band). Nothing here knows about time or segments.

use std::fmt;
use std::ops::{Add, AddAssign, Sub};

/// A valid "how likely are you to recommend us" answer: an integer 0..=10.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Score(u8);

impl Score {
    /// The highest possible score.
    pub const MAX: u8 = 10;

    /// A score from an integer, or `None` outside 0..=10.
    pub fn new(value: i64) -> Option<Score> {
        u8::try_from(value)
            .ok()
            .filter(|v| *v <= Self::MAX)
            .map(Score)
    }

    /// The score as a number.
    pub fn value(self) -> u8 {
        self.0
    }

    /// Promoter (9-10), passive (7-8) or detractor (0-6).
    pub fn category(self) -> Category {
        match self.0 {
            9..=10 => Category::Promoter,
            7..=8 => Category::Passive,
            _ => Category::Detractor,
        }
    }
}

/// The three kinds of respondent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Category {
    /// Scores 9 and 10.
    Promoter,
    /// Scores 7 and 8.
    Passive,
    /// Scores 0 to 6.
    Detractor,
}

impl Category {
    /// All categories, in a fixed order.
    pub const ALL: [Category; 3] = [Category::Promoter, Category::Passive, Category::Detractor];

    /// The lower-case name used in metric labels and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Category::Promoter => "promoter",
            Category::Passive => "passive",
            Category::Detractor => "detractor",
        }
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Counts of responses by category.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Tally {
    /// Responses scoring 9-10.
    pub promoters: u64,
    /// Responses scoring 7-8.
    pub passives: u64,
    /// Responses scoring 0-6.
    pub detractors: u64,
    /// Survey invitations sent (for the response rate); not responses.
    pub invitations: u64,
}

impl Tally {
    /// A tally of `count` responses of one category.
    pub fn of(category: Category, count: u64) -> Tally {
        let mut tally = Tally::default();
        tally.count(category, count);
        tally
    }

    /// Counts `count` more responses of `category`.
    pub fn count(&mut self, category: Category, count: u64) {
        *self.slot(category) += count;
    }

    /// The count for one category.
    pub fn get(&self, category: Category) -> u64 {
        match category {
            Category::Promoter => self.promoters,
            Category::Passive => self.passives,
            Category::Detractor => self.detractors,
        }
    }

    fn slot(&mut self, category: Category) -> &mut u64 {
        match category {
            Category::Promoter => &mut self.promoters,
            Category::Passive => &mut self.passives,
            Category::Detractor => &mut self.detractors,
        }
    }

    /// All responses counted.
    pub fn responses(&self) -> u64 {
        self.promoters + self.passives + self.detractors
    }

    /// True when nothing is counted.
    pub fn is_empty(&self) -> bool {
        self.responses() == 0
    }

    /// True if nothing at all was counted, invitations included.
    pub fn is_zero(&self) -> bool {
        self.is_empty() && self.invitations == 0
    }

    /// `invitations` invitations.
    pub fn invited(invitations: u64) -> Tally {
        Tally {
            invitations,
            ..Tally::default()
        }
    }

    /// Responses per invitation sent in the same interval; `None` with no invitations. (Not a
    /// fraction of those invitations: a response may answer an invitation from before the
    /// interval, so the ratio can exceed 1.)
    pub fn response_rate(&self) -> Option<f64> {
        (self.invitations > 0).then(|| self.responses() as f64 / self.invitations as f64)
    }

    /// The variance of one response's score coded +1 (promoter), 0 (passive), -1
    /// (detractor): p + d - (p - d)^2; `None` with no responses.
    pub fn score_variance(&self) -> Option<f64> {
        let n = self.responses();
        if n == 0 {
            return None;
        }
        let n = n as f64;
        let p = self.promoters as f64 / n;
        let d = self.detractors as f64 / n;
        Some((p + d - (p - d).powi(2)).max(0.0))
    }

    /// NPS = 100 * (promoters - detractors) / responses, in [-100, 100]; `None` with no responses.
    pub fn nps(&self) -> Option<f64> {
        let n = self.responses();
        (n > 0).then(|| 100.0 * (self.promoters as f64 - self.detractors as f64) / n as f64)
    }

    /// Half-width of the 95 % confidence interval of the NPS, in NPS points; `None` with no
    /// responses. The variance of NPS/100 is (p + d - (p - d)^2) / n.
    pub fn ci95(&self) -> Option<f64> {
        let n = self.responses();
        if n == 0 {
            return None;
        }
        let variance = self.score_variance()? / n as f64;
        Some(100.0 * 1.96 * variance.sqrt())
    }

    /// The band of the NPS; `None` with no responses.
    pub fn band(&self) -> Option<Band> {
        self.nps().map(Band::of)
    }
}

impl Add for Tally {
    type Output = Tally;
    fn add(self, other: Tally) -> Tally {
        Tally {
            promoters: self.promoters + other.promoters,
            passives: self.passives + other.passives,
            detractors: self.detractors + other.detractors,
            invitations: self.invitations + other.invitations,
        }
    }
}

impl AddAssign for Tally {
    fn add_assign(&mut self, other: Tally) {
        *self = *self + other;
    }
}

impl Sub for Tally {
    type Output = Tally;
    /// Saturating difference, category by category.
    fn sub(self, other: Tally) -> Tally {
        Tally {
            promoters: self.promoters.saturating_sub(other.promoters),
            passives: self.passives.saturating_sub(other.passives),
            detractors: self.detractors.saturating_sub(other.detractors),
            invitations: self.invitations.saturating_sub(other.invitations),
        }
    }
}

/// How good an NPS is: high >= 50, medium 30..50, low < 30.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Band {
    /// NPS below 30.
    Low,
    /// NPS from 30 up to (not including) 50.
    Medium,
    /// NPS 50 or more.
    High,
}

impl Band {
    /// The band an NPS value falls in.
    pub fn of(nps: f64) -> Band {
        if nps >= 50.0 {
            Band::High
        } else if nps >= 30.0 {
            Band::Medium
        } else {
            Band::Low
        }
    }

    /// The lower-case name used in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Band::Low => "low",
            Band::Medium => "medium",
            Band::High => "high",
        }
    }
}

impl fmt::Display for Band {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a window's NPS compares with the window just before it (the same length, ending where
/// this one starts): the difference and whether it is more than noise, by the two-sample z
/// statistic on scores coded +1/0/-1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Change {
    /// The earlier window's NPS; `None` if it had no responses.
    pub previous_nps: Option<f64>,
    /// This NPS minus the earlier one, in NPS points; `None` unless both have responses.
    pub delta: Option<f64>,
    /// delta / sqrt(var1/n1 + var2/n2), with var = p + d - (p - d)^2 per response (on the
    /// -1..1 scale); `None` unless both windows have responses and the difference has a
    /// spread (two unanimous windows: 0 if they agree, `None` if they do not).
    pub z: Option<f64>,
    /// Responses in this window and in the earlier one.
    pub responses: (u64, u64),
}

impl Change {
    /// |z| beyond this is a change at the 5 % level (two-sided).
    pub const Z_95: f64 = 1.96;

    /// The change from `previous` to `current`.
    pub fn between(current: &Tally, previous: &Tally) -> Change {
        let previous_nps = previous.nps();
        let delta = current.nps().zip(previous_nps).map(|(c, p)| c - p);
        let z = match (delta, current.score_variance(), previous.score_variance()) {
            (Some(delta), Some(v1), Some(v2)) => {
                let se =
                    (v1 / current.responses() as f64 + v2 / previous.responses() as f64).sqrt();
                if se > 0.0 {
                    Some(delta / 100.0 / se)
                } else if delta == 0.0 {
                    Some(0.0)
                } else {
                    None
                }
            }
            _ => None,
        };
        Change {
            previous_nps,
            delta,
            z,
            responses: (current.responses(), previous.responses()),
        }
    }

    /// True if the change is more than noise: |z| > 1.96 (or the two windows are unanimous
    /// and disagree), with at least `min_responses` responses in each window.
    pub fn significant(&self, min_responses: u64) -> bool {
        let enough = self.responses.0 >= min_responses && self.responses.1 >= min_responses;
        let beyond = match self.z {
            Some(z) => z.abs() > Self::Z_95,
            None => self.delta.is_some_and(|d| d != 0.0),
        };
        enough && beyond
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tally(promoters: u64, passives: u64, detractors: u64) -> Tally {
        Tally {
            promoters,
            passives,
            detractors,
            invitations: 0,
        }
    }

    /// The two-sample z on a worked example: 50/30/20 (n = 100) against 30/30/40 (n = 100).
    #[test]
    fn change_is_the_two_sample_z_on_coded_scores() {
        let now = tally(50, 30, 20);
        let before = tally(30, 30, 40);
        let change = Change::between(&now, &before);
        assert_eq!(change.previous_nps, Some(-10.0));
        assert!((change.delta.expect("delta") - 40.0).abs() < 1e-9);
        // var1 = 0.7 - 0.09 = 0.61, var2 = 0.7 - 0.01 = 0.69; se = sqrt(0.013) = 0.11402
        let se: f64 = (0.61f64 / 100.0 + 0.69 / 100.0).sqrt();
        assert!((change.z.expect("z") - 0.4 / se).abs() < 1e-9);
        assert!(change.significant(30));
        assert!(!change.significant(101), "too few responses to say");
        // No earlier responses: nothing to compare.
        let none = Change::between(&now, &Tally::default());
        assert_eq!((none.previous_nps, none.delta, none.z), (None, None, None));
        assert!(!none.significant(0));
        // Unanimous windows: no spread; agreeing is no change, disagreeing is one.
        let all_promoters = Change::between(&tally(40, 0, 0), &tally(40, 0, 0));
        assert_eq!(all_promoters.z, Some(0.0));
        assert!(!all_promoters.significant(30));
        let flipped = Change::between(&tally(40, 0, 0), &tally(0, 0, 40));
        assert_eq!(flipped.z, None);
        assert!(flipped.significant(30));
    }

    #[test]
    fn response_rate_is_responses_per_invitation() {
        let mut t = tally(3, 1, 1);
        assert_eq!(t.response_rate(), None);
        t += Tally::invited(10);
        assert_eq!(t.response_rate(), Some(0.5));
        assert!(!t.is_empty() && !t.is_zero());
        assert!(Tally::invited(2).is_empty() && !Tally::invited(2).is_zero());
    }

    #[test]
    fn categories_follow_the_score_boundaries() {
        let categories: Vec<Category> = (0..=10)
            .map(|s| Score::new(s).expect("in range").category())
            .collect();
        use Category::*;
        assert_eq!(
            categories,
            [
                Detractor, Detractor, Detractor, Detractor, Detractor, Detractor, Detractor,
                Passive, Passive, Promoter, Promoter
            ]
        );
        assert_eq!(Score::new(11), None);
        assert_eq!(Score::new(-1), None);
        assert_eq!(Score::new(i64::MAX), None);
    }

    #[test]
    fn worked_example_20_50_30_gives_minus_10() {
        let t = tally(20, 50, 30);
        let nps = t.nps().expect("has responses");
        assert!((nps - -10.0).abs() < 1e-9, "nps was {nps}");
        assert_eq!(t.band(), Some(Band::Low));
    }

    #[test]
    fn margin_of_error_matches_the_formula() {
        // p = 0.2, d = 0.3, n = 100: variance = (0.5 - 0.01) / 100 = 0.0049, sd = 0.07.
        let ci = tally(20, 50, 30).ci95().expect("has responses");
        assert!((ci - 100.0 * 1.96 * 0.07).abs() < 1e-9, "ci was {ci}");
        // All promoters: no spread at all.
        assert_eq!(tally(5, 0, 0).ci95(), Some(0.0));
    }

    #[test]
    fn no_responses_means_no_nps() {
        let t = Tally::default();
        assert_eq!(t.nps(), None);
        assert_eq!(t.ci95(), None);
        assert_eq!(t.band(), None);
    }

    #[test]
    fn bands_have_inclusive_lower_edges() {
        assert_eq!(Band::of(50.0), Band::High);
        assert_eq!(Band::of(49.99), Band::Medium);
        assert_eq!(Band::of(30.0), Band::Medium);
        assert_eq!(Band::of(29.99), Band::Low);
        assert_eq!(Band::of(-100.0), Band::Low);
    }

    #[test]
    fn tallies_add_and_subtract() {
        let a = tally(1, 2, 3);
        let b = tally(10, 20, 30);
        assert_eq!(a + b, tally(11, 22, 33));
        assert_eq!(b - a, tally(9, 18, 27));
        assert_eq!(a - b, Tally::default());
    }
}
