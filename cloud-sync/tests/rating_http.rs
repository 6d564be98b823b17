//! The rating routes over real HTTP: usage per day in a time zone, settlement, the ledger with
//! an adjustment after late data. Records go straight into the store (ingest is tested in
//! `http.rs`).
#![allow(clippy::unwrap_used)]

use countersign_cloud::client::{self, ClientError};
use countersign_cloud::usage::DateRange;
use countersign_cloud::{CloudConfig, Endpoint, Store};
use countersign_meter::{DeviceTime, Report, TimeQuality, Totals, REPORT_BYTES_MAX};
use countersign_protocol::keys::write_secret;
use time::macros::date;

const TOKEN: [u8; 32] = [0x5a; 32];
const SIM: u64 = 8_988_280_666_000_000_001;

fn insert(store: &Store, seq: u32, up: u64, at: &str) {
    let at_s = u64::try_from(at.parse::<jiff::Timestamp>().unwrap().as_second()).unwrap();
    let r = Report {
        meter_id: 1,
        epoch: 0,
        seq,
        iccid: SIM,
        time: DeviceTime::wall_clock(TimeQuality::Network, at_s).unwrap(),
        base: Totals::default(),
        used: Totals { up, down: 0 },
        extras: Default::default(),
    };
    let mut buf = [0u8; REPORT_BYTES_MAX];
    let n = r.encode(&[1u8; 32], &mut buf).unwrap();
    store.insert_record(r.id(), 1, at_s * 1000, &buf[..n]).unwrap();
}

#[tokio::test]
async fn zone_days_settlement_and_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin.token");
    write_secret(&token_file, &TOKEN).unwrap();
    let config = CloudConfig::new(dir.path().join("data"), &token_file);
    let endpoint = Endpoint::open(&config).unwrap();
    let countersign_cloud::StoreBackend::Sled(store) = endpoint.store().clone() else {
        panic!("Endpoint::open gives the embedded store");
    };
    // 23:30 UTC on 2026-01-10 is already 2026-01-11 in Berlin.
    insert(&store, 0, 100, "2026-01-10T12:00:00Z");
    insert(&store, 2, 300, "2026-01-10T23:30:00Z");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(endpoint.serve(listener, async move {
        let _ = stopped.await;
    }));
    let http = reqwest::Client::new();
    let token = hex::encode(TOKEN);

    let utc = client::usage_days(&http, &base, &token, "UTC", None, DateRange::default()).await.unwrap();
    assert_eq!(utc.days.len(), 1);
    let berlin = client::usage_days(&http, &base, &token, "Europe/Berlin", Some(SIM), DateRange::default())
        .await
        .unwrap();
    let days: Vec<_> = berlin.days.iter().map(|d| (d.date, d.up_bytes)).collect();
    assert_eq!(days, vec![(date!(2026 - 01 - 10), 100), (date!(2026 - 01 - 11), 200)]);
    let e = client::usage_days(&http, &base, &token, "Mars/Olympus", None, DateRange::default())
        .await
        .unwrap_err();
    assert!(matches!(&e, ClientError::Refused { status: 400, .. }), "{e}");

    // Both days ended long ago: a 48 h window closes them.
    let r = client::settle(&http, &base, &token, "Europe/Berlin", 48).await.unwrap();
    assert_eq!((r.settled, r.adjustments), (2, 0));
    let e = client::settle(&http, &base, &token, "UTC", 48).await.unwrap_err();
    assert!(matches!(&e, ClientError::Refused { status: 409, .. }), "{e}");

    // A late report of day 1 moves 50 bytes: booked as adjustments, settled figures unchanged.
    insert(&store, 1, 150, "2026-01-10T13:00:00Z");
    let r = client::settle(&http, &base, &token, "Europe/Berlin", 48).await.unwrap();
    assert_eq!((r.settled, r.adjustments), (0, 2));
    let ledger = client::usage_ledger(&http, &base, &token, Some(SIM), DateRange::default()).await.unwrap();
    assert_eq!(ledger.tz.as_deref(), Some("Europe/Berlin"));
    let view: Vec<_> = ledger
        .days
        .iter()
        .map(|d| {
            (
                d.settled_up_bytes,
                d.adjustments.iter().map(|a| a.delta_up_bytes).collect::<Vec<_>>(),
                d.booked_total_bytes,
            )
        })
        .collect();
    assert_eq!(view, vec![(100, vec![50], 150), (200, vec![-50], 150)]);
    let json = serde_json::to_value(&ledger.days[0]).unwrap();
    assert_eq!(json["iccid"], "8988280666000000001");
    assert_eq!(json["date"], "2026-01-10");

    let _ = stop.send(());
    task.await.unwrap().unwrap();
}
