-- Operations: what operators read and steer with plain SQL. The views and their columns are public
-- API: they stay stable (new columns may be added at the end).

-- A paused subscription keeps receiving deliveries (dispatch still enqueues them) but none is sent
-- until it is resumed. Unlike `status = off`, nothing is skipped or lost.
CREATE TABLE fhir_outbox.subscription_pause (
    project_id      uuid NOT NULL,
    subscription_id text NOT NULL,
    paused_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, subscription_id)
);

-- `fhir-outbox resend` writes an outbox row for the current version without a new version (Medplum's
-- $resend); it is marked, and may be restricted to one subscription.
ALTER TABLE fhir_outbox.outbox
    ADD COLUMN resend boolean NOT NULL DEFAULT false,
    ADD COLUMN resend_subscription_id text;

-- Final failures (deliveries that exhausted their attempts) per subscription, for auto-disable.
-- Any success deletes a subscription's rows.
CREATE TABLE fhir_outbox.subscription_failure (
    project_id      uuid NOT NULL,
    subscription_id text NOT NULL,
    failed_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX subscription_failure_by_subscription
    ON fhir_outbox.subscription_failure (project_id, subscription_id, failed_at);

-- Retention prunes finished rows by age.
CREATE INDEX delivery_finished ON fhir_outbox.delivery (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX outbox_dispatched ON fhir_outbox.outbox (dispatched_at) WHERE dispatched_at IS NOT NULL;

-- Delivery state per subscription (every current Subscription, with or without deliveries).
CREATE VIEW fhir_outbox.subscription_delivery_status AS
SELECT r.project_id,
       r.id                                           AS subscription_id,
       v.content ->> 'status'                         AS status,
       v.content -> 'channel' ->> 'type'              AS channel_type,
       v.content ->> 'criteria'                       AS criteria,
       (p.subscription_id IS NOT NULL)                AS paused,
       coalesce(d.pending, 0)                         AS pending,
       coalesce(d.in_flight, 0)                       AS in_flight,
       coalesce(d.succeeded, 0)                       AS succeeded,
       coalesce(d.skipped, 0)                         AS skipped,
       coalesce(d.failed, 0)                          AS failed,
       d.oldest_undelivered_at,
       now() - d.oldest_undelivered_at                AS oldest_undelivered_age,
       d.last_error,
       d.last_skip_reason,
       d.last_finished_at
FROM fhir_outbox.resource r
JOIN fhir_outbox.resource_version v USING (project_id, resource_type, id, version_id)
LEFT JOIN fhir_outbox.subscription_pause p ON p.project_id = r.project_id AND p.subscription_id = r.id
LEFT JOIN LATERAL (
    SELECT count(*) FILTER (WHERE x.state = 'pending')   AS pending,
           count(*) FILTER (WHERE x.state = 'in_flight') AS in_flight,
           count(*) FILTER (WHERE x.state = 'succeeded') AS succeeded,
           count(*) FILTER (WHERE x.state = 'skipped')   AS skipped,
           count(*) FILTER (WHERE x.state = 'failed')    AS failed,
           min(x.changed_at) FILTER (WHERE x.state IN ('pending', 'in_flight')) AS oldest_undelivered_at,
           (array_agg(x.reason ORDER BY x.id DESC)
                FILTER (WHERE x.state IN ('failed', 'pending') AND x.reason IS NOT NULL))[1] AS last_error,
           (array_agg(x.reason ORDER BY x.id DESC) FILTER (WHERE x.state = 'skipped'))[1] AS last_skip_reason,
           max(x.finished_at) AS last_finished_at
    FROM fhir_outbox.delivery x
    WHERE x.project_id = r.project_id AND x.subscription_id = r.id
) d ON true
WHERE r.resource_type = 'Subscription' AND NOT r.deleted;

-- The attempt log: one row per HTTP attempt. Join its AuditEvent with
--   JOIN fhir_outbox.resource_version e ON e.resource_type = 'AuditEvent' AND e.id = l.audit_event_id
CREATE VIEW fhir_outbox.delivery_attempt_log AS
SELECT a.id AS attempt_id, a.delivery_id, a.project_id, a.subscription_id,
       d.resource_type, d.resource_id, d.version_id, d.interaction, d.webhook_id,
       a.attempt, a.started_at, a.duration_ms, a.succeeded, a.status, a.error, a.response_body,
       a.audit_event_id
FROM fhir_outbox.delivery_attempt a
JOIN fhir_outbox.delivery d ON d.id = a.delivery_id;

-- Changes not yet dispatched, per project, and how far behind dispatch is.
CREATE VIEW fhir_outbox.outbox_backlog AS
SELECT project_id,
       count(*)                 AS undispatched,
       min(changed_at)          AS oldest_changed_at,
       now() - min(changed_at)  AS dispatch_lag
FROM fhir_outbox.outbox
WHERE dispatched_at IS NULL
GROUP BY project_id;
