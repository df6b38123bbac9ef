//! Fuzz target: decoding and classifying any bytes never panics, and whatever decodes
//! satisfies the contract's invariants (score in 0..=10, ids of 1..=128 characters).
#![no_main]

use libfuzzer_sys::fuzz_target;
use npsflow_core::{classify, decode, Clock, DuplicateFilter, Span, Timestamp, WindowSpecs};

fuzz_target!(|bytes: &[u8]| {
    if let Ok(response) = decode(bytes) {
        assert!(response.score.value() <= 10);
        let chars = response.response_id.chars().count();
        assert!((1..=128).contains(&chars));
        assert!(std::str::from_utf8(bytes).is_ok());
    }
    let windows = WindowSpecs::new(&["1h", "28d"], 60, Span::minutes(5)).expect("valid");
    let mut seen = DuplicateFilter::new(Span::days(1), 16);
    let _ = npsflow_core::repartition_key(bytes, 1 << 20);
    let _ = classify(
        bytes,
        0,
        Clock::Wall(Timestamp(1_795_348_800_000)),
        &windows,
        &mut seen,
    );
});
