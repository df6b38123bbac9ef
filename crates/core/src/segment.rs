//! Customer segments: which segments a response counts in, and their canonical names.
//!
//! Every response counts in `all`, in `<dimension>=<value>` for each configured dimension it
//! carries, and in each configured combination it fully carries
//! (`product=sedan,region=east`, dimensions sorted by name). In values, `%`, `,` and `=` are
//! percent-encoded so that names are unambiguous. A cap on distinct values per dimension
//! keeps the number of segments (and of metric series) bounded: the first `cap` values seen
//! are kept, later new ones count as `<dimension>=__other__`. A real value spelled like the
//! reserved `__other__` is escaped (its first `_` as `%5F`: `region=%5F_other__`), so it keeps
//! a segment of its own and never merges with the overflow.
//!
//! Segments say nothing about time: each segment's counts are kept per window by
//! [`window`](crate::window), which counts the responses with `from <= responded_at < to`.

use rustc_hash::FxHashMap;
use std::fmt;
use std::fmt::Write as _;

use crate::response::SegmentEntry;

/// The segment every response counts in.
pub const ALL: &str = "all";
/// The value that stands for every value past a dimension's cap. A real value equal to it
/// is named `%5F_other__` (see [`encode_value`]).
pub const OTHER: &str = "__other__";

/// Which segments to keep: dimensions, combinations of them, and the per-dimension cap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentSpec {
    dimensions: Vec<String>,
    /// Each combination as indices into `dimensions`, in name order.
    combinations: Vec<Vec<usize>>,
    max_values_per_dimension: usize,
}

/// Why a segment spec is not usable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SegmentSpecError {
    /// A dimension name is empty or has characters other than `A-Za-z0-9_.-`.
    BadDimensionName(String),
    /// A dimension is listed twice.
    RepeatedDimension(String),
    /// A combination names a dimension that is not configured.
    UnknownDimension(String),
    /// A combination has fewer than two distinct dimensions.
    CombinationTooSmall(String),
    /// The cap is zero.
    ZeroCap,
}

impl fmt::Display for SegmentSpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SegmentSpecError::BadDimensionName(name) => write!(
                f,
                "dimension name {name:?} must be non-empty and use only A-Z a-z 0-9 _ . -"
            ),
            SegmentSpecError::RepeatedDimension(name) => {
                write!(f, "dimension {name:?} is listed twice")
            }
            SegmentSpecError::UnknownDimension(name) => write!(
                f,
                "combination uses dimension {name:?}, which is not in segments.dimensions"
            ),
            SegmentSpecError::CombinationTooSmall(combo) => write!(
                f,
                "combination {combo:?} needs at least two different dimensions"
            ),
            SegmentSpecError::ZeroCap => {
                f.write_str("segments.max_values_per_dimension must be at least 1")
            }
        }
    }
}

impl std::error::Error for SegmentSpecError {}

impl SegmentSpec {
    /// A spec from dimension names, combinations (each a list of dimension names) and the cap.
    pub fn new<S: AsRef<str>>(
        dimensions: &[S],
        combinations: &[Vec<S>],
        max_values_per_dimension: usize,
    ) -> Result<SegmentSpec, SegmentSpecError> {
        if max_values_per_dimension == 0 {
            return Err(SegmentSpecError::ZeroCap);
        }
        let mut names: Vec<String> = Vec::new();
        for name in dimensions.iter().map(AsRef::as_ref) {
            let valid = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
            if !valid {
                return Err(SegmentSpecError::BadDimensionName(name.to_owned()));
            }
            if names.iter().any(|n| n == name) {
                return Err(SegmentSpecError::RepeatedDimension(name.to_owned()));
            }
            names.push(name.to_owned());
        }
        names.sort();
        let mut combos: Vec<Vec<usize>> = Vec::new();
        for combo in combinations {
            let mut indices = combo
                .iter()
                .map(|name| {
                    let name = name.as_ref();
                    names
                        .iter()
                        .position(|n| n == name)
                        .ok_or_else(|| SegmentSpecError::UnknownDimension(name.to_owned()))
                })
                .collect::<Result<Vec<usize>, _>>()?;
            indices.sort_unstable();
            indices.dedup();
            if indices.len() < 2 {
                let shown: Vec<&str> = combo.iter().map(AsRef::as_ref).collect();
                return Err(SegmentSpecError::CombinationTooSmall(shown.join("+")));
            }
            if !combos.contains(&indices) {
                combos.push(indices);
            }
        }
        Ok(SegmentSpec {
            dimensions: names,
            combinations: combos,
            max_values_per_dimension,
        })
    }

    /// The configured dimensions, sorted by name.
    pub fn dimensions(&self) -> &[String] {
        &self.dimensions
    }

    /// The most distinct values kept per dimension.
    pub fn max_values_per_dimension(&self) -> usize {
        self.max_values_per_dimension
    }
}

/// A segment's canonical name as a small number, valid within one [`SegmentCatalog`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentId(pub u32);

/// Assigns responses to segments and remembers every segment name it has made.
///
/// Lookups on the hot path hash each dimension's value once; combinations are found by the
/// small indices of their values, so no name is built for a segment seen before.
#[derive(Debug, Clone)]
pub struct SegmentCatalog {
    spec: SegmentSpec,
    /// Per dimension: each admitted value, with its index and its segment.
    values: Vec<FxHashMap<String, DimensionValue>>,
    /// Per dimension: `__other__`, once a value past the cap has been seen.
    other: Vec<Option<DimensionValue>>,
    /// Per dimension: `dimension=value` of each value index, for naming combinations.
    pairs: Vec<Vec<String>>,
    /// Per combination: the value indices of its dimensions -> its segment.
    combinations: Vec<FxHashMap<Box<[u32]>, SegmentId>>,
    ids: FxHashMap<String, SegmentId>,
    names: Vec<String>,
    /// The value index of each dimension for the response being assigned.
    scratch_values: Vec<Option<u32>>,
    scratch_key: Vec<u32>,
}

#[derive(Debug, Clone, Copy)]
struct DimensionValue {
    index: u32,
    segment: SegmentId,
}

/// What assigning one response found out, beyond its segments.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Assignment {
    /// How many of the response's dimension values were past the cap and counted as
    /// `__other__`.
    pub overflowed_values: u32,
}

impl SegmentCatalog {
    /// An empty catalog for a spec; `all` is always segment 0.
    pub fn new(spec: SegmentSpec) -> SegmentCatalog {
        let dimensions = spec.dimensions.len();
        let mut catalog = SegmentCatalog {
            values: vec![FxHashMap::default(); dimensions],
            other: vec![None; dimensions],
            pairs: vec![Vec::new(); dimensions],
            combinations: vec![FxHashMap::default(); spec.combinations.len()],
            ids: FxHashMap::default(),
            names: Vec::new(),
            scratch_values: vec![None; dimensions],
            scratch_key: Vec::new(),
            spec,
        };
        catalog.intern(ALL.to_owned());
        catalog
    }

    /// The spec this catalog follows.
    pub fn spec(&self) -> &SegmentSpec {
        &self.spec
    }

    /// Replaces `out` with the segments a message carrying `segments` (a response's or an
    /// invitation's, sorted by key) counts in: `all` first, then single dimensions in name
    /// order, then combinations in configured order.
    pub fn assign(
        &mut self,
        segments: &[SegmentEntry<'_>],
        out: &mut Vec<SegmentId>,
    ) -> Assignment {
        out.clear();
        out.push(SegmentId(0));
        let mut assignment = Assignment::default();
        for dimension in 0..self.spec.dimensions.len() {
            let value = segments
                .binary_search_by(|(key, _)| key.as_ref().cmp(&self.spec.dimensions[dimension]))
                .ok()
                .map(|i| self.value(dimension, &segments[i].1, &mut assignment));
            self.scratch_values[dimension] = value.map(|v| v.index);
            out.extend(value.map(|v| v.segment));
        }
        for combination in 0..self.spec.combinations.len() {
            let mut key = std::mem::take(&mut self.scratch_key);
            key.clear();
            let complete = self.spec.combinations[combination]
                .iter()
                .all(|&d| self.scratch_values[d].map(|i| key.push(i)).is_some());
            if complete {
                out.push(self.combination(combination, &key));
            }
            self.scratch_key = key;
        }
        assignment
    }

    /// The value of one dimension, admitting it if the cap allows, else `__other__`.
    fn value(&mut self, dimension: usize, value: &str, report: &mut Assignment) -> DimensionValue {
        if let Some(found) = self.values[dimension].get(value) {
            return *found;
        }
        if self.values[dimension].len() < self.spec.max_values_per_dimension {
            let mut pair = self.spec.dimensions[dimension].clone();
            pair.push('=');
            encode_value(value, &mut pair);
            let made = self.new_value(dimension, pair);
            self.values[dimension].insert(value.to_owned(), made);
            return made;
        }
        report.overflowed_values += 1;
        match self.other[dimension] {
            Some(other) => other,
            None => {
                // The overflow's name is the only one spelled `<dimension>=__other__`: a real
                // value `__other__` is encoded as `%5F_other__`.
                let pair = format!("{}={OTHER}", self.spec.dimensions[dimension]);
                let made = self.new_value(dimension, pair);
                self.other[dimension] = Some(made);
                made
            }
        }
    }

    /// Makes the segment `pair` (`dimension=encoded value`) and the dimension's next index.
    fn new_value(&mut self, dimension: usize, pair: String) -> DimensionValue {
        let segment = self.intern(pair.clone());
        let pairs = &mut self.pairs[dimension];
        pairs.push(pair);
        DimensionValue {
            index: (pairs.len() - 1) as u32,
            segment,
        }
    }

    fn combination(&mut self, combination: usize, key: &[u32]) -> SegmentId {
        if let Some(id) = self.combinations[combination].get(key) {
            return *id;
        }
        let dimensions = &self.spec.combinations[combination];
        let name = dimensions
            .iter()
            .zip(key)
            .map(|(&d, &i)| self.pairs[d][i as usize].as_str())
            .collect::<Vec<_>>()
            .join(",");
        let id = self.intern(name);
        self.combinations[combination].insert(key.into(), id);
        id
    }

    /// The id of a name, made if new.
    fn intern(&mut self, name: String) -> SegmentId {
        if let Some(id) = self.ids.get(&name) {
            return *id;
        }
        let id = SegmentId(self.names.len() as u32);
        self.ids.insert(name.clone(), id);
        self.names.push(name);
        id
    }

    /// The canonical name of a segment made by this catalog.
    pub fn name(&self, id: SegmentId) -> &str {
        &self.names[id.0 as usize]
    }

    /// The id of a segment by canonical name, if this catalog has made it.
    pub fn id(&self, name: &str) -> Option<SegmentId> {
        self.ids.get(name).copied()
    }

    /// How many segments the catalog has made.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Always false: `all` exists from the start.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// Appends the canonical form of a real segment value to `out`: `%`, `,` and `=`
/// percent-encoded, and a value equal to the reserved [`OTHER`] with its first `_` encoded
/// (`%5F_other__`), so that no real value is ever named like the overflow.
pub fn encode_value(value: &str, out: &mut String) {
    let value = match value.strip_prefix('_') {
        Some(rest) if value == OTHER => {
            out.push_str("%5F");
            rest
        }
        _ => value,
    };
    for c in value.chars() {
        match c {
            '%' | ',' | '=' => {
                let _ = write!(out, "%{:02X}", c as u32);
            }
            _ => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::response::decode;

    fn response_with(segments: &str) -> String {
        format!(
            r#"{{"response_id":"r","score":5,"responded_at":"2026-01-01T00:00:00Z","customer_id":"c","segments":{segments}}}"#
        )
    }

    fn names(catalog: &mut SegmentCatalog, segments: &str) -> Vec<String> {
        let text = response_with(segments);
        let response = decode(text.as_bytes()).expect("valid");
        let mut ids = Vec::new();
        catalog.assign(&response.segments, &mut ids);
        ids.iter().map(|id| catalog.name(*id).to_owned()).collect()
    }

    fn spec(cap: usize) -> SegmentSpec {
        SegmentSpec::new(
            &["region", "product", "tier"],
            &[vec!["region", "product"]],
            cap,
        )
        .expect("valid spec")
    }

    #[test]
    fn responses_count_in_all_dimensions_and_full_combinations() {
        let mut catalog = SegmentCatalog::new(spec(10));
        assert_eq!(
            names(
                &mut catalog,
                r#"{"region":"east","product":"sedan","color":"red"}"#
            ),
            [
                "all",
                "product=sedan",
                "region=east",
                "product=sedan,region=east"
            ]
        );
        assert_eq!(
            names(&mut catalog, r#"{"region":"east"}"#),
            ["all", "region=east"]
        );
        assert_eq!(names(&mut catalog, "{}"), ["all"]);
    }

    #[test]
    fn values_are_encoded_unambiguously() {
        let mut catalog = SegmentCatalog::new(spec(10));
        assert_eq!(
            names(&mut catalog, r#"{"region":"a,b=c%d","product":"x"}"#),
            [
                "all",
                "product=x",
                "region=a%2Cb%3Dc%25d",
                "product=x,region=a%2Cb%3Dc%25d"
            ]
        );
    }

    #[test]
    fn values_past_the_cap_count_as_other() {
        let mut catalog = SegmentCatalog::new(spec(2));
        names(&mut catalog, r#"{"region":"east"}"#);
        names(&mut catalog, r#"{"region":"west"}"#);
        let text = response_with(r#"{"region":"north","product":"van"}"#);
        let response = decode(text.as_bytes()).expect("valid");
        let mut ids = Vec::new();
        let assignment = catalog.assign(&response.segments, &mut ids);
        assert_eq!(assignment.overflowed_values, 1);
        let got: Vec<&str> = ids.iter().map(|id| catalog.name(*id)).collect();
        assert_eq!(
            got,
            [
                "all",
                "product=van",
                "region=__other__",
                "product=van,region=__other__"
            ]
        );
        // Admitted values keep their own segment.
        assert_eq!(
            names(&mut catalog, r#"{"region":"east"}"#),
            ["all", "region=east"]
        );
        assert_eq!(catalog.id("region=east"), Some(SegmentId(1)));
    }

    #[test]
    fn a_real_value_named_like_the_overflow_keeps_its_own_segment() {
        let mut catalog = SegmentCatalog::new(spec(2));
        assert_eq!(
            names(&mut catalog, r#"{"region":"__other__","product":"van"}"#),
            [
                "all",
                "product=van",
                "region=%5F_other__",
                "product=van,region=%5F_other__"
            ]
        );
        names(&mut catalog, r#"{"region":"east"}"#);
        // Past the cap: the overflow is its own segment, never the real value's.
        assert_eq!(
            names(&mut catalog, r#"{"region":"west","product":"van"}"#),
            [
                "all",
                "product=van",
                "region=__other__",
                "product=van,region=__other__"
            ]
        );
        let real = catalog.id("region=%5F_other__").expect("made");
        let overflow = catalog.id("region=__other__").expect("made");
        assert_ne!(real, overflow);
        // The real value keeps counting in its own segment after the cap is reached.
        assert_eq!(
            names(&mut catalog, r#"{"region":"__other__"}"#),
            ["all", "region=%5F_other__"]
        );
        // Its encoding is unambiguous: the spelled-out `%5F_other__` is a different value.
        assert_eq!(
            names(
                &mut SegmentCatalog::new(spec(5)),
                r#"{"region":"%5F_other__"}"#
            ),
            ["all", "region=%255F_other__"]
        );
        // Only the exact reserved name is escaped.
        let mut encoded = String::new();
        for value in ["__other", "_other__", "__other__x", "x__other__"] {
            encoded.clear();
            encode_value(value, &mut encoded);
            assert_eq!(encoded, value);
        }
    }

    #[test]
    fn bad_specs_are_rejected() {
        assert_eq!(
            SegmentSpec::new(&["re gion"], &[], 5),
            Err(SegmentSpecError::BadDimensionName("re gion".into()))
        );
        assert_eq!(
            SegmentSpec::new(&["a", "a"], &[], 5),
            Err(SegmentSpecError::RepeatedDimension("a".into()))
        );
        assert_eq!(
            SegmentSpec::new(&["a"], &[vec!["a", "b"]], 5),
            Err(SegmentSpecError::UnknownDimension("b".into()))
        );
        assert_eq!(
            SegmentSpec::new(&["a"], &[vec!["a", "a"]], 5),
            Err(SegmentSpecError::CombinationTooSmall("a+a".into()))
        );
        assert_eq!(
            SegmentSpec::new::<&str>(&[], &[], 0),
            Err(SegmentSpecError::ZeroCap)
        );
    }
}
