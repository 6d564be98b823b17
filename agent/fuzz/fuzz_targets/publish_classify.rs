//! A publish on the report topic (device input: any topic, any payload, cut or not) through
//! the agent's classifier: it never panics, a cut publish is always quarantined as
//! `too_large`, and anything it accepts is a report of the meter the topic names.
#![no_main]

use countersign_agent::classify::{classify_publish, Verdict};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // [topic length][cut?][topic][payload]
    let [topic_len, cut, rest @ ..] = data else { return };
    let (topic, payload) = rest.split_at(usize::from(*topic_len).min(rest.len()));
    let topic = String::from_utf8_lossy(topic);
    let true_len = (cut & 1 == 1).then_some(payload.len().saturating_add(usize::from(*cut)));
    match classify_publish(&topic, payload, true_len) {
        Verdict::Report(id) => {
            assert!(true_len.is_none(), "a cut publish was accepted");
            let (report, _) = countersign_meter::Report::decode(payload).expect("accepted reports decode");
            assert_eq!(report.id(), id);
            let meter = topic.strip_prefix(countersign_protocol::REPORT_TOPIC_PREFIX).expect("report topic");
            assert_eq!(meter.parse::<u64>().ok(), Some(report.meter_id));
        }
        Verdict::Quarantine { reason, detail } => {
            assert!(!reason.is_empty() && !detail.is_empty());
            if true_len.is_some() {
                assert_eq!(reason, "too_large");
            }
        }
    }
});
