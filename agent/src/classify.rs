//! Deciding what an MQTT payload on the report topic is. Pure: no IO, no clock.
//!
//! The agent holds no meter keys, so it cannot check tags; it checks everything else a
//! gateway can check — size, version, structure, and that the topic names the meter the
//! report claims to be from — so that garbage is kept aside instead of being forwarded.

use countersign_meter::report::{RecordId, Report, REPORT_BYTES_MAX};
use countersign_protocol::REPORT_TOPIC_PREFIX;

/// The verdict on one payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A well-formed report: buffer it under its record id.
    Report(RecordId),
    /// Not a usable report: quarantine it with this reason.
    Quarantine {
        /// Stable reason code.
        reason: &'static str,
        /// What exactly was wrong.
        detail: String,
    },
}

/// Classifies a publish received on `topic`. `true_len` is set when the payload was larger
/// than the agent's MQTT packet limit: the MQTT client then passed on only an excerpt, and
/// the publish is quarantined as `too_large` whatever the excerpt holds.
pub fn classify_publish(topic: &str, payload: &[u8], true_len: Option<usize>) -> Verdict {
    match true_len {
        Some(n) => Verdict::Quarantine {
            reason: "too_large",
            detail: format!(
                "payload is {n} bytes, over the agent's MQTT packet limit; only its first {} bytes were read",
                payload.len()
            ),
        },
        None => classify(topic, payload),
    }
}

/// Classifies a payload received on `topic`.
pub fn classify(topic: &str, payload: &[u8]) -> Verdict {
    let quarantine = |reason, detail: String| Verdict::Quarantine { reason, detail };
    let Some(meter) = topic.strip_prefix(REPORT_TOPIC_PREFIX) else {
        return quarantine("bad_topic", format!("topic '{topic}' is not under {REPORT_TOPIC_PREFIX}"));
    };
    let Ok(topic_meter) = meter.parse::<u64>() else {
        return quarantine("bad_topic", format!("topic level '{meter}' is not a meter id"));
    };
    if payload.len() > REPORT_BYTES_MAX {
        return quarantine(
            "too_long",
            format!("payload is {} bytes, a report is at most {REPORT_BYTES_MAX}", payload.len()),
        );
    }
    match Report::decode(payload) {
        Err(e) => quarantine(e.code(), e.to_string()),
        Ok((r, _)) if r.meter_id != topic_meter => quarantine(
            "topic_mismatch",
            format!("report from meter {} published under meter {topic_meter}", r.meter_id),
        ),
        Ok((r, _)) => Verdict::Report(r.id()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use countersign_meter::DeviceTime;
    use countersign_testkit::report::ReportBuilder;

    fn report(meter_id: u64) -> Vec<u8> {
        ReportBuilder::new(meter_id, 2, 8_988_280_666_000_000_001, DeviceTime::uptime(5).unwrap())
            .epoch(1)
            .used(10, 20)
            .encode(&[0u8; 32])
    }

    #[test]
    fn good_report() {
        assert_eq!(
            classify("countersign/v1/reports/5", &report(5)),
            Verdict::Report(RecordId { meter_id: 5, epoch: 1, seq: 2 })
        );
    }

    #[test]
    fn an_oversized_publish_is_too_large_whatever_its_excerpt() {
        let v = classify_publish("countersign/v1/reports/5", &report(5), Some(4 << 20));
        assert!(
            matches!(&v, Verdict::Quarantine { reason: "too_large", detail } if detail.contains("4194304")),
            "{v:?}"
        );
        assert_eq!(
            classify_publish("countersign/v1/reports/5", &report(5), None),
            classify("countersign/v1/reports/5", &report(5))
        );
    }

    #[test]
    fn bad_inputs_are_quarantined_with_reasons() {
        let reason = |t: &str, p: &[u8]| match classify(t, p) {
            Verdict::Quarantine { reason, .. } => reason,
            v => panic!("accepted {v:?}"),
        };
        assert_eq!(reason("countersign/v1/reports/6", &report(5)), "topic_mismatch");
        assert_eq!(reason("countersign/v1/reports/x", &report(5)), "bad_topic");
        assert_eq!(reason("other/5", &report(5)), "bad_topic");
        assert_eq!(reason("countersign/v1/reports/5", &[0u8; 5000]), "too_long");
        assert_eq!(reason("countersign/v1/reports/5", b"hello"), "too_short");
        let mut r = report(5);
        r[0] = 9;
        assert_eq!(reason("countersign/v1/reports/5", &r), "unknown_version");
    }
}
