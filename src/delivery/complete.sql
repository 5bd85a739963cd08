-- The recorder's fenced completions (`delivery::queries::complete`), in one statement: a delivery
-- whose lease this worker still holds moves from the hot table to history when it finished, or stays,
-- rescheduled, when it is to be tried again; the attempt rows and stored AuditEvents of those
-- deliveries (and of no other) are inserted, and a success forgets its subscription's final
-- failures. One statement, so that a batch costs one round trip whatever it holds (about 0.1 ms of
-- CPU per round trip on each side here, docs/performance.md run V). Runs in a transaction begun
-- with `RECORD_BEGIN` (`enable_seqscan = off`, `jit = off`): a lane that was empty when this
-- statement was planned (a truncated lane before autovacuum has analyzed it) would otherwise be read
-- whole at every completion. Pinned by the test
-- `storage::the_completions_plan_made_on_empty_lanes_never_scans_a_filled_lane`.
WITH c AS (
    SELECT * FROM unnest($1::int8[], $2::uuid[], $3::text[], $4::int4[], $5::int4[],
                         $6::timestamptz[], $7::text[], $8::int4[])
        AS c(id, lease_token, state, attempts, preamble_failures, next_attempt_at, reason,
             last_status)),
-- A delivery that finished leaves the hot table for history: one delete, one insert
-- (no update, no dead index entries left behind in the claim's indexes).
finished AS (
    -- `d.id = ANY ($1)` as well as the join: however the plan joins them, the hot
    -- table is read by those ids (an index lookup or one scan), never once per row.
    DELETE FROM fhir_outbox.unfinished_delivery d USING c
    WHERE d.id = ANY ($1) AND d.id = c.id AND d.lease_token = c.lease_token
      AND d.state = 'in_flight'
      AND c.state <> 'pending'
    RETURNING d.id, d.webhook_id, d.project_id, d.subscription_id, d.outbox_seq,
              d.resource_project_id, d.resource_type, d.resource_id, d.version_id,
              d.previous_version_id, d.interaction, d.changed_at, d.request_id,
              d.trace_id, d.matched_at, c.state, c.attempts,
              coalesce(c.next_attempt_at, d.next_attempt_at) AS next_attempt_at,
              c.reason, d.claims, c.preamble_failures,
              coalesce(c.last_status, d.last_status) AS last_status, d.replay,
              d.notification, d.event_number),
stored AS (
    INSERT INTO fhir_outbox.finished_delivery
        (id, webhook_id, project_id, subscription_id, outbox_seq, resource_project_id,
         resource_type, resource_id, version_id, previous_version_id, interaction,
         changed_at, request_id, trace_id, matched_at, state, attempts, next_attempt_at,
         finished_at, reason, claims, preamble_failures, last_status, replay,
         notification, event_number)
    SELECT id, webhook_id, project_id, subscription_id, outbox_seq, resource_project_id,
           resource_type, resource_id, version_id, previous_version_id, interaction,
           changed_at, request_id, trace_id, matched_at, state, attempts, next_attempt_at,
           now(), reason, claims, preamble_failures, last_status, replay, notification,
           event_number
    FROM finished
    RETURNING id),
rescheduled AS (
    UPDATE fhir_outbox.unfinished_delivery d
    SET state = 'pending', attempts = c.attempts, preamble_failures = c.preamble_failures,
        next_attempt_at = coalesce(c.next_attempt_at, d.next_attempt_at),
        reason = c.reason, last_status = coalesce(c.last_status, d.last_status),
        lease_token = NULL, lease_expires_at = NULL,
        lane = (SELECT current FROM fhir_outbox.delivery_lane)
    FROM c
    WHERE d.id = ANY ($1) AND d.id = c.id AND d.lease_token = c.lease_token
      AND d.state = 'in_flight' AND c.state = 'pending'
    RETURNING d.id, d.project_id, d.subscription_id),
written AS (
    SELECT id, project_id, subscription_id FROM finished
    UNION ALL
    SELECT id, project_id, subscription_id FROM rescheduled),
-- The AuditEvents as stored (`audit::StoredAuditEvent`), each in its delivery's project: one row
-- each, no outbox row, as `fhir_outbox.create_audit_events` stores them.
audited AS (
    INSERT INTO fhir_outbox.audit_event (project_id, id, recorded_at, content)
    SELECT w.project_id, e.id, e.recorded_at, e.content::json
    FROM unnest($17::int8[], $18::text[], $19::timestamptz[], $20::text[])
         AS e(delivery_id, id, recorded_at, content)
    JOIN written w ON w.id = e.delivery_id),
attempted AS (
    INSERT INTO fhir_outbox.delivery_attempt
        (delivery_id, project_id, subscription_id, attempt, started_at, duration_ms, succeeded,
         status, error, response_body, audit_event_id)
    SELECT a.delivery_id, w.project_id, w.subscription_id, a.attempt, a.started_at,
           a.duration_ms, a.succeeded, a.status, a.error, a.response_body, a.audit_event_id
    FROM unnest($9::int8[], $10::int4[], $11::timestamptz[], $12::int4[], $13::bool[],
                $14::int4[], $15::text[], $16::text[], $21::text[])
         AS a(delivery_id, attempt, started_at, duration_ms, succeeded, status, error,
              response_body, audit_event_id)
    JOIN written w ON w.id = a.delivery_id
    RETURNING project_id, subscription_id, succeeded),
-- Auto-disable counts final failures in a row: a success starts the count again (the final
-- failures of this batch are counted after this statement, in the same transaction).
cleared AS (
    DELETE FROM fhir_outbox.subscription_failure f
    USING (SELECT DISTINCT project_id, subscription_id FROM attempted WHERE succeeded) s
    WHERE f.project_id = s.project_id AND f.subscription_id = s.subscription_id)
SELECT id AS "id!" FROM stored
UNION ALL
SELECT id AS "id!" FROM rescheduled
