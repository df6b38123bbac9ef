//! How the command line reports a failure: the exit code by kind (sysexits: 64 `EX_USAGE`
//! for usage errors, clap's included, 78 `EX_CONFIG` for an invalid configuration, 1 for
//! anything at run time) and one readable line of causes, each said once, without Rust
//! names (librdkafka's error codes appear as their descriptions).

use std::error::Error;
use std::fmt;

use npsflow_runtime::config::ConfigErrors;

/// `EX_USAGE`: the command line was wrong.
pub const EX_USAGE: u8 = 64;
/// `EX_CONFIG`: the configuration is invalid.
pub const EX_CONFIG: u8 = 78;
/// Anything that went wrong at run time.
pub const EX_FAILURE: u8 = 1;

/// A command line npsflow cannot act on (beyond what clap checks).
#[derive(Debug)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Error for UsageError {}

/// The exit code of a clap parse error: 0 for help and version, 64 for the rest.
pub fn clap_exit_code(kind: clap::error::ErrorKind) -> u8 {
    use clap::error::ErrorKind;
    match kind {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => 0,
        _ => EX_USAGE,
    }
}

/// The exit code of a failed command, by the kind of its first recognised cause.
pub fn exit_code(error: &anyhow::Error) -> u8 {
    for cause in error.chain() {
        if cause.is::<ConfigErrors>() {
            return EX_CONFIG;
        }
        if cause.is::<UsageError>() {
            return EX_USAGE;
        }
    }
    EX_FAILURE
}

/// One line: every cause of `error` once, outermost first, joined by ": ". A cause whose
/// text its outer cause already says is left out; librdkafka's error codes read as their
/// descriptions.
pub fn render(error: &anyhow::Error) -> String {
    let chain: Vec<&(dyn Error + 'static)> = error.chain().collect();
    npsflow_runtime::readable::render_chain(&chain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::error::KafkaError;
    use rdkafka::types::RDKafkaErrorCode;

    #[test]
    fn exit_codes_by_kind() {
        let config = anyhow::Error::new(ConfigErrors(vec!["`topics.partitions`: bad".into()]));
        assert_eq!(exit_code(&config), EX_CONFIG);
        assert_eq!(exit_code(&config.context("loading the configuration")), 78);
        let usage = anyhow::Error::new(UsageError("unknown role".into()));
        assert_eq!(exit_code(&usage), EX_USAGE);
        let kafka = anyhow::Error::new(KafkaError::MetadataFetch(
            RDKafkaErrorCode::BrokerTransportFailure,
        ));
        assert_eq!(exit_code(&kafka), EX_FAILURE);
        assert_eq!(exit_code(&anyhow::anyhow!("anything else")), 1);
    }

    #[test]
    fn clap_usage_errors_exit_with_64_and_help_with_0() {
        use clap::error::ErrorKind;
        assert_eq!(clap_exit_code(ErrorKind::UnknownArgument), 64);
        assert_eq!(clap_exit_code(ErrorKind::InvalidValue), 64);
        assert_eq!(clap_exit_code(ErrorKind::MissingRequiredArgument), 64);
        assert_eq!(clap_exit_code(ErrorKind::InvalidSubcommand), 64);
        assert_eq!(clap_exit_code(ErrorKind::DisplayHelp), 0);
        assert_eq!(clap_exit_code(ErrorKind::DisplayVersion), 0);
    }

    #[test]
    fn the_kafka_error_chain_is_said_once_and_without_rust_names() {
        let error = anyhow::Error::new(npsflow_runtime::RuntimeError::Kafka(
            KafkaError::MetadataFetch(RDKafkaErrorCode::BrokerTransportFailure),
        ))
        .context("creating topics");
        let text = render(&error);
        assert_eq!(
            text,
            "creating topics: kafka: Meta data fetch error: Local: Broker transport failure"
        );
        assert!(!text.contains("BrokerTransportFailure"), "{text}");
        assert_eq!(
            text.matches("Broker transport failure").count(),
            1,
            "{text}"
        );
    }
}
