-- Distributing the endpoint's schema on Citus: run once, as a superuser on the coordinator,
-- after the endpoint applied its migrations there. The one copy of these statements; the
-- reasons are in postgres.rs ("Running on Citus") and ARCHITECTURE.md.
-- schema_migrations stays a local coordinator table.

-- Migrations 1 and 2: registry and records.
SELECT create_reference_table('meters');
SELECT create_reference_table('gateways');
SELECT create_reference_table('api_tokens');
SELECT create_distributed_table('records', 'iccid');
SELECT create_distributed_table('record_ids', 'meter_id');

-- Migration 3: ledger and Lago outbox, co-located with the records they follow.
SELECT create_reference_table('ledger_meta');
SELECT create_distributed_table('ledger_settled', 'iccid', colocate_with => 'records');
SELECT create_distributed_table('ledger_adjustments', 'iccid', colocate_with => 'records');
SELECT create_distributed_table('lago_planned', 'iccid', colocate_with => 'records');
SELECT create_distributed_table('lago_outbox', 'iccid', colocate_with => 'records');
SELECT create_distributed_table('lago_epoch_max', 'meter_id', colocate_with => 'record_ids');

-- Migration 4: billing, every table keyed by customer first, co-located by customer.
SELECT create_distributed_table('billing_wallets', 'customer');
SELECT create_distributed_table('billing_debits', 'customer', colocate_with => 'billing_wallets');
SELECT create_distributed_table('billing_topups', 'customer', colocate_with => 'billing_wallets');
SELECT create_distributed_table('billing_alerts', 'customer', colocate_with => 'billing_wallets');

-- Migration 5: usage rollups. Buckets and faulty records per SIM, co-located with the
-- records; epoch tails per meter, co-located with the record ids (an epoch spans SIM swaps).
SELECT create_reference_table('rollup_meta');
SELECT create_distributed_table('rollup_buckets', 'iccid', colocate_with => 'records');
SELECT create_distributed_table('rollup_faulty', 'iccid', colocate_with => 'records');
SELECT create_distributed_table('epoch_tails', 'meter_id', colocate_with => 'record_ids');

-- Migration 7: SIM-days changed after settlement closed them, co-located with the records.
SELECT create_distributed_table('rollup_changed', 'iccid', colocate_with => 'records');

-- Migration 9: the Lago planner's queue of unplanned records, co-located with the records.
SELECT create_distributed_table('lago_pending', 'iccid', colocate_with => 'records');
