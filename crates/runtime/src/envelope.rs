//! How a message travels from the input topic to the decide step and the dead-letter topic
//! without losing a byte: the envelope the repartition step wraps each valid message in
//! (source partition and offset, topic, key, headers, bytes, in the record's value), and the
//! dead letter rebuilt from it exactly as the message was received.

use npsflow_core::Source;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::Message;

use crate::kafka::Outgoing;

/// Header names on dead letters, forwarded messages and alerts.
pub mod headers {
    /// Machine-readable reason code.
    pub const ERROR: &str = "npsflow-error";
    /// Human-readable reason (never quotes the message).
    pub const ERROR_DETAIL: &str = "npsflow-error-detail";
    /// Topic the message came from.
    pub const SOURCE_TOPIC: &str = "npsflow-source-topic";
    /// Partition the message came from.
    pub const SOURCE_PARTITION: &str = "npsflow-source-partition";
    /// Offset of the message.
    pub const SOURCE_OFFSET: &str = "npsflow-source-offset";
    /// Size in bytes of a message dead-lettered without its value.
    pub const ORIGINAL_SIZE: &str = "npsflow-original-size";
    /// What a record on the followup role's internal topic is: `alert`, `outcome`, `notice`.
    pub const KIND: &str = "npsflow-kind";
}

/// The first bytes of a message wrapped for the repartition topic.
const ENVELOPE_MAGIC: &[u8] = b"NPF1";

/// A message as it was received on the input topic: where, its key, headers and bytes.
pub(crate) struct Received<'a> {
    pub(crate) topic: &'a str,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) key: Option<&'a [u8]>,
    /// The original headers, without the ones npsflow added when forwarding.
    pub(crate) headers: Vec<Header<'a, &'a [u8]>>,
    pub(crate) payload: Option<&'a [u8]>,
}

impl<'a> Received<'a> {
    /// A message read from the input topic itself.
    pub(crate) fn direct<M: Message>(message: &'a M) -> Received<'a> {
        Received {
            topic: message.topic(),
            partition: message.partition(),
            offset: message.offset(),
            key: message.key(),
            headers: message
                .headers()
                .map_or_else(Vec::new, |h| h.iter().collect()),
            payload: message.payload(),
        }
    }

    /// Appends the message wrapped for the repartition topic to `out`, so that it carries
    /// everything a dead letter needs: `NPF1`, source partition (i32) and offset (i64), source
    /// topic, key (or none), header count and headers, then the original bytes. Big-endian
    /// lengths; -1 stands for a null key, header value or payload. Kept in the value rather
    /// than in Kafka headers, which some brokers store at a high cost per header.
    pub(crate) fn write_envelope(&self, out: &mut Vec<u8>) {
        fn bytes(out: &mut Vec<u8>, value: Option<&[u8]>) {
            match value {
                Some(v) => {
                    out.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    out.extend_from_slice(v);
                }
                None => out.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        out.extend_from_slice(ENVELOPE_MAGIC);
        out.extend_from_slice(&self.partition.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
        bytes(out, Some(self.topic.as_bytes()));
        bytes(out, self.key);
        out.extend_from_slice(&(self.headers.len() as i32).to_be_bytes());
        for header in &self.headers {
            bytes(out, Some(header.key.as_bytes()));
            bytes(out, header.value);
        }
        bytes(out, self.payload);
    }

    /// The message inside an envelope (see [`Received::write_envelope`]), if it is one.
    pub(crate) fn from_envelope(envelope: &'a [u8]) -> Option<Received<'a>> {
        struct Reader<'a>(&'a [u8]);
        impl<'a> Reader<'a> {
            fn take(&mut self, n: usize) -> Option<&'a [u8]> {
                let (head, rest) = (self.0.get(..n)?, self.0.get(n..)?);
                self.0 = rest;
                Some(head)
            }
            fn i32(&mut self) -> Option<i32> {
                Some(i32::from_be_bytes(self.take(4)?.try_into().ok()?))
            }
            fn i64(&mut self) -> Option<i64> {
                Some(i64::from_be_bytes(self.take(8)?.try_into().ok()?))
            }
            fn bytes(&mut self) -> Option<Option<&'a [u8]>> {
                match self.i32()? {
                    -1 => Some(None),
                    n => Some(Some(self.take(usize::try_from(n).ok()?)?)),
                }
            }
            fn text(&mut self) -> Option<&'a str> {
                std::str::from_utf8(self.bytes()??).ok()
            }
        }
        let mut r = Reader(envelope.strip_prefix(ENVELOPE_MAGIC)?);
        let partition = r.i32()?;
        let offset = r.i64()?;
        let topic = r.text()?;
        let key = r.bytes()?;
        let count = usize::try_from(r.i32()?).ok()?;
        let mut headers = Vec::with_capacity(count.min(1024));
        for _ in 0..count {
            let key = r.text()?;
            let value = r.bytes()?;
            headers.push(Header { key, value });
        }
        let payload = r.bytes()?;
        r.0.is_empty().then_some(Received {
            topic,
            partition,
            offset,
            key,
            headers,
            payload,
        })
    }

    pub(crate) fn source(&self) -> Source {
        Source {
            partition: self.partition,
            offset: self.offset,
        }
    }

    /// The original headers followed by `extra` and the source coordinates.
    fn headers_with(&self, extra: &[(&str, &[u8])]) -> OwnedHeaders {
        let mut out = OwnedHeaders::new_with_capacity(self.headers.len() + extra.len() + 3);
        for header in &self.headers {
            out = out.insert(Header {
                key: header.key,
                value: header.value,
            });
        }
        for (key, value) in extra {
            out = out.insert(Header {
                key,
                value: Some(*value),
            });
        }
        source_headers(out, self.topic, self.partition, self.offset)
    }

    /// The dead letter of this message: its original key, bytes and headers, plus why and
    /// where it came from. Its fallback, used when it cannot be written whole, has no value
    /// and says the original size.
    pub(crate) fn dead_letter(&self, topic: &str, code: &str, detail: &str) -> Outgoing {
        let size = self.payload.map_or(0, <[u8]>::len).to_string();
        let without_value = Outgoing::new(
            topic,
            None,
            self.key.map(<[u8]>::to_vec),
            None,
            Some(self.headers_with(&[
                (headers::ERROR, code.as_bytes()),
                (headers::ERROR_DETAIL, detail.as_bytes()),
                (headers::ORIGINAL_SIZE, size.as_bytes()),
            ])),
        );
        Outgoing {
            fallback: Some(Box::new(without_value)),
            ..Outgoing::new(
                topic,
                None,
                self.key.map(<[u8]>::to_vec),
                self.payload.map(<[u8]>::to_vec),
                Some(self.headers_with(&[
                    (headers::ERROR, code.as_bytes()),
                    (headers::ERROR_DETAIL, detail.as_bytes()),
                ])),
            )
        }
    }
}

pub(crate) fn source_headers(
    base: OwnedHeaders,
    topic: &str,
    partition: i32,
    offset: i64,
) -> OwnedHeaders {
    base.insert(Header {
        key: headers::SOURCE_TOPIC,
        value: Some(topic),
    })
    .insert(Header {
        key: headers::SOURCE_PARTITION,
        value: Some(&partition.to_string()),
    })
    .insert(Header {
        key: headers::SOURCE_OFFSET,
        value: Some(&offset.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_envelope_carries_the_message_exactly() {
        let headers = vec![
            Header {
                key: "trace-id",
                value: Some(&b"abc"[..]),
            },
            Header {
                key: "empty",
                value: None,
            },
        ];
        for (key, payload) in [
            (Some(&b"cust-1"[..]), Some(&b"{\"response_id\":\"r\"}"[..])),
            (None, Some(&b""[..])),
            (Some(&b""[..]), None),
        ] {
            let original = Received {
                topic: "survey.responses",
                partition: 7,
                offset: 1 << 40,
                key,
                headers: headers.clone(),
                payload,
            };
            let mut envelope = Vec::new();
            original.write_envelope(&mut envelope);
            let back = Received::from_envelope(&envelope).expect("an envelope");
            assert_eq!(
                (
                    back.topic,
                    back.partition,
                    back.offset,
                    back.key,
                    back.payload
                ),
                (
                    original.topic,
                    original.partition,
                    original.offset,
                    original.key,
                    original.payload
                )
            );
            let pairs = |h: &[Header<'_, &[u8]>]| -> Vec<(String, Option<Vec<u8>>)> {
                h.iter()
                    .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                    .collect()
            };
            assert_eq!(pairs(&back.headers), pairs(&original.headers));
            // Anything cut short or with bytes left over is not an envelope.
            assert!(Received::from_envelope(&envelope[..envelope.len() - 1]).is_none());
            let mut longer = envelope.clone();
            longer.push(0);
            assert!(Received::from_envelope(&longer).is_none());
        }
        assert!(Received::from_envelope(b"{\"response_id\":1}").is_none());
    }
}
