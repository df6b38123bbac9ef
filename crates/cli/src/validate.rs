//! `npsflow validate FILE.jsonl`: decides each line of a file (or `-` for standard input) the
//! way the pipeline decodes a message, with the core's own decoder, and says per line whether
//! it is valid and, if not, the reason code (the `npsflow-error` dead-letter header) and
//! sentence.
//!
//! Survey responses (the default) are decided as the ingest role's first step decides them
//! ([`npsflow_core::repartition_key`]: the size limit, then
//! [`npsflow_core::response::decode`]); outcome events (`--format outcome`) as the followup
//! role does ([`npsflow_core::decode_outcome`]). Only the message's own content counts: a
//! valid response can still be a duplicate, too old or in the future once it meets the
//! pipeline's memory and clock.
//!
//! Output, one line per input line: `LINE<TAB>valid` or
//! `LINE<TAB>invalid<TAB>CODE<TAB>SENTENCE`; a summary goes to standard error. Exit codes
//! (BSD sysexits): 0 all valid, 1 some invalid, 64 usage error, 66 input not readable.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};

/// Exit code for input that cannot be read (sysexits' EX_NOINPUT).
pub const EXIT_NO_INPUT: u8 = 66;

/// Kafka's default `message.max.bytes`, the default of `topics.max_message_bytes`.
const DEFAULT_MAX_BYTES: usize = 1_048_588;

/// Options of `npsflow validate`.
#[derive(Args, Debug)]
pub struct ValidateArgs {
    /// A file with one message per line (JSON Lines), or `-` for standard input.
    file: PathBuf,
    /// What the lines are: survey responses (`survey.responses`) or follow-up outcome events
    /// (`npsflow.followup-outcomes`).
    #[arg(long, value_enum, default_value_t = Format::Response)]
    format: Format,
    /// The input topic's size limit (`topics.max_message_bytes`): a longer response is
    /// `too_large`, as in the pipeline.
    #[arg(long, default_value_t = DEFAULT_MAX_BYTES)]
    max_bytes: usize,
}

/// The message formats `npsflow validate` knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// A survey response.
    Response,
    /// A follow-up outcome event.
    Outcome,
}

/// The verdict on one message: `None` if valid, else its reason code and sentence.
pub fn verdict(format: Format, message: &[u8], max_bytes: usize) -> Option<(&'static str, String)> {
    match format {
        Format::Response => npsflow_core::repartition_key(message, max_bytes)
            .err()
            .map(|reason| (reason.code(), reason.to_string())),
        Format::Outcome => npsflow_core::decode_outcome(message)
            .err()
            .map(|reason| (reason.code(), reason.to_string())),
    }
}

/// How many lines were valid and invalid.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Valid lines.
    pub valid: u64,
    /// Invalid lines.
    pub invalid: u64,
}

/// Decides every line of `input` and writes one verdict line each to `out`. A line is the bytes
/// up to `\n` (not included); the last line need not end with one.
pub fn run_on(
    format: Format,
    max_bytes: usize,
    input: impl Read,
    mut out: impl Write,
) -> std::io::Result<Counts> {
    let mut reader = BufReader::new(input);
    let mut line = Vec::new();
    let mut counts = Counts::default();
    let mut number = 0u64;
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        number += 1;
        if line.last() == Some(&b'\n') {
            line.pop();
        }
        match verdict(format, &line, max_bytes) {
            None => {
                counts.valid += 1;
                writeln!(out, "{number}\tvalid")?;
            }
            Some((code, sentence)) => {
                counts.invalid += 1;
                writeln!(out, "{number}\tinvalid\t{code}\t{sentence}")?;
            }
        }
    }
    out.flush()?;
    Ok(counts)
}

/// Runs the command.
pub fn run(args: &ValidateArgs) -> ExitCode {
    let from_stdin = args.file.as_os_str() == "-";
    let input: Box<dyn Read> = if from_stdin {
        Box::new(std::io::stdin().lock())
    } else {
        match std::fs::File::open(&args.file) {
            Ok(file) => Box::new(file),
            Err(error) => {
                eprintln!("error: cannot read {}: {error}", args.file.display());
                return ExitCode::from(EXIT_NO_INPUT);
            }
        }
    };
    let stdout = std::io::stdout().lock();
    match run_on(
        args.format,
        args.max_bytes,
        input,
        std::io::BufWriter::new(stdout),
    ) {
        Ok(counts) => {
            eprintln!(
                "{} lines: {} valid, {} invalid",
                counts.valid + counts.invalid,
                counts.valid,
                counts.invalid
            );
            if counts.invalid == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::from(1),
        Err(error) => {
            let name = if from_stdin {
                "standard input".to_owned()
            } else {
                args.file.display().to_string()
            };
            eprintln!("error: cannot read {name}: {error}");
            ExitCode::from(EXIT_NO_INPUT)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decide(format: Format, input: &[u8]) -> (String, Counts) {
        let mut out = Vec::new();
        let counts = run_on(format, DEFAULT_MAX_BYTES, input, &mut out).expect("in memory");
        (String::from_utf8(out).expect("UTF-8"), counts)
    }

    #[test]
    fn each_line_gets_its_verdict_code_and_sentence() {
        let input = b"{\"response_id\":\"r\",\"score\":7,\"responded_at\":\"2026-11-22T12:00:00Z\",\"customer_id\":\"c\"}\n\
            {\"response_id\":\"r\",\"score\":11,\"responded_at\":\"2026-11-22T12:00:00Z\",\"customer_id\":\"c\"}\n\
            \n\
            {\"score\":1,\"score\":2}";
        let (out, counts) = decide(Format::Response, input);
        assert_eq!(
            out,
            "1\tvalid\n\
             2\tinvalid\tscore_out_of_range\tfield `score` must be 0..=10\n\
             3\tinvalid\tnot_json\tmessage is not JSON (syntax error at line 1, column 0)\n\
             4\tinvalid\tduplicate_field\tfield `score` appears more than once\n"
        );
        assert_eq!(
            counts,
            Counts {
                valid: 1,
                invalid: 3
            }
        );
    }

    #[test]
    fn a_crlf_line_is_the_same_message_and_bytes_are_kept() {
        let input = b"{\"response_id\":\"r\",\"score\":7,\"responded_at\":\"2026-11-22T12:00:00Z\",\"customer_id\":\"c\"}\r\n{\"response_id\":\"\xff\"}\n";
        let (out, _) = decide(Format::Response, input);
        assert_eq!(
            out,
            "1\tvalid\n2\tinvalid\tnot_utf8\tmessage is not UTF-8 (invalid byte at offset 16)\n"
        );
    }

    #[test]
    fn a_message_over_the_size_limit_is_too_large() {
        let line = br#"{"response_id":"r","score":7,"responded_at":"2026-11-22T12:00:00Z","customer_id":"c"}"#;
        let mut out = Vec::new();
        run_on(Format::Response, line.len() - 1, &line[..], &mut out).expect("in memory");
        let out = String::from_utf8(out).expect("UTF-8");
        assert!(out.starts_with("1\tinvalid\ttoo_large\t"), "{out}");
    }

    #[test]
    fn outcome_events_use_the_outcome_decoder() {
        let input = b"{\"event_id\":\"e\",\"case_id\":\"c\",\"type\":\"note\",\"occurred_at\":\"2026-11-24T09:30:00Z\"}\n\
            {\"event_id\":\"e\",\"case_id\":\"c\",\"type\":\"teleported\",\"occurred_at\":\"2026-11-24T09:30:00Z\"}\n";
        let (out, counts) = decide(Format::Outcome, input);
        assert_eq!(
            out,
            "1\tvalid\n2\tinvalid\tunknown_value\tfield type is not one of the allowed values\n"
        );
        assert_eq!(counts.invalid, 1);
    }

    #[test]
    fn an_empty_input_has_no_lines() {
        assert_eq!(
            decide(Format::Response, b""),
            (String::new(), Counts::default())
        );
    }
}
