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
        let n = n as f64;
        let p = self.promoters as f64 / n;
        let d = self.detractors as f64 / n;
        let variance = ((p + d - (p - d).powi(2)) / n).max(0.0);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn tally(promoters: u64, passives: u64, detractors: u64) -> Tally {
        Tally {
            promoters,
            passives,
            detractors,
        }
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
