//! The endpoint's reply body (network input, as the agent sees it) through the same parse and
//! check the uploader applies: it never panics, and a reply is accepted only for the gateway,
//! batch and record count it was sent for.
#![no_main]

use countersign_agent::pipeline::check_reply;
use countersign_protocol::BatchReply;
use libfuzzer_sys::fuzz_target;

const GATEWAY_ID: u64 = 7;
const BATCH_SEQ: u64 = 300;

fuzz_target!(|data: &[u8]| {
    let Some((&sent, body)) = data.split_first() else { return };
    let sent = usize::from(sent);
    if let Ok(reply) = serde_json::from_slice::<BatchReply>(body) {
        let ok = check_reply(&reply, GATEWAY_ID, BATCH_SEQ, sent).is_ok();
        assert_eq!(
            ok,
            reply.gateway_id == GATEWAY_ID && reply.batch_seq == BATCH_SEQ && reply.results.len() == sent
        );
    }
});
