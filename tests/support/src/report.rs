//! Meter reports for tests: any field set directly (including values a real meter would
//! never produce), encoded and tagged under a meter key as the firmware does. Knows the
//! report type of `countersign-meter`; knows nothing of how a report travels or is stored.

use countersign_meter::{DeviceTime, ExtraCounter, RecordId, Report, TimeQuality, Totals, REPORT_BYTES_MAX};

/// A report under construction. Unless set: epoch 0, no base totals, nothing used, no extra
/// counters.
#[derive(Clone, Debug)]
pub struct ReportBuilder {
    report: Report,
}

impl ReportBuilder {
    /// Report `seq` of meter `meter_id` on SIM `iccid`, made at device time `time`.
    pub fn new(meter_id: u64, seq: u32, iccid: u64, time: DeviceTime) -> Self {
        Self {
            report: Report {
                meter_id,
                epoch: 0,
                seq,
                iccid,
                time,
                base: Totals::default(),
                used: Totals::default(),
                extras: Default::default(),
            },
        }
    }

    /// The meter's boot epoch.
    pub fn epoch(mut self, epoch: u32) -> Self {
        self.report.epoch = epoch;
        self
    }

    /// Lifetime totals restored at the start of the epoch.
    pub fn base(mut self, up: u64, down: u64) -> Self {
        self.report.base = Totals { up, down };
        self
    }

    /// Bytes counted since the start of the epoch.
    pub fn used(mut self, up: u64, down: u64) -> Self {
        self.report.used = Totals { up, down };
        self
    }

    /// One more extra counter (kinds must be strictly increasing for the report to encode).
    pub fn extra(mut self, counter: ExtraCounter) -> Self {
        self.report.extras.push(counter).expect("room for another extra counter");
        self
    }

    /// The report as built.
    pub fn report(&self) -> &Report {
        &self.report
    }

    /// Its record id.
    pub fn id(&self) -> RecordId {
        self.report.id()
    }

    /// Its SIM.
    pub fn iccid(&self) -> u64 {
        self.report.iccid
    }

    /// The report's bytes, tagged under the meter's `key`.
    pub fn encode(&self, key: &[u8; 32]) -> Vec<u8> {
        let mut buf = [0u8; REPORT_BYTES_MAX];
        let n = self.report.encode(key, &mut buf).expect("the report encodes");
        buf[..n].to_vec()
    }
}

/// A device time from the network clock at `unix_s`.
pub fn network_time(unix_s: u64) -> DeviceTime {
    DeviceTime::wall_clock(TimeQuality::Network, unix_s).expect("a valid network time")
}

/// Seconds since the Unix epoch of an RFC 3339 time such as `2026-11-01T08:00:00Z`.
pub fn unix_s(at: &str) -> u64 {
    let t: jiff::Timestamp = at.parse().expect("an RFC 3339 time");
    u64::try_from(t.as_second()).expect("a time after 1970")
}

/// Seconds since the Unix epoch, now.
pub fn now_s() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("a clock after 1970").as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_built_is_what_decodes() {
        let b =
            ReportBuilder::new(7, 3, 8_988_280_666_000_000_001, network_time(unix_s("2026-11-24T12:00:00Z")))
                .epoch(2)
                .base(10, 20)
                .used(30, 40);
        let (decoded, _) = Report::decode(&b.encode(&[1; 32])).expect("decodes");
        assert_eq!(&decoded, b.report());
        assert_eq!(b.id(), RecordId { meter_id: 7, epoch: 2, seq: 3 });
        assert_eq!(decoded.time.unix_s(), Some(1_795_521_600));
    }
}
